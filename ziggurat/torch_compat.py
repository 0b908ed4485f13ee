"""Small shims over PyTorch API differences between torch releases.

ziggurat requires torch >= 2.8 (the whole test suite passes on 2.8.0, 2.11.0, 2.13.0 and
2.14.1); the shims for older releases (< 2.4) are kept for a torch installed past pip's
requirement, and tested only by simulating the old signatures.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import cast

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


def _is_compiling_check() -> Callable[[], bool]:
    """``torch.compiler.is_compiling`` from torch 2.3; ``torch._dynamo.is_compiling`` before."""
    check = getattr(torch.compiler, "is_compiling", None)
    if check is None:  # torch < 2.3
        dynamo = importlib.import_module("torch._dynamo")
        check = dynamo.is_compiling
    return cast("Callable[[], bool]", check)


_IS_COMPILING = _is_compiling_check()


def compiling() -> bool:
    """Whether torch.compile is tracing the current code."""
    return bool(_IS_COMPILING())
