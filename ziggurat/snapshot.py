"""A copy of a problem's training state, restorable in place: parameters and buffers, the
optimizer's state and its param-group settings, and the scheduler's state."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def _copy(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_copy(v) for v in value)
    return value


class Snapshot:
    """Tensors are cloned (no deepcopy of modules); ``restore`` copies them back in place,
    so parameters keep their identity and the snapshot can be restored many times."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                 scheduler: Any | None = None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.tensors = [t.detach().clone() for t in self._module_tensors()]
        self.opt_state: dict[Tensor, Any] = (
            {} if optimizer is None else {p: _copy(s) for p, s in optimizer.state.items()}
        )
        self.groups: list[dict[str, Any]] = [] if optimizer is None else [
            _copy({k: v for k, v in g.items() if k != "params"}) for g in optimizer.param_groups
        ]
        self.scheduler_state = None if scheduler is None else _copy(scheduler.state_dict())

    def _module_tensors(self) -> list[Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def state_dict(self) -> dict[str, Any]:
        """The saved values, optimizer state keyed by parameter position (checkpointable)."""
        index = {id(p): i for i, p in enumerate(self.module.parameters())}
        return {"tensors": self.tensors,
                "opt_state": {index[id(p)]: s for p, s in self.opt_state.items()
                              if id(p) in index},
                "groups": self.groups, "scheduler": self.scheduler_state}

    @classmethod
    def from_state_dict(cls, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        scheduler: Any | None, state: dict[str, Any]) -> Snapshot:
        """Rebuild a snapshot of ``module`` / ``optimizer`` / ``scheduler``."""
        snap = cls.__new__(cls)
        snap.module, snap.optimizer, snap.scheduler = module, optimizer, scheduler
        snap.tensors = list(state["tensors"])
        params = list(module.parameters())
        snap.opt_state = {params[int(i)]: s for i, s in state["opt_state"].items()}
        snap.groups = list(state["groups"])
        snap.scheduler_state = state["scheduler"]
        return snap

    def restore(self) -> None:
        """Put the saved values back."""
        with torch.no_grad():
            for t, saved in zip(self._module_tensors(), self.tensors):
                t.copy_(saved)
        if self.optimizer is not None:
            state = self.optimizer.state
            for p in list(state.keys()):
                if p not in self.opt_state:
                    del state[p]
            for p, saved_state in self.opt_state.items():
                state[p] = _copy(saved_state)
            for group, settings in zip(self.optimizer.param_groups, self.groups):
                group.update(_copy(settings))
        if self.scheduler is not None and self.scheduler_state is not None:
            self.scheduler.load_state_dict(_copy(self.scheduler_state))
