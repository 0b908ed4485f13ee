"""DARTS: identity base Jacobian, x = scale · v (no Hessian solve).

(dθ*/dλ)ᵀ v ≈ −scale · ∂²_{λθ} L_in · v. With ``scale`` equal to the lower learning rate
this is the formula of one unrolled SGD step (Liu et al., 2019), evaluated where every
method is, at the lower parameters *after* their step (the exact one-step derivative takes
it before the step: ``zg.Reverse`` on an ``IterativeProblem``); with the default
``scale=1`` it is the identity approximation H⁻¹ ≈ I used by Betty and SAMA.
The mixed product defaults to double backward; DARTS' central finite difference
(ε = fd_eps/‖x‖) is available with ``mixed="fd"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from ..validation import check_float
from . import linalg
from .base import Curvature, HypergradMethod, InnerObjective, MixedMode
from .linalg import TensorList


@dataclass(frozen=True)
class Darts(HypergradMethod):
    """Identity-preconditioned hypergradient (DARTS' second-order approximation).

    Args:
        scale: x = scale · v; set it to the lower learning rate for one-step DARTS.
        mixed: "exact" (default via "auto"; double backward) or "fd" (DARTS' central
            difference: faster, but wrong when the lower loss feeds a detached quantity
            back into itself, e.g. a weighting net fed the detached loss).
        fd_eps: finite-difference radius numerator, ε = fd_eps / ‖x‖ (DARTS uses 0.01).

    Example:
        >>> import torch, ziggurat as zg
        >>> theta = torch.tensor([1.0, 2.0], requires_grad=True)
        >>> lam = torch.tensor([0.5, 0.5], requires_grad=True)
        >>> obj = zg.InnerObjective([theta], [lam], lambda: 0.5 * (lam * theta**2).sum())
        >>> [g.round(decimals=4) for g in zg.Darts()(obj, [torch.ones(2)])]
        [tensor([-1., -2.])]
    """

    name: ClassVar[str] = "darts"
    default_mixed: ClassVar[Literal["exact", "fd"]] = "exact"
    uses_hessian: ClassVar[bool] = False

    scale: float = 1.0
    mixed: MixedMode = "auto"
    fd_eps: float = 0.01

    def __post_init__(self) -> None:
        check_float("Darts", "scale", self.scale, strict=True)
        self._check_mixed()

    def uniform_scale(self, objective: InnerObjective) -> float | None:
        return self.scale

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        return v if self.scale == 1.0 else linalg.scale(self.scale, v)
