"""Linear algebra on lists of tensors (one tensor per parameter), without flattening.

Every vector here is a ``list[Tensor]`` shaped like a parameter list. Reductions return
0-dim tensors and never call ``.item()``, so solvers run without host synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

TensorList = list[Tensor]


def zeros_like(xs: Sequence[Tensor]) -> TensorList:
    """A list of zero tensors shaped like ``xs``."""
    return [torch.zeros_like(x) for x in xs]


def clone(xs: Sequence[Tensor]) -> TensorList:
    """Detached copies of ``xs``."""
    return [x.detach().clone() for x in xs]


def dot(xs: Sequence[Tensor], ys: Sequence[Tensor]) -> Tensor:
    """Σ_i <x_i, y_i> as a 0-dim tensor (in the dtype of the inputs)."""
    if len(xs) == 0:
        return torch.zeros(())
    return torch.stack([torch.vdot(x.reshape(-1), y.reshape(-1)) for x, y in zip(xs, ys)]).sum()


def norm(xs: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of the concatenation of ``xs`` as a 0-dim tensor."""
    if len(xs) == 0:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(xs))))


def _broadcast_alpha(alpha: Tensor, xs: Sequence[Tensor]) -> bool:
    """On CPU a 0-dim tensor alpha is broadcast by addcmul, so no alpha * x temporary is
    written (fresh θ-sized pages cost as much as the arithmetic there). On accelerators the
    multi-tensor kernels need equal shapes, so two of them (mul, add) are kept."""
    return len(xs) > 0 and xs[0].device.type == "cpu" and alpha.device.type == "cpu"


def axpy(alpha: Tensor | float, xs: Sequence[Tensor], ys: Sequence[Tensor]) -> TensorList:
    """Return y + alpha * x (new tensors; no host sync for a tensor alpha)."""
    if isinstance(alpha, Tensor):
        if _broadcast_alpha(alpha, xs):
            return list(torch._foreach_addcmul(list(ys), list(xs), [alpha] * len(xs)))
        return list(torch._foreach_add(list(ys), torch._foreach_mul(list(xs), alpha)))
    return list(torch._foreach_add(list(ys), list(xs), alpha=alpha))


def axpy_(alpha: Tensor | float, xs: Sequence[Tensor], ys: list[Tensor]) -> None:
    """y += alpha * x, in place (no temporary on CPU, see ``axpy``)."""
    if isinstance(alpha, Tensor):
        if _broadcast_alpha(alpha, xs):
            torch._foreach_addcmul_(ys, list(xs), [alpha] * len(xs))
        else:
            torch._foreach_add_(ys, torch._foreach_mul(list(xs), alpha))
    else:
        torch._foreach_add_(ys, list(xs), alpha=alpha)


def scale(alpha: Tensor | float, xs: Sequence[Tensor]) -> TensorList:
    """alpha * x (new tensors)."""
    return list(torch._foreach_mul(list(xs), alpha))


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
