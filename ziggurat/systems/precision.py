"""Mixed precision for a problem's own forward pass, and dynamic loss scaling for fp16.

* "fp32": no autocast.
* "bf16": ``torch.autocast`` with bfloat16 on the parameters' device (CPU or CUDA); no loss
  scaling is needed (bf16 has float32's exponent range).
* "fp16": ``torch.autocast`` with float16 and a dynamic loss scale: the loss is multiplied by
  s before differentiation, gradients are divided by s before anything else uses them
  (clipping, the hypergradient, the optimizer), and a step whose gradients overflow is
  skipped while s halves; after ``growth_interval`` finite steps s doubles (torch's
  GradScaler defaults).

Hypergradient evaluations (``full_precision``) always run with autocast off, so finite
differences and solver dot products are computed in the parameters' dtype.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context of ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "fp32":
        return nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def full_precision(device: torch.device) -> AbstractContextManager[Any]:
    """Autocast disabled on ``device`` (for hypergradient arithmetic)."""
    return torch.autocast(device_type=device.type, enabled=False)


class DynamicLossScaler:
    """Loss scale s for fp16: multiply before differentiating, divide after; on overflow
    skip the step and halve s; double s after ``growth_interval`` good steps."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000) -> None:
        self.scale = float(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.good_steps = 0

    def update(self, finite: bool) -> None:
        """Record whether the last step's gradients were finite and adapt the scale."""
        if finite:
            self.good_steps += 1
            if self.good_steps >= self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
        else:
            self.scale *= self.backoff_factor
            self.good_steps = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.good_steps = int(state["good_steps"])
