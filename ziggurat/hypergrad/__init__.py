"""Hypergradient methods: one module each, one signature, resolved by name through a registry.

Every method is a frozen settings object; calling it as ``method(objective, v)`` returns
(dθ*/dλ)ᵀ v (sign included, see ``base``). ``resolve`` turns a ``type`` string or a method
object into a method object, so problems never import a method by name.
"""

from __future__ import annotations

from typing import Any

from ..errors import ConfigError
from .base import Curvature, HypergradMethod, InnerObjective, mixed_finite_difference
from .cg import CG
from .darts import Darts
from .fixed_point import FixedPoint
from .neumann import Neumann
from .sama import SAMA

REGISTRY: dict[str, type[HypergradMethod]] = {}


def register(cls: type[HypergradMethod]) -> type[HypergradMethod]:
    """Register a method class under ``cls.name`` so configs can name it as ``type``."""
    if not cls.name:
        raise ConfigError(cls.__name__, "name", cls.name, "a non-empty registry name")
    REGISTRY[cls.name] = cls
    return cls


for _cls in (Darts, SAMA, CG, Neumann, FixedPoint):
    register(_cls)


def resolve(
    method: str | HypergradMethod, owner: str = "Config", **settings: Any
) -> HypergradMethod:
    """A method object from a registered name (with settings) or a method object as is."""
    if isinstance(method, HypergradMethod):
        if settings:
            raise ConfigError(
                owner, "type", method,
                f"a method object already carries its settings; drop {sorted(settings)}",
            )
        return method
    if not isinstance(method, str) or method not in REGISTRY:
        raise ConfigError(
            owner, "type", method,
            f"one of {sorted(REGISTRY)} or a method object such as zg.CG(iterations=20)",
        )
    return REGISTRY[method](**settings)


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
    "mixed_finite_difference",
    "register",
    "resolve",
]
