"""Folder put on PYTHONPATH by ``python -m ziggurat.compat.betty``; see ``betty/``."""
