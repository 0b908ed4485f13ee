"""Gradient clipping by the total L2 norm, out of place (so it can sit inside an unroll)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def clip_by_total_norm(grads: Sequence[Tensor], max_norm: float) -> list[Tensor]:
    """g · min(1, max_norm / (‖g‖ + 1e-6)), the rule of torch.nn.utils.clip_grad_norm_.

    Out of place and differentiable; no host synchronisation.
    """
    if not grads:
        return []
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    factor = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    return [g * factor.to(g.dtype) for g in grads]
