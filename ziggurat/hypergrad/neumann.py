"""Neumann series: x = α Σ_{k=0}^{K} (I − αH)^k v ≈ H⁻¹ v.

Converges to H⁻¹ v as K → ∞ when 0 < α < 2/λ_max(H) and H is positive definite. When α is
not given it is chosen as 1/λ̂_max from a few power iterations (Betty's default α = 1
diverges silently whenever λ_max > 2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..validation import check_float, check_int
from .base import (
    Curvature,
    HypergradMethod,
    InnerObjective,
    MixedMode,
    takes_factored_vectors,
)
from .linalg import TensorList
from .richardson import richardson, step_size


@dataclass(frozen=True)
class Neumann(HypergradMethod):
    """Implicit hypergradient with H⁻¹ v approximated by K terms of the Neumann series.

    Args:
        iterations: K, the number of Hessian-vector products (terms after the first).
        alpha: series step α; None estimates λ_max(H) by power iteration and uses 1/λ̂.
        power_iterations: power-iteration steps per estimate of λ_max.
        alpha_refresh: re-estimate λ_max every this many calls (from the last power
            iterate, so the estimate sharpens over the run).
        mixed, fd_eps: how the mixed product is computed. "auto" is "exact": one backward
            to λ only through the graph of ∇_θ L_in that the products built, measured
            cheaper than forward mode's dual forward (docs/methods.md).

    Example:
        >>> import torch, ziggurat as zg
        >>> theta = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> lam = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> obj = zg.InnerObjective([theta], [lam], lambda: 0.5 * (lam * theta**2).sum())
        >>> zg.Neumann(iterations=3, alpha=0.5)(obj, [torch.ones(2)])
        [tensor([-0.9375, -0.9375])]
    """

    name: ClassVar[str] = "neumann"
    default_mixed: ClassVar[Literal["exact", "fd"]] = "exact"

    iterations: int = 10
    alpha: float | None = None
    power_iterations: int = 10
    alpha_refresh: int = 100
    mixed: MixedMode = "auto"
    fd_eps: float = 0.01

    def __post_init__(self) -> None:
        check_int("Neumann", "iterations", self.iterations, 0)
        check_float("Neumann", "alpha", self.alpha, strict=True, allow_none=True)
        check_int("Neumann", "power_iterations", self.power_iterations, 1)
        check_int("Neumann", "alpha_refresh", self.alpha_refresh, 1)
        self._check_mixed()

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        alpha = step_size(
            objective, curvature, self.alpha, self.power_iterations, self.alpha_refresh,
            key="neumann",
        )
        return richardson(curvature, v, alpha, self.iterations)


takes_factored_vectors(Neumann)
