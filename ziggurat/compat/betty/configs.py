"""Betty's ``Config`` and ``EngineConfig`` (every field and default of betty-ml 0.2.1), and
their translation into ziggurat's configs.

The dataclasses are mutable, as Betty's are; they are read when a problem (``Config``) or
the engine (``EngineConfig``) is built. ``to_ziggurat`` says how each field maps:

=====================  ==========================================================
Betty field            ziggurat
=====================  ==========================================================
type                   the problem's method (see ``hypergradient.method_for``)
unroll_steps           Config.unroll_steps
warmup_steps           Config.warmup_steps = unroll_steps · ⌊warmup / unroll⌋, which
                       gives Betty's schedule (the first upper step after warm-up
                       comes at the first multiple of unroll_steps above
                       warmup_steps)
gradient_accumulation  Config.gradient_accumulation
gradient_clipping      Config.gradient_clipping (0.0, Betty's "off", is None)
precision              Config.precision ("fp32", "bf16", "fp16")
first_order,           no effect: ziggurat computes each hypergradient with the
retain_graph,          problem's method and never needs a kept graph;
allow_unused           IterativeProblem always differentiates its unroll
initial_dynamic_scale, fp16 uses ziggurat's own dynamic loss scaler
scale_factor
log_step               EngineConfig.log_step (the smallest positive one)
darts_alpha,           the finite-difference radius of darts (with mixed="fd") /
sama_adam_alpha        sama (with mixed="fd")
neumann_iterations,    Neumann(iterations, alpha); a diverging alpha is warned about
neumann_alpha
cg_iterations,         CG(iterations); cg_alpha only rescales the system Betty
cg_alpha               solves, so the correct answer does not depend on it
=====================  ==========================================================

``mixed`` is an addition: "exact" (default) computes the mixed second derivative of
darts / sama by double backward; "fd" uses Betty's central finite difference.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

from ...config import Config as ZConfig
from ...config import EngineConfig as ZEngineConfig
from ...errors import ConfigError

#: Betty's ``strategy`` values and the ziggurat EngineConfig.strategy each becomes
STRATEGIES: dict[str, str] = {
    "default": "none",
    "cpu": "none",
    "gpu": "none",
    "distributed": "ddp",
    "zero": "zero",
    "fsdp": "fsdp",
}

#: Betty's ``logger_type`` values and the ziggurat logger kinds each becomes
LOGGERS: dict[str, str] = {"none": "console", "tensorboard": "tensorboard", "wandb": "wandb"}


@dataclass
class Config:
    """Training configuration of one Betty problem (Betty 0.2.1's fields and defaults)."""

    type: str = "darts"
    unroll_steps: int = 1
    first_order: bool = True
    retain_graph: bool = False
    allow_unused: bool = True

    # gradient accumulation
    gradient_accumulation: int = 1

    # gradient clipping
    gradient_clipping: float = 0.0

    # precision
    precision: str = "fp32"
    initial_dynamic_scale: float = 4096.0
    scale_factor: float = 2.0

    # warm-up
    warmup_steps: int = 0

    # logging
    log_step: int = -1
    log_local_step: bool = False

    # darts
    darts_alpha: float = 0.01
    darts_multitask: bool = False

    # sama
    sama_adam_alpha: float = 1.0
    sama_multitask: bool = False

    # neumann
    neumann_iterations: int = 1
    neumann_alpha: float = 1.0

    # cg
    cg_iterations: int = 1
    cg_alpha: float = 1.0

    # ziggurat addition: how darts / sama compute the mixed second derivative
    mixed: str = "exact"

    def to_ziggurat(self, method: Any, roll_back: bool = False) -> ZConfig:
        """The ziggurat Config of a problem with this configuration and ``method``."""
        for name in ("darts_multitask", "sama_multitask"):
            if getattr(self, name):
                raise ConfigError(
                    "betty Config", name, True,
                    "False: multitask finite differences (leaving the lower parameters "
                    "perturbed) are not supported by ziggurat's Betty layer",
                )
        if self.mixed not in ("exact", "fd"):
            raise ConfigError("betty Config", "mixed", self.mixed, "'exact' or 'fd'")
        unroll = self.unroll_steps
        if not isinstance(unroll, int) or unroll < 1:
            raise ConfigError("betty Config", "unroll_steps", unroll, "an integer >= 1")
        warmup = self.warmup_steps
        if not isinstance(warmup, int) or warmup < 0:
            raise ConfigError("betty Config", "warmup_steps", warmup, "an integer >= 0")
        clip = self.gradient_clipping
        accumulation = self.gradient_accumulation
        if not isinstance(accumulation, int) or accumulation < 1:
            raise ConfigError("betty Config", "gradient_accumulation", accumulation,
                              "an integer >= 1")
        if accumulation > 1:
            warnings.warn(
                f"betty Config(gradient_accumulation={accumulation}): one step draws the "
                f"{accumulation} micro-batches here, so train_iters, warmup_steps and "
                f"valid_step count accumulated steps (Betty counts micro-batches); divide "
                f"them by {accumulation} for Betty's schedule (docs/migrating_from_betty.md)",
                UserWarning, stacklevel=3)
        return _BettyBackedConfig(
            type=method,
            unroll_steps=unroll,
            roll_back=roll_back,
            warmup_steps=unroll * (warmup // unroll),
            gradient_accumulation=accumulation,
            gradient_clipping=float(clip) if clip and clip > 0 else None,
            precision=self.precision,
            betty=self,
        )


class BettyFallback:
    """Mixin for a ziggurat config made from a Betty one (held in its ``betty`` field):
    names ziggurat's config lacks are answered from the Betty config."""

    def __getattr__(self, item: str) -> Any:
        betty = self.__dict__.get("betty")
        if betty is not None and not item.startswith("__"):
            return getattr(betty, item)
        raise AttributeError(item)


@dataclass(frozen=True)
class _BettyBackedConfig(BettyFallback, ZConfig):
    """A ziggurat Config that also answers Betty's field names (``first_order``,
    ``cg_alpha``, ``log_step``, ...) from the Betty Config it was made from."""

    betty: Config | None = dataclasses.field(default=None, repr=False, compare=False)


@dataclass
class EngineConfig:
    """Configuration of a Betty ``Engine`` (Betty 0.2.1's fields and defaults)."""

    train_iters: int = 50000
    valid_step: int = 500

    # logger
    logger_type: str = "none"

    # roll back
    roll_back: bool = False

    # distributed training
    backend: str = "nccl"
    strategy: str = "default"

    # early stopping
    early_stopping: bool = False
    early_stopping_mode: str = "min"
    early_stopping_tolerance: int = 5
    early_stopping_metric: str = "loss"

    def to_ziggurat(self, log_step: int | None = None) -> ZEngineConfig:
        """The ziggurat EngineConfig; ``log_step`` comes from the problems' configs."""
        if self.logger_type not in LOGGERS:
            raise ConfigError("betty EngineConfig", "logger_type", self.logger_type,
                              f"one of {sorted(LOGGERS)}")
        strategy = strategy_for(self.strategy)
        return ZEngineConfig(
            train_iters=self.train_iters,
            valid_step=self.valid_step if self.valid_step and self.valid_step > 0 else None,
            early_stopping_metric=self.early_stopping_metric if self.early_stopping else None,
            early_stopping_mode=self.early_stopping_mode,  # type: ignore[arg-type]
            early_stopping_patience=self.early_stopping_tolerance,
            log_step=log_step,
            # Betty's visualisation loggers also print; their files go to ./runs/run/
            logger_type=("console", kind) if (kind := LOGGERS[self.logger_type]) != "console"
            else kind,
            log_dir="runs" if kind != "console" else None,
            progress="off",
            summary=False,
            strategy=strategy,
        )


def strategy_for(strategy: str) -> str:
    """ziggurat's strategy for Betty's ``strategy`` value (ConfigError for unknown ones)."""
    if strategy == "accelerate":
        raise ConfigError(
            "betty EngineConfig", "strategy", strategy,
            f"one of {sorted(STRATEGIES)}: HuggingFace Accelerate is not supported; use "
            f"'distributed' (DDP), 'zero' or 'fsdp' under torchrun",
        )
    if strategy not in STRATEGIES:
        raise ConfigError("betty EngineConfig", "strategy", strategy,
                          f"one of {sorted(STRATEGIES)}")
    return STRATEGIES[strategy]
