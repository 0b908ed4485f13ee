"""Evaluate a module with other tensors standing in for its parameters.

Unrolled problems keep their parameters as non-leaf tensors that carry the autograd graph
of the steps so far; ``use_parameters`` makes the ordinary module (and ``self.module(x)``
in user code) compute with them, then puts the real ``nn.Parameter`` objects back.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor


@contextmanager
def use_parameters(
    module: torch.nn.Module, params: Sequence[Tensor], values: Sequence[Tensor]
) -> Iterator[None]:
    """Within the block, every use of ``params[i]`` inside ``module`` sees ``values[i]``.

    Parameters shared by several submodules are replaced everywhere they appear.
    """
    holders: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    by_id = {id(p): v for p, v in zip(params, values)}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in by_id:
                holders.append((mod, name, p))
                mod._parameters[name] = by_id[id(p)]  # type: ignore[assignment]
    try:
        yield
    finally:
        for mod, name, p in holders:
            mod._parameters[name] = p
