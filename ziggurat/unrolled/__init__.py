"""Unrolled (iterative) differentiation: methods and helpers of IterativeProblem."""

from __future__ import annotations

from .methods import EvolutionStrategies, Forward, Reinforce, Reverse
from .reparam import use_parameters

__all__ = ["EvolutionStrategies", "Forward", "Reinforce", "Reverse", "use_parameters"]
