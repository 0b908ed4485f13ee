"""Endless batch streams over one or several data loaders (one pass = one epoch)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch.utils.data

from .errors import ConfigError


def is_loader_group(data: object) -> bool:
    """True for a list or tuple of DataLoaders (several loaders zipped into one batch)."""
    return (
        isinstance(data, list | tuple)
        and len(data) > 0
        and all(isinstance(d, torch.utils.data.DataLoader) for d in data)
    )


class BatchStream:
    """Cycles over a loader forever; with several loaders yields a tuple of their batches.

    ``on_epoch_end`` is called each time the (first) loader is exhausted, before it restarts.
    """

    def __init__(
        self, data: Iterable[Any] | None, owner: str, on_epoch_end: Callable[[], None]
    ) -> None:
        if data is not None and not isinstance(data, Iterable):
            raise ConfigError(
                owner, "train_data_loader", type(data).__name__,
                "an iterable of batches (a DataLoader, a list of batches) or a list of "
                "DataLoaders",
            )
        self.owner = owner
        self.sources: list[Iterable[Any]] = (
            [] if data is None else list(data) if is_loader_group(data) else [data]
        )
        self._iterators: list[Iterator[Any] | None] = [None] * len(self.sources)
        self._on_epoch_end = on_epoch_end
        self.epoch = 0

    def _next_from(self, i: int) -> Any:
        it = self._iterators[i]
        if it is None:
            it = self._iterators[i] = iter(self.sources[i])
        try:
            return next(it)
        except StopIteration:
            pass
        fresh = iter(self.sources[i])
        try:
            batch = next(fresh)
        except StopIteration:
            raise ConfigError(
                self.owner, "train_data_loader", "an empty loader",
                "a loader that yields at least one batch",
            ) from None
        self._iterators[i] = fresh
        if i == 0:
            self.epoch += 1
            self._on_epoch_end()
        return batch

    def next(self) -> Any:
        """The next batch (None when the problem has no data)."""
        if not self.sources:
            return None
        if len(self.sources) == 1:
            return self._next_from(0)
        return tuple(self._next_from(i) for i in range(len(self.sources)))
