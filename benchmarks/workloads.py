"""Shared pieces of the benchmark suite: the reweighting workload, timers, memory probes,
and the optional peer libraries (each one None when it is not installed).

The reweighting structure (Meta-Weight-Net): a classifier MLP 512-h-h-10 is trained on
mean_i w_i · ℓ_i with w = V(ℓ.detach()), V a 1-100-1 sigmoid MLP (the meta net); V is
trained on the classifier's plain cross-entropy on a clean meta batch. Batch 64 on both
levels, one lower step per upper step (unroll 1).
"""

from __future__ import annotations

import importlib
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

import torch
import torch.nn.functional as F

#: hidden width h of the 512-h-h-10 classifier for each nominal size
SIZES: dict[str, int] = {"2M": 1190, "8M": 2578, "32M": 5401}
BATCH = 64
INPUT = 512
CLASSES = 10


def optional(module: str) -> ModuleType | None:
    """Import a peer library, or None (with the reason kept in ``MISSING``) when absent."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or a compiled extension that does not load
        MISSING[module] = f"{type(err).__name__}: {err}"
        return None


MISSING: dict[str, str] = {}

#: --no-deps keeps torch as it is; TorchOpt 0.7.3 imports optree and graphviz (the Python
#: package, for torchopt.visual) at import time
BENCH_INSTALL = (
    "pip install --no-deps --ignore-requires-python betty-ml==0.2.1 higher==0.2.1 "
    "torchopt==0.7.3 optree graphviz"
)


def skip_message(peer: str) -> str:
    return (f"skipped {peer}: not importable ({MISSING.get(peer, 'not installed')}); "
            f"install the optional peers with: {BENCH_INSTALL}")


@dataclass
class Workload:
    """Models, optimizers and fixed batches of one reweighting configuration."""

    classifier: torch.nn.Module
    meta: torch.nn.Module
    x: torch.Tensor
    y: torch.Tensor
    xm: torch.Tensor
    ym: torch.Tensor

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.classifier.parameters())


def classifier(hidden: int) -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Linear(INPUT, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
        torch.nn.ReLU(), torch.nn.Linear(hidden, CLASSES))


def meta_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(1, 100), torch.nn.ReLU(),
                               torch.nn.Linear(100, 1), torch.nn.Sigmoid())


def workload(hidden: int, device: str, seed: int = 0) -> Workload:
    torch.manual_seed(seed)
    dev = torch.device(device)
    return Workload(
        classifier(hidden).to(dev), meta_net().to(dev),
        torch.randn(BATCH, INPUT, device=dev), torch.randint(0, CLASSES, (BATCH,), device=dev),
        torch.randn(BATCH, INPUT, device=dev), torch.randint(0, CLASSES, (BATCH,), device=dev))


def lower_optimizer(kind: str, params: object) -> torch.optim.Optimizer:
    """"sgd": SGD with momentum 0.9, lr 0.1; "adam": Adam, lr 1e-3."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=1e-3)  # type: ignore[arg-type]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9)  # type: ignore[arg-type]


def weighted_loss(model: torch.nn.Module, meta: torch.nn.Module, x: torch.Tensor,
                  y: torch.Tensor) -> torch.Tensor:
    """mean_i V(ℓ_i.detach()) · ℓ_i."""
    losses = F.cross_entropy(model(x), y, reduction="none")
    weights = meta(losses.detach().unsqueeze(1)).squeeze(1)
    return (weights * losses).mean()


def optimizer_steps(loss: Callable[[], torch.Tensor], params: tuple[torch.Tensor, ...],
                    opt: torch.optim.Optimizer, steps: int = 1) -> tuple[torch.Tensor, ...]:
    """``steps`` steps of ``opt`` on loss() (grad mode on: TorchOpt's ``custom_root`` runs
    its solver inside an autograd.Function), returning the parameters detached: the lower
    solver of the TorchOpt programs."""
    with torch.enable_grad():
        for _ in range(steps):
            grads = torch.autograd.grad(loss(), params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
    return tuple(p.detach() for p in params)


def plain_step_fn(w: Workload, kind: str) -> Callable[[], None]:
    """A plain training step of the classifier (its own optimizer of the same kind)."""
    opt = lower_optimizer(kind, w.classifier.parameters())

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(w.classifier(w.x), w.y).backward()
        opt.step()

    return step


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def interleaved_medians(fns: list[Callable[[], None]], repeats: int, device: str,
                        warmup: int = 1) -> list[float]:
    """Median seconds of each function, timed in alternation (so that load from other
    processes hits them alike)."""
    return [statistics.median(t) for t in interleaved_times(fns, repeats, device, warmup)]


def median_ratios(times: list[list[float]]) -> list[float]:
    """For each function, the median over rounds of its time / the first function's time in
    the same round (robust to load that changes between rounds)."""
    return [statistics.median(a / b for a, b in zip(t, times[0])) for t in times]


def interleaved_times(fns: list[Callable[[], None]], repeats: int, device: str,
                      warmup: int = 1) -> list[list[float]]:
    """Seconds of each function in each of ``repeats`` rounds, timed in alternation."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            bucket.append(time.perf_counter() - start)
    return times


# ------------------------------------------------------------------------ memory probes
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak(device: str) -> float:
    """Start a peak-memory window; return the current footprint in MB (resident memory on
    CPU, allocated memory on CUDA)."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    if os.path.exists("/proc/self/clear_refs"):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident size (Linux >= 4.0)
    return _status_kb("VmRSS") / 1024


def peak(device: str) -> float:
    """Peak footprint in MB since ``reset_peak``."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 2**20
    return _status_kb("VmHWM") / 1024
