"""Small shims over PyTorch API differences between the versions ziggurat supports (>= 2.2)."""

from __future__ import annotations

import torch


def autocast_enabled(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` ("cpu", "cuda", ...).

    ``torch.is_autocast_enabled(device_type)`` exists from torch 2.4; before, the call took no
    argument (CUDA only) and CPU had ``torch.is_autocast_cpu_enabled()``.
    """
    try:
        return bool(torch.is_autocast_enabled(device_type))
    except TypeError:  # torch < 2.4
        if device_type == "cpu":
            return bool(torch.is_autocast_cpu_enabled())
        return device_type == "cuda" and bool(torch.is_autocast_enabled())
