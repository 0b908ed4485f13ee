"""The engine: runs a multilevel program's schedule, validation and early stopping.

Schedule of one iteration (``train_step``), in bottom-up order: every leaf problem steps;
a problem with lower problems steps once each lower problem c has taken
``c.config.unroll_steps`` counted steps since the upper problem last stepped (steps within
c's first ``c.config.warmup_steps`` do not count). After an upper problem steps, its lower
problems begin a new unroll, and those with ``roll_back=True`` return to where that unroll
began.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import Tensor

from .checkpoint import CheckpointManager, is_plain, rng_state, set_rng_state
from .config import EngineConfig
from .errors import ConfigError, GraphError, ZigguratError
from .graph import DependencySpec, ProgramGraph, build_graph
from .logging import MetricRecord, MetricsStream, Progress, make_sinks
from .parallel import DataParallel, select_state
from .problem import Problem, explain_missing_attribute
from .render import summary


class Engine:
    """Runs problems connected by u2l / l2u dependencies.

    Args:
        problems: every problem of the program.
        dependencies: ``{"u2l": {upper: [lower, ...]}, "l2u": {lower: [upper, ...]}}`` with
            problems or their names as keys and values (``zg.chain(outer, inner)`` builds a
            chain); None for a single-level program.
        config: ``zg.EngineConfig``.

    Subclass and override ``validation()`` (returning a dict of metrics) to validate every
    ``config.valid_step`` iterations. Problems are reachable as ``engine.<name>``.
    """

    def __init__(
        self,
        problems: Sequence[Problem],
        dependencies: DependencySpec | None = None,
        config: EngineConfig | None = None,
    ) -> None:
        if config is not None and not isinstance(config, EngineConfig):
            raise ConfigError("Engine", "config", type(config).__name__, "a zg.EngineConfig")
        if isinstance(problems, Problem) or not all(isinstance(p, Problem) for p in problems):
            raise ConfigError("Engine", "problems", problems, "a list of zg.Problem objects")
        self.config = config if config is not None else EngineConfig()
        self.problems: list[Problem] = list(problems)
        self.global_step = 0
        self.stopped_early = False
        self.validation_history: list[tuple[int, dict[str, Any]]] = []
        self._best: float | None = None
        self._bad_validations = 0
        self._elapsed = 0.0  # seconds run so far (carried over by checkpoints)
        self._owns_checkpoints = False
        self._logged_counts: dict[str, int] = {}
        for p in self.problems:
            p.initialize()
        # strategy "ddp" / "zero": one replica per rank, see ziggurat.parallel
        self._parallel: DataParallel | None = (
            None if self.config.strategy == "none"
            else DataParallel(self.config.strategy, self.problems))
        self.set_dependency(dependencies)

    # ----------------------------------------------------------------- program structure
    def set_dependency(self, dependencies: DependencySpec | None) -> None:
        """(Re)wire the program; step counters of the schedule start afresh. The graph
        lookups the schedule needs (leaves, children, counter keys) are taken here, once,
        not at every iteration."""
        # problems are reached as problem.<name> and engine.<name>: no attribute may clash
        # (the engine's own problem attributes, from an earlier wiring, do not count; they
        # are replaced only once the new wiring has passed its checks)
        own = {n for n, p in self.__dict__.get("_reached", {}).items()
               if self.__dict__.get(n) is p}
        reserved = ({attr for p in self.problems for attr in p._attribute_names()}
                    | (set(dir(self)) - own) | {"graph"})
        graph = build_graph(self.problems, dependencies, reserved)
        _check_levels(self.problems, graph)
        for name in own:
            del self.__dict__[name]
        self.graph: ProgramGraph = graph
        self._by_name = {p.name: p for p in self.problems}
        self._reached = dict(self._by_name)  # engine.<name>: a plain instance attribute
        self.__dict__.update(self._reached)
        for p in self.problems:
            p.attach(self.graph, self._by_name)
        # counted steps of each lower problem since each of its upper problems last stepped
        self._pending = {(u, c): 0 for c in self.graph.names for u in self.graph.parents[c]}
        self._unroll_open = {n: False for n in self.graph.names}
        self._plan = _schedule_plan(self.graph, self._by_name)

    if TYPE_CHECKING:  # problems are instance attributes (``set_dependency``); at run
        # time the class has no __getattr__, which would slow every attribute read
        def __getattr__(self, item: str) -> Any: ...

    # ----------------------------------------------------------------- schedule
    def train_step(self) -> list[str]:
        """One iteration of the schedule; returns the names of the problems that stepped.

        (Written out in one loop: it runs at every iteration, and on small models its
        bookkeeping is a measurable part of the step.)"""
        try:
            return self._train_step()
        except AttributeError as err:  # a misspelt name in a training_step, say
            explain_missing_attribute(err)
            raise

    def _train_step(self) -> list[str]:
        stepped: list[str] = []
        finished: list[str] = []
        pending, unroll_open = self._pending, self._unroll_open
        for name, problem, waits, counts, children in self._plan:
            if waits:  # not a leaf: ready once each lower problem took its unroll_steps
                ready = True
                for key, lower in waits:
                    if pending[key] < lower.config.unroll_steps:
                        ready = False
                        break
                if not ready:
                    continue
            counted = problem.count >= problem.config.warmup_steps
            if counted and not unroll_open[name]:
                problem.start_unroll()
                unroll_open[name] = True
            problem.step()
            if counted:
                for key in counts:
                    pending[key] += 1
            stepped.append(name)
            if waits:
                for key, _ in waits:
                    pending[key] = 0
                finished.extend(children)
        if finished:
            for c in dict.fromkeys(finished):
                self._by_name[c].end_unroll()
                unroll_open[c] = False
        self.global_step += 1
        return stepped

    # ----------------------------------------------------------------- run loop
    def validation(self) -> Mapping[str, Any] | None:
        """Override: evaluate the program and return metrics (e.g. {"loss": ...})."""
        return None

    def run(self) -> None:
        """Run until ``config.train_iters`` iterations, with validation, early stopping,
        metrics, progress and checkpoints; with ``resume`` continue from the newest
        checkpoint first. Sinks and the progress bar are closed however the run ends."""
        cfg = self.config
        manager = None
        resumed_at: int | None = None
        if cfg.checkpoint_dir is not None:
            manager = CheckpointManager(cfg.checkpoint_dir, cfg.keep_last)
            if cfg.resume:
                found = manager.load_latest()
                if found is not None:
                    self.load_state_dict(select_state(self._parallel, found[0]))
                    resumed_at = self.global_step
            elif manager.paths() and not self._owns_checkpoints:
                raise ConfigError(
                    "EngineConfig", "checkpoint_dir", cfg.checkpoint_dir,
                    "a folder without another run's checkpoints: it holds "
                    f"{[p.name for p in manager.paths()]}; set resume=True to continue that "
                    f"run, or use an empty folder",
                )
            self._owns_checkpoints = True
            for p in self.problems:
                for source in p._stream.sources if p._stream is not None else []:
                    if getattr(source, "persistent_workers", False):
                        warnings.warn(
                            f"problem '{p.name}' uses a DataLoader with persistent_workers="
                            f"True: its workers' random state is not in the checkpoints, so "
                            f"a resumed run can differ from an uninterrupted one; use "
                            f"persistent_workers=False for bit-identical resumes",
                            stacklevel=2)
            if not self._state_is_plain():
                raise ZigguratError(
                    "checkpoints are on but the program's state holds objects that cannot be "
                    "saved safely (a scheduler, batch or method state that is not made of "
                    "tensors, numbers, strings, lists, tuples and dicts); fix it or turn "
                    "checkpointing off."
                )
        main = self._parallel is None or self._parallel.is_main  # rank 0 alone writes
        if cfg.summary and main:
            print(summary(self.graph, self.problems), flush=True)
        start = time.perf_counter() - self._elapsed
        progress = Progress(cfg.train_iters, cfg.progress if main else "off",
                            initial=self.global_step)
        with MetricsStream(make_sinks(cfg.logger_type if main else (), cfg.log_dir,
                                      cfg.run_name, _config_record(self), resumed_at)) as stream:
            try:
                self._run_loop(manager, stream, progress, start)
            finally:
                progress.close()
                self._elapsed = time.perf_counter() - start
        for problem in self.problems:
            problem.sync()
        if manager is not None and self.checkpointable:
            self._save(manager)

    def _run_loop(self, manager: CheckpointManager | None, stream: MetricsStream,
                  progress: Progress, start: float) -> None:
        cfg = self.config
        due = False
        while self.global_step < cfg.train_iters and not self.stopped_early:
            self.train_step()
            if cfg.log_step is not None and self.global_step % cfg.log_step == 0:
                for record in self._train_records(time.perf_counter() - start):
                    stream.write(record)
            if progress.mode != "off":  # the losses cost a host sync each: read when shown
                progress.update(self.global_step, self._latest_losses)
            if cfg.valid_step is not None and self.global_step % cfg.valid_step == 0:
                metrics = self.validation()
                if self._parallel is not None:  # every rank uses rank 0's metrics
                    metrics = self._parallel.agree(metrics)
                if metrics is not None:
                    self.validation_history.append((self.global_step, dict(metrics)))
                    stream.write(MetricRecord(
                        global_step=self.global_step, problem="engine", step=self.global_step,
                        loss=float(metrics.get("loss", float("nan"))),
                        metrics=_scalars({k: v for k, v in metrics.items() if k != "loss"}),
                        lr=None, hypergrad_norm=None, wall_time=time.perf_counter() - start,
                        kind="validation"))
                    if self._should_stop(metrics):
                        self.stopped_early = True
            if manager is not None and cfg.checkpoint_step is not None:
                due = due or self.global_step % cfg.checkpoint_step == 0
                if due and self.checkpointable:
                    self._elapsed = time.perf_counter() - start
                    self._save(manager)
                    due = False

    def _latest_losses(self) -> dict[str, float]:
        return {p.name: float(p.last_loss) for p in self.problems if p.last_loss is not None}

    def _train_records(self, wall_time: float) -> list[MetricRecord]:
        """One record per problem that has stepped: loss, metrics, lr, hypergradient norm."""
        records = []
        for p in self.problems:
            if p.last_loss is None or self._logged_counts.get(p.name) == p.count:
                continue  # nothing new since the last record of this problem
            self._logged_counts[p.name] = p.count
            metrics = _scalars(p.last_metrics)
            records.append(MetricRecord(
                global_step=self.global_step, problem=p.name, step=p.count,
                loss=float(p.last_loss), metrics=metrics,
                lr=float(p.optimizer.param_groups[0]["lr"]),
                hypergrad_norm=p.last_hypergrad_norm, wall_time=wall_time, kind="train"))
        return records

    # ----------------------------------------------------------------- checkpointing
    @property
    def checkpointable(self) -> bool:
        """True at iteration boundaries where no problem holds an open unroll graph."""
        return all(p.checkpointable for p in self.problems)

    def _save(self, manager: CheckpointManager) -> None:
        """Write a checkpoint (data parallel: collective; rank 0 writes every rank's part)."""
        if self._parallel is None:
            manager.save(self.state_dict(), self.global_step)
            return
        state = self._parallel.gather_state(self.state_dict,
                                            self._parallel.local_part(rng_state()))
        if state is not None:
            manager.save(state, self.global_step)

    def _state_is_plain(self) -> bool:
        """Whether the state can be checkpointed (data parallel: rank 0 decides for all)."""
        if self._parallel is None:
            return is_plain(self.state_dict())
        state = self._parallel.gather_state(self.state_dict,
                                            self._parallel.local_part(rng_state()))
        return bool(self._parallel.comm.broadcast_object(
            None if state is None else is_plain(state)))

    def state_dict(self) -> dict[str, Any]:
        """The whole program: every problem's state, the schedule, validation and RNGs."""
        return {
            "global_step": self.global_step,
            "pending": [[u, c, n] for (u, c), n in self._pending.items()],
            "unroll_open": dict(self._unroll_open),
            "best": self._best,
            "bad_validations": self._bad_validations,
            "stopped_early": self.stopped_early,
            "validation_history": [
                [step, _scalars(metrics)] for step, metrics in self.validation_history
            ],
            "rng": rng_state(),
            "elapsed": self._elapsed,
            "logged_counts": dict(self._logged_counts),
            "problems": {p.name: p.state_dict() for p in self.problems},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (the same program, built the same way)."""
        names = set(state["problems"])
        if names != set(self._by_name):
            raise ZigguratError(
                f"the checkpoint holds problems {sorted(names)} but this program has "
                f"{sorted(self._by_name)}; resume with the program that wrote it."
            )
        for name, problem_state in state["problems"].items():
            self._by_name[name].load_state_dict(problem_state)
        self.global_step = int(state["global_step"])
        self._pending = {(u, c): int(n) for u, c, n in state["pending"]}
        self._unroll_open = {k: bool(v) for k, v in state["unroll_open"].items()}
        self._best = state["best"]
        self._bad_validations = int(state["bad_validations"])
        self.stopped_early = bool(state["stopped_early"])
        self.validation_history = [(int(s), dict(m)) for s, m in state["validation_history"]]
        set_rng_state(state["rng"])
        self._elapsed = float(state.get("elapsed", 0.0))
        # which steps the logs hold already (a checkpoint without them: every step so far),
        # so that a problem that has not stepped since is not recorded twice
        self._logged_counts = {str(k): int(v) for k, v in state.get(
            "logged_counts", {p.name: p.count for p in self.problems}).items()}

    def _should_stop(self, metrics: Mapping[str, Any]) -> bool:
        cfg = self.config
        key = cfg.early_stopping_metric
        if key is None:
            return False
        if key not in metrics:
            raise ZigguratError(
                f"EngineConfig.early_stopping_metric={key!r} is not among the metrics returned "
                f"by validation() ({sorted(metrics)}); return it or change the setting."
            )
        value = float(metrics[key])
        if math.isnan(value):
            raise ZigguratError(f"validation metric '{key}' is NaN at step {self.global_step}.")
        delta = cfg.early_stopping_min_delta
        better = (
            self._best is None
            or (cfg.early_stopping_mode == "min" and value < self._best - delta)
            or (cfg.early_stopping_mode == "max" and value > self._best + delta)
        )
        if better:
            self._best = value
            self._bad_validations = 0
            return False
        self._bad_validations += 1
        return self._bad_validations >= cfg.early_stopping_patience



class _PlanEntry(NamedTuple):
    """What the schedule reads about one problem at every iteration, looked up once.

    ``waits``: for each lower problem c, the key (self, c) of its counted steps and c
    (whose ``config.unroll_steps`` it must reach, read at each iteration so that a replaced
    config is followed; empty for a leaf); ``counts``: the keys (upper, self) a counted step
    of this problem increments; ``children``: the lower problems' names."""

    name: str
    problem: Problem
    waits: tuple[tuple[tuple[str, str], Problem], ...]
    counts: tuple[tuple[str, str], ...]
    children: tuple[str, ...]


def _schedule_plan(graph: ProgramGraph, by_name: Mapping[str, Problem]) -> tuple[_PlanEntry, ...]:
    """The schedule's per-problem lookups, in the graph's bottom-up order (the order in
    which ``train_step`` visits the problems)."""
    return tuple(
        _PlanEntry(
            name=name,
            problem=by_name[name],
            waits=tuple(((name, c), by_name[c]) for c in graph.children[name]),
            counts=tuple((u, name) for u in graph.parents[name]),
            children=tuple(graph.children[name]),
        )
        for name in graph.order
    )


def _scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The metrics that are single numbers (others are not logged)."""
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, int | float | Tensor) and not isinstance(v, bool)
            and (not isinstance(v, Tensor) or v.numel() == 1)}


def _config_record(engine: Engine) -> dict[str, Any]:
    """The program's settings, for loggers that keep a run configuration (wandb)."""
    record: dict[str, Any] = {"engine": {k: v for k, v in vars(engine.config).items()}}
    for p in engine.problems:
        record[p.name] = {"class": type(p).__name__, "method": repr(p.method),
                          "unroll_steps": p.config.unroll_steps,
                          "optimizer": type(p.optimizer).__name__}
    return record


def _check_levels(problems: Sequence[Problem], graph: ProgramGraph) -> None:
    """No parameter is trained by two problems; every problem below another can pass
    hypergradients up; no unrolled problem lies below another."""
    owner: dict[int, str] = {}
    for p in problems:
        for t in p.trainable_parameters():
            other = owner.setdefault(id(t), p.name)
            if other != p.name:
                raise GraphError(
                    f"problems '{other}' and '{p.name}' train the same parameter tensor (shape "
                    f"{tuple(t.shape)}); each level must own its parameters. Give one of them "
                    f"its own copy, or freeze it there (requires_grad=False)."
                )
    by_name = {p.name: p for p in problems}
    for p in problems:
        if graph.parents[p.name] and type(p).best_response_vjp is Problem.best_response_vjp:
            raise GraphError(
                f"problem '{p.name}' lies below {list(graph.parents[p.name])} but is a plain "
                f"{type(p).__name__}, which cannot pass hypergradients up; make it a "
                f"zg.ImplicitProblem."
            )
        unrolled_above = ([q for q in graph.parents[p.name]
                           if by_name[q].method_family == "iterative"]
                          if p.method_family == "iterative" else [])
        if unrolled_above:
            raise GraphError(
                f"the unrolled problem '{p.name}' lies below the unrolled problem(s) "
                f"{unrolled_above}: not supported (an unroll holds its own copies of θ, "
                f"renewed at every step, so an unroll below cannot be differentiated through "
                f"the one above: its hypergradient would be wrong). Make one of them a "
                f"zg.ImplicitProblem."
            )

