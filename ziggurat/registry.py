"""Methods by name: the registry that lets a config say ``type="cg"`` without any problem
importing a method. Two families: ``implicit`` methods (used by ImplicitProblem: they see
the lower problem as an InnerObjective) and ``iterative`` methods (used by
IterativeProblem: they differentiate the unrolled optimization itself)."""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from .errors import ConfigError

Family = Literal["implicit", "iterative"]


class Method:
    """Base of every hypergradient method: a frozen settings object with a registry name."""

    name: ClassVar[str] = ""
    family: ClassVar[Family] = "implicit"


REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Register a method class under ``cls.name`` so configs can name it as ``type``."""
    if not cls.name:
        raise ConfigError(cls.__name__, "name", cls.name, "a non-empty registry name")
    REGISTRY[cls.name] = cls
    return cls


def resolve(method: str | Method, owner: str = "Config", **settings: Any) -> Method:
    """A method object from a registered name (with settings) or a method object as is."""
    if isinstance(method, Method):
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
