"""Betty (betty-ml 0.2.1) programs on ziggurat, unchanged.

Run a Betty program as it is::

    python -m ziggurat.compat.betty their_program.py --their-args

or, inside the program, replace ``import betty`` by ``import ziggurat.compat.betty as
betty``. Importing this package makes ``import betty`` and ``from betty.<module> import
...`` (engine, configs, problems, hypergradient, logging, utils) resolve here for the
rest of the process (``install()`` / ``uninstall()`` do it explicitly). See
docs/migrating_from_betty.md for what is kept, what is corrected and every difference.
"""

from __future__ import annotations

__version__ = "0.2.1"  # the Betty release whose API this layer provides

from . import configs, engine, hypergradient, logging, problems, utils
from ._redirect import install, shim_dir, uninstall
from .configs import Config, EngineConfig
from .engine import Engine
from .problems import ImplicitProblem, IterativeProblem, Problem

__all__ = [
    "Config",
    "Engine",
    "EngineConfig",
    "ImplicitProblem",
    "IterativeProblem",
    "Problem",
    "__version__",
    "configs",
    "engine",
    "hypergradient",
    "install",
    "logging",
    "problems",
    "shim_dir",
    "uninstall",
    "utils",
]

install()
