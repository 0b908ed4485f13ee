"""Conjugate gradient: x solves (H + δI) x = v, exact on a quadratic after dim(θ) steps.

Textbook CG (Hestenes & Stiefel) on tensor lists, one Hessian-vector product per
iteration, no host synchronisation unless ``tol`` is set. In exact mode the mixed product
rides along with those products (``solve_mixed``). Converges for H + δI positive
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
from .base import (
    Curvature,
    HypergradMethod,
    InnerObjective,
    MixedMode,
    takes_factored_vectors,
)
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
        mixed: "exact" (default via "auto"), "forward", "fd" or "auto". Exact mode is
            fused: each iteration's backward of <∇_θ L_in, p_k> goes to θ and λ together,
            giving H p_k and M p_k = ∂²_{λθ} L_in p_k at once, and the mixed product of
            x = Σ_k α_k p_k is Σ_k α_k M p_k: no separate backward for it.
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

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        x, _ = self._iterate(v, curvature, fused=False)
        assert x is not None
        return x

    def solve_mixed(
        self, objective: InnerObjective, v: TensorList, curvature: Curvature
    ) -> TensorList | None:
        """M x_K = Σ_k α_k M p_k with M = ∂²_{λθ} L_in, from the products of
        ``Curvature.hvp_and_mixed``: x_K = Σ_k α_k p_k is never formed, and no separate
        backward is taken for the mixed product (damping shifts H only, not M). A subclass
        that overrides ``solve`` is not fused."""
        if type(self).solve is not CG.solve:
            return None
        _, mx = self._iterate(v, curvature, fused=True)
        if mx is None:  # stopped before any product (v = 0): x = 0, checked as unfused
            return curvature.mixed(linalg.zeros_like(v))
        return mx

    def _iterate(
        self, v: TensorList, curvature: Curvature, fused: bool
    ) -> tuple[TensorList | None, TensorList | None]:
        """CG from x₀ = 0. Unfused: (x, None). Fused: (None, M x), with M x None when no
        product was taken; the graph of ∇_θ L_in is released after the last product."""
        x = None if fused else linalg.zeros_like(v)
        mx: TensorList | None = None
        r = linalg.clone(v)
        p = list(v)  # never written in place: each iteration makes a new p
        rr = linalg.dot(r, r)
        stop = None if self.tol is None else (self.tol * linalg.norm(v)) ** 2
        tiny = 100.0 * torch.finfo(rr.dtype).eps
        active = torch.ones((), dtype=torch.bool, device=rr.device)
        top_curvature = torch.zeros_like(rr)
        for k in range(self.iterations):
            if stop is not None and bool(rr <= stop):
                break
            last = k == self.iterations - 1
            if fused:
                ap, mp = curvature.hvp_and_mixed(p, retain=not last)
            else:
                ap, mp = curvature.hvp(p), None
            if self.damping:
                linalg.axpy_(self.damping, p, ap)
            pap = linalg.dot(p, ap)
            direction_curvature = linalg.safe_div(pap, linalg.dot(p, p))
            top_curvature = torch.maximum(top_curvature, direction_curvature)
            active = active & (pap > 0) & (direction_curvature > tiny * top_curvature)
            step = torch.where(active, linalg.safe_div(rr, pap), torch.zeros_like(rr))
            if mp is not None:
                if mx is None:
                    mx = linalg.scale(step, mp)
                else:
                    linalg.axpy_(step, mp, mx)
            if x is not None:
                linalg.axpy_(step, p, x)
            if last:  # the residual and next direction would go unused
                break
            linalg.axpy_(-step, ap, r)
            rr_new = linalg.dot(r, r)
            beta = linalg.safe_div(rr_new, rr)
            p = linalg.axpy(beta, p, r)
            rr = rr_new
        if fused:
            curvature.release()
        return x, mx


takes_factored_vectors(CG)
