"""Shims over PyTorch API differences (``ziggurat.torch_compat``)."""

from __future__ import annotations

import pytest
import torch

from ziggurat.torch_compat import autocast_enabled, compiling


def test_autocast_enabled_follows_the_context() -> None:
    assert not autocast_enabled("cpu")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert autocast_enabled("cpu")
        assert not autocast_enabled("cuda")
    assert not autocast_enabled("cpu")


def test_autocast_enabled_on_the_torch_2_2_signature(monkeypatch: pytest.MonkeyPatch) -> None:
    """Before torch 2.4 ``is_autocast_enabled`` took no argument and meant CUDA; CPU had
    its own function. The shim answers the same through them."""
    def cuda_only() -> bool:  # the old signature: an argument raises TypeError
        return False

    # (patched only around our calls: torch.autocast itself calls the new signature)
    with monkeypatch.context() as old_api:
        old_api.setattr(torch, "is_autocast_enabled", cuda_only)
        assert not autocast_enabled("cpu") and not autocast_enabled("cuda")
    with torch.autocast("cpu", dtype=torch.bfloat16), monkeypatch.context() as old_api:
        old_api.setattr(torch, "is_autocast_enabled", cuda_only)
        assert autocast_enabled("cpu")
        assert not autocast_enabled("cuda") and not autocast_enabled("xpu")


def test_compiling_is_false_in_eager_and_true_under_compile() -> None:
    seen: list[bool] = []

    def f(x: torch.Tensor) -> torch.Tensor:
        seen.append(compiling())
        return x + 1

    f(torch.ones(1))
    torch.compile(f, backend="eager")(torch.ones(1))
    assert seen[0] is False and True in seen[1:]
