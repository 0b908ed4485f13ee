"""Linear algebra on lists of tensors (one tensor per parameter), without flattening.

Every vector here is a list shaped like a parameter list, each entry a tensor or, for a
linear layer's weight under the factored Hessian-vector products, a ``FactorSum`` (the
functions below take either; dense entries go through multi-tensor kernels). Reductions
return 0-dim tensors and never call ``.item()``, so solvers run without host
synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .lowrank import FactorSum

#: a vector: one entry per parameter (a ``FactorSum`` only where factored products made it)
TensorList = list[Tensor]


def _any_factored(*lists: Sequence[object]) -> bool:
    return any(isinstance(t, FactorSum) for xs in lists for t in xs)


def _dense_positions(xs: Sequence[object], ys: Sequence[object]) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(xs, ys))
            if not isinstance(x, FactorSum) and not isinstance(y, FactorSum)]


def same_shapes(xs: Sequence[Any], ys: Sequence[Any]) -> bool:
    """Whether two tensor lists have the same length and shapes, entry by entry."""
    return len(xs) == len(ys) and all(x.shape == y.shape for x, y in zip(xs, ys))


def zeros_like(xs: Sequence[Tensor]) -> TensorList:
    """A list of zero tensors shaped like ``xs``."""
    return [FactorSum.zeros(x) if isinstance(x, FactorSum) else torch.zeros_like(x) for x in xs]


def clone(xs: Sequence[Tensor]) -> TensorList:
    """Detached copies of ``xs``."""
    return [x.copy() if isinstance(x, FactorSum) else x.detach().clone()
            for x in xs]


def _dot1(x: Tensor | FactorSum, y: Tensor | FactorSum) -> Tensor:
    if isinstance(x, FactorSum):
        return x.dot(y)
    if isinstance(y, FactorSum):
        return y.dot(x)
    return torch.vdot(x.reshape(-1), y.reshape(-1))


#: the relative error, in units of the dtype's ε, that a dot product with factored entries
#: may carry (estimated, see ``FactorSum.dot_and_error``): past it the entries whose error
#: is too large are formed as matrices and multiplied as such
FACTORED_DOT_RTOL = 1e4


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Σ_i <x_i, y_i> as a 0-dim tensor (in the dtype of the inputs).

    Entries kept as factors are multiplied through their factors while the estimated
    rounding error of the sum stays below ``FACTORED_DOT_RTOL``·ε of its value, and as
    matrices where it would not (a solver's residual whose factored terms have cancelled:
    the factored value would be noise). That check is one host sync."""
    if len(xs) == 0:
        return torch.zeros(())
    if not _any_factored(xs, ys):
        return torch.stack([_dot1(x, y) for x, y in zip(xs, ys)]).sum()
    parts: list[Tensor] = []
    errors: dict[int, Tensor] = {}
    for i, (x, y) in enumerate(zip(xs, ys)):
        if isinstance(x, FactorSum) or isinstance(y, FactorSum):
            part, errors[i] = (x.dot_and_error(y) if isinstance(x, FactorSum)
                               else y.dot_and_error(x))
            parts.append(part)
        else:
            parts.append(_dot1(x, y))
    total = torch.stack(parts).sum()
    limit = FACTORED_DOT_RTOL * torch.finfo(total.dtype).eps * total.abs()
    estimates = torch.stack(list(errors.values()))
    if bool(estimates.sum() <= limit):
        return total
    share = limit / len(errors)  # each entry over its share of the allowance is formed
    for (i, _), over in zip(errors.items(), (estimates > share).tolist()):
        if over:
            parts[i] = torch.vdot(_matrix(xs[i]).reshape(-1), _matrix(ys[i]).reshape(-1))
    return torch.stack(parts).sum()


def _matrix(x: Tensor | FactorSum) -> Tensor:
    return x.dense() if isinstance(x, FactorSum) else x


def norm(xs: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of ``xs`` as a 0-dim tensor."""
    if len(xs) == 0:
        return torch.zeros(())
    if _any_factored(xs):
        return dot(xs, xs).clamp_min(0).sqrt()
    if len(xs) == 1:  # (one kernel instead of three)
        return torch.linalg.vector_norm(xs[0])
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(xs))))


def _broadcast_alpha(alpha: Tensor, xs: Sequence[Tensor]) -> bool:
    """On CPU a 0-dim tensor alpha is broadcast by addcmul, so no alpha * x temporary is
    written (fresh θ-sized pages cost as much as the arithmetic there). On accelerators the
    multi-tensor kernels need equal shapes, so two of them (mul, add) are kept."""
    return len(xs) > 0 and xs[0].device.type == "cpu" and alpha.device.type == "cpu"


def _mixed_axpy(alpha: Tensor | float, x: Tensor | FactorSum,
                y: Tensor | FactorSum) -> Tensor | FactorSum:
    """y + alpha * x for one entry pair of which at least one is a ``FactorSum``."""
    out = y.copy() if isinstance(y, FactorSum) else FactorSum({}, y, y)
    return out.add_(x, alpha)


def axpy(alpha: Tensor | float, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
    """Return y + alpha * x (new tensors; no host sync for a tensor alpha)."""
    if _any_factored(xs, ys):
        dense = _dense_positions(xs, ys)
        out: list[Any] = [None if i in dense else _mixed_axpy(alpha, x, y)
                          for i, (x, y) in enumerate(zip(xs, ys))]
        if dense:
            for i, t in zip(dense, axpy(alpha, [xs[i] for i in dense], [ys[i] for i in dense])):
                out[i] = t
        return out
    if isinstance(alpha, Tensor):
        if _broadcast_alpha(alpha, xs):
            return list(torch._foreach_addcmul(list(ys), list(xs), [alpha] * len(xs)))
        return list(torch._foreach_add(list(ys), torch._foreach_mul(list(xs), alpha)))
    return list(torch._foreach_add(list(ys), list(xs), alpha=alpha))


def axpy_(alpha: Tensor | float, xs: Sequence[Tensor], ys: list[Tensor]) -> None:
    """y += alpha * x, in place (no temporary on CPU, see ``axpy``); a ``FactorSum`` entry
    of y is updated in place, a tensor entry of y meeting a ``FactorSum`` is replaced."""
    if _any_factored(xs, ys):
        dense = _dense_positions(xs, ys)
        for i, (x, y) in enumerate(zip(xs, ys)):
            if i not in dense:
                entry: Any = (y.add_(x, alpha) if isinstance(y, FactorSum)
                              else _mixed_axpy(alpha, x, y))
                ys[i] = entry
        if dense:
            axpy_(alpha, [xs[i] for i in dense], [ys[i] for i in dense])
        return
    if isinstance(alpha, Tensor):
        if _broadcast_alpha(alpha, xs):
            torch._foreach_addcmul_(ys, list(xs), [alpha] * len(xs))
        else:
            torch._foreach_add_(ys, torch._foreach_mul(list(xs), alpha))
    else:
        torch._foreach_add_(ys, list(xs), alpha=alpha)


def scale(alpha: Tensor | float, xs: Sequence[Tensor]) -> TensorList:
    """alpha * x (new tensors)."""
    if _any_factored(xs):
        return [x.scaled(alpha) if isinstance(x, FactorSum) else x * alpha
                for x in xs]
    return list(torch._foreach_mul(list(xs), alpha))


def densify(xs: Sequence[Tensor]) -> TensorList:
    """``xs`` with every ``FactorSum`` formed as a matrix."""
    return [x.dense() if isinstance(x, FactorSum) else x for x in xs]


def all_finite(xs: Sequence[Tensor]) -> bool:
    """True when every entry of every tensor is finite (one host sync)."""
    if len(xs) == 0:
        return True
    return bool(torch.stack([torch.isfinite(x).all() for x in xs]).all())


def safe_div(num: Tensor, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (a converged solver then stops moving, not NaN)."""
    zero = torch.zeros_like(num)
    return torch.where(den != 0, num / torch.where(den != 0, den, torch.ones_like(den)), zero)


def power_iteration(
    matvec: Callable[[TensorList], TensorList],
    start: Sequence[Tensor],
    iterations: int,
) -> tuple[Tensor, TensorList]:
    """Estimate the largest eigenvalue of a symmetric PSD operator by power iteration.

    Returns the Rayleigh quotient <x, Ax>/<x, x> after ``iterations`` steps from ``start``
    (it approaches λ_max from below) and the last iterate, to restart from later.
    """
    x = list(start)
    estimate = torch.zeros((), dtype=x[0].dtype, device=x[0].device)
    for _ in range(iterations):
        nx = norm(x)
        x = scale(safe_div(torch.ones_like(nx), nx), x)
        ax = matvec(x)
        estimate = dot(x, ax)
        x = ax
    return estimate, x
