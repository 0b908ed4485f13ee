"""A copy of a problem's parameters, buffers and optimizer state, restorable in place."""

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
    """Tensors are cloned (no deepcopy of modules); ``restore`` copies them back in place."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
        self.module = module
        self.optimizer = optimizer
        self.tensors = [t.detach().clone() for t in self._module_tensors()]
        self.opt_state: dict[Tensor, Any] = (
            {} if optimizer is None else {p: _copy(s) for p, s in optimizer.state.items()}
        )

    def _module_tensors(self) -> list[Tensor]:
        return [*self.module.parameters(), *self.module.buffers()]

    def state_dict(self) -> dict[str, Any]:
        """The saved values, optimizer state keyed by parameter position (checkpointable)."""
        index = {id(p): i for i, p in enumerate(self.module.parameters())}
        return {"tensors": self.tensors,
                "opt_state": {index[id(p)]: s for p, s in self.opt_state.items()
                              if id(p) in index}}

    @classmethod
    def from_state_dict(cls, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None,
                        state: dict[str, Any]) -> Snapshot:
        """Rebuild a snapshot of ``module`` / ``optimizer`` from ``state_dict()``."""
        snap = cls.__new__(cls)
        snap.module, snap.optimizer = module, optimizer
        snap.tensors = list(state["tensors"])
        params = list(module.parameters())
        snap.opt_state = {params[int(i)]: s for i, s in state["opt_state"].items()}
        return snap

    def restore(self) -> None:
        """Put the saved values back (parameters keep their identity)."""
        with torch.no_grad():
            for t, saved in zip(self._module_tensors(), self.tensors):
                t.copy_(saved)
        if self.optimizer is not None:
            state = self.optimizer.state
            for p in list(state.keys()):
                if p not in self.opt_state:
                    del state[p]
            for p, saved in self.opt_state.items():
                state[p] = _copy(saved)
