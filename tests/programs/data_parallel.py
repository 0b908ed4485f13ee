"""A two-level program run data parallel by tests/test_distributed.py.

    python data_parallel.py OUT_DIR SCENARIO [SCENARIO ...]     (under torchrun, or with
                                                                 RANK/WORLD_SIZE/... set)

Upper level: per-feature weight decay λ (softplus) and a bias shift; lower level: a small
tanh MLP trained on the weighted-decay MSE. Each scenario saves, per rank, the final
parameters and what it measured to ``OUT_DIR/<scenario>-rank<r>.pt``:

* ``equal-<method>``: 20 meta-steps with per-rank batch B (strategy "ddp"), counting the
  ``torch.distributed.all_reduce`` calls (a counting wrapper around the real function).
* ``zero-<method>``: the same with strategy "zero", with checkpoints every 10 iterations.
* ``factored-<method>``: as ``equal-`` on a wider MLP (``WIDE``) with a method that takes
  v's linear layers in factors (``FACTORED``), counting ``all_gather`` calls too.
* ``gather``: ``Communicator.all_gather_rows`` with row counts that differ between ranks,
  and ``factored.global_factors`` on entries factored on both ranks, on one rank only, and
  with a rest: the densified result against the all-reduced mean of the local entries.
* ``zero1-<sgd|adam>``: SAMA under ZeRO on a lower model of one weight tensor, so that one
  rank's optimizer shard (and SAMA's record there) is empty.
* ``systems``: CG with unroll 2, roll-back and gradient accumulation 2 (``SYSTEMS``).
* ``chain3``: a three-level chain (``build3``), counting all-reduces as above.
* ``stop``: rank-dependent validation metrics (rank 0's worsens, rank 1's improves), early
  stopping on rank 0's metric, JSONL logs.
* ``ckpt``: dropout with per-rank random streams, checkpoints every 10 of 20 iterations.
* ``fail``: rank 1 raises during its third step (torchrun must end the whole launch).
* ``fsdp``: what torch's FSDP2 / DTensor give the quantities the implicit methods need
  (``fsdp_facts``; why strategy "fsdp" is refused).
* ``resume-<run>``: resume the checkpoint of step 10 of the scenario ``<run>`` (``ckpt`` or
  ``zero-<method>``), copied to ``OUT_DIR/resume-<run>-in``, up to iteration 20.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, TensorDataset

import ziggurat as zg

B = 4  # per-rank batch
STEPS = 20
DTYPE = torch.float64
METHODS: dict[str, Callable[[], zg.HypergradMethod]] = {
    "darts": lambda: zg.Darts(),
    "sama": lambda: zg.SAMA(),
    "neumann": lambda: zg.Neumann(iterations=3, alpha=0.05),
    "cg": lambda: zg.CG(iterations=3, damping=0.1),
    "fixed_point": lambda: zg.FixedPoint(iterations=3),  # step from 10 power iterations
}
#: methods taking v's linear layers as factors (forward mode; SAMA with Adam forms P v_W
#: from them), run on a hidden width where the 64 × 64 layer's factors pay
FACTORED: dict[str, Callable[[], zg.HypergradMethod]] = {
    "darts": lambda: zg.Darts(mixed="forward"),
    "sama": lambda: zg.SAMA(),
}
WIDE = 64
SYSTEMS = {"unroll_steps": 2, "roll_back": True, "gradient_accumulation": 2}
# Hessian-vector products in a run of STEPS meta-steps
HVPS = {"darts": 0, "sama": 0, "neumann": 3 * 20, "cg": 3 * 20, "fixed_point": 3 * 20 + 10}


def data() -> tuple[TensorDataset, TensorDataset]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 5, generator=g, dtype=DTYPE)
    w = torch.randn(5, 1, generator=g, dtype=DTYPE)
    y = x @ w + 0.3 * torch.randn(96, 1, generator=g, dtype=DTYPE)
    return TensorDataset(x[:64], y[:64]), TensorDataset(x[64:], y[64:])


def loaders(batch: int, replicas: int, rank: int) -> tuple[DataLoader[Any], DataLoader[Any]]:
    """Shuffled shards; replicas=1 with batch 2B reads the union of the two ranks' batches."""
    train, val = data()
    return (zg.distributed.distributed_loader(train, batch, seed=1, num_replicas=replicas,
                                              rank=rank),
            zg.distributed.distributed_loader(val, batch, seed=2, num_replicas=replicas,
                                              rank=rank))


class Engine(zg.Engine):
    """Validation metric: rank 0's grows, rank 1's shrinks (so only rank 0 wants to stop)."""

    def validation(self) -> Mapping[str, Any]:
        rank = dist.get_rank() if dist.is_initialized() else 0
        n = len(self.validation_history) + 1
        return {"loss": float(n) if rank == 0 else 1.0 / n, "rank": rank}


def build(method: str, *, strategy: str, batch: int, replicas: int, rank: int,
          dropout: float = 0.0, inner: Mapping[str, Any] | None = None,
          factored: bool = False, single: bool = False, optimizer: str | None = None,
          scheduler: str | None = None, batchnorm: bool = False, **engine: Any) -> zg.Engine:
    """The program; ``factored``: hidden width ``WIDE`` with a second hidden layer and the
    method ``FACTORED[method]``; ``single``: the lower model one weight tensor (5 → 1, no
    bias: under ZeRO with 2 ranks one rank's optimizer shard is empty); ``optimizer``
    ("sgd" or "adam") overrides the lower optimizer (Adam for sama, else SGD);
    ``scheduler`` ("exp" or "plateau", on the loss) schedules the lower optimizer (under
    ZeRO built on a ZeroRedundancyOptimizer given as the optimizer, as the docs ask);
    ``batchnorm``: a BatchNorm1d after the first layer (running statistics: buffers)."""
    torch.manual_seed(0)
    width = WIDE if factored else 1 if single else 4
    middle = ([torch.nn.Linear(width, width), torch.nn.Tanh()] if factored else [])
    net = (torch.nn.Sequential(torch.nn.Linear(5, 1, bias=False)).to(DTYPE) if single else
           torch.nn.Sequential(torch.nn.Linear(5, width),
                               *([torch.nn.BatchNorm1d(width)] if batchnorm else []),
                               torch.nn.Tanh(), torch.nn.Dropout(dropout), *middle,
                               torch.nn.Linear(width, 1)).to(DTYPE))
    upper = torch.nn.ParameterDict({
        "decay": torch.nn.Parameter(torch.full((width, 5), -1.0, dtype=DTYPE)),
        "shift": torch.nn.Parameter(torch.zeros(1, dtype=DTYPE))})
    torch.manual_seed(100 + rank)  # per-rank random streams (dropout)
    train, val = loaders(batch, replicas, rank)

    def inner_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        x, y = b
        pred = p(x) + p.outer.module["shift"]
        decay = torch.nn.functional.softplus(p.outer.module["decay"])
        return ((pred - y) ** 2).mean() + 0.5 * (decay * net[0].weight ** 2).sum()

    def outer_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        x, y = b
        return ((p.inner(x) - y) ** 2).mean()

    adam = optimizer == "adam" if optimizer is not None else method == "sama"
    kind, settings_ = ((torch.optim.Adam, {"lr": 0.05}) if adam
                       else (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9}))
    lower_opt: torch.optim.Optimizer = kind(net.parameters(), **settings_)
    if scheduler is not None and strategy == "zero":
        from torch.distributed.optim import ZeroRedundancyOptimizer
        lower_opt = ZeroRedundancyOptimizer(net.parameters(), optimizer_class=kind, **settings_)
    schedule = (None if scheduler is None
                else torch.optim.lr_scheduler.ExponentialLR(lower_opt, gamma=0.8)
                if scheduler == "exp"
                else torch.optim.lr_scheduler.ReduceLROnPlateau(lower_opt, factor=0.5,
                                                                patience=0))
    lower = zg.ImplicitProblem("inner", net, lower_opt, scheduler=schedule,
                               train_data_loader=train, training_step=inner_loss,
                               config=zg.Config(type=(FACTORED if factored else METHODS)[
                                   method](), **(inner or {})))
    outer = zg.Problem("outer", upper, torch.optim.Adam(upper.parameters(), lr=0.02),
                       train_data_loader=val, training_step=outer_loss)
    settings: dict[str, Any] = {"train_iters": STEPS, "progress": "off", "summary": False,
                                "logger_type": (), "strategy": strategy, **engine}
    return Engine([outer, lower], {"u2l": {outer: [lower]}, "l2u": {lower: [outer]}},
                  config=zg.EngineConfig(**settings))


def build3(*, strategy: str, batch: int, replicas: int, rank: int,
           skip: bool = False) -> zg.Engine:
    """Three levels, zg.chain(top, mid, bot): bot's MLP with mid's per-weight decay (CG
    through bot), mid's decay trained on held-out MSE plus top's penalty (Darts through mid),
    top's penalty trained on a loss of mid's decay on its own batch; ``skip``: top's loss
    also reads bot's predictions on its batch, a hypergradient path of two edges
    (top ← mid ← bot) whose inner vector is a product of the ranks' data."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                              torch.nn.Linear(4, 1)).to(DTYPE)
    mid_m = torch.nn.ParameterDict({"decay": torch.nn.Parameter(
        torch.full((4, 5), -1.0, dtype=DTYPE))})
    top_m = torch.nn.ParameterDict({"s": torch.nn.Parameter(torch.zeros(1, dtype=DTYPE))})
    train, val = loaders(batch, replicas, rank)
    _, top_data = loaders(batch, replicas, rank)

    def bot_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        x, y = b
        decay = torch.nn.functional.softplus(p.mid.module["decay"])
        return ((p(x) - y) ** 2).mean() + 0.5 * (decay * net[0].weight ** 2).sum()

    def mid_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        x, y = b
        penalty = torch.nn.functional.softplus(p.top.module["s"])
        return ((p.bot(x) - y) ** 2).mean() + (penalty * p.module["decay"] ** 2).sum()

    def top_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        x, y = b
        scale = torch.nn.functional.softplus(p.mid.module["decay"]).mean(0)
        fit = ((x @ scale - y.squeeze(1)) ** 2).mean()
        return fit + ((p.bot(x) - y) ** 2).mean() if skip else fit

    bot = zg.ImplicitProblem("bot", net, torch.optim.SGD(net.parameters(), lr=0.05),
                             train_data_loader=train, training_step=bot_loss,
                             config=zg.Config(type=zg.CG(iterations=3, damping=0.1)))
    mid = zg.ImplicitProblem("mid", mid_m, torch.optim.SGD(mid_m.parameters(), lr=0.1),
                             train_data_loader=val, training_step=mid_loss,
                             config=zg.Config(type="darts"))
    top = zg.Problem("top", top_m, torch.optim.Adam(top_m.parameters(), lr=0.05),
                     train_data_loader=top_data, training_step=top_loss)
    deps = ({"u2l": {top: [mid], mid: [bot]}, "l2u": {bot: [mid, top], mid: [top]}} if skip
            else zg.chain(top, mid, bot))
    return zg.Engine([top, mid, bot], deps, config=zg.EngineConfig(
        train_iters=STEPS, progress="off", summary=False, logger_type=(), strategy=strategy))


def result(engine: zg.Engine) -> dict[str, Any]:
    return {"params": {f"{p.name}.{k}": v.detach().clone()
                       for p in engine.problems for k, v in p.module.state_dict().items()},
            "last_loss": {p.name: p.last_loss for p in engine.problems},
            "global_step": engine.global_step, "stopped_early": engine.stopped_early}


def _failure(fn: Callable[[], object]) -> str:
    """The error ``fn`` raises, its lines joined ("" when it returns)."""
    try:
        fn()
    except Exception as e:  # the message is the result
        return " ".join(line for line in f"{type(e).__name__}: {e}".splitlines() if line)
    return ""


def fsdp_facts(rank: int, world: int) -> dict[str, Any]:
    """The gradient g = ∂L/∂θ (create_graph), a Hessian-vector product H v and the mixed
    product ∂²L/∂λ∂θ · v of an inner loss on the global batch, for θ = build()'s MLP with
    its parameters sharded by torch's FSDP2 (``fully_shard``) or as DTensors:

    * ``sharded``: torch.autograd.grad with respect to the module's parameters after
      ``fully_shard(reshard_after_forward=False)`` and ``set_reshard_after_backward(False)``
      (the advice of pytorch#172543): the error;
    * ``resharded``: ``unshard()``, then differentiating the unsharded parameters the module
      holds, with FSDP's default reshard after backward: the double backward's error;
    * ``gathered``: the same with both reshards off, local results averaged by all-reduce:
      the largest relative error against the global batch (kept gathered, it is exact);
    * ``dtensor``: ``torch.func.functional_call`` on a hook-free copy with Shard(0) DTensor
      parameters (redistributed to Replicate inside) and a Shard(0) batch: the error;
    * ``local``: Shard(0) DTensor parameters (the leaves) gathered into plain tensors by
      ``redistribute(Replicate)`` and ``to_local(grad_placements=[Partial()])``, the module
      run by functional_call on the rank's plain batch, the local loss divided by the world
      size: the backward of the gather reduce-scatters, so g and H v come out as Shard(0)
      DTensors of the global quantities (the mixed product, with respect to the replicated
      λ, is local and summed by all-reduce): the largest relative error, and the placements.
    """
    try:  # FSDP2 and the public DTensor module (torch >= 2.6)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import (
            DTensor,
            Partial,
            Replicate,
            Shard,
            distribute_tensor,
        )
    except ImportError as e:
        return {"unavailable": f"{type(e).__name__}: {e}"}

    if not dist.is_initialized():
        zg.distributed.init_distributed("ddp")
    mesh = init_device_mesh("cpu", (world,))
    train, _ = data()
    x, y = train.tensors[0][: 2 * B], train.tensors[1][: 2 * B]
    xs, ys = x.chunk(world)[rank], y.chunk(world)[rank]
    torch.manual_seed(0)
    lam = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)

    def net() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(),
                                   torch.nn.Linear(4, 1)).to(DTYPE)

    def loss_of(out: torch.Tensor, target: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return ((out - target) ** 2).mean() + scale * (out ** 2).mean()

    def products(loss: torch.Tensor, params: list[torch.Tensor],
                 vs: list[torch.Tensor], upper: torch.Tensor) -> list[torch.Tensor]:
        g = torch.autograd.grad(loss, params, create_graph=True)
        hv = torch.autograd.grad(g, params, vs, retain_graph=True)
        (mixed,) = torch.autograd.grad(g, [upper], vs)
        return [t.detach() for t in (*g, *hv, mixed)]

    ref_net = net()
    vs = [torch.randn(p.shape, dtype=DTYPE) for p in ref_net.parameters()]
    reference = products(loss_of(ref_net(x), y, lam), list(ref_net.parameters()), vs, lam)

    def sharded() -> None:
        m = net()
        fully_shard(m, mesh=mesh, reshard_after_forward=False)
        m.set_reshard_after_backward(False)  # type: ignore[operator]
        params = list(m.parameters())
        products(loss_of(m(xs), ys, lam), params, vs, lam)

    def gathered(reshard_after_backward: bool) -> list[torch.Tensor]:
        m = net()
        fully_shard(m, mesh=mesh, reshard_after_forward=False)
        m.set_reshard_after_backward(reshard_after_backward)  # type: ignore[operator]
        m.unshard()  # type: ignore[operator]
        local = products(loss_of(m(xs), ys, lam), list(m.parameters()), vs, lam)
        for t in local:
            dist.all_reduce(t)
            t.div_(world)
        return local

    def functional() -> None:
        m = net()
        names = [n for n, _ in m.named_parameters()]
        params = [distribute_tensor(p.detach(), mesh, [Shard(0)]).requires_grad_()
                  for p in m.parameters()]
        full = [p.redistribute(mesh, [Replicate()]) for p in params]
        out = torch.func.functional_call(
            m, dict(zip(names, full)), (DTensor.from_local(xs, mesh, [Shard(0)]),))
        loss = loss_of(out, DTensor.from_local(ys, mesh, [Shard(0)]),
                       DTensor.from_local(lam, mesh, [Replicate()]))
        products(loss, params, [distribute_tensor(v, mesh, [Shard(0)]) for v in vs], lam)

    def local() -> tuple[list[torch.Tensor], set[str]]:
        m = net()
        names = [n for n, _ in m.named_parameters()]
        params = [distribute_tensor(p.detach(), mesh, [Shard(0)]).requires_grad_()
                  for p in m.parameters()]
        full = [p.redistribute(mesh, [Replicate()]).to_local(grad_placements=[Partial()])
                for p in params]
        out = torch.func.functional_call(m, dict(zip(names, full)), (xs,))
        found = products(loss_of(out, ys, lam) / world, params,
                         [distribute_tensor(v, mesh, [Shard(0)]) for v in vs], lam)
        dist.all_reduce(found[-1])
        placements = {str(t.placements) for t in found[:-1] if isinstance(t, DTensor)}
        return [t.full_tensor() if isinstance(t, DTensor) else t for t in found], placements

    def error(found: list[torch.Tensor]) -> float:
        return max(float((a - b).norm() / b.norm()) for a, b in zip(found, reference))

    facts: dict[str, Any] = {"sharded": _failure(sharded),
                             "resharded": _failure(lambda: gathered(True)),
                             "dtensor": _failure(functional), "gathered": error(gathered(False))}
    try:  # (torch 2.11: "not have been used in the graph" in the double backward)
        by_dtensor, placements = local()
    except RuntimeError:
        facts["local_failure"] = _failure(local)
    else:
        facts.update(local=error(by_dtensor), local_placements=sorted(placements))
    return facts


def run_counting_all_reduces(engine: Any) -> int:
    """Run the engine with a counting wrapper around the real ``dist.all_reduce``; the
    number of calls it made."""
    return run_counting(engine, "all_reduce")["all_reduce"]


def run_counting(engine: Any, *collectives: str) -> dict[str, int]:
    """Run the engine with counting wrappers around the real ``dist.<collective>`` of each
    of ``collectives``; the number of calls each got."""
    calls = dict.fromkeys(collectives, 0)
    real = {name: getattr(dist, name) for name in collectives}

    def counting(name: str) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[name] += 1
            return real[name](*args, **kwargs)
        return call

    for name in collectives:
        setattr(dist, name, counting(name))
    try:
        engine.run()
    finally:
        for name, fn in real.items():
            setattr(dist, name, fn)
    return calls


def gather_checks(rank: int, world: int) -> dict[str, Any]:
    """``all_gather_rows`` and ``global_factors`` on hand-made entries (see the module
    docstring): what each returned, and its error against the expected values."""
    from ziggurat.hypergrad.factored import LinearFactors, densify, global_factors
    from ziggurat.systems.distributed import Communicator

    if not dist.is_initialized():
        zg.distributed.init_distributed("ddp")
    comm = Communicator(rank, world, torch.device("cpu"), "gloo", "ddp")
    # rows: rank r has r + 1 rows of a float64 tensor, 3 − r rows of a float32 one
    a = torch.full((rank + 1, 3), float(rank), dtype=DTYPE)
    b = torch.full((3 - rank, 2), 10.0 + rank, dtype=torch.float32)
    rows = comm.gather_ints([a.shape[0], b.shape[0]])
    got_a, got_b = comm.all_gather_rows([a, b], rows)
    want_a = torch.cat([torch.full((r + 1, 3), float(r), dtype=DTYPE) for r in range(world)])
    want_b = torch.cat([torch.full((3 - r, 2), 10.0 + r) for r in range(world)])
    g = torch.Generator().manual_seed(10 + rank)

    def factors(n: int, rest: bool) -> LinearFactors:
        return LinearFactors(torch.randn(n, 40, generator=g, dtype=DTYPE),
                             torch.randn(n, 30, generator=g, dtype=DTYPE),
                             torch.randn(30, 40, generator=g, dtype=DTYPE) if rest else None,
                             torch.Size((30, 40)))

    vector: list[Any] = [
        factors(rank + 2, rest=False),                      # factored on both ranks
        factors(3, rest=False) if rank == 0 else torch.randn(30, 40, generator=g,
                                                             dtype=DTYPE),  # on one rank
        factors(2, rest=True),                              # factored, with a rest
        torch.randn(7, generator=g, dtype=DTYPE),           # dense everywhere
        factors(2, rest=rank == 0),                         # a rest on one rank only
    ]
    local = [t.clone() for t in densify(vector)]
    comm.mean_(local)  # the reference: the mean of the local entries
    dense = global_factors(comm, [vector])
    kinds = [type(t).__name__ for t in vector]
    comm.mean_(dense)
    error = max(float((x - y).norm() / y.norm()) for x, y in zip(densify(vector), local))
    return {"rows_error": max(float((got_a - want_a).abs().max()),
                              float((got_b - want_b).abs().max())),
            "shapes": [tuple(got_a.shape), tuple(got_b.shape)], "kinds": kinds,
            "ranks": [t.rank for t in vector if isinstance(t, LinearFactors)],
            "error": error}


def run_scenario(name: str, out: Path, rank: int, world: int) -> dict[str, Any]:
    kind, _, method = name.partition("-")
    if kind == "fsdp":
        return fsdp_facts(rank, world)
    if kind in ("equal", "zero"):
        ckpt: dict[str, Any] = {} if kind == "equal" else {
            "checkpoint_dir": str(out / f"{name}-ckpt"), "checkpoint_step": 10, "keep_last": 5}
        engine = build(method, strategy="ddp" if kind == "equal" else "zero", batch=B,
                       replicas=world, rank=rank, **ckpt)
        calls = run_counting_all_reduces(engine)
        return {**result(engine), "all_reduce": calls}
    if kind == "factored":
        engine = build(method, strategy="ddp", batch=B, replicas=world, rank=rank,
                       factored=True)
        counted = run_counting(engine, "all_reduce", "all_gather")
        return {**result(engine), "all_reduce": counted["all_reduce"],
                "all_gather": counted["all_gather"]}
    if kind == "gather":
        return gather_checks(rank, world)
    if kind == "zero1":  # zero1-<optimizer>: SAMA, ZeRO, one weight tensor (a shard empty)
        engine = build("sama", strategy="zero", batch=B, replicas=world, rank=rank,
                       single=True, optimizer=method)
        engine.run()
        return result(engine)
    if kind == "chain3":  # chain3, chain3-skip (a path of two edges)
        engine = build3(strategy="ddp", batch=B, replicas=world, rank=rank,
                        skip=method == "skip")
        calls = run_counting_all_reduces(engine)
        return {**result(engine), "all_reduce": calls}
    if kind == "sched":  # sched-<strategy>-<method>-<scheduler>
        strategy, method, scheduler = method.split("-")
        engine = build(method, strategy=strategy, batch=B, replicas=world, rank=rank,
                       scheduler=scheduler)
        engine.run()
        return result(engine)
    if kind == "nan":  # rank 1's lower loss is NaN when the 3rd hypergradient recomputes it
        engine = build("darts", strategy="ddp", batch=B, replicas=world, rank=rank)
        outer, inner = engine.problems
        poison = {"on": False}
        outer_loss, inner_step, inner_loss = outer.training_step, inner.step, inner.training_step

        def marked_outer_loss(b: Any) -> Any:
            poison["on"] = rank == 1 and outer.count == 2
            return outer_loss(b)

        def clean_inner_step() -> None:
            poison["on"] = False
            inner_step()

        def poisoned_inner_loss(b: Any) -> Any:
            loss = inner_loss(b)
            return loss * float("nan") if poison["on"] else loss

        outer.training_step = marked_outer_loss  # type: ignore[method-assign]
        inner.step = clean_inner_step  # type: ignore[method-assign]
        inner.training_step = poisoned_inner_loss  # type: ignore[method-assign]
        return {"error": _failure(engine.run), "outer_steps": outer.count}
    if kind == "systems":  # unroll 2 with roll-back, 2 micro-batches per step, CG
        engine = build("cg", strategy="ddp", batch=B, replicas=world, rank=rank, inner=SYSTEMS)
        engine.run()
        return result(engine)
    if kind == "stop":
        engine = build("darts", strategy="ddp", batch=B, replicas=world, rank=rank,
                       train_iters=50, valid_step=2, early_stopping_metric="loss",
                       early_stopping_patience=2, logger_type=("jsonl",),
                       log_dir=str(out / "logs"), log_step=1)
        engine.run()
        return {**result(engine), "history": [[s, float(m["rank"])]
                                              for s, m in engine.validation_history]}
    if kind == "ckpt":  # ckpt: darts, ddp, dropout; ckpt-bn: with BatchNorm
        engine = build("darts", strategy="ddp", batch=B, replicas=world, rank=rank,
                       dropout=0.3, checkpoint_dir=str(out / ("ckpt-bn-ckpt" if method else
                                                              "ckpt")),
                       checkpoint_step=10, keep_last=5, batchnorm=method == "bn")
        engine.run()
        return result(engine)
    if kind == "resume":  # resume-ckpt(-bn): darts, ddp, dropout; resume-zero-<method>: zero
        zero = method.startswith("zero-")
        engine = build(method[5:] if zero else "darts", strategy="zero" if zero else "ddp",
                       batch=B, replicas=world, rank=rank, dropout=0.0 if zero else 0.3,
                       checkpoint_dir=str(out / f"{name}-in"), resume=True, checkpoint_step=10,
                       batchnorm=method == "ckpt-bn")
        engine.run()
        return result(engine)
    if kind == "fail":  # rank 1 raises in its 3rd step; rank 0 waits in a collective
        engine = build("darts", strategy="ddp", batch=B, replicas=world, rank=rank)
        inner = engine.problems[1]
        step = inner.training_step

        def failing(b: Any) -> Any:
            if rank == 1 and inner.count == 2:
                raise RuntimeError("rank 1 fails on purpose")
            return step(b)

        inner.training_step = failing  # type: ignore[method-assign]
        engine.run()
        return result(engine)
    raise SystemExit(f"unknown scenario {name!r}")


def main() -> None:
    out = Path(sys.argv[1])
    for name in sys.argv[2:]:
        found = run_scenario(name, out, int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
        torch.save(found, out / f"{name}-rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()
    # Every result is on disk. End the process here, without interpreter finalization:
    # gloo's worker threads can still be torn down during it, and then std::terminate
    # aborts a rank that succeeded ("terminate called without an active exception", seen
    # once in a local full run; a torch teardown race, pytorch/pytorch#190489).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
