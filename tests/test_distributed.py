"""Data-parallel runs with real processes (gloo, CPU, float64): exactness against one process
with the global batch, all-reduce counts, ZeRO, rank-aware early stopping, logs and resume.

One launch of two processes runs every scenario of tests/programs/data_parallel.py (as a
torchrun launch does: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT in the
environment, the library joins the process group); the resume is a second launch through
``python -m torch.distributed.run``. The one-process references run in the test process.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from programs.data_parallel import (
    FACTORED,
    HVPS,
    METHODS,
    STEPS,
    SYSTEMS,
    B,
    build,
    build3,
    data,
)

import ziggurat as zg
from ziggurat.data import BatchStream

PROGRAM = Path(__file__).parent / "programs" / "data_parallel.py"
SCENARIOS = [*(f"equal-{m}" for m in METHODS), *(f"factored-{m}" for m in FACTORED), "gather",
             "zero1-sgd", "zero1-adam",
             "zero-darts", "zero-sama", "chain3", "chain3-skip", "systems", "stop", "ckpt",
             "fsdp", "sched-zero-sama-exp", "sched-ddp-darts-plateau", "sched-zero-darts-plateau",
             "nan", "ckpt-bn"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    # a rank that fails makes the others' collectives time out instead of hanging
    env.update(OMP_NUM_THREADS="1", ZIGGURAT_DIST_TIMEOUT="60", **extra)
    return env


def _check(procs: list[subprocess.Popen[str]], timeout: float) -> None:
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(i, out) for i, (p, out) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    assert not failed, "\n".join(f"process {i}:\n{err[-3000:]}" for i, (_, err) in failed)


def launch_ranks(out: Path, scenarios: list[str], world: int = 2) -> None:
    """``world`` processes with torchrun's environment variables."""
    port = str(_free_port())
    procs = [subprocess.Popen(
        [sys.executable, str(PROGRAM), str(out), *scenarios],
        env=_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    _check(procs, timeout=240)


def launch_torchrun(out: Path, scenarios: list[str]) -> subprocess.Popen[str]:
    """``python -m torch.distributed.run --nproc-per-node 2``, as users launch."""
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         str(PROGRAM), str(out), *scenarios],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, list[Any]]]:
    out = tmp_path_factory.mktemp("dp")
    launch_ranks(out, SCENARIOS)
    found = {name: [torch.load(out / f"{name}-rank{r}.pt", weights_only=True)
                    for r in range(2)] for name in SCENARIOS}
    return out, found


def _relerr(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).norm() / b[k].norm()) for k in b)


def _params(engine: zg.Engine) -> dict[str, torch.Tensor]:
    return {f"{p.name}.{k}": v for p in engine.problems for k, v in p.module.state_dict().items()}


@pytest.mark.parametrize("method", list(METHODS))
def test_two_ranks_with_batch_b_equal_one_rank_with_batch_2b(
    runs: tuple[Path, dict[str, list[Any]]], method: str
) -> None:
    _, found = runs
    rank0, rank1 = found[f"equal-{method}"]
    reference = build(method, strategy="none", batch=2 * B, replicas=1, rank=0)
    start = {k: v.clone() for k, v in _params(reference).items()}
    reference.run()
    assert _relerr(rank0["params"], _params(reference)) <= 1e-6
    # replicas stay identical, and the run really moved both levels
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in start)
    assert _relerr(start, _params(reference)) > 1e-2
    # the bound can fail: one process on a single rank's batch of B ends elsewhere
    half = build(method, strategy="none", batch=B, replicas=1, rank=0)
    half.run()
    assert _relerr(rank0["params"], _params(half)) > 1e-3


@pytest.mark.parametrize("method", list(METHODS))
def test_all_reduce_calls_per_meta_step(
    runs: tuple[Path, dict[str, list[Any]]], method: str
) -> None:
    """Per meta-step: the lower step's gradient (1); the upper step's v (1) and its gradient,
    direct part plus local hypergradient contributions (1); plus one per Hessian-vector
    product (cg, neumann, fixed_point and its power iterations)."""
    _, found = runs
    for result in found[f"equal-{method}"]:
        assert result["all_reduce"] == 3 * STEPS + HVPS[method]


@pytest.mark.parametrize("method", list(FACTORED))
def test_factored_vectors_two_ranks_equal_one_rank(
    runs: tuple[Path, dict[str, list[Any]]], method: str
) -> None:
    """v of the 64 × 64 layer as factors gathered from both ranks (the 5 × 64 layer's
    factors stop paying with both ranks' rows: formed and all-reduced dense): the run
    equals one process with the global batch (which keeps the same layer's factors), with
    one gather of row counts and one of factors per meta-step, and no more all-reduces."""
    _, found = runs
    rank0, rank1 = found[f"factored-{method}"]
    reference = build(method, strategy="none", batch=2 * B, replicas=1, rank=0, factored=True)
    start = {k: v.clone() for k, v in _params(reference).items()}
    reference.run()
    assert _relerr(rank0["params"], _params(reference)) <= 1e-9
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in start)
    assert _relerr(start, _params(reference)) > 1e-2
    for result in (rank0, rank1):
        assert result["all_gather"] == 2 * STEPS
        assert result["all_reduce"] == 3 * STEPS


def test_rows_gathered_and_factors_made_global(runs: tuple[Path, dict[str, list[Any]]]) -> None:
    """``all_gather_rows`` with row counts that differ by rank (and two dtypes), and
    ``global_factors``: an entry factored on both ranks stays factored with both ranks'
    rows, one factored on rank 0 only is formed dense on both, one with a rest keeps its
    factors and averages the rest, one with a rest on rank 0 only is formed dense on both;
    densified, the result is the mean of the local entries."""
    _, found = runs
    for res in found["gather"]:
        assert res["rows_error"] == 0.0
        assert res["shapes"] == [(3, 3), (5, 2)]
        assert res["kinds"] == ["LinearFactors", "Tensor", "LinearFactors", "Tensor", "Tensor"]
        assert res["ranks"] == [2 + 3, 2 + 2]
        assert res["error"] <= 1e-13


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_zero_with_an_empty_optimizer_shard_equals_one_rank(
    runs: tuple[Path, dict[str, list[Any]]], optimizer: str
) -> None:
    """SAMA under ZeRO when one rank holds no parameter's optimizer state (its record is
    empty): every rank still takes the same path (no collective mismatch), and the run
    equals one process with the global batch."""
    _, found = runs
    rank0, rank1 = found[f"zero1-{optimizer}"]
    reference = build("sama", strategy="none", batch=2 * B, replicas=1, rank=0, single=True,
                      optimizer=optimizer)
    start = {k: v.clone() for k, v in _params(reference).items()}
    reference.run()
    assert _relerr(rank0["params"], _params(reference)) <= 1e-9
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in start)
    assert _relerr(start, _params(reference)) > 1e-2


def test_unroll_roll_back_and_accumulation_two_ranks_equal_one_rank(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    reference = build("cg", strategy="none", batch=2 * B, replicas=1, rank=0, inner=SYSTEMS)
    reference.run()
    assert _relerr(found_params(runs, "systems"), _params(reference)) <= 1e-6


def found_params(runs: tuple[Path, dict[str, list[Any]]], name: str) -> dict[str, torch.Tensor]:
    rank0, rank1 = runs[1][name]
    assert all(torch.equal(v, rank1["params"][k]) for k, v in rank0["params"].items())
    params: dict[str, torch.Tensor] = rank0["params"]
    return params


def test_three_level_chain_two_ranks_equal_one_rank(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """The global vector is carried down every edge: per iteration bot 1, mid 2 (+3 for CG's
    Hessian-vector products through bot), top 2 (Darts through mid)."""
    _, found = runs
    reference = build3(strategy="none", batch=2 * B, replicas=1, rank=0)
    start = {k: v.clone() for k, v in _params(reference).items()}
    reference.run()
    rank0, rank1 = found["chain3"]
    assert _relerr(rank0["params"], _params(reference)) <= 1e-6
    assert all(torch.equal(rank0["params"][k], rank1["params"][k]) for k in start)
    assert min(float((start[k] - v).norm()) for k, v in _params(reference).items()) > 1e-3
    assert rank0["all_reduce"] == STEPS * (1 + 2 + 3 + 2)


def test_a_path_of_two_edges_two_ranks_equal_one_rank(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """top reads bot through mid as well as directly: the vector carried from bot to mid is
    a product of each rank's data, averaged before mid's method multiplies it by its own
    (without that average top's parameters were 3e-3 off)."""
    reference = build3(strategy="none", batch=2 * B, replicas=1, rank=0, skip=True)
    reference.run()
    assert _relerr(found_params(runs, "chain3-skip"), _params(reference)) <= 1e-9
    # per meta-step, beyond the chain's: CG through bot for top's path (3 Hessian-vector
    # products) and the inner edge's vector (mid-sized)
    assert runs[1]["chain3-skip"][0]["all_reduce"] == STEPS * (1 + 2 + 3 + 2 + 3 + 1)


@pytest.mark.parametrize("name", ["sched-zero-sama-exp", "sched-ddp-darts-plateau",
                                  "sched-zero-darts-plateau"])
def test_schedulers_two_ranks_equal_one_rank(runs: tuple[Path, dict[str, list[Any]]],
                                             name: str) -> None:
    """SAMA under ZeRO reads the learning rate of the step from the wrapper's groups, which
    the scheduler sets (the local optimizer gets them only inside the step: SAMA read the
    last step's lr, 1e-2 off); ReduceLROnPlateau steps with the mean of the ranks' losses
    (each rank's own: replicas diverged by 0.18)."""
    _, _, method, scheduler = name.split("-")
    reference = build(method, strategy="none", batch=2 * B, replicas=1, rank=0,
                      scheduler=scheduler)
    reference.run()
    assert _relerr(found_params(runs, name), _params(reference)) <= 1e-9
    lrs = [g["lr"] for g in reference.problems[1].optimizer.param_groups]
    assert max(lrs) < 0.05 * 0.9  # the schedule acted


def test_a_non_finite_hypergradient_on_one_rank_stops_every_rank(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """Only rank 1's recomputed lower loss is NaN: its flag travels in the gradient's
    all-reduce, so both ranks raise the error at the same step (rank 0 died of a closed
    connection before)."""
    rank0, rank1 = runs[1]["nan"]
    assert "the hypergradient of problem 'outer' at its step 3 is not finite" in rank0["error"]
    assert "on another rank" in rank0["error"]
    assert "NaN or Inf in parameters" in rank1["error"]
    assert rank0["outer_steps"] == rank1["outer_steps"] == 2


@pytest.mark.parametrize("method", ["darts", "sama"])
def test_zero_agrees_with_ddp(runs: tuple[Path, dict[str, list[Any]]], method: str) -> None:
    _, found = runs
    zero, ddp = found[f"zero-{method}"], found[f"equal-{method}"]
    for r in range(2):
        assert _relerr(zero[r]["params"], ddp[r]["params"]) <= 1e-12
    # SAMA under ZeRO completes its shard-wise P v with one more all-reduce per meta-step
    assert zero[0]["all_reduce"] == STEPS * (3 + (method == "sama"))


def test_early_stopping_on_rank_0_stops_every_rank_and_rank_0_alone_logs(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    out, found = runs
    for result in found["stop"]:  # rank 0's metric worsens from its 1st validation: patience 2
        assert (result["global_step"], result["stopped_early"]) == (6, True)
        assert result["history"] == [[2, 0.0], [4, 0.0], [6, 0.0]]  # rank 0's metrics
    lines = (out / "logs" / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 6 * 2 + 3  # one record per problem and step, one per validation


def test_two_rank_run_resumes_from_a_two_rank_checkpoint(
    runs: tuple[Path, dict[str, list[Any]]],
) -> None:
    """DDP with dropout (per-rank random streams), DDP with BatchNorm (every step starts
    from rank 0's running statistics, the checkpoint's), and ZeRO with Adam (sharded state,
    consolidated on rank 0 for the file): bit-identical to the uninterrupted runs."""
    out, found = runs
    runs_ = ["ckpt", "ckpt-bn", "zero-sama"]
    for run in runs_:
        folder = out / ("ckpt" if run == "ckpt" else f"{run}-ckpt")
        assert sorted(p.name for p in folder.iterdir()) == [
            "ckpt-000000010.pt", "ckpt-000000020.pt"]  # written once, by rank 0
        (out / f"resume-{run}-in").mkdir()
        shutil.copy(folder / "ckpt-000000010.pt", out / f"resume-{run}-in")
    _check([launch_torchrun(out, [f"resume-{run}" for run in runs_])], timeout=180)
    for run in runs_:
        for r in range(2):
            resumed = torch.load(out / f"resume-{run}-rank{r}.pt", weights_only=True)
            full = found[run][r]
            assert resumed["global_step"] == 20
            assert all(torch.equal(resumed["params"][k], v) for k, v in full["params"].items())
            assert resumed["last_loss"] == full["last_loss"]  # each rank's batches and dropout
        assert found[run][0]["last_loss"] != found[run][1]["last_loss"]
    # one process refuses a checkpoint of two
    one = build("darts", strategy="none", batch=2 * B, replicas=1, rank=0,
                checkpoint_dir=str(out / "resume-ckpt-in"), resume=True)
    with pytest.raises(zg.ZigguratError, match="written by a run with 2 processes"):
        one.run()


def test_an_error_on_one_rank_ends_the_launch_and_surfaces(tmp_path: Path) -> None:
    """Rank 0 waits in an all-reduce that rank 1 never joins: torchrun ends both processes
    (no hang) and reports rank 1's error."""
    proc = launch_torchrun(tmp_path, ["fail"])
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0
    assert "rank 1 fails on purpose" in err
    assert not list(tmp_path.glob("fail-rank*.pt"))


# --------------------------------------------------------------------------- in-process
def test_strategy_setting_is_checked() -> None:
    with pytest.raises(zg.ConfigError, match="strategy"):
        zg.EngineConfig(strategy="deepspeed")


def test_missing_torchrun_environment_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(zg.ZigguratError, match="torchrun --nproc-per-node") as info:
        build("darts", strategy="ddp", batch=B, replicas=1, rank=0)
    assert "RANK" in str(info.value) and "strategy='none'" in str(info.value)


def test_programs_a_data_parallel_run_cannot_do_exactly_are_refused() -> None:
    net = torch.nn.Linear(2, 1)
    upper = torch.nn.Linear(1, 1)

    def engine(inner: zg.Problem, strategy: str) -> zg.Engine:
        outer = zg.Problem("outer", upper, torch.optim.SGD(upper.parameters(), lr=0.1),
                           training_step=lambda p, b: p.inner.module.weight.sum())
        return zg.Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                         config=zg.EngineConfig(strategy=strategy, summary=False))

    def lower(cls: type[zg.Problem], config: zg.Config) -> zg.Problem:
        return cls("inner", net, torch.optim.SGD(net.parameters(), lr=0.1), config=config,
                   training_step=lambda p, b: (p.module.weight * p.outer.module.weight).sum())

    with pytest.raises(zg.ConfigError, match="unrolled hypergradients are not data-parallel"):
        engine(lower(zg.IterativeProblem, zg.Config(type="reverse")), "ddp")
    with pytest.raises(zg.ConfigError, match="roll-back snapshot") as info:
        engine(lower(zg.ImplicitProblem, zg.Config(roll_back=True)), "zero")
    assert info.value.field == "config.roll_back"


def test_backend_that_cannot_serve_the_device_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(zg.ConfigError, match="nccl serves CUDA tensors only"):
        zg.distributed.check_backend("nccl", torch.device("cpu"))
    monkeypatch.setenv("ZIGGURAT_DIST_BACKEND", "gloo")
    assert zg.distributed.choose_backend(0) == (torch.device("cpu"), "gloo")
    if not torch.cuda.is_available():
        monkeypatch.setenv("ZIGGURAT_DIST_BACKEND", "nccl")
        with pytest.raises(zg.ConfigError, match="unset ZIGGURAT_DIST_BACKEND"):
            zg.distributed.choose_backend(0)


def test_fsdp_is_refused_with_the_reason_and_the_alternative() -> None:
    with pytest.raises(zg.ConfigError, match=r"autograd\.grad") as info:
        build("darts", strategy="fsdp", batch=B, replicas=1, rank=0)
    message = str(info.value)
    assert info.value.field == "strategy"
    for fact in ("not have been used in the graph", "set_reshard_after_backward(False)",
                 "Partial()", "not built", "'zero'", "docs/distributed.md"):
        assert fact in message


def test_fsdp2_facts_behind_the_refusal(runs: tuple[Path, dict[str, list[Any]]]) -> None:
    """What the refusal of strategy="fsdp" states, checked on 2 gloo ranks with the installed
    torch (tests/programs/data_parallel.py, ``fsdp_facts``). If this fails after a torch
    upgrade, FSDP2 may now support second-order autograd.grad: revisit the refusal in
    ziggurat/parallel.py and docs/distributed.md."""
    # torch's failures are pinned only on the release they were checked on (a user's other
    # torch is not wrong for lacking them); the exact routes on that release and later ones
    checked_release = torch.__version__.startswith("2.13.")
    release = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])
    for facts in runs[1]["fsdp"]:
        if "unavailable" in facts:
            pytest.skip(f"this torch has no FSDP2 / public DTensor ({facts['unavailable']})")
        if checked_release:
            # the sharded parameters are not in the graph, even with both reshards off
            assert "not have been used in the graph" in facts["sharded"]
            # differentiating the gathered parameters: FSDP's reshard after backward frees
            # the storage the double backward needs ...
            assert "storage of size 0" in facts["resharded"]
            # DTensor parameters and batch through functional_call: the double backward's
            # sharding propagation fails
            assert "Sharding propagation failed" in facts["dtensor"]
        # with the parameters kept gathered it is exact, i.e. plain data parallelism
        assert facts["gathered"] <= 1e-12
        if "local_failure" in facts:
            # an older torch may lack the DTensor route below (2.11: its double backward
            # does not reach the sharded leaves); the refusal does not rest on it
            assert release < (2, 13), facts["local_failure"]
            assert "not have been used in the graph" in facts["local_failure"]
            continue
        # DTensor parameters gathered by a differentiable redistribute + to_local(Partial)
        # on a plain local batch: exact, g and H v sharded (the route an "fsdp" would take)
        assert facts["local"] <= 1e-12
        assert facts["local_placements"] == ["(Shard(dim=0),)"]


def test_distributed_sampler_is_reseeded_every_pass_and_resumes() -> None:
    train, _ = data()
    n = len(train)
    passes: list[list[list[int]]] = [[], []]  # per rank: the sample order of each pass
    for rank in range(2):
        loader = zg.distributed.distributed_loader(
            torch.utils.data.TensorDataset(torch.arange(n)), 8, seed=3, num_replicas=2,
            rank=rank)
        stream = BatchStream(loader, "inner", lambda: None)
        per_pass = n // 2 // 8
        order = [int(i) for _ in range(2 * per_pass) for i in stream.next()[0]]
        passes[rank] = [order[: n // 2], order[n // 2:]]
        # mid-pass checkpoint of the stream: a fresh one continues with the same batches
        state = stream.state_dict()
        again = BatchStream(loader, "inner", lambda: None)
        again.load_state_dict(state)
        assert all(torch.equal(stream.next()[0], again.next()[0]) for _ in range(per_pass + 1))
    for k in range(2):  # each pass: the ranks' shards are disjoint and cover the data
        assert sorted(passes[0][k] + passes[1][k]) == list(range(n))
    assert passes[0][0] != passes[0][1]  # reshuffled for the second pass
