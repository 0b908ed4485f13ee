"""Betty's ``Engine`` on ziggurat's.

``Engine(problems, config=None, dependencies=None, env=None)`` with Betty's argument order
and dependency meaning, which differs from ziggurat's:

* Betty's ``u2l[U] = [C, ...]``: the loss of U reads the parameters of C (a hypergradient
  path starts there) = ziggurat's ``l2u[C] = [U]``;
* Betty's ``l2u[C] = [P, ...]``: P is an upper problem (parent) of C = ziggurat's
  ``u2l[P] = [C]``.

The usual bilevel ``{"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}`` reads the same in
both. Betty's engine attributes (``global_step``, ``train_iters``, ``valid_step``,
``leaves``, ``dependencies``, ``logger``, ``device``, problems by name) and methods
(``run``, ``train_step``, ``train`` / ``eval``, ``set_dependency``, ``validation``) are
kept; early stopping and the wandb logger, which crash in Betty 0.2.1, work.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from ... import engine as _engine
from ...config import EngineConfig as ZEngineConfig
from ...errors import ConfigError
from .configs import BettyFallback, EngineConfig, strategy_for
from .logging import LoggerBase
from .logging import logger as make_logger
from .problems import Problem

__all__ = ["Engine", "translate_dependencies"]


def translate_dependencies(dependencies: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """ziggurat's dependencies for Betty's (each table transposed and swapped)."""
    if dependencies is None:
        return None
    if not isinstance(dependencies, Mapping):
        raise ConfigError("betty Engine", "dependencies", type(dependencies).__name__,
                          "a dict {'u2l': {upper: [lower]}, 'l2u': {lower: [upper]}}")
    unknown = set(dependencies) - {"u2l", "l2u"}
    if unknown:
        raise ConfigError("betty Engine", "dependencies", sorted(map(str, unknown)),
                          "only the keys 'u2l' and 'l2u'")

    def transposed(table: Mapping[Any, Any] | None) -> dict[Any, list[Any]]:
        out: dict[Any, list[Any]] = {}
        for key, values in (table or {}).items():
            if isinstance(values, str) or not isinstance(values, Iterable):
                values = [values]
            for value in values:
                out.setdefault(value, []).append(key)
        return out

    return {"u2l": transposed(dependencies.get("l2u")),
            "l2u": transposed(dependencies.get("u2l"))}


@dataclasses.dataclass(frozen=True)
class _BettyBackedEngineConfig(BettyFallback, ZEngineConfig):
    """ziggurat's EngineConfig that also answers Betty's field names (``early_stopping``,
    ``roll_back``, ``strategy``, ...) from the Betty EngineConfig it was made from."""

    betty: EngineConfig | None = dataclasses.field(default=None, repr=False, compare=False)


def _device_for(strategy: str) -> torch.device:
    if strategy == "cpu":
        return torch.device("cpu")
    if strategy == "gpu":
        return torch.device("cuda")
    if strategy == "default":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # distributed strategies: the rank's device is chosen by the distributed layer
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Engine(_engine.Engine):
    """Betty's Engine: runs Betty problems (see the module docstring)."""

    def __init__(
        self,
        problems: Sequence[Any],
        config: EngineConfig | ZEngineConfig | None = None,
        dependencies: Mapping[str, Any] | None = None,
        env: Any | None = None,
    ) -> None:
        if env is not None:
            raise ConfigError(
                "betty Engine", "env", type(env).__name__,
                "None: Betty's reinforcement-learning environments are not supported by "
                "ziggurat's Betty layer",
            )
        if config is None:
            config = EngineConfig()
        problems = list(problems)
        log_steps = [p.betty_config.log_step for p in problems
                     if isinstance(p, Problem) and p.betty_config is not None
                     and p.betty_config.log_step > 0]
        if isinstance(config, EngineConfig):
            zconfig = config.to_ziggurat(min(log_steps) if log_steps else None)
            extra = {f.name: getattr(zconfig, f.name) for f in dataclasses.fields(zconfig)
                     if f.init}
            zconfig = _BettyBackedEngineConfig(**extra, betty=config)
            strategy = config.strategy
            roll_back = config.roll_back
        elif isinstance(config, ZEngineConfig):
            strategy, roll_back = "default", False
            zconfig = config
        else:
            raise ConfigError("betty Engine", "config", type(config).__name__,
                              "a betty.configs.EngineConfig")
        strategy_for(strategy)
        self._betty_stepping = False
        self.betty_config = config
        self.device = _device_for(strategy)
        self.dependencies = dependencies
        self.env = None
        translated = translate_dependencies(dependencies)
        with_parents = {id(c) for vals in (translated or {}).get("u2l", {}).values()
                        for c in vals}
        for p in problems:
            if isinstance(p, Problem):
                p.target_device = self.device
                if roll_back and id(p) in with_parents:
                    p.configure_roll_back(True)
        self.logger: LoggerBase = make_logger(getattr(config, "logger_type", "none")
                                              if isinstance(config, EngineConfig) else "none")
        super().__init__(problems, translated, zconfig)
        for p in problems:
            if isinstance(p, Problem):
                p.add_logger(self.logger)
        self.train_iters = zconfig.train_iters
        self.valid_step = zconfig.valid_step
        self.early_stopping = zconfig.early_stopping_metric is not None
        if type(self).validation is not _engine.Engine.validation:
            user_validation = self.validation

            def validation() -> Mapping[str, Any] | None:
                self.eval()
                try:
                    return user_validation()
                finally:
                    self.train()

            self.validation = validation  # type: ignore[method-assign]

    # ----------------------------------------------------------------- Betty's interface
    @property
    def global_step(self) -> int:
        """Iterations taken; inside ``train_step`` it includes the iteration being taken
        (Betty increments it first)."""
        return self._global_step + (1 if self._betty_stepping else 0)

    @global_step.setter
    def global_step(self, value: int) -> None:
        self._global_step = value - (1 if self._betty_stepping else 0)

    def train_step(self) -> list[str]:
        self._betty_stepping = True
        try:
            return super().train_step()
        finally:
            self._betty_stepping = False

    @property
    def leaves(self) -> list[Any]:
        """Problems with no lower problem (stepped every iteration)."""
        return [p for p in self.problems if self.graph.is_leaf(p.name)]

    def set_dependency(self, dependencies: Mapping[str, Any] | None) -> None:
        """(Re)wire the program with Betty-style ``dependencies``."""
        if "_by_name" in self.__dict__:  # called by a user after construction
            self.dependencies = dependencies
            super().set_dependency(translate_dependencies(dependencies))
        else:  # called by ziggurat's constructor with the translated form
            super().set_dependency(dependencies)

    def run(self) -> None:
        """Train for ``train_iters`` iterations, validating every ``valid_step``."""
        self.train()
        super().run()
        self.logger.info("Multilevel optimization finished!")

    def train(self) -> None:
        """Every problem (and its module) to training mode."""
        for p in self.problems:
            if isinstance(p, Problem):
                p.train()
            elif isinstance(p.module, torch.nn.Module):
                p.module.train()

    def eval(self) -> None:
        """Every problem (and its module) to evaluation mode."""
        for p in self.problems:
            if isinstance(p, Problem):
                p.eval()
            elif isinstance(p.module, torch.nn.Module):
                p.module.eval()

    def do_validation(self) -> bool:
        """Whether validation runs (a ``validation`` method is defined)."""
        return type(self).validation is not _engine.Engine.validation

    def is_rank_zero(self) -> bool:
        """True on the process that logs: rank 0 of a data-parallel run, or the only one."""
        return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0

    def is_implemented(self, fn_name: str) -> bool:
        """Whether the engine has a callable ``fn_name``."""
        return callable(getattr(self, fn_name, None))
