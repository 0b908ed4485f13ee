"""Checkpoint and resume of whole programs, with real processes and real files."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import ziggurat as zg

from helpers import Vec

PROGRAM = Path(__file__).parent / "programs" / "resumable.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    return subprocess.run([sys.executable, str(PROGRAM), *args], capture_output=True,
                          text=True, env=env, timeout=300)


def _equal_nested(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_nested(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(_equal_nested(x, y) for x, y in zip(a, b))
    return bool(a == b)


@pytest.mark.parametrize("unrolled", [False, True], ids=["implicit", "unrolled"])
def test_killed_run_resumes_to_bit_identical_parameters(tmp_path: Path, unrolled: bool) -> None:
    """SIGKILL between checkpoints, resume in a new process: parameters, optimizer state and
    step count equal the uninterrupted run's bit for bit (shuffled loaders, dropout, a
    scheduler, a warm-started fixed point, or an open-unroll-aware unrolled problem)."""
    extra = ["--unrolled"] if unrolled else []
    whole = _run(str(tmp_path / "a"), str(tmp_path / "a.pt"), *extra)
    assert whole.returncode == 0, whole.stderr
    killed = _run(str(tmp_path / "b"), str(tmp_path / "b.pt"), "--kill-at", "14", *extra)
    assert killed.returncode == -signal.SIGKILL
    assert not (tmp_path / "b.pt").exists()
    names = sorted(p.name for p in (tmp_path / "b").iterdir())
    # keep_last=2; the unrolled problem (K=3) defers checkpoints to closed unrolls
    assert names == (["ckpt-000000009.pt", "ckpt-000000012.pt"] if unrolled
                     else ["ckpt-000000008.pt", "ckpt-000000012.pt"])
    resumed = _run(str(tmp_path / "b"), str(tmp_path / "b.pt"), "--resume", *extra)
    assert resumed.returncode == 0, resumed.stderr
    a = torch.load(tmp_path / "a.pt", weights_only=True)
    b = torch.load(tmp_path / "b.pt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 30
    assert _equal_nested(a, b)


def _small_engine(tmp_path: Path, **kw: Any) -> tuple[zg.Engine, Vec]:
    m, h = Vec([1.0, -1.0]), Vec([0.5])
    inner = zg.ImplicitProblem("inner", m, torch.optim.SGD(m.parameters(), lr=0.1),
                               training_step=lambda p, b: ((p() - p.outer()) ** 2).sum())
    outer = zg.ImplicitProblem("outer", h, torch.optim.SGD(h.parameters(), lr=0.1),
                               training_step=lambda p, b: (p.inner() ** 2).sum())
    cfg = zg.EngineConfig(checkpoint_dir=str(tmp_path), summary=False, progress="off", **kw)
    return zg.Engine([outer, inner], zg.chain(outer, inner), cfg), m


def test_truncated_newest_checkpoint_falls_back_to_the_previous(tmp_path: Path) -> None:
    engine, _ = _small_engine(tmp_path, train_iters=6, checkpoint_step=2, keep_last=5)
    engine.run()
    paths = zg.checkpoint.CheckpointManager(tmp_path, 5).paths()
    assert [p.name for p in paths] == [f"ckpt-00000000{k}.pt" for k in (2, 4, 6)]
    newest = paths[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    with pytest.warns(UserWarning, match="cannot be read"):
        state, path = zg.checkpoint.CheckpointManager(tmp_path, 5).load_latest()  # type: ignore[misc]
    assert path == paths[-2] and state["global_step"] == 4


def test_a_pickle_that_runs_code_is_never_executed(tmp_path: Path) -> None:
    """Checkpoints load with weights_only=True: a file whose unpickling would run code is
    rejected (and skipped), never executed."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, (f"touch {marker}",))

    good, _ = _small_engine(tmp_path, train_iters=2, checkpoint_step=2)
    good.run()
    with open(tmp_path / "ckpt-000000009.pt", "wb") as f:
        pickle.dump({"format": 1, "state": Evil()}, f)
    with pytest.warns(UserWarning, match="cannot be read"):
        found = zg.checkpoint.CheckpointManager(tmp_path, 3).load_latest()
    assert found is not None and found[1].name == "ckpt-000000002.pt"
    assert not marker.exists()


def test_keep_last_and_atomic_names(tmp_path: Path) -> None:
    engine, _ = _small_engine(tmp_path, train_iters=10, checkpoint_step=1, keep_last=3)
    engine.run()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000008.pt", "ckpt-000000009.pt", "ckpt-000000010.pt"]


def test_resume_without_checkpoint_starts_fresh_and_checkpoint_settings_are_checked(
    tmp_path: Path,
) -> None:
    engine, _ = _small_engine(tmp_path / "empty", train_iters=3, resume=True)
    engine.run()
    assert engine.global_step == 3
    with pytest.raises(zg.ConfigError, match="checkpoint_dir"):
        zg.EngineConfig(checkpoint_step=5)
    with pytest.raises(zg.ConfigError, match="keep_last"):
        zg.EngineConfig(checkpoint_dir=str(tmp_path), keep_last=0)


def test_resuming_into_a_different_program_is_refused(tmp_path: Path) -> None:
    engine, _ = _small_engine(tmp_path, train_iters=2, checkpoint_step=2)
    engine.run()
    m = Vec([1.0])
    other = zg.Engine([zg.ImplicitProblem("solo", m, torch.optim.SGD(m.parameters(), lr=0.1),
                                          training_step=lambda p, b: p().sum())],
                      config=zg.EngineConfig(checkpoint_dir=str(tmp_path), resume=True,
                                             train_iters=4, summary=False, progress="off"))
    with pytest.raises(zg.ZigguratError, match="holds problems"):
        other.run()


# --------------------------------------------------------------------------- review fixes
def test_a_corrupt_newest_file_is_set_aside_and_never_outlives_good_ones(tmp_path: Path
                                                                         ) -> None:
    engine, _ = _small_engine(tmp_path, train_iters=4, checkpoint_step=2, keep_last=2)
    engine.run()
    newest = tmp_path / "ckpt-000000004.pt"
    newest.write_bytes(b"garbage")
    engine, _ = _small_engine(tmp_path, train_iters=6, checkpoint_step=2, keep_last=1,
                              resume=True)
    with pytest.warns(UserWarning, match="renamed"):
        engine.run()
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["ckpt-000000004.pt.corrupt", "ckpt-000000006.pt"]
    again, _ = _small_engine(tmp_path, train_iters=7, resume=True)
    again.run()
    assert again.global_step == 7  # resumed from 6, not from scratch


def test_a_new_run_refuses_a_folder_holding_another_runs_checkpoints(tmp_path: Path) -> None:
    first, _ = _small_engine(tmp_path, train_iters=4, checkpoint_step=2)
    first.run()
    second, _ = _small_engine(tmp_path, train_iters=4, checkpoint_step=2)
    with pytest.raises(zg.ConfigError, match="resume=True"):
        second.run()
    first.config = zg.EngineConfig(**{**vars(first.config), "train_iters": 6})
    first.run()  # the engine that wrote them may go on
    assert first.global_step == 6


def test_namedtuples_and_dict_subclasses_are_not_plain() -> None:
    from collections import OrderedDict, defaultdict, namedtuple

    Pair = namedtuple("Pair", "x y")
    assert zg.checkpoint.is_plain((torch.ones(1), 2, "a", None, [1.0], {"k": (1,)}))
    assert zg.checkpoint.is_plain(OrderedDict(a=torch.ones(1)))
    assert not zg.checkpoint.is_plain(Pair(torch.ones(1), 1))
    assert not zg.checkpoint.is_plain(defaultdict(int))


def _es_program(tmp_path: Path, iters: int, resume: bool) -> tuple[zg.Engine, Vec]:
    m, h = Vec([1.0, -1.0]), Vec([0.5, 0.2])
    inner = zg.IterativeProblem(
        "inner", m, torch.optim.SGD(m.parameters(), lr=0.3),
        config=zg.Config(type=zg.EvolutionStrategies(samples=3, sigma=0.1), unroll_steps=2),
        training_step=lambda p, b: ((p() - torch.tanh(p.outer())) ** 2).sum())
    outer = zg.ImplicitProblem("outer", h, torch.optim.SGD(h.parameters(), lr=0.1),
                               training_step=lambda p, b: ((p.inner() - 0.3) ** 2).sum())
    cfg = zg.EngineConfig(train_iters=iters, checkpoint_dir=str(tmp_path), checkpoint_step=2,
                          resume=resume, summary=False, progress="off")
    return zg.Engine([outer, inner], zg.chain(outer, inner), cfg), h


def test_evolution_strategies_resume_bit_identically(tmp_path: Path) -> None:
    whole, h_whole = _es_program(tmp_path / "a", 10, False)
    whole.run()
    part, _ = _es_program(tmp_path / "b", 4, False)
    part.run()
    rest, h_rest = _es_program(tmp_path / "b", 10, True)
    rest.run()
    assert torch.equal(h_whole.theta, h_rest.theta)


def _sampler_program(tmp_path: Path, iters: int, resume: bool) -> Vec:
    from torch.utils.data import DataLoader, RandomSampler, TensorDataset

    data = TensorDataset(torch.arange(12, dtype=torch.float64).unsqueeze(1))
    loader = DataLoader(data, batch_size=4,
                        sampler=RandomSampler(data, generator=torch.Generator().manual_seed(3)))
    m = Vec([0.0])
    p = zg.ImplicitProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
                           train_data_loader=loader,
                           training_step=lambda p, b: ((p() - b[0]) ** 2).mean() * b[0][0])
    zg.Engine([p], config=zg.EngineConfig(train_iters=iters, checkpoint_dir=str(tmp_path),
                                          checkpoint_step=1, resume=resume, summary=False,
                                          progress="off")).run()
    return m


def test_a_samplers_own_generator_is_restored(tmp_path: Path) -> None:
    whole = _sampler_program(tmp_path / "a", 8, False)
    _sampler_program(tmp_path / "b", 4, False)  # stops inside the second epoch
    resumed = _sampler_program(tmp_path / "b", 8, True)
    assert torch.equal(whole.theta, resumed.theta)


def _shared_generator_program(tmp_path: Path, iters: int, resume: bool) -> tuple[Vec, Vec]:
    """Two problems' shuffled loaders drawing from one generator (as a program seeded with
    ``zg.seeding.seed_everything`` may give them), 3 batches a pass, checkpoints every step."""
    from torch.utils.data import DataLoader, TensorDataset

    shared = torch.Generator().manual_seed(5)
    data = TensorDataset(torch.arange(12, dtype=torch.float64).unsqueeze(1))
    low_m, up_m = Vec([0.0]), Vec([1.0])
    low = zg.ImplicitProblem(
        "low", low_m, torch.optim.SGD(low_m.parameters(), lr=0.1),
        train_data_loader=DataLoader(data, batch_size=4, shuffle=True, generator=shared),
        training_step=lambda p, b: ((p() - p.up() * b[0]) ** 2).mean())
    up = zg.ImplicitProblem(
        "up", up_m, torch.optim.SGD(up_m.parameters(), lr=0.01),
        train_data_loader=DataLoader(data, batch_size=4, shuffle=True, generator=shared),
        training_step=lambda p, b: ((p.low() - b[0]) ** 2).mean())
    zg.Engine([up, low], zg.chain(up, low),
              zg.EngineConfig(train_iters=iters, checkpoint_dir=str(tmp_path), checkpoint_step=1,
                              resume=resume, summary=False, progress="off")).run()
    return low_m, up_m


@pytest.mark.parametrize("stop", [2, 4, 5])
def test_loaders_sharing_a_generator_resume_bit_identically(tmp_path: Path, stop: int) -> None:
    """Each loader's pass is replayed from its own starting state, which moves the shared
    generator; it is then put where it stood at the checkpoint, so the next passes draw what
    an uninterrupted run draws."""
    whole = _shared_generator_program(tmp_path / "a", 9, False)
    _shared_generator_program(tmp_path / "b", stop, False)
    resumed = _shared_generator_program(tmp_path / "b", 9, True)
    for a, b in zip(whole, resumed):
        assert torch.equal(a.theta, b.theta)


def test_resume_keeps_the_metrics_written_before_the_checkpoint(tmp_path: Path) -> None:
    import json

    def program(iters: int, resume: bool) -> None:
        engine, _ = _small_engine(tmp_path / "ckpt", train_iters=iters, checkpoint_step=3,
                                  resume=resume, log_step=1, logger_type=("jsonl", "csv"),
                                  log_dir=str(tmp_path / "logs"))
        engine.run()

    program(4, False)  # checkpoint at 3 (and 4 at the end); records for steps 1..4
    (tmp_path / "ckpt" / "ckpt-000000004.pt").unlink()  # as if killed after step 4's records
    program(6, True)
    lines = (tmp_path / "logs" / "run" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["global_step"] for line in lines]
    assert steps == [1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6]  # step 4 once, not twice
    import csv

    with open(tmp_path / "logs" / "run" / "metrics.csv", newline="") as f:
        assert [int(r["global_step"]) for r in csv.DictReader(f)] == steps


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_a_last_line_cut_short_is_dropped_on_resume(tmp_path: Path, kind: str) -> None:
    """A crash while a record was written (power loss, a full disk) leaves a last line
    without its line end: the resumed run drops it (JSONL failed to parse it, CSV kept a
    row with truncated cells); that record is lost, the others are kept once."""
    import csv
    import json

    def program(iters: int, resume: bool) -> None:
        engine, _ = _small_engine(tmp_path / "ckpt", train_iters=iters, checkpoint_step=3,
                                  resume=resume, log_step=1, logger_type=kind,
                                  log_dir=str(tmp_path / "logs"))
        engine.run()

    program(4, False)
    path = tmp_path / "logs" / "run" / f"metrics.{kind}"
    text = path.read_text()
    path.write_text(text[:-12])  # step 4's last record cut short; resumed from step 4
    program(6, True)
    if kind == "jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
    else:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    assert [int(r["global_step"]) for r in rows] == [1, 1, 2, 2, 3, 3, 4, 5, 5, 6, 6]
    assert all(r["wall_time"] not in (None, "") and float(r["wall_time"]) > 0 for r in rows)


def _outer_every_third_iteration(**settings: Any) -> zg.Engine:
    """inner steps every iteration, outer every third (unroll 3); ``EngineConfig(**settings)``
    with JSONL records of every step."""
    m, h = Vec([1.0, -1.0]), Vec([0.5])
    inner = zg.ImplicitProblem("inner", m, torch.optim.SGD(m.parameters(), lr=0.1),
                               config=zg.Config(unroll_steps=3),
                               training_step=lambda p, b: ((p() - p.outer()) ** 2).sum())
    outer = zg.ImplicitProblem("outer", h, torch.optim.SGD(h.parameters(), lr=0.1),
                               training_step=lambda p, b: (p.inner() ** 2).sum())
    return zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(
        log_step=1, logger_type="jsonl", summary=False, progress="off", **settings))


def test_records_are_not_repeated_for_problems_that_did_not_step(tmp_path: Path) -> None:
    import json

    _outer_every_third_iteration(train_iters=6, log_dir=str(tmp_path)).run()
    records = [json.loads(x)
               for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["global_step"] for r in records if r["problem"] == "outer"] == [3, 6]
    assert [r["global_step"] for r in records if r["problem"] == "inner"] == [1, 2, 3, 4, 5, 6]


def test_a_resumed_run_logs_what_an_uninterrupted_one_logs(tmp_path: Path) -> None:
    """The upper problem steps every 3 iterations; a run resumed from the checkpoint of
    iteration 4 (outer last stepped at 3) writes every record once, the hypergradient norm
    included: the records of the logs and the checkpoint agree on what was logged."""
    import json

    def program(folder: str, iters: int, resume: bool) -> list[dict[str, Any]]:
        _outer_every_third_iteration(
            train_iters=iters, log_dir=str(tmp_path / folder), resume=resume,
            checkpoint_dir=str(tmp_path / folder / "ckpt"), checkpoint_step=4).run()
        lines = (tmp_path / folder / "run" / "metrics.jsonl").read_text().splitlines()
        return [{k: r[k] for k in ("global_step", "problem", "step", "loss", "hypergrad_norm")}
                for r in map(json.loads, lines)]

    whole = program("a", 9, False)
    program("b", 5, False)  # checkpoints at 4 and at the end (5)
    (tmp_path / "b" / "ckpt" / "ckpt-000000005.pt").unlink()  # as if killed after step 5
    resumed = program("b", 9, True)
    assert resumed == whole
    assert [r["global_step"] for r in whole if r["problem"] == "outer"] == [3, 6, 9]


def test_metrics_are_averaged_over_micro_batches() -> None:
    m = Vec([0.0])
    batches = [torch.tensor([1.0]), torch.tensor([3.0])]
    p = zg.ImplicitProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
                           train_data_loader=batches,
                           config=zg.Config(gradient_accumulation=2),
                           training_step=lambda p, b: {"loss": (p() * b).sum(), "b": b.sum()})
    zg.Engine([p], config=zg.EngineConfig(train_iters=1, summary=False, progress="off")).run()
    assert float(p.last_metrics["b"]) == 2.0
    assert float(p.last_loss) == 0.0
