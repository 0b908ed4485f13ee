"""Fixed-point iteration x ← v + (I − αH) x, whose fixed point is x = H⁻¹ v / α.

Run on y = αx (Richardson, y ← y + α(v − H y)), optionally warm-started from the previous
call's solution, which tracks H⁻¹ v cheaply when θ and v change slowly between upper steps.
Converges when H is positive definite and 0 < α < 2/λ_max(H).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..validation import check_bool, check_float, check_int
from . import linalg
from .base import Curvature, HypergradMethod, InnerObjective, MixedMode
from .linalg import TensorList
from .richardson import richardson, step_size


@dataclass(frozen=True)
class FixedPoint(HypergradMethod):
    """Implicit hypergradient with H⁻¹ v from a (warm-started) fixed-point iteration.

    Args:
        iterations: Hessian-vector products per call.
        alpha: step α; None picks 1/λ̂_max(H) by power iteration (see ``Neumann``).
        warm_start: start from the previous solution for the same request (the same
            upper problem and path, ``InnerObjective.key``) instead of αv. From a cold start
            this method equals ``Neumann`` with the same settings.
        power_iterations, alpha_refresh: as for ``Neumann``.
        mixed, fd_eps: how the mixed product is computed. "auto" is "exact": one backward
            to λ only through the graph of ∇_θ L_in that the products built, measured
            cheaper than forward mode's dual forward (docs/methods.md).

    Example:
        >>> import torch, ziggurat as zg
        >>> theta = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> lam = torch.tensor([2.0, 2.0], requires_grad=True)
        >>> obj = zg.InnerObjective([theta], [lam], lambda: 0.5 * (lam * theta**2).sum())
        >>> zg.FixedPoint(iterations=5, alpha=0.5)(obj, [torch.ones(2)])  # exact: −θ/λ
        [tensor([-0.5000, -0.5000])]
    """

    name: ClassVar[str] = "fixed_point"
    default_mixed: ClassVar[Literal["exact", "fd"]] = "exact"

    iterations: int = 10
    alpha: float | None = None
    warm_start: bool = True
    power_iterations: int = 10
    alpha_refresh: int = 100
    mixed: MixedMode = "auto"
    fd_eps: float = 0.01

    def __post_init__(self) -> None:
        check_int("FixedPoint", "iterations", self.iterations, 1)
        check_bool("FixedPoint", "warm_start", self.warm_start)
        check_float("FixedPoint", "alpha", self.alpha, strict=True, allow_none=True)
        check_int("FixedPoint", "power_iterations", self.power_iterations, 1)
        check_int("FixedPoint", "alpha_refresh", self.alpha_refresh, 1)
        self._check_mixed()

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        alpha = step_size(
            objective, curvature, self.alpha, self.power_iterations, self.alpha_refresh,
            key="fixed_point",
        )
        # one warm start per request key (upper problem and path): each solves its own v
        solutions = objective.state.setdefault("fixed_point_solutions", {})
        previous = solutions.get(objective.key) if self.warm_start else None
        if previous is not None and not linalg.same_shapes(previous, v):
            previous = None
        y = richardson(curvature, v, alpha, self.iterations, start=previous)
        if self.warm_start:
            solutions[objective.key] = linalg.clone(y)
        return y
