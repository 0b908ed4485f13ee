"""Hypergradient methods: one module each, one signature, resolved by name through a registry.

Every method is a frozen settings object; calling it as ``method(objective, v)`` returns
(dθ*/dλ)ᵀ v (sign included, see ``base``). ``resolve`` turns a ``type`` string or a method
object into a method object, so problems never import a method by name.
"""

from __future__ import annotations

from ..registry import REGISTRY, register, resolve
from .base import (
    Curvature,
    HypergradMethod,
    InnerObjective,
    fixed_randomness,
    mixed_finite_difference,
)
from .cg import CG
from .darts import Darts
from .fixed_point import FixedPoint
from .neumann import Neumann
from .sama import SAMA

for _cls in (Darts, SAMA, CG, Neumann, FixedPoint):
    register(_cls)


__all__ = [
    "CG",
    "REGISTRY",
    "SAMA",
    "Curvature",
    "Darts",
    "FixedPoint",
    "HypergradMethod",
    "InnerObjective",
    "Neumann",
    "fixed_randomness",
    "mixed_finite_difference",
    "register",
    "resolve",
]
