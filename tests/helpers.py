"""Small modules shared by the tests."""

from __future__ import annotations

import torch

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
