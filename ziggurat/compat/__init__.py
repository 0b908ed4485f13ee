"""Compatibility layers that run programs written for other libraries on ziggurat.

``ziggurat.compat.betty``: Betty (betty-ml 0.2.1) programs, unchanged; see
docs/migrating_from_betty.md.
"""
