"""Betty's small public helpers (same names and results, written for ziggurat)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "convert_tensor", "count_parameters", "flatten_list", "get_dtype", "get_grad_norm",
    "get_param_index", "get_weight_norm", "log_from_loss_dict", "neg_with_none",
    "replace_none_with_zero", "to_vec",
]


def convert_tensor(item: Any, device: Any = None) -> Any:
    """``item`` moved to ``device`` if it is a tensor, else unchanged."""
    return item.to(device) if isinstance(item, Tensor) else item


def get_dtype(precision: str) -> torch.dtype:
    """torch dtype of a precision name ("fp16", "bf16", anything else: float32)."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision, torch.float32)


def _total_norm(values: Iterable[Tensor]) -> float:
    total = sum(float(v.float().norm()) ** 2 for v in values)
    return -1 if total != total or total in (float("inf"), float("-inf")) else total


def get_grad_norm(parameters: Tensor | Iterable[Tensor]) -> float:
    """Sum of squared gradient norms (Betty's value: the square, -1 if not finite)."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return _total_norm(p.grad for p in params if p.grad is not None)


def get_weight_norm(parameters: Tensor | Iterable[Tensor]) -> float:
    """Sum of squared parameter norms (Betty's value: the square, -1 if not finite)."""
    params = [parameters] if isinstance(parameters, Tensor) else list(parameters)
    return _total_norm(p.detach() for p in params)


def flatten_list(regular_list: Sequence[Any]) -> list[Any]:
    """Concatenate a list of lists."""
    return [item for sub in regular_list for item in sub]


def get_param_index(param: Tensor, param_list: Iterable[Tensor]) -> int | None:
    """Position of ``param`` (by identity) in ``param_list``; None if absent."""
    for i, p in enumerate(param_list):
        if p is param:
            return i
    return None


def log_from_loss_dict(loss_dict: Mapping[str, Any]) -> str:
    """"key: value || key: value" with tensors as numbers and sequences indexed."""
    out = []
    for key, values in loss_dict.items():
        if isinstance(values, dict | list):
            items = values.values() if isinstance(values, dict) else values
            for i, v in enumerate(items):
                out.append(f"{key}_{i}: {v.item() if isinstance(v, Tensor) else v}")
        else:
            out.append(f"{key}: {values.item() if isinstance(values, Tensor) else values}")
    return " || ".join(out)


def to_vec(tensor_list: Sequence[Tensor], alpha: float = 1.0) -> Tensor:
    """All tensors flattened into one vector, times ``alpha``."""
    return torch.cat([alpha * t.reshape(-1) for t in tensor_list])


def count_parameters(tensor_list: Iterable[Tensor]) -> int:
    """Total number of elements."""
    return sum(t.numel() for t in tensor_list)


def neg_with_none(a: Tensor | None) -> Tensor | None:
    """−a, or None."""
    return None if a is None else -a


def replace_none_with_zero(tensor_list: Sequence[Tensor | None],
                           reference: Sequence[Tensor]) -> tuple[Tensor, ...]:
    """Each None replaced by zeros shaped like the matching reference tensor."""
    return tuple(torch.zeros_like(r) if t is None else t for t, r in zip(tensor_list, reference))
