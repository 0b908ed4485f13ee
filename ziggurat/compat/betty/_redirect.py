"""Make ``import betty`` and ``import betty.<sub>`` resolve to ``ziggurat.compat.betty``.

``install()`` puts the layer's modules into ``sys.modules`` under Betty's names and a
finder first on ``sys.meta_path`` that answers every other ``betty.*`` name with a clear
ImportError (so a real Betty installed beside ziggurat is never half-mixed in).
``shim_dir()`` is a folder holding a ``betty`` package that does the same when imported;
the runner puts it first on PYTHONPATH so subprocesses resolve betty the same way.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

PACKAGE = "ziggurat.compat.betty"
#: Betty's public modules and the layer's module each is
SUBMODULES = ("engine", "configs", "problems", "hypergradient", "logging", "utils")


class _BettyFinder(importlib.abc.MetaPathFinder):
    """Refuses ``betty.*`` modules the layer does not provide, naming what it provides."""

    def find_spec(self, fullname: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname == "betty" or not fullname.startswith("betty."):
            return None
        if fullname in sys.modules:
            return None
        provided = ", ".join(f"betty.{s}" for s in SUBMODULES)
        raise ImportError(
            f"{fullname} is not provided by ziggurat's Betty compatibility layer (it provides "
            f"betty, {provided}); see docs/migrating_from_betty.md for the replacement",
            name=fullname,
        )


_FINDER = _BettyFinder()


def install() -> None:
    """Alias ``betty`` and its public submodules to the layer (idempotent)."""
    root = importlib.import_module(PACKAGE)
    sys.modules["betty"] = root
    for sub in SUBMODULES:
        module = importlib.import_module(f"{PACKAGE}.{sub}")
        sys.modules[f"betty.{sub}"] = module
        setattr(root, sub, module)
    if not any(f is _FINDER for f in sys.meta_path):
        sys.meta_path.insert(0, _FINDER)


def uninstall() -> None:
    """Remove the aliases and the finder."""
    for name in ["betty", *(f"betty.{s}" for s in SUBMODULES)]:
        module = sys.modules.get(name)
        if module is not None and module.__name__.startswith(PACKAGE):
            del sys.modules[name]
    sys.meta_path[:] = [f for f in sys.meta_path if f is not _FINDER]


def shim_dir() -> Path:
    """The folder holding the ``betty`` shim package (for PYTHONPATH)."""
    return Path(__file__).resolve().parent / "_shim"
