"""The files here are programs run through ``python -m ziggurat.compat.betty`` by
tests/test_compat_betty.py; pytest must not import them (they run at import)."""

collect_ignore_glob = ["*.py"]
