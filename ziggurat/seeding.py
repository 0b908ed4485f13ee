"""Reproducible runs: one call seeds every random number generator a training loop draws from.

Usage::

    g = zg.seeding.seed_everything(0)
    loader = DataLoader(data, shuffle=True, generator=g, num_workers=2,
                        worker_init_fn=zg.seeding.worker_init_fn)

Same seed, same code, same machine and library versions: the same shuffles, dropout masks,
``random`` and NumPy draws (in the main process and in DataLoader workers), hence the same
parameters. Bit-identical results on a GPU also need ``deterministic=True``.
"""

from __future__ import annotations

import numbers
import os
import random

import torch

from .errors import ConfigError
from .validation import check_bool

SEED_MAX = 2**32 - 1  # NumPy's legacy seeding accepts seeds in [0, 2**32 - 1]


def _check_seed(seed: object) -> int:
    """An int (NumPy integers too; not a bool) in [0, SEED_MAX], as a Python int."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not (
        0 <= int(seed) <= SEED_MAX
    ):
        raise ConfigError(
            "seed_everything", "seed", seed,
            "an integer in [0, 2**32 - 1] (NumPy's range); pass e.g. seed=0, or reduce a "
            "larger seed with seed % 2**32",
        )
    return int(seed)


def _seed_numpy(seed: int) -> None:
    try:
        import numpy as np
    except ImportError:  # NumPy is optional
        return
    np.random.seed(seed)


def seed_everything(seed: int, deterministic: bool = False) -> torch.Generator:
    """Seed Python's ``random``, NumPy (if installed) and torch on the CPU and every CUDA
    device; set ``PYTHONHASHSEED`` for subprocesses. Return a CPU ``torch.Generator`` seeded
    with ``seed``, for ``DataLoader(generator=...)``.

    With ``deterministic=True`` also turn on ``torch.use_deterministic_algorithms(True,
    warn_only=True)`` (operations without a deterministic implementation warn instead of
    failing), set cuDNN to deterministic without benchmarking, and set
    ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (deterministic cuBLAS; effective
    when set before CUDA starts). With False these switches are left as they are.

    Raises ConfigError when ``seed`` is not an integer in [0, 2**32 - 1].

    Example:
        >>> g = seed_everything(0)
        >>> a = torch.rand(2)
        >>> _ = seed_everything(0)
        >>> torch.equal(a, torch.rand(2)), g.initial_seed()
        (True, 0)
    """
    seed = _check_seed(seed)
    check_bool("seed_everything", "deterministic", deterministic)
    random.seed(seed)
    _seed_numpy(seed)
    torch.manual_seed(seed)  # CPU and, lazily, every CUDA device
    torch.cuda.manual_seed_all(seed)
    os.environ["PYTHONHASHSEED"] = str(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def worker_init_fn(worker_id: int) -> None:
    """Seed ``random`` and NumPy inside a DataLoader worker from torch's per-worker seed.

    torch gives worker ``worker_id`` the seed ``base_seed + worker_id``, ``base_seed`` drawn
    from the loader's generator at each epoch, so workers differ from one another and from
    epoch to epoch while the whole run repeats under one ``seed_everything`` seed. Pass as
    ``DataLoader(..., worker_init_fn=zg.seeding.worker_init_fn, generator=g)``.
    """
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    _seed_numpy(seed)
