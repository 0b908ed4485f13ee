"""Conjugate gradient: x solves (H + δI) x = v, exact on a quadratic after dim(θ) steps.

Textbook CG (Hestenes & Stiefel) on tensor lists, one Hessian-vector product per
iteration, no host synchronisation unless ``tol`` is set. Converges for H + δI positive
definite; H must be symmetric (true for a Hessian).

Breakdown guard (as in Steihaug's truncated CG): the iteration stops moving at the first
search direction p whose curvature pᵀ(H + δI)p / pᵀp is not positive or is below
100·eps(dtype) times the largest curvature seen. That happens when H is indefinite, or
singular with v reaching its null space (the upper loss reads lower parameters that L_in
does not use); the iterate then is the solution on the well-curved subspace instead of an
overflowing one. No host sync: the stop is a mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from ..validation import check_float, check_int
from . import linalg
from .base import Curvature, HypergradMethod, InnerObjective, MixedMode
from .linalg import TensorList


@dataclass(frozen=True)
class CG(HypergradMethod):
    """Implicit hypergradient with x = (H + damping·I)⁻¹ v by conjugate gradient.

    Args:
        iterations: CG iterations (Hessian-vector products). Exact in exact arithmetic
            after dim(θ) iterations on a quadratic lower loss.
        damping: δ >= 0 added to the Hessian's diagonal (regularises an indefinite or
            singular H; biases the answer by O(δ)).
        tol: stop early when ‖r‖ <= tol·‖v‖ (costs one host sync per iteration); None runs
            every iteration.
        mixed: "exact" (default via "auto"), "fd" or "auto".
        fd_eps: finite-difference radius numerator when mixed="fd".

    Example:
        >>> import torch, ziggurat as zg
        >>> theta = torch.tensor([1.0, 1.0], requires_grad=True)
        >>> lam = torch.tensor([2.0, 4.0], requires_grad=True)
        >>> obj = zg.InnerObjective([theta], [lam], lambda: 0.5 * (lam * theta**2).sum())
        >>> zg.CG(iterations=2)(obj, [torch.ones(2)])  # −diag(θ) diag(λ)⁻¹ v
        [tensor([-0.5000, -0.2500])]
    """

    name: ClassVar[str] = "cg"
    default_mixed: ClassVar[Literal["exact", "fd"]] = "exact"

    iterations: int = 10
    damping: float = 0.0
    tol: float | None = None
    mixed: MixedMode = "auto"
    fd_eps: float = 0.01

    def __post_init__(self) -> None:
        check_int("CG", "iterations", self.iterations, 1)
        check_float("CG", "damping", self.damping)
        check_float("CG", "tol", self.tol, strict=True, allow_none=True)
        self._check_mixed()

    def _operator(self, curvature: Curvature, p: TensorList) -> TensorList:
        hp = curvature.hvp(p)
        if self.damping:
            linalg.axpy_(self.damping, p, hp)
        return hp

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        x = linalg.zeros_like(v)
        r = linalg.clone(v)
        p = linalg.clone(v)
        rr = linalg.dot(r, r)
        stop = None if self.tol is None else (self.tol * linalg.norm(v)) ** 2
        tiny = 100.0 * torch.finfo(rr.dtype).eps
        active = torch.ones((), dtype=torch.bool, device=rr.device)
        top_curvature = torch.zeros_like(rr)
        for _ in range(self.iterations):
            if stop is not None and bool(rr <= stop):
                break
            ap = self._operator(curvature, p)
            pap = linalg.dot(p, ap)
            direction_curvature = linalg.safe_div(pap, linalg.dot(p, p))
            top_curvature = torch.maximum(top_curvature, direction_curvature)
            active = active & (pap > 0) & (direction_curvature > tiny * top_curvature)
            step = torch.where(active, linalg.safe_div(rr, pap), torch.zeros_like(rr))
            linalg.axpy_(step, p, x)
            linalg.axpy_(-step, ap, r)
            rr_new = linalg.dot(r, r)
            beta = linalg.safe_div(rr_new, rr)
            p = linalg.axpy(beta, p, r)
            rr = rr_new
        return x
