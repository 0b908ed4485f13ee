"""ziggurat: gradient-based multilevel optimization on PyTorch.

Write each level as a ``Problem`` (module, optimizer, data, ``training_step``), connect the
levels with u2l / l2u dependencies, and let the ``Engine`` run them; hypergradients through
each lower level are computed by its configured method (``Darts``, ``SAMA``, ``CG``,
``Neumann``, ``FixedPoint``).
"""

from __future__ import annotations

from . import checkpoint, logging, optim, registry, render, seeding, systems
from .config import Config, EngineConfig
from .engine import Engine
from .errors import ConfigError, GraphError, HypergradientError, ZigguratError
from .graph import ProgramGraph, build_graph, chain
from .hypergrad import (
    CG,
    SAMA,
    Darts,
    FixedPoint,
    HypergradMethod,
    InnerObjective,
    Neumann,
    register,
)
from .iterative import IterativeProblem
from .problem import ImplicitProblem, Problem
from .systems import distributed
from .unrolled import EvolutionStrategies, Forward, Reinforce, Reverse

__version__ = "0.1.0"

__all__ = [
    "CG",
    "SAMA",
    "Config",
    "ConfigError",
    "Darts",
    "Engine",
    "EngineConfig",
    "EvolutionStrategies",
    "FixedPoint",
    "Forward",
    "GraphError",
    "HypergradMethod",
    "HypergradientError",
    "ImplicitProblem",
    "InnerObjective",
    "IterativeProblem",
    "Neumann",
    "Problem",
    "ProgramGraph",
    "Reinforce",
    "Reverse",
    "ZigguratError",
    "__version__",
    "build_graph",
    "chain",
    "checkpoint",
    "distributed",
    "logging",
    "optim",
    "register",
    "registry",
    "render",
    "seeding",
    "systems",
]
