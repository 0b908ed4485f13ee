"""seed_everything and worker_init_fn: a training loop with a shuffling DataLoader (in the
main process and in two workers), dropout, and ``random`` / NumPy draws repeats bit for bit
under one seed and changes under another; bad seeds are refused by name."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

import ziggurat as zg
import ziggurat.seeding
from ziggurat.errors import ConfigError
from ziggurat.seeding import seed_everything, worker_init_fn

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _restore_global_state() -> Iterator[None]:
    """Leave the RNGs, environment and determinism switches as the test found them."""
    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    env = {k: os.environ.get(k) for k in ("PYTHONHASHSEED", "CUBLAS_WORKSPACE_CONFIG")}
    det = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    cudnn = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    yield
    random.setstate(py)
    np.random.set_state(npy)
    torch.set_rng_state(cpu)
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    torch.use_deterministic_algorithms(det, warn_only=warn_only)
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn


class NoisyData(Dataset[tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]]):
    """Fixed points whose items add noise drawn from ``random``, NumPy and torch."""

    def __init__(self, n: int = 24) -> None:
        g = torch.Generator().manual_seed(1234)
        self.x = torch.randn(n, 3, generator=g, dtype=DTYPE)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5], dtype=DTYPE) + 0.3

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor]:
        draws = torch.tensor([random.random(), float(np.random.rand()),
                              float(torch.rand((), dtype=DTYPE))], dtype=DTYPE)
        return self.x[i] + 0.01 * draws.sum(), self.y[i], i, draws


def _train(seed: int, workers: int, epochs: int = 2) -> dict[str, torch.Tensor]:
    """Seed, build a model, train with shuffled batches; return everything that varies."""
    g = seed_everything(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Tanh(), torch.nn.Linear(8, 1)
    ).to(DTYPE)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    loader = DataLoader(
        NoisyData(), batch_size=4, shuffle=True, generator=g, num_workers=workers,
        worker_init_fn=worker_init_fn if workers else None,
    )
    order, losses, draws = [], [], []
    for _ in range(epochs):
        for x, y, idx, d in loader:
            scale = 1.0 + 0.1 * random.random() + 0.1 * float(np.random.rand())
            loss = scale * ((model(x).squeeze(-1) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            order.append(idx)
            losses.append(loss.detach())
            draws.append(d)
    return {
        "params": torch.cat([p.detach().flatten() for p in model.parameters()]),
        "order": torch.cat(order),
        "losses": torch.stack(losses),
        "draws": torch.cat(draws),
    }


@pytest.mark.parametrize("workers", [0, 2])
def test_same_seed_is_bit_identical(workers: int) -> None:
    a, b = _train(7, workers), _train(7, workers)
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("workers", [0, 2])
def test_different_seeds_differ(workers: int) -> None:
    a, b = _train(7, workers), _train(8, workers)
    for key in a:
        assert not torch.equal(a[key], b[key]), key


def test_workers_and_epochs_draw_distinct_streams() -> None:
    """Each worker, in each epoch, starts its ``random`` / NumPy / torch streams afresh
    from a different seed: no two batches see the same draws."""
    run = _train(3, workers=2, epochs=2)
    first = run["draws"].reshape(-1, 4, 3)[:, 0, :]  # the first item of every batch
    for col in range(3):
        assert len(set(first[:, col].tolist())) == len(first)
    # both epochs cover the data once, in different orders
    order = run["order"].reshape(2, -1)
    assert sorted(order[0].tolist()) == sorted(order[1].tolist()) == list(range(24))
    assert not torch.equal(order[0], order[1])


def test_worker_init_fn_seeds_random_and_numpy_from_torch_seed() -> None:
    torch.manual_seed(2**32 + 5)  # torch's seed is 64-bit; random / NumPy get it mod 2**32
    worker_init_fn(0)
    assert random.random() == random.Random(5).random()
    assert np.random.rand() == np.random.RandomState(5).rand()
    assert zg.seeding.worker_init_fn is worker_init_fn  # reachable as zg.seeding.worker_init_fn
    assert ziggurat.seeding.seed_everything is seed_everything


def test_seed_everything_seeds_every_generator_and_returns_one() -> None:
    g = seed_everything(11)
    assert isinstance(g, torch.Generator) and g.initial_seed() == 11
    assert g.device == torch.device("cpu")
    expected = torch.rand(3, generator=torch.Generator().manual_seed(11))
    assert torch.equal(torch.rand(3, generator=g), expected)
    assert torch.equal(torch.rand(3), expected)  # the global torch generator
    assert random.random() == random.Random(11).random()
    assert np.random.rand() == np.random.RandomState(11).rand()
    assert torch.initial_seed() == 11
    assert os.environ["PYTHONHASHSEED"] == "11"
    seed_everything(0)
    seed_everything(2**32 - 1)  # both ends of the range
    assert seed_everything(np.int64(3)).initial_seed() == 3


def test_pythonhashseed_reaches_subprocesses() -> None:
    seed_everything(5)
    code = "print(hash('ziggurat'))"
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, timeout=30).stdout for _ in range(2)]
    assert runs[0] == runs[1] != ""


def test_deterministic_switches() -> None:
    os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
    torch.use_deterministic_algorithms(False)
    seed_everything(1)
    assert not torch.are_deterministic_algorithms_enabled()  # False leaves them alone
    seed_everything(1, deterministic=True)
    assert torch.are_deterministic_algorithms_enabled()
    assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":16:8"
    seed_everything(1, deterministic=True)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"  # a user's choice is kept
    a = _train(4, workers=0, epochs=1)
    seed_everything(1, deterministic=True)
    assert all(torch.equal(a[k], v) for k, v in _train(4, workers=0, epochs=1).items())


def test_without_numpy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)  # `import numpy` raises ImportError
    g = seed_everything(9)
    assert g.initial_seed() == 9 and random.random() == random.Random(9).random()
    worker_init_fn(0)


@pytest.mark.parametrize("seed", [-1, 2**32, 1.5, "0", True, None, np.int64(-3), np.float64(1.0)])
def test_bad_seed_raises_config_error(seed: Any) -> None:
    with pytest.raises(ConfigError, match=r"seed_everything\.seed=.*integer in \[0, 2\*\*32 - 1\]"
                       ) as err:
        seed_everything(seed)
    assert err.value.field == "seed"


def test_bad_deterministic_raises_config_error() -> None:
    with pytest.raises(ConfigError, match=r"seed_everything\.deterministic='yes'") as err:
        seed_everything(0, deterministic="yes")  # type: ignore[arg-type]
    assert err.value.field == "deterministic"
