"""Multi-process data parallelism on torch.distributed: the environment, the process group,
the reductions problems call, and the data sharding helpers.

A run launched by ``torchrun --nproc-per-node N prog.py`` starts N processes, each with
RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment. With
``EngineConfig(strategy="ddp" | "zero")`` every process builds the same program; the engine
calls :func:`init_distributed`, which joins (or reuses) the default process group:

* device and backend: ``cuda:LOCAL_RANK`` with "nccl" when CUDA is available, else the CPU
  with "gloo"; ``ZIGGURAT_DIST_BACKEND`` overrides the backend. nccl cannot serve CPU
  tensors: that combination is refused with an error naming the fix.
* each rank draws its own shard of the data (:func:`distributed_loader`, a DataLoader over a
  ``DistributedSampler``); ``batch_size`` is **per rank**, the global batch is
  ``batch_size × WORLD_SIZE``.

:class:`Communicator` does every reduction. Each quantity (a list of tensors) goes through
**one** all-reduce of a flat buffer per dtype and device, launched with ``async_op=True``.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import ConfigError, ZigguratError

#: strategies EngineConfig.strategy accepts ("none": one process, nothing changes)
STRATEGIES: tuple[str, ...] = ("none", "ddp", "zero", "fsdp")
_ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_BACKEND_VAR = "ZIGGURAT_DIST_BACKEND"
_TIMEOUT_VAR = "ZIGGURAT_DIST_TIMEOUT"


@dataclass(frozen=True)
class DistEnvironment:
    """Where this process stands in a torchrun launch."""

    rank: int
    world_size: int
    local_rank: int


def detect_environment(strategy: str = "ddp") -> DistEnvironment:
    """This process's rank, world size and local rank: from the initialised default process
    group if there is one, else from torchrun's environment variables (an error naming the
    missing ones and how to launch when they are absent)."""
    if dist.is_available() and dist.is_initialized():
        rank = dist.get_rank()
        return DistEnvironment(rank, dist.get_world_size(),
                               int(os.environ.get("LOCAL_RANK", rank)))
    missing = [k for k in _ENV_VARS if k not in os.environ]
    if missing:
        raise ZigguratError(
            f"EngineConfig(strategy={strategy!r}) needs a torch.distributed launch, but the "
            f"environment lacks {missing}. Launch with `torchrun --nproc-per-node N prog.py` "
            f"(or `python -m torch.distributed.run ...`), initialise the process group "
            f"yourself before building the Engine, or use strategy='none' for one process."
        )
    try:
        rank, world, local = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
    except ValueError:
        raise ZigguratError(
            f"RANK / WORLD_SIZE / LOCAL_RANK must be integers; got "
            f"{[os.environ[k] for k in ('RANK', 'WORLD_SIZE', 'LOCAL_RANK')]}."
        ) from None
    if not 0 <= rank < world:
        raise ZigguratError(f"RANK={rank} is outside [0, WORLD_SIZE={world}).")
    return DistEnvironment(rank, world, local)


def choose_backend(local_rank: int) -> tuple[torch.device, str]:
    """(device, backend): ``cuda:local_rank`` and nccl when CUDA is available, else the CPU
    and gloo. ZIGGURAT_DIST_BACKEND overrides the backend ("gloo" then means the CPU)."""
    backend = os.environ.get(_BACKEND_VAR)
    if torch.cuda.is_available() and backend != "gloo":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
    else:
        device = torch.device("cpu")
    backend = backend or ("nccl" if device.type == "cuda" else "gloo")
    check_backend(backend, device)
    return device, backend


def check_backend(backend: str, device: torch.device) -> None:
    """Refuse a backend that cannot all-reduce tensors on ``device`` (nccl on the CPU)."""
    if backend not in ("gloo", "nccl", "mpi", "cuda:nccl,cpu:gloo", "cpu:gloo,cuda:nccl"):
        raise ConfigError("torch.distributed", "backend", backend,
                          "'gloo' (CPU, or CUDA) or 'nccl' (CUDA)")
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError(
            "torch.distributed", "backend", backend,
            f"'gloo' for parameters on {device.type}: nccl serves CUDA tensors only (unset "
            f"{_BACKEND_VAR}, or move the modules to cuda:LOCAL_RANK)",
        )


def init_distributed(strategy: str) -> Communicator:
    """Join the default process group (``env://``, from torchrun's variables) unless it is
    already initialised, and return the communicator the problems use."""
    if strategy not in STRATEGIES or strategy == "none":
        raise ConfigError("init_distributed", "strategy", strategy,
                          f"one of {STRATEGIES[1:]}")
    if not dist.is_available():
        raise ZigguratError("this torch build has no torch.distributed; use strategy='none'.")
    env = detect_environment(strategy)
    if dist.is_initialized():
        backend = str(dist.get_backend())
        device = (torch.device("cuda", env.local_rank % torch.cuda.device_count())
                  if backend == "nccl" else torch.device("cpu"))
    else:
        device, backend = choose_backend(env.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        timeout = timedelta(seconds=float(os.environ.get(_TIMEOUT_VAR, "1800")))
        dist.init_process_group(backend, timeout=timeout)
        atexit.register(_destroy_own_group)
    return Communicator(env.rank, env.world_size, device, backend, strategy)


def _destroy_own_group() -> None:
    """At interpreter exit, shut down the process group ziggurat initialised (a program
    written for Betty never does): left to the C++ static destructors, gloo's threads can
    end the process with ``terminate called without an active exception`` (SIGABRT) after
    a successful run."""
    if dist.is_initialized():
        dist.destroy_process_group()


def device() -> torch.device:
    """The device this rank should put its modules on (``cuda:LOCAL_RANK`` or the CPU), as
    :func:`choose_backend` picks it."""
    return choose_backend(int(os.environ.get("LOCAL_RANK", "0")))[0]


def _groups(tensors: Sequence[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[int]]:
    out: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for i, t in enumerate(tensors):
        out.setdefault((t.dtype, t.device), []).append(i)
    return out


def _flatten(tensors: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """The tensors' values, concatenated into one flat tensor (written into ``out`` if given)."""
    return torch.cat([t.detach().reshape(-1) for t in tensors], out=out)


def _unflatten_into(flat: Tensor, tensors: Sequence[Tensor]) -> None:
    """Copy consecutive slices of ``flat`` back into ``tensors`` (the inverse of _flatten)."""
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


class _Buffers:
    """Flat communication buffers kept between steps, one per (dtype, device, size): a
    fresh multi-megabyte buffer every call costs page faults on first touch."""

    def __init__(self) -> None:
        self._free: dict[tuple[torch.dtype, torch.device, int], list[Tensor]] = {}

    def take(self, tensors: list[Tensor]) -> Tensor:
        """A buffer holding the concatenation of ``tensors`` (flattened)."""
        numel = sum(t.numel() for t in tensors)
        free = self._free.get((tensors[0].dtype, tensors[0].device, numel))
        return _flatten(tensors, out=free.pop() if free else None)

    def give(self, buf: Tensor) -> None:
        """Return a buffer once nothing reads it any more."""
        self._free.setdefault((buf.dtype, buf.device, buf.numel()), []).append(buf)


class Pending:
    """An all-reduce in flight over a list of tensors; ``wait()`` writes the result back
    into them (divided by ``divisor``) and is idempotent."""

    def __init__(self, tensors: list[Tensor], divisor: float,
                 buffers: _Buffers | None = None) -> None:
        self.tensors = tensors
        self.divisor = divisor
        self._buffers = buffers
        self._work: list[tuple[Any, Tensor, list[int]]] = []
        for indices in _groups(tensors).values():
            group = [tensors[i] for i in indices]
            flat = buffers.take(group) if buffers is not None else _flatten(group)
            self._work.append((dist.all_reduce(flat, async_op=True), flat, indices))

    @property
    def done(self) -> bool:
        """True once the results have been written back."""
        return not self._work

    def wait(self) -> None:
        """Block until the reduction finished and write it back into the tensors."""
        work, self._work = self._work, []
        for handle, flat, indices in work:
            handle.wait()
            if self.divisor != 1.0:
                flat.div_(self.divisor)
            _unflatten_into(flat, [self.tensors[i] for i in indices])
            if self._buffers is not None:
                self._buffers.give(flat)


class Communicator:
    """The reductions of one data-parallel run (ranks of the default process group).

    Every method is collective: all ranks must call it in the same order. A list of tensors
    is reduced by one ``all_reduce`` of a flat buffer per (dtype, device) group.

    Also satisfies ``ziggurat.hypergrad.Reducer``: Hessian-vector products are averaged
    with ``mean_``; SAMA under ZeRO completes its shard-wise preconditioned vector with
    ``sum_``; a method waits for an in-flight ``v`` with ``wait``.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device, backend: str,
                 strategy: str) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.backend = backend
        self.strategy = strategy
        self._pending: Pending | None = None
        self._buffers = _Buffers()

    def __repr__(self) -> str:
        return (f"Communicator(rank={self.rank}, world_size={self.world_size}, "
                f"backend={self.backend!r}, strategy={self.strategy!r})")

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes logs and checkpoints."""
        return self.rank == 0

    @property
    def shards_optimizer_state(self) -> bool:
        """True when each rank holds only its shard of the optimizer state (ZeRO)."""
        return self.strategy == "zero"

    # ------------------------------------------------------------------ reductions
    def start_mean(self, tensors: list[Tensor]) -> Pending:
        """Launch the in-place global mean of ``tensors`` (async); ``wait()`` finishes it.
        The communicator remembers it, so ``wait()`` on the communicator finishes it too."""
        if self._pending is not None:
            self._pending.wait()
        self._pending = Pending(tensors, float(self.world_size), self._buffers)
        return self._pending

    @property
    def pending(self) -> bool:
        """True while a reduction started by ``start_mean`` has not been written back."""
        return self._pending is not None and not self._pending.done

    def wait(self) -> None:
        """Finish the reduction started by ``start_mean`` (nothing if none is in flight)."""
        if self._pending is not None:
            self._pending.wait()
            self._pending = None

    def mean_(self, tensors: list[Tensor]) -> None:
        """Replace ``tensors`` by their mean over the ranks, in place (one all-reduce)."""
        Pending(tensors, float(self.world_size), self._buffers).wait()

    def sum_(self, tensors: list[Tensor]) -> None:
        """Replace ``tensors`` by their sum over the ranks, in place (one all-reduce)."""
        Pending(tensors, 1.0, self._buffers).wait()

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values`` (the same length on every rank), in rank order: one
        all-gather of a small integer tensor (and one host read of it)."""
        local = torch.tensor(list(values), dtype=torch.int64).to(self.device)
        out = [torch.empty_like(local) for _ in range(self.world_size)]
        dist.all_gather(out, local)
        return torch.stack(out).tolist()

    def all_gather_rows(self, tensors: Sequence[Tensor], rows: Sequence[Sequence[int]]
                        ) -> list[Tensor]:
        """For each 2-D tensor of ``tensors``, the concatenation over the ranks (in rank
        order) of every rank's tensor at that position, whose row counts may differ:
        ``rows[r][i]`` is rank r's row count of ``tensors[i]`` (``gather_ints``). One
        all-gather of a flat buffer per dtype and device, each tensor padded to its
        largest row count there (the padding is dropped again)."""
        pieces: list[list[Tensor]] = [[] for _ in tensors]
        for indices in _groups(tensors).values():
            widest = {i: max(r[i] for r in rows) for i in indices}
            padded = []
            for i in indices:
                t = tensors[i]
                pad = widest[i] - t.shape[0]
                padded.append(t if pad == 0 else torch.cat([t, t.new_zeros(pad, t.shape[1])]))
            flat = _flatten(padded)
            parts = [torch.empty_like(flat) for _ in range(self.world_size)]
            dist.all_gather(parts, flat)
            for rank, part in enumerate(parts):
                offset = 0
                for i in indices:
                    width = tensors[i].shape[1]
                    block = part[offset:offset + widest[i] * width].view(widest[i], width)
                    offset += widest[i] * width
                    pieces[i].append(block[:rows[rank][i]])
        return [torch.cat(p) for p in pieces]

    # ------------------------------------------------------------------ objects
    def broadcast_tensors_(self, tensors: Sequence[Tensor], src: int = 0) -> None:
        """Overwrite ``tensors`` on every rank with rank ``src``'s values (one broadcast per
        dtype group): replicas start from the same parameters, as DDP's constructor does."""
        tensors = list(tensors)
        for indices in _groups(tensors).values():
            group = [tensors[i] for i in indices]
            flat = _flatten(group)
            dist.broadcast(flat, src)
            _unflatten_into(flat, group)

    def broadcast_object(self, obj: Any, src: int = 0) -> Any:
        """Rank ``src``'s ``obj`` on every rank (pickled; for small metadata only)."""
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src)
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        dist.barrier()


def distributed_loader(
    dataset: torch.utils.data.Dataset[Any],
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    num_replicas: int | None = None,
    rank: int | None = None,
    **loader_kwargs: Any,
) -> torch.utils.data.DataLoader[Any]:
    """A DataLoader giving this rank its shard of ``dataset``: ``batch_size`` samples **per
    rank** per batch (global batch ``batch_size × world size``).

    The sampler is a ``DistributedSampler(shuffle=shuffle, seed=seed)``; ziggurat's batch
    stream calls its ``set_epoch(pass)`` before every pass, so each epoch is shuffled
    afresh, identically on every rank (no overlap between ranks), and resumes exactly.
    Without shuffling rank r reads samples r, r + W, r + 2W, ... (W = world size). A dataset
    whose size W does not divide is padded (``drop_last=False``, torch's rule): each pass
    repeats the first samples of its order so that every rank has as many; ``drop_last=True``
    drops the remainder instead.
    """
    sampler: torch.utils.data.DistributedSampler[Any] = torch.utils.data.DistributedSampler(
        dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
        drop_last=drop_last)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler,
                                       **loader_kwargs)
