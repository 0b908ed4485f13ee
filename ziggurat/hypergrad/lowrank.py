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
        """The Frobenius inner product <M, other> as a 0-dim tensor."""
        mine = self._stacked()
        total: Tensor | None = None
        if isinstance(other, Tensor):
            if mine is not None:  # <Δᵀ X, T> = Σ Δ ⊙ (X Tᵀ)
                total = (mine[0].mm(other.t()) * mine[1]).sum()
            if self.rest is not None:
                part = torch.vdot(self.rest.reshape(-1), other.reshape(-1))
                total = part if total is None else total + part
        else:
            theirs = other._stacked()
            if mine is not None and theirs is not None:
                total = (mine[1].mm(theirs[1].t()) * mine[0].mm(theirs[0].t())).sum()
            if other.rest is not None and mine is not None:
                part = (mine[0].mm(other.rest.t()) * mine[1]).sum()
                total = part if total is None else total + part
            if self.rest is not None:
                part = other.dot(self.rest)
                total = part if total is None else total + part
        if total is None:
            return torch.zeros((), dtype=self.dtype, device=self.device)
        return total
