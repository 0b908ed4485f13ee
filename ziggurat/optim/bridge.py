"""Conversion between a torch.optim optimizer and its functional twin, both ways.

``from_torch`` reads each parameter's settings from the param group holding it and its
state from ``optimizer.state``; ``write_back`` stores a functional state in torch's format,
so torch can continue (or be checkpointed) where the functional optimizer stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..data import scalars_to_cpu
from ..errors import ZigguratError
from .functional import (
    FUNCTIONAL_OPTIMIZERS,
    FunctionalOptimizer,
    Hyper,
    State,
    StateIn,
    zero_step,
)

_TWINS: dict[type[torch.optim.Optimizer], type[FunctionalOptimizer]] = {
    cls.torch_type: cls for cls in FUNCTIONAL_OPTIMIZERS.values()
}

SUPPORTED = ", ".join(f"torch.optim.{t.__name__}" for t in _TWINS)
"""The torch optimizers that have a functional twin (exact types)."""


def functional_twin(optimizer: torch.optim.Optimizer) -> FunctionalOptimizer:
    """The functional optimizer that computes what ``optimizer.step()`` computes.

    The type must be exactly one of the supported ones: a subclass may override ``step``,
    so it is refused rather than silently mistaken for its base.
    """
    kind = type(optimizer)
    cls = _TWINS.get(kind)
    if cls is None:
        bases = [t.__name__ for t in _TWINS if isinstance(optimizer, t)]
        why = (
            f" It subclasses torch.optim.{bases[0]}, but a subclass may change step(), so it "
            f"is not taken for its base."
            if bases
            else ""
        )
        raise ZigguratError(
            f"No functional (differentiable) twin of the optimizer "
            f"{kind.__module__}.{kind.__qualname__}: supported are {SUPPORTED}.{why} Use one "
            f"of those for the problem whose steps are unrolled."
        )
    return cls()


def _groups_by_param(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _group_of(
    groups: dict[int, dict[str, Any]],
    p: Tensor,
    index: int,
    optimizer: torch.optim.Optimizer,
    caller: str,
) -> dict[str, Any]:
    group = groups.get(id(p))
    if group is None:
        raise ZigguratError(
            f"{caller}: params[{index}] (shape {tuple(p.shape)}) is in no param group of the "
            f"{type(optimizer).__name__} optimizer; pass the very tensors the optimizer was "
            f"built with (matched by identity)."
        )
    return group


def from_torch(
    optimizer: torch.optim.Optimizer, params: Sequence[Tensor]
) -> tuple[FunctionalOptimizer, State, Hyper]:
    """Map a torch optimizer to its functional twin: per-parameter hyperparameters read from
    the param group holding each tensor in `params` (matched by identity), and the
    optimizer's current state for those tensors converted (detached clones) to the
    functional state (empty/zero state if the optimizer has not stepped yet).

    Hyperparameter values are the group's own objects (a tensor lr stays that tensor).
    """
    twin = functional_twin(optimizer)
    groups = _groups_by_param(optimizer)
    hyper: Hyper = []
    state: State = []
    on_device: list[dict[str, Tensor]] = []  # states whose step counter is on a device
    for i, p in enumerate(params):
        group = _group_of(groups, p, i, optimizer, "from_torch")
        h = twin.hyper_from_group(group)
        twin.settings(h, i)  # fail here, naming the parameter, not at the first step
        hyper.append(h)
        torch_state = optimizer.state.get(p, {})
        if not torch_state:
            state.append(twin.init_state([p], [h])[0])
            continue
        converted: dict[str, Tensor] = {}
        for key, value in torch_state.items():
            if key not in twin.state_keys or value is None:
                continue
            if key == "step" and not isinstance(value, Tensor):
                value = torch.tensor(float(value), dtype=zero_step().dtype)
            if isinstance(value, Tensor):
                converted[key] = value.detach().clone()
        if "step" in converted and converted["step"].device.type != "cpu":
            on_device.append(converted)
        state.append(converted)
    _counters_to_cpu(on_device)
    return twin, state, hyper


def _counters_to_cpu(states: Sequence[dict[str, Tensor]]) -> None:
    """Step counters that fused or capturable torch optimizers keep on the parameters'
    device, moved to the CPU as torch's other optimizers keep them (the functional step
    reads its counter as a number: on the CPU that is no host sync) in one transfer per
    device, not one each."""
    dtype = zero_step().dtype
    for s, counter in zip(states, scalars_to_cpu([s["step"] for s in states])):
        s["step"] = counter.to(dtype).clone()  # (its own storage, not a view of the stack)


def write_back(optimizer: torch.optim.Optimizer, params: Sequence[Tensor], state: StateIn) -> None:
    """Store a functional state (detached) into optimizer.state[p] in torch's own format, so
    the torch optimizer can continue (or be checkpointed) exactly where the functional one
    stopped.

    Only the state is stored: copy the functional parameters into ``params`` yourself
    (``p.data.copy_(new)`` or under ``torch.no_grad()``).
    """
    twin = functional_twin(optimizer)
    if len(state) != len(params):
        raise ZigguratError(
            f"write_back got {len(params)} params but {len(state)} state dicts; pass one "
            f"state dict per parameter."
        )
    groups = _groups_by_param(optimizer)
    for i, (p, s) in enumerate(zip(params, state)):
        group = _group_of(groups, p, i, optimizer, "write_back")
        unknown = sorted(set(s) - twin.state_keys)
        if unknown:
            raise ZigguratError(
                f"write_back: the state of params[{i}] has keys {unknown} that "
                f"torch.optim.{type(optimizer).__name__} does not use; pass the state built "
                f"by the {twin.name} functional optimizer."
            )
        stored = {k: v.detach().clone() for k, v in s.items()}
        if "step" in stored and group.get("fused", False):
            stored["step"] = _counter_on(stored["step"], p.device, torch.float32)
        elif "step" in stored and group.get("capturable", False):
            stored["step"] = _counter_on(stored["step"], p.device, stored["step"].dtype)
        optimizer.state[p] = stored


def _counter_on(counter: Tensor, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A step counter on ``device`` (where fused and capturable optimizers keep it). From
    the CPU it is a fill kernel with the counter's value (read without a host sync), not a
    copy: a blocking copy to a GPU waits for the queued work, once per parameter."""
    if counter.device.type == "cpu" and device.type != "cpu":
        return torch.full((), float(counter), dtype=dtype, device=device)
    return counter.to(device=device, dtype=dtype)
