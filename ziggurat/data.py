"""Endless batch streams over one or several data loaders (one pass = one epoch)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch.utils.data

from .errors import ConfigError


def scalars_to_cpu(values: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """0-dim tensors (step counters, say) on the CPU, in order: those on another device with
    one transfer per device (stacked; float64 where their dtypes differ), not one host sync
    each; those on the CPU as they are. A moved one is a view of its device's transfer."""
    out = list(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, t in enumerate(values):
        if t.device.type != "cpu":
            by_device.setdefault(t.device, []).append(i)
    for indices in by_device.values():
        group = [values[i].reshape(()) for i in indices]
        if any(t.dtype != group[0].dtype for t in group):
            group = [t.double() for t in group]
        for i, t in zip(indices, torch.stack(group).cpu().unbind()):
            out[i] = t
    return out


def step_counts(counters: Sequence[torch.Tensor | float]) -> list[float]:
    """The values of optimizer step counters, read with one transfer per device: torch.optim
    keeps them on the CPU (reading one is no host sync), except fused or capturable
    optimizers, which keep them on the parameters' device (one sync for all of them, not one
    each)."""
    on_cpu = iter(scalars_to_cpu([c for c in counters if isinstance(c, torch.Tensor)]))
    return [float(next(on_cpu)) if isinstance(c, torch.Tensor) else float(c)
            for c in counters]


def to_device(obj: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """``obj`` with every tensor on ``device``: tensors in dicts, lists and tuples (named
    tuples and dict subclasses keep their type), at any depth; ``obj`` itself, not a copy,
    when every tensor is already there; a tensor that occurs twice is moved once (both
    places hold the same copy). Other objects are left as they are. ``non_blocking`` as in
    ``Tensor.to``."""
    kind = type(obj)
    if kind is tuple or kind is list:  # the common batch, checked first: it runs every step
        for v in obj:
            if type(v) is not torch.Tensor or v.device != device:
                break
        else:
            return obj
    return _moved(obj, device, non_blocking, {})


def _moved(obj: Any, device: torch.device, non_blocking: bool,
           memo: dict[int, torch.Tensor]) -> Any:
    """``to_device``'s walk; ``memo`` maps the id of each tensor moved to its copy."""
    if isinstance(obj, torch.Tensor):
        if obj.device == device:
            return obj
        if id(obj) not in memo:
            memo[id(obj)] = obj.to(device, non_blocking=non_blocking)
        return memo[id(obj)]
    if isinstance(obj, dict):
        moved = {k: _moved(v, device, non_blocking, memo) for k, v in obj.items()}
        if all(moved[k] is v for k, v in obj.items()):
            return obj
        out = copy.copy(obj)  # (keeps a subclass: OrderedDict, defaultdict, dict(...) ones)
        out.update(moved)
        return out
    if isinstance(obj, list | tuple):
        items = [_moved(v, device, non_blocking, memo) for v in obj]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        if hasattr(obj, "_fields"):  # a named tuple
            return type(obj)(*items)
        return type(obj)(items)
    return obj


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
        # for resuming: the random state each pass started from, and batches drawn since
        self._starts: list[dict[str, Any] | None] = [None] * len(self.sources)
        self._positions = [0] * len(self.sources)
        self._passes = [0] * len(self.sources)  # passes started (DistributedSampler epochs)
        self._on_epoch_end = on_epoch_end
        self.epoch = 0

    def _start_pass(self, i: int) -> Iterator[Any]:
        _set_epoch(self.sources[i], self._passes[i])
        self._passes[i] += 1
        self._starts[i] = {
            "torch": torch.get_rng_state(),
            "generators": [g.get_state() for g in _generators(self.sources[i])],
        }
        self._positions[i] = 0
        return iter(self.sources[i])

    def _next_from(self, i: int) -> Any:
        it = self._iterators[i]
        if it is None:
            it = self._iterators[i] = self._start_pass(i)
        try:
            batch = next(it)
            self._positions[i] += 1
            return batch
        except StopIteration:
            return self._next_pass(i)

    def _next_pass(self, i: int) -> Any:
        """The first batch of a new pass over loader i (the current one is exhausted)."""
        fresh = self._start_pass(i)
        try:
            batch = next(fresh)
        except StopIteration:
            raise ConfigError(
                self.owner, "train_data_loader", "an empty loader",
                "a loader that yields at least one batch",
            ) from None
        self._positions[i] = 1
        self._iterators[i] = fresh
        if i == 0:
            self.epoch += 1
            self._on_epoch_end()
        return batch

    def state_dict(self) -> dict[str, Any]:
        """Where each loader stands: its pass's starting random state and batches drawn,
        and its generators' states now (a generator shared with another loader has moved
        on since this pass started)."""
        return {"epoch": self.epoch,
                "sources": [{"start": s, "position": n, "passes": k,
                             "generators_now": [g.get_state() for g in _generators(src)]}
                            for s, n, k, src in zip(self._starts, self._positions,
                                                    self._passes, self.sources)]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Recreate each loader's current pass from its starting random state and skip the
        batches already drawn (the program's RNG is left as it was)."""
        if len(state["sources"]) != len(self.sources):
            raise ConfigError(self.owner, "train_data_loader", f"{len(self.sources)} loaders",
                              f"the {len(state['sources'])} loaders the checkpoint was made with")
        self.epoch = int(state["epoch"])
        current = torch.get_rng_state()
        try:
            for i, entry in enumerate(state["sources"]):
                start, position = entry["start"], int(entry["position"])
                self._starts[i], self._positions[i] = start, position
                self._passes[i] = int(entry.get("passes", 0))
                if start is None:
                    self._iterators[i] = None
                    continue
                torch.set_rng_state(start["torch"])
                for generator, saved in zip(_generators(self.sources[i]), start["generators"]):
                    generator.set_state(saved)
                _set_epoch(self.sources[i], self._passes[i] - 1)
                it = iter(self.sources[i])
                for _ in range(position):
                    next(it)
                self._iterators[i] = it
        finally:
            torch.set_rng_state(current)
        # the replays above moved the generators; each is put where it stood when the state
        # was saved (for one shared by several loaders, or by a loader and the program)
        for i, entry in enumerate(state["sources"]):
            for generator, saved in zip(_generators(self.sources[i]),
                                        entry.get("generators_now", [])):
                generator.set_state(saved)

    def next(self) -> Any:
        """The next batch (None when the problem has no data)."""
        sources = self.sources
        if len(sources) == 1:  # the common case, written out: it runs at every step
            it = self._iterators[0]
            if it is not None:
                try:
                    batch = next(it)
                except StopIteration:
                    return self._next_pass(0)
                self._positions[0] += 1
                return batch
            return self._next_from(0)
        if not sources:
            return None
        return tuple(self._next_from(i) for i in range(len(sources)))


def _set_epoch(source: object, epoch: int) -> None:
    """Tell a DataLoader's DistributedSampler which pass starts (it reseeds its shuffle
    with seed + epoch, identically on every rank)."""
    sampler = getattr(source, "sampler", None)
    if isinstance(sampler, torch.utils.data.DistributedSampler):
        sampler.set_epoch(epoch)


def _generators(source: object) -> list[torch.Generator]:
    """The random generators a loader pass draws from besides torch's global one: the
    DataLoader's own and its sampler's (or its batch sampler's sampler's), each once."""
    candidates = [getattr(source, "generator", None)]
    sampler = getattr(source, "sampler", None)
    candidates.append(getattr(sampler, "generator", None))
    batch_sampler = getattr(source, "batch_sampler", None)
    candidates.append(getattr(getattr(batch_sampler, "sampler", None), "generator", None))
    found: list[torch.Generator] = []
    for g in candidates:
        # (``is not None`` first: torch.Generator's isinstance check runs in Python)
        if g is not None and isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
    return found

