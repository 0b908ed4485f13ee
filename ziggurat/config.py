"""Configuration of one problem (``Config``) and of the whole program (``EngineConfig``).

Both are frozen dataclasses validated on creation: a wrong value raises ``ConfigError``
naming the field, the value and what is allowed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal

from . import hypergrad as _hypergrad  # noqa: F401  (registers the implicit methods)
from .errors import ConfigError
from .logging.progress import PROGRESS_MODES
from .logging.stream import check_sinks
from .registry import REGISTRY, Method, resolve
from .systems import PRECISIONS
from .systems.distributed import STRATEGIES
from .validation import check_bool, check_float, check_int

# Betty-style shorthand fields: (field name, methods it applies to, setting of the method).
_SHORTHANDS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    ("cg_iterations", ("cg",), "iterations"),
    ("cg_damping", ("cg",), "damping"),
    ("neumann_iterations", ("neumann",), "iterations"),
    ("neumann_alpha", ("neumann",), "alpha"),
    ("fixed_point_iterations", ("fixed_point",), "iterations"),
    ("fixed_point_alpha", ("fixed_point",), "alpha"),
    ("darts_alpha", ("darts", "sama"), "fd_eps"),
)


@dataclass(frozen=True)
class Config:
    """Settings of one problem (one level).

    Args:
        type: how the hypergradient *through this problem* is computed when an upper
            problem needs it: a name ("darts", "sama", "cg", "neumann", "fixed_point" for an
            ImplicitProblem; "reverse", "forward", "es" for an IterativeProblem) or a method
            object (``zg.CG(iterations=20, damping=1e-3)``). None (default): the problem
            class's default, Darts for ImplicitProblem and reverse mode for
            IterativeProblem.
        unroll_steps: this problem's steps between two steps of its upper problems.
        roll_back: the unroll's steps are look-ahead: once the upper problems have stepped,
            this problem returns to its state at the start of the unroll (parameters,
            buffers, optimizer state and settings, scheduler) and takes the same steps
            again, on the same batches, with the updated upper parameters (Meta-Weight-Net's
            "virtual step, meta step, real step"; Betty's roll-back for one step).
        warmup_steps: this problem's first steps that do not count towards an upper step.
        check_finite: stop with an error naming the problem and step when a hypergradient
            this problem receives is NaN or infinite. Reads the hypergradient's norm on the
            host: one device sync per hypergradient, which False removes.
        gradient_accumulation: micro-batches per step; their gradients are averaged (each
            differentiated on its own) before the hypergradient, clipping and the step.
        gradient_clipping: clip the final gradient (hypergradient included) to this total
            L2 norm (torch's clip_grad_norm_ rule); None: no clipping.
        precision: "fp32", "bf16" (autocast, CPU or CUDA) or "fp16" (autocast with dynamic
            loss scaling, CUDA) for this problem's own forward passes; hypergradient
            evaluations always run with autocast off.
        scheduler_metric: what a ReduceLROnPlateau scheduler is stepped with: "loss" or the
            name of a metric returned by training_step.
        cg_iterations, cg_damping, neumann_iterations, neumann_alpha,
        fixed_point_iterations, fixed_point_alpha, darts_alpha: shorthand for the settings
            of a method given by name (``darts_alpha`` is the finite-difference radius
            numerator of darts and sama). Setting one that does not belong to ``type`` is an
            error.

    Example:
        >>> import ziggurat as zg
        >>> zg.Config(type="cg", cg_iterations=20, unroll_steps=10).method
        CG(iterations=20, damping=0.0, tol=None, mixed='auto', fd_eps=0.01)
    """

    type: str | Method | None = None
    unroll_steps: int = 1
    roll_back: bool = False
    warmup_steps: int = 0
    check_finite: bool = True
    gradient_accumulation: int = 1
    gradient_clipping: float | None = None
    precision: str = "fp32"
    scheduler_metric: str = "loss"
    cg_iterations: int | None = None
    cg_damping: float | None = None
    neumann_iterations: int | None = None
    neumann_alpha: float | None = None
    fixed_point_iterations: int | None = None
    fixed_point_alpha: float | None = None
    darts_alpha: float | None = None
    method: Method | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_int("Config", "unroll_steps", self.unroll_steps, 1)
        check_int("Config", "warmup_steps", self.warmup_steps, 0)
        check_bool("Config", "roll_back", self.roll_back)
        check_bool("Config", "check_finite", self.check_finite)
        check_int("Config", "gradient_accumulation", self.gradient_accumulation, 1)
        check_float("Config", "gradient_clipping", self.gradient_clipping, strict=True,
                    allow_none=True)
        if self.precision not in PRECISIONS:
            raise ConfigError("Config", "precision", self.precision, f"one of {PRECISIONS}")
        if not isinstance(self.scheduler_metric, str) or not self.scheduler_metric:
            raise ConfigError("Config", "scheduler_metric", self.scheduler_metric,
                              "'loss' or the name of a metric returned by training_step")
        name = self.type.name if isinstance(self.type, Method) else self.type
        settings: dict[str, Any] = {}
        for short, methods, setting in _SHORTHANDS:
            value = getattr(self, short)
            if value is None:
                continue
            if isinstance(self.type, Method) or name not in methods:
                raise ConfigError(
                    "Config", short, value,
                    f"only with type in {list(methods)} given by name (type is {self.type!r}); "
                    f"put the setting on the method object instead, e.g. "
                    f"zg.{_class_name(methods[0])}({setting}={value!r})",
                )
            settings[setting] = value
        if self.type is None:
            object.__setattr__(self, "method", None)
            return
        try:
            method = resolve(self.type, "Config", **settings)
        except ConfigError as err:
            if err.owner == "Config":
                raise
            shorts = [s for s, m, st in _SHORTHANDS if name in m and st == err.field]
            if not shorts:
                raise
            raise ConfigError("Config", shorts[0], err.value, err.allowed) from None
        object.__setattr__(self, "method", method)


def _class_name(method_name: str) -> str:
    return REGISTRY[method_name].__name__


@dataclass(frozen=True)
class EngineConfig:
    """Settings of the whole program.

    Args:
        train_iters: engine iterations; each one steps every leaf problem once.
        valid_step: call ``Engine.validation()`` every this many iterations (None: never).
        early_stopping_metric: name of a metric returned by ``validation()``; None disables
            early stopping.
        early_stopping_mode: "min" or "max": whether smaller or larger is better.
        early_stopping_patience: validations without improvement before the run stops.
        early_stopping_min_delta: smallest change that counts as an improvement.
        log_step: print each problem's latest loss and metrics every this many iterations
            (None: never).
        checkpoint_dir: folder for checkpoints (``ckpt-<step>.pt``); None: no checkpoints.
        checkpoint_step: save every this many iterations (at the first iteration boundary
            where no unrolled problem holds an open unroll), and at the end of the run.
        keep_last: how many checkpoints to keep.
        resume: continue from the newest readable checkpoint in checkpoint_dir, if any.
        logger_type: where the metrics stream goes: one of, or a tuple of, "console",
            "jsonl", "csv", "tensorboard", "wandb" (offline unless WANDB_MODE says
            otherwise); training records every ``log_step`` iterations, validation records
            whenever validation runs. Files go to ``log_dir/run_name/``.
        log_dir, run_name: where file-writing loggers write.
        progress: progress bar over iterations: "auto" (a bar on a terminal, plain lines
            otherwise), "rich", "tqdm", "plain" or "off".
        summary: print a one-screen summary of the program when ``run`` starts.
        strategy: "none" (one process), or data parallel over the processes of a torchrun
            launch: "ddp" (replicas, gradients averaged by all-reduce), "zero" (as ddp, with
            each optimizer's state sharded by ZeroRedundancyOptimizer); "fsdp" is refused
            with the reason (see docs/distributed.md). Betty's ``strategy`` values
            ("distributed", "zero", "fsdp") map here through ``ziggurat.compat.betty``.

    Example:
        >>> import ziggurat as zg
        >>> zg.EngineConfig(train_iters=100, valid_step=10).valid_step
        10
    """

    train_iters: int = 1000
    valid_step: int | None = None
    early_stopping_metric: str | None = None
    early_stopping_mode: Literal["min", "max"] = "min"
    early_stopping_patience: int = 5
    early_stopping_min_delta: float = 0.0
    log_step: int | None = None
    checkpoint_dir: str | None = None
    checkpoint_step: int | None = None
    keep_last: int = 3
    resume: bool = False
    logger_type: str | tuple[str, ...] = "console"
    log_dir: str | None = None
    run_name: str = "run"
    progress: str = "auto"
    summary: bool = True
    strategy: str = "none"

    def __post_init__(self) -> None:
        check_int("EngineConfig", "train_iters", self.train_iters, 1)
        check_int("EngineConfig", "valid_step", self.valid_step, 1, allow_none=True)
        check_int("EngineConfig", "log_step", self.log_step, 1, allow_none=True)
        if self.early_stopping_metric is not None and not (
            isinstance(self.early_stopping_metric, str) and self.early_stopping_metric
        ):
            raise ConfigError(
                "EngineConfig", "early_stopping_metric", self.early_stopping_metric,
                "None or the name of a metric returned by Engine.validation()",
            )
        if self.early_stopping_metric is not None and self.valid_step is None:
            raise ConfigError(
                "EngineConfig", "valid_step", self.valid_step,
                "an integer >= 1 when early_stopping_metric is set (early stopping is "
                "decided on validation results)",
            )
        if self.early_stopping_mode not in ("min", "max"):
            raise ConfigError(
                "EngineConfig", "early_stopping_mode", self.early_stopping_mode, "'min' or 'max'"
            )
        check_int("EngineConfig", "early_stopping_patience", self.early_stopping_patience, 1)
        check_float("EngineConfig", "early_stopping_min_delta", self.early_stopping_min_delta)
        if self.checkpoint_dir is not None and not (
            isinstance(self.checkpoint_dir, str | os.PathLike) and str(self.checkpoint_dir)
        ):
            raise ConfigError("EngineConfig", "checkpoint_dir", self.checkpoint_dir,
                              "None or a folder path")
        check_int("EngineConfig", "checkpoint_step", self.checkpoint_step, 1, allow_none=True)
        check_int("EngineConfig", "keep_last", self.keep_last, 1)
        check_bool("EngineConfig", "resume", self.resume)
        check_sinks(self.logger_type, self.log_dir, self.run_name)
        if self.progress not in PROGRESS_MODES:
            raise ConfigError("EngineConfig", "progress", self.progress,
                              f"one of {PROGRESS_MODES}")
        check_bool("EngineConfig", "summary", self.summary)
        if not isinstance(self.strategy, str) or self.strategy not in STRATEGIES:
            raise ConfigError("EngineConfig", "strategy", self.strategy,
                              f"one of {STRATEGIES} (launch with torchrun for the others)")
        for name in ("checkpoint_step", "resume"):
            if getattr(self, name) not in (None, False) and self.checkpoint_dir is None:
                raise ConfigError("EngineConfig", "checkpoint_dir", None,
                                  f"a folder path when {name} is set")
