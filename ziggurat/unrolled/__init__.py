"""Unrolled (iterative) differentiation: methods and helpers of IterativeProblem."""

from __future__ import annotations

from .methods import EvolutionStrategies, Forward, Reverse
from .reparam import use_parameters

__all__ = ["EvolutionStrategies", "Forward", "Reverse", "use_parameters"]
