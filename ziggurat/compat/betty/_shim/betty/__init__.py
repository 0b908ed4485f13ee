"""``import betty`` in a process started by a program run through
``python -m ziggurat.compat.betty``: becomes ziggurat's Betty layer."""

import sys

import ziggurat.compat.betty as _layer

if __name__ == "betty":
    sys.modules["betty"] = _layer
