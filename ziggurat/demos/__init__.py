"""Runnable demonstration programs (``ziggurat demo [NAME]``), on data shipped by packages.

Every module here that defines ``NAME`` (the command-line name) and ``main(argv) -> int`` is
a demo; the first line of its docstring is its summary. Modules are imported only when
listed or run.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from types import ModuleType

DEFAULT = "reweighting"


def _modules() -> dict[str, ModuleType]:
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        name = getattr(module, "NAME", None)
        if isinstance(name, str) and callable(getattr(module, "main", None)):
            found[name] = module
    return dict(sorted(found.items()))


def demos() -> dict[str, tuple[str, Callable[[list[str]], int]]]:
    """Demo name -> (one-line summary, main)."""
    return {name: ((m.__doc__ or "").strip().splitlines()[0] if m.__doc__ else "", m.main)
            for name, m in _modules().items()}
