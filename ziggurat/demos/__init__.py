"""Runnable demonstration programs (``ziggurat demo [NAME]``), on data shipped by packages."""

from __future__ import annotations

from collections.abc import Callable

from . import weight_decay

DEMOS: dict[str, tuple[str, Callable[[list[str]], int]]] = {
    "weight-decay": (weight_decay.__doc__.splitlines()[0] if weight_decay.__doc__ else "",
                     weight_decay.main),
}
DEFAULT = "weight-decay"
