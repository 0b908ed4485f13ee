"""Errors raised by ziggurat. Each names the problem, the setting and the fix."""

from __future__ import annotations


class ZigguratError(Exception):
    """Base class of every error ziggurat raises on purpose."""


class ConfigError(ZigguratError, ValueError):
    """A configuration field holds a value that is not allowed."""

    def __init__(self, owner: str, field: str, value: object, allowed: str) -> None:
        self.owner = owner
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"{owner}.{field}={value!r} is not allowed: {allowed}")


class GraphError(ZigguratError, ValueError):
    """The problems and their dependencies do not form a valid multilevel program."""


class HypergradientError(ZigguratError, RuntimeError):
    """A hypergradient could not be computed, or came out NaN or infinite."""
