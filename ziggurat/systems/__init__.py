"""Training systems shared by every problem: precision and loss scaling, gradient clipping."""

from __future__ import annotations

from .clipping import clip_by_total_norm
from .precision import PRECISIONS, DynamicLossScaler, autocast_for, full_precision

__all__ = [
    "PRECISIONS",
    "DynamicLossScaler",
    "autocast_for",
    "clip_by_total_norm",
    "full_precision",
]
