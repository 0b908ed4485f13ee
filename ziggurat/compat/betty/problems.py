"""Betty's problem classes (``Problem``, ``ImplicitProblem``, ``IterativeProblem``) on
ziggurat's.

They take Betty's constructor ``(name, config, module, optimizer, scheduler,
train_data_loader, extra_config)`` and Betty's hooks (``training_step``, ``forward``,
``configure_*``, ``get_batch``, ``param_callback()`` and ``grad_callback()`` without
arguments, ``on_inner_loop_start``, ``epoch_callback``, ``custom_optimizer_step``), and
expose what Betty programs read: ``name``, ``config``, ``cfg`` (the extra config),
``module``, ``optimizer``, ``scheduler``, ``cur_batch``, ``count``, ``leaf``,
``children``, ``parents``, ``paths``, ``trainable_parameters()``, ``parameters()``,
``state_dict()`` / ``load_state_dict()``, ``set_*``, ``logger``, and every other problem
as ``self.<name>``. ``count`` follows Betty: inside the problem's own ``training_step``
it already includes the step being taken.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from ... import iterative as _iterative
from ... import problem as _problem
from ...config import Config as ZConfig
from ...data import BatchStream, to_device
from ...errors import ConfigError
from .configs import Config
from .hypergradient import method_for
from .logging import LoggerBase

__all__ = ["ImplicitProblem", "IterativeProblem", "Problem"]

_BETTY_STATE_KEYS = {"module", "optimizer", "scheduler", "scaler"}


def _loaders(data: Any) -> Any:
    """Betty accepts one loader or a tuple of loaders (a tuple of one is that loader)."""
    if isinstance(data, tuple):
        return data[0] if len(data) == 1 else list(data)
    return data


def _takes_no_arguments(fn: Callable[..., Any]) -> bool:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return not any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
                   for p in params)


class Problem(_problem.Problem):
    """Base of Betty's problems on ziggurat (see the module docstring)."""

    _betty_iterative = False

    def __init__(
        self,
        name: str,
        config: Config | ZConfig | None = None,
        module: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        train_data_loader: Any | None = None,
        extra_config: Any | None = None,
    ) -> None:
        if config is None:
            config = Config()
        if isinstance(config, Config):
            self.betty_config: Config | None = config
            zconfig = config.to_ziggurat(method_for(config, self._betty_iterative))
        elif isinstance(config, ZConfig):
            self.betty_config = None
            zconfig = config
        else:
            raise ConfigError(name, "config", type(config).__name__,
                              "a betty.configs.Config (or a ziggurat Config)")
        self._betty_count = 0
        self._betty_stepping = False
        super().__init__(name, module=module, optimizer=optimizer, scheduler=scheduler,
                         train_data_loader=_loaders(train_data_loader), config=zconfig)
        self.cfg = extra_config
        self.logger = LoggerBase()
        self.env: Any = None
        self.target_device: torch.device | None = None
        self._training = True
        self._adapt_callbacks()

    # ----------------------------------------------------------------- Betty's counters
    @property
    def count(self) -> int:
        """Local step count; inside this problem's own step it includes that step (Betty)."""
        return self._betty_count + (1 if self._betty_stepping else 0)

    @count.setter
    def count(self, value: int) -> None:
        self._betty_count = value - (1 if self._betty_stepping else 0)

    def _step_number(self) -> int:
        return self._betty_count + 1  # (``count`` already counts the step inside it)

    def step(self) -> None:
        self._betty_stepping = True
        try:
            super().step()
        finally:
            self._betty_stepping = False

    # ----------------------------------------------------------------- Betty's hooks
    def _adapt_callbacks(self) -> None:
        """Betty's ``param_callback()`` / ``grad_callback()`` take no arguments (gradients
        are in ``p.grad``); ziggurat's take the parameters / gradients."""
        user_param = type(self).param_callback
        if user_param is not _problem.Problem.param_callback and _takes_no_arguments(
                self.param_callback):
            bound: Callable[[], Any] = self.param_callback  # type: ignore[assignment]
            self.param_callback = lambda params: bound()  # type: ignore[method-assign]
        user_grad = type(self).grad_callback
        if user_grad is not _problem.Problem.grad_callback and _takes_no_arguments(
                self.grad_callback):
            bound_grad: Callable[[], Any] = self.grad_callback  # type: ignore[assignment]

            def grad_callback(grads: list[Tensor]) -> list[Tensor]:
                params = self.trainable_parameters()
                for p, g in zip(params, grads):
                    p.grad = g
                bound_grad()
                return [g if p.grad is None else p.grad for p, g in zip(params, grads)]

            self.grad_callback = grad_callback  # type: ignore[method-assign]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """What calling the problem computes (default: its module)."""
        return self.module(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if type(self).forward is Problem.forward:
            return super().__call__(*args, **kwargs)
        return self.forward(*args, **kwargs)

    def get_batch(self) -> Any:
        batch = super().get_batch()
        if self.target_device is not None and self.target_device.type != "cpu":
            batch = to_device(batch, self.target_device)
        return batch

    def initialize(self) -> None:
        if self.module is None:
            self.module = self.configure_module()
        if self.target_device is not None and isinstance(self.module, torch.nn.Module):
            self.module.to(self.target_device)
        super().initialize()

    # ----------------------------------------------------------------- Betty's accessors
    @property
    def paths(self) -> list[list[_problem.Problem]]:
        """Betty's form: ``[self, c, ..., self]``, the problems a hypergradient is carried
        through, from the one whose parameters this problem's loss reads up to itself."""
        return [[self, *reversed(chain[1:]), self] for chain in super().paths]

    def meta_trainable_parameters(self) -> list[Tensor]:
        """Parameters an upper problem differentiates through (Betty's name)."""
        return self.trainable_parameters()

    def set_module(self, module: torch.nn.Module) -> None:
        """Replace the module (the optimizer should be replaced too if it changes)."""
        self.module = module
        if self.target_device is not None:
            module.to(self.target_device)

    def set_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Replace the optimizer."""
        self.optimizer = optimizer

    def set_scheduler(self, scheduler: Any) -> None:
        """Replace the learning-rate scheduler."""
        self.scheduler = scheduler

    def set_train_data_loader(self, loader: Any, idx: int = 0) -> None:
        """Replace the (idx-th) training data loader; batches restart from it."""
        current = self.train_data_loader
        if isinstance(current, list) and len(current) > 1:
            current = list(current)
            current[idx] = loader
            self.train_data_loader = current
        elif idx != 0:
            raise ConfigError(self.name, "idx", idx, "0: this problem has one data loader")
        else:
            self.train_data_loader = loader
        if self._stream is not None:
            self._stream = BatchStream(self.train_data_loader, self.name, self._end_epoch)

    def get_opt_param_group_for_param(self, param: Tensor) -> dict[str, Any] | None:
        """The optimizer param group holding ``param``."""
        for group in self.optimizer.param_groups:
            if any(p is param for p in group["params"]):
                return group
        return None

    def get_opt_state_for_param(self, param: Tensor) -> Any:
        """The optimizer state of ``param``."""
        return self.optimizer.state[param]

    def is_implemented(self, fn_name: str) -> bool:
        """Whether the problem has a callable ``fn_name``."""
        return callable(getattr(self, fn_name, None))

    def is_rank_zero(self) -> bool:
        """True on the process that logs (always, on one process)."""
        return True

    def train(self) -> None:
        """Training mode (the module's too)."""
        self._training = True
        if isinstance(self.module, torch.nn.Module):
            self.module.train()

    def eval(self) -> None:
        """Evaluation mode (the module's too)."""
        self._training = False
        if isinstance(self.module, torch.nn.Module):
            self.module.eval()

    def log(self, stats: Mapping[str, Any], global_step: int | None = None) -> None:
        """Log ``stats`` as Betty does (an INFO line)."""
        from .utils import log_from_loss_dict

        step = "" if global_step is None else f"[Global Step {global_step}] "
        self.logger.info(f'[Problem "{self.name}"] {step}[Local Step {self.count}] '
                         f"{log_from_loss_dict(stats)}")

    def add_logger(self, logger: Any) -> None:
        """Use ``logger`` for this problem's messages."""
        self.logger = logger

    # ----------------------------------------------------------------- state
    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore ``state_dict()``; also accepts Betty's own form (module, optimizer and
        optionally scheduler / scaler only)."""
        if set(state) <= _BETTY_STATE_KEYS:
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.scheduler is not None and state.get("scheduler") is not None:
                self.scheduler.load_state_dict(state["scheduler"])
            return
        super().load_state_dict(state)

    def configure_roll_back(self, roll_back: bool) -> None:
        """Engine-wide roll back (Betty's EngineConfig.roll_back) for a problem with upper
        problems: the problem's unroll is retaken after its upper problems step."""
        self.config = dataclasses.replace(self.config, roll_back=roll_back)


class ImplicitProblem(Problem, _problem.ImplicitProblem):
    """A lower or upper level whose hypergradient uses its ``config.type`` (darts, sama,
    neumann, cg)."""


class IterativeProblem(Problem, _iterative.IterativeProblem):
    """A level differentiated through its unrolled optimizer steps (reverse mode, exact).

    Betty 0.2.1's IterativeProblem needs functorch's removed ``make_functional_with_buffers``
    and crashes; this one unrolls ``unroll_steps`` steps of the problem's own torch
    optimizer with a differentiable twin."""

    _betty_iterative = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if type(self).forward is Problem.forward:
            return _iterative.IterativeProblem.__call__(self, *args, **kwargs)
        if self._own or self._theta is None:
            return self.forward(*args, **kwargs)
        with self.as_read():
            return self.forward(*args, **kwargs)
