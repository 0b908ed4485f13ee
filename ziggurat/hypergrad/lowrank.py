"""A weight-shaped vector kept as thin factors: M = Σ_s Δ_sᵀ X_s + R.

The Hessian-vector products of ``factored_hessian`` return a linear layer's entry this way:
each term s pairs an n_s × in matrix X_s with an n_s × out matrix Δ_s, and R is a dense
rest (or None). One side of each term is *fixed* (a tensor of the graph of ∇_θ L_in, the
same in every product of one solve: a layer's input rows, or its output-gradient rows); the
other side varies. Terms are kept per *slot*, and two terms of one slot share their fixed
side, so a sum of them is one term whose varying sides add: a linear combination of any
number of products has no more rows than the graph has slots (rank ≤ 2n per ``F.linear``
call, plus the upper gradient's n). Krylov solvers (CG, Neumann) then never form an
out × in matrix.

Cost of the operations, for r rows in all: ``right_product`` / ``left_product`` of N rows
2·N·r·(in + out) multiply-adds (against N·in·out with the matrix), ``dot`` of two sums
r₁·r₂·(in + out), ``dense`` r·in·out. When r·(in + out) reaches in·out the factors are no
smaller than the matrix and the sum collapses into R (``add_``).
"""

from __future__ import annotations

import math
from collections.abc import Hashable

import torch
from torch import Tensor

#: a term: (X, Δ, whether X is the fixed side (else Δ is))
Term = tuple[Tensor, Tensor, bool]
Scalar = Tensor | float


class FactorSum:
    """M = Σ_s Δ_sᵀ X_s + R, an (out × in) matrix kept as factors (see the module doc).

    Terms are never written in place (sums make new tensors), so copies may share them.
    """

    __slots__ = ("device", "dtype", "rest", "shape", "terms")

    def __init__(self, terms: dict[Hashable, Term], rest: Tensor | None,
                 like: Tensor | FactorSum) -> None:
        """``like``: a tensor of M's shape, dtype and device (a parameter)."""
        self.terms = terms
        self.rest = rest
        self.shape: torch.Size = like.shape
        self.dtype: torch.dtype = like.dtype
        self.device: torch.device = like.device

    @classmethod
    def zeros(cls, like: Tensor | FactorSum) -> FactorSum:
        """The zero matrix shaped like ``like`` (no terms, no rest)."""
        return cls({}, None, like)

    @property
    def rows(self) -> int:
        """r, the number of factor rows over all terms."""
        return sum(x.shape[0] for x, _, _ in self.terms.values())

    def copy(self) -> FactorSum:
        """A new sum holding the same (never mutated) terms."""
        return FactorSum(dict(self.terms), self.rest, self)

    def dense(self) -> Tensor:
        """M as a matrix."""
        out = self.rest
        for x, d, _ in self.terms.values():
            out = d.t().mm(x) if out is None else out.addmm(d.t(), x)
        return torch.zeros(self.shape, dtype=self.dtype, device=self.device) if out is None else out

    def scaled(self, alpha: Scalar) -> FactorSum:
        """alpha · M (the varying side of each term is scaled)."""
        terms = {s: (x, d * alpha, True) if fx else (x * alpha, d, False)
                 for s, (x, d, fx) in self.terms.items()}
        rest = None if self.rest is None else self.rest * alpha
        return FactorSum(terms, rest, self)

    def add_(self, other: FactorSum | Tensor, alpha: Scalar = 1.0) -> FactorSum:
        """M += alpha · other (in place on this object, not on its tensors); returns self."""
        if isinstance(other, Tensor):
            self.rest = other * alpha if self.rest is None else self.rest + other * alpha
            return self
        for slot, (x, d, fx) in other.terms.items():
            mine = self.terms.get(slot)
            if mine is None:
                self.terms[slot] = (x, d * alpha, True) if fx else (x * alpha, d, False)
            elif fx:  # X fixed: the Δ sides add
                self.terms[slot] = (mine[0], mine[1] + d * alpha, True)
            else:
                self.terms[slot] = (mine[0] + x * alpha, mine[1], False)
        if other.rest is not None:
            self.add_(other.rest, alpha)
        out_features, in_features = self.shape
        if self.rows * (in_features + out_features) >= in_features * out_features:
            self.rest, self.terms = self.dense(), {}  # the factors no longer pay
        return self

    def _stacked(self) -> tuple[Tensor, Tensor] | None:
        if not self.terms:
            return None
        xs, ds = zip(*((x, d) for x, d, _ in self.terms.values()))
        return (xs[0], ds[0]) if len(xs) == 1 else (torch.cat(xs), torch.cat(ds))

    def right_product(self, rows: Tensor) -> Tensor:
        """rows Mᵀ for rows (N × in): Σ_s (rows X_sᵀ) Δ_s + rows Rᵀ."""
        out: Tensor | None = None
        stacked = self._stacked()
        if stacked is not None:
            out = rows.mm(stacked[0].t()).mm(stacked[1])
        if self.rest is not None:
            out = rows.mm(self.rest.t()) if out is None else out.addmm_(rows, self.rest.t())
        return rows.new_zeros(rows.shape[0], self.shape[0]) if out is None else out

    def left_product(self, rows: Tensor) -> Tensor:
        """rows M for rows (N × out): Σ_s (rows Δ_sᵀ) X_s + rows R."""
        out: Tensor | None = None
        stacked = self._stacked()
        if stacked is not None:
            out = rows.mm(stacked[1].t()).mm(stacked[0])
        if self.rest is not None:
            out = rows.mm(self.rest) if out is None else out.addmm_(rows, self.rest)
        return rows.new_zeros(rows.shape[0], self.shape[1]) if out is None else out

    def dot(self, other: FactorSum | Tensor) -> Tensor:
        """The Frobenius inner product <M, other> as a 0-dim tensor, from the factors (see
        ``dot_and_error`` for how far to trust it; ``linalg.dot`` checks)."""
        return self.dot_and_error(other)[0]

    def dot_and_error(self, other: FactorSum | Tensor) -> tuple[Tensor, Tensor]:
        """<M, other> from the factors, and an estimate of its rounding error.

        The factored product sums Gram entries (Δ_s·Δ'_t)(X_s·X'_t) whose rounding error is
        relative to the factors' sizes, not to the result: when the terms of a sum cancel
        (a Krylov residual r = v − αAp near convergence), the value can be all noise. Each
        Gram entry's error is taken as √k·ε·‖row‖‖row'‖ (k the summed length), which gives
        √k·ε·(aᵀ|G_X|a' + bᵀ|G_Δ|b') for row norms a (of Δ), b (of X); a dense part
        <R, T> adds √(numel)·ε·‖R‖‖T‖."""
        eps = torch.finfo(self.dtype).eps
        out_features, in_features = self.shape
        mine = self._stacked()
        total: Tensor | None = None
        error: Tensor | None = None

        def add(value: Tensor, err: Tensor) -> None:
            nonlocal total, error
            total = value if total is None else total + value
            error = err if error is None else error + err

        if isinstance(other, Tensor):
            if mine is not None:  # <Δᵀ X, T> = Σ Δ ⊙ (X Tᵀ)
                xt = mine[0].mm(other.t())
                add((xt * mine[1]).sum(),
                    math.sqrt(in_features) * eps * _row_norms(mine[1]).dot(_row_norms(mine[0]))
                    * torch.linalg.vector_norm(other))
            if self.rest is not None:
                add(*_dense_dot(self.rest, other, eps))
        else:
            theirs = other._stacked()
            if mine is not None and theirs is not None:
                g_d, g_x = mine[1].mm(theirs[1].t()), mine[0].mm(theirs[0].t())
                a, a2 = _row_norms(mine[1]), _row_norms(theirs[1])
                b, b2 = _row_norms(mine[0]), _row_norms(theirs[0])
                # (G_Δ sums over out: its error meets |G_X|; G_X's over in meets |G_Δ|)
                add((g_d * g_x).sum(),
                    eps * (math.sqrt(out_features) * a.dot(g_x.abs().mv(a2))
                           + math.sqrt(in_features) * b.dot(g_d.abs().mv(b2))))
            if other.rest is not None and mine is not None:
                add(*FactorSum(self.terms, None, self).dot_and_error(other.rest))
            if self.rest is not None:
                add(*other.dot_and_error(self.rest))
        if total is None or error is None:
            zero = torch.zeros((), dtype=self.dtype, device=self.device)
            return zero, zero
        return total, error


def _row_norms(m: Tensor) -> Tensor:
    return torch.linalg.vector_norm(m, dim=1)


def _dense_dot(x: Tensor, y: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """<x, y> of two matrices, and its rounding-error estimate √(numel)·ε·‖x‖‖y‖."""
    return (torch.vdot(x.reshape(-1), y.reshape(-1)),
            math.sqrt(x.numel()) * eps * torch.linalg.vector_norm(x)
            * torch.linalg.vector_norm(y))
