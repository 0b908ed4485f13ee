"""Small modules and problems shared by the tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

import ziggurat as zg

DTYPE = torch.float64


class Vec(torch.nn.Module):
    """A module holding one parameter vector θ (float64 from a list); calling it returns θ."""

    def __init__(self, values: list[float] | torch.Tensor) -> None:
        super().__init__()
        t = values.clone() if isinstance(values, torch.Tensor) else torch.tensor(values,
                                                                                  dtype=DTYPE)
        self.theta = torch.nn.Parameter(t)

    def forward(self) -> torch.Tensor:
        return self.theta


class Quad(zg.ImplicitProblem):
    """L = ½‖θ − Σ_uppers θ_u‖² + ½‖Σ_lowers θ_c‖²; counts on_inner_loop_start calls."""

    def __init__(
        self,
        name: str,
        uppers: Sequence[str] = (),
        lowers: Sequence[str] = (),
        config: zg.Config | None = None,
        init: tuple[float, float] = (1.0, -2.0),
        optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
    ) -> None:
        module = Vec(list(init))
        opt = (optimizer or (lambda ps: torch.optim.SGD(ps, lr=0.1)))(module.parameters())
        super().__init__(name, module=module, optimizer=opt, config=config)
        self.uppers, self.lowers = tuple(uppers), tuple(lowers)
        self.unroll_starts: list[int] = []  # self.count at each on_inner_loop_start

    def training_step(self, batch: Any) -> torch.Tensor:
        zero = torch.zeros(2, dtype=DTYPE)
        target = sum((getattr(self, u)() for u in self.uppers), zero)
        loss = 0.5 * ((self() - target) ** 2).sum()
        if self.lowers:
            below = sum((getattr(self, c)() for c in self.lowers), zero)
            loss = loss + 0.5 * (below**2).sum()
        return loss

    def on_inner_loop_start(self) -> None:
        self.unroll_starts.append(self.count)
