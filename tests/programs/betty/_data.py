"""Deterministic float64 data and output helpers shared by the Betty-style programs and
their native twins (tests/test_compat_betty.py)."""

from __future__ import annotations

import json
import sys

import torch

DTYPE = torch.float64


def regression(seed: int = 0, n: int = 24, dim: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g, dtype=DTYPE)
    X = torch.randn(n, dim, generator=g, dtype=DTYPE)
    Xv = torch.randn(n, dim, generator=g, dtype=DTYPE)
    return {"X": X, "y": X @ w + 0.3 * torch.randn(n, generator=g, dtype=DTYPE),
            "Xv": Xv, "yv": Xv @ w + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)}


def noisy_labels(seed: int = 1, n: int = 32, dim: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(dim, generator=g, dtype=DTYPE)
    X = torch.randn(n, dim, generator=g, dtype=DTYPE)
    y = (X @ w > 0).to(DTYPE)
    flip = torch.rand(n, generator=g, dtype=DTYPE) < 0.3
    Xv = torch.randn(n // 2, dim, generator=g, dtype=DTYPE)
    return {"X": X, "y": torch.where(flip, 1 - y, y), "Xv": Xv, "yv": (Xv @ w > 0).to(DTYPE)}


def batches(*tensors: torch.Tensor, size: int) -> list[tuple[torch.Tensor, ...]]:
    n = tensors[0].shape[0]
    return [tuple(t[i:i + size] for t in tensors) for i in range(0, n, size)]


def linear(dim: int, out: int = 1, seed: int = 0, bias: bool = False) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(dim, out, bias=bias, dtype=DTYPE)


def save(path: str, problems: dict[str, torch.nn.Module]) -> None:
    """Final parameters of each problem's module, flattened, as JSON (exact floats)."""
    out = {name: [float(x) for p in m.parameters() for x in p.detach().reshape(-1)]
           for name, m in problems.items()}
    with open(path, "w") as f:
        json.dump(out, f)


def out_path() -> str:
    if len(sys.argv) != 2:
        raise SystemExit(f"usage: {sys.argv[0]} OUTPUT.json")
    return sys.argv[1]
