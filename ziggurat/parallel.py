"""The engine's side of a data-parallel run: preparing the problems, agreeing on validation
results, and rank-aware checkpoints.

* Preparation: every problem's parameters and buffers are broadcast from rank 0 (replicas
  start equal, as torch's DDP constructor makes them); with "zero" each optimizer is
  wrapped in ``ZeroRedundancyOptimizer`` (optimizer state sharded over the ranks); each
  problem gets the ``Communicator`` that averages its gradients.
* Validation: every rank runs ``Engine.validation()``; the metrics of **rank 0** are
  broadcast and used by all ranks (history, logs, early stopping), so every rank takes the
  same early-stopping decision at the same iteration.
* Checkpoints: rank 0 writes one file holding the program's state plus, for every rank, the
  parts that differ between ranks (random state, data positions, current batches, last
  losses, method state); every rank reads the file on resume and takes its own part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .data import to_device
from .errors import ConfigError, ZigguratError
from .problem import MicroBatches, Problem
from .systems.distributed import Communicator, init_distributed

#: per-problem state that differs between ranks (each rank's shard of the data)
RANK_LOCAL_KEYS = ("stream", "cur_batch", "cur_batch_micro", "unroll_batches", "last_loss",
                   "method_state")


class DataParallel:
    """A program run as one replica per rank (strategy "ddp" or "zero")."""

    def __init__(self, strategy: str, problems: Sequence[Problem],
                 comm: Communicator | None = None) -> None:
        if strategy == "fsdp":
            raise ConfigError(
                "EngineConfig", "strategy", "fsdp",
                "'ddp', or 'zero' to save memory (ZeroRedundancyOptimizer: each rank keeps "
                "its shard of the optimizer state; exactly 'ddp' otherwise). Every ziggurat "
                "gradient and hypergradient (darts, sama, cg, neumann, fixed_point; double "
                "backward for Hessian-vector and mixed products) is torch.autograd.grad with "
                "respect to the parameters, and torch's FSDP2 cannot give it: after "
                "fully_shard the module's parameters are sharded DTensors the forward does "
                "not use (it all-gathers unsharded copies), so autograd.grad raises 'appears "
                "to not have been used in the graph', with reshard_after_forward=False and "
                "set_reshard_after_backward(False) too; differentiating the unsharded copies "
                "after unshard() needs them kept gathered through the whole double backward "
                "(the default reshard after backward frees their storage), which saves "
                "nothing over 'zero'. An exact route on DTensor instead (sharded parameters "
                "gathered per evaluation by redistribute + to_local(grad_placements="
                "[Partial()])) works in torch but is not built into ziggurat yet; details and "
                "a check of each: docs/distributed.md, 'ZeRO and FSDP'",
            )
        self.problems = list(problems)
        for p in self.problems:  # before joining the process group: errors come first
            _check(p, strategy)
        self.comm = comm if comm is not None else init_distributed(strategy)
        for p in self.problems:
            for t in p.parameters():
                if t.device.type != self.comm.device.type:
                    raise ConfigError(
                        p.name, "module", f"parameters on {t.device}",
                        f"parameters on {self.comm.device} for the {self.comm.backend} "
                        f"backend (move the module with .to(zg.distributed.device()))",
                    )
        for p in self.problems:
            self._prepare(p)

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the rank that writes logs and checkpoints)."""
        return self.comm.is_main

    def _prepare(self, p: Problem) -> None:
        self.comm.broadcast_tensors_([*p.module.parameters(), *p.module.buffers()])
        if self.comm.strategy == "zero":
            p.optimizer = _zero(p)
        p.comm = self.comm

    # ------------------------------------------------------------------ validation
    def agree(self, metrics: Mapping[str, Any] | None) -> Mapping[str, Any] | None:
        """Rank 0's validation metrics, on every rank (tensors sent as numbers)."""
        plain = None if metrics is None else {
            k: (float(v) if isinstance(v, torch.Tensor) and v.numel() == 1 else v)
            for k, v in metrics.items()}
        result: Mapping[str, Any] | None = self.comm.broadcast_object(plain)
        return result

    # ------------------------------------------------------------------ checkpoints
    def consolidate(self) -> None:
        """ZeRO: gather every optimizer's sharded state on rank 0 (collective)."""
        for p in self.problems:
            consolidate = getattr(p.optimizer, "consolidate_state_dict", None)
            if consolidate is not None:
                consolidate(to=0)

    def gather_state(self, engine_state: Any, local: dict[str, Any]) -> dict[str, Any] | None:
        """Collective: rank 0 gets ``engine_state()`` with every rank's local part under
        "ranks"; the other ranks get None (and never build the full state)."""
        self.consolidate()
        parts = self.comm.gather_objects(local)
        if not self.is_main:
            return None
        state: dict[str, Any] = engine_state()
        state["world_size"] = self.comm.world_size
        state["ranks"] = parts
        return state

    def local_part(self, rng: dict[str, Any]) -> dict[str, Any]:
        """This rank's random state and its problems' rank-local state."""
        return {"rng": rng, "problems": {p.name: _local_state(p) for p in self.problems}}

    def select(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint as this rank should load it: rank 0's state with this rank's
        local parts put in (an error when the world size differs from the writer's)."""
        world = state.get("world_size")
        if world != self.comm.world_size or "ranks" not in state:
            raise ZigguratError(
                f"the checkpoint was written by a run with {world or 1} process(es) and this "
                f"run has {self.comm.world_size}; resume with the same number of processes "
                f"(each rank continues its own data shard and random stream)."
            )
        mine = state["ranks"][self.comm.rank]
        out = dict(state)
        out["rng"] = mine["rng"]
        out["problems"] = {name: {**pstate, **mine["problems"][name]}
                           for name, pstate in state["problems"].items()}
        return out


def _check(p: Problem, strategy: str) -> None:
    """Refuse what a data-parallel run cannot do exactly, naming the fix."""
    from .iterative import IterativeProblem

    if isinstance(p, IterativeProblem):
        raise ConfigError(
            p.name, "EngineConfig.strategy", strategy,
            "'none' for a program with an IterativeProblem: unrolled hypergradients are "
            "not data-parallel yet; use an ImplicitProblem (darts, sama, cg, neumann, "
            "fixed_point) or one process",
        )
    if p.config.roll_back and strategy == "zero":
        raise ConfigError(
            p.name, "config.roll_back", True,
            "False with strategy='zero' (the roll-back snapshot would hold only this "
            "rank's shard of the optimizer state); use strategy='ddp' for roll_back",
        )
    if p.config.precision == "fp16":
        raise ConfigError(
            p.name, "config.precision", "fp16",
            f"'bf16' or 'fp32' with strategy={strategy!r}: fp16 loss scaling skips steps "
            f"per rank, which would desynchronise the replicas",
        )


def select_state(parallel: DataParallel | None, state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The checkpoint as this process should load it; a one-process run refuses a
    checkpoint written by several processes (and the reverse, in ``DataParallel.select``)."""
    if parallel is not None:
        return parallel.select(state)
    if "ranks" in state:
        raise ZigguratError(
            f"the checkpoint was written by a run with {state.get('world_size')} processes and "
            f"this run has 1; resume with the same number of processes (torchrun "
            f"--nproc-per-node {state.get('world_size')}) and the same EngineConfig.strategy."
        )
    return state


def _local_state(p: Problem) -> dict[str, Any]:
    """What ``Problem.state_dict`` holds under RANK_LOCAL_KEYS, without the optimizer's
    state (which ZeRO only gives on rank 0)."""
    from .checkpoint import is_plain

    batch = list(p.cur_batch) if isinstance(p.cur_batch, MicroBatches) else p.cur_batch
    stream = p._stream
    cpu = torch.device("cpu")  # (gathered from every rank: not onto every rank's GPU)
    return {
        "stream": None if stream is None else stream.state_dict(),
        "cur_batch": to_device(batch, cpu) if is_plain(batch) else None,
        "cur_batch_micro": isinstance(p.cur_batch, MicroBatches),
        "unroll_batches": to_device(p._unroll_batches, cpu),
        "last_loss": p.last_loss,
        "method_state": p.method_state,
    }


def _zero(p: Problem) -> torch.optim.Optimizer:
    """The problem's optimizer wrapped in ZeroRedundancyOptimizer (its own class, groups and
    settings), or as is when it already is one."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    opt = p.optimizer
    if isinstance(opt, ZeroRedundancyOptimizer):
        return opt
    if p.scheduler is not None:
        raise ConfigError(
            p.name, "scheduler", type(p.scheduler).__name__,
            "no scheduler on an optimizer that strategy='zero' has to wrap (the scheduler "
            "would keep adjusting the unwrapped optimizer); pass ZeroRedundancyOptimizer("
            "params, optimizer_class=..., ...) as the optimizer and build the scheduler on it",
        )
    if any(opt.state.values()):
        raise ConfigError(p.name, "optimizer", type(opt).__name__,
                          "an optimizer that has not stepped yet, for strategy='zero'")
    defaults = dict(opt.defaults)
    groups = [dict(g) for g in opt.param_groups]
    return ZeroRedundancyOptimizer(groups, optimizer_class=type(opt), **defaults)
