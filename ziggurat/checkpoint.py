"""Checkpoints of a whole program on disk: atomic writes, the last N kept, safe loading.

A checkpoint file holds only tensors, numbers, strings, lists, tuples and dicts, so it is
read with ``torch.load(..., weights_only=True)``: loading one never runs code. Writing goes
to a temporary file in the same folder, is flushed and fsync'ed, then renamed over the final
name (and the folder fsync'ed), so a crash or a kill at any moment leaves every earlier
checkpoint intact. Loading tries the newest file first and falls back to older ones when a
file is truncated or unreadable.
"""

from __future__ import annotations

import os
import random
import re
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Any, cast

import torch

from .errors import ZigguratError

_NAME = re.compile(r"^ckpt-(\d{9})\.pt$")
FORMAT = 1


def rng_state() -> dict[str, Any]:
    """The random state of Python, NumPy (when installed), torch and every CUDA device."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy is optional
        state["numpy"] = None
    else:
        kind, keys, pos, has_gauss, cached = cast(tuple[Any, ...], np.random.get_state())
        state["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), int(pos),
                          int(has_gauss), float(cached))
    state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if state.get("numpy") is not None:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


_SCALARS = (type(None), bool, int, float, str, torch.dtype)


def is_plain(obj: Any) -> bool:
    """True when ``obj`` is made only of what ``weights_only`` loading accepts: exact
    built-in scalars, tensors, and lists, tuples and dicts of them (a namedtuple or a dict
    subclass would be pickled by class, and refused when loading)."""
    if type(obj) in _SCALARS or isinstance(obj, torch.Tensor):
        return True
    if type(obj) in (list, tuple):
        return all(is_plain(x) for x in obj)
    if type(obj) in (dict, OrderedDict):
        return all(is_plain(k) and is_plain(v) for k, v in obj.items())
    return False


def _step_of(path: Path) -> int:
    match = _NAME.match(path.name)
    return int(match.group(1)) if match else -1


class CheckpointManager:
    """Numbered checkpoint files ``ckpt-<global step>.pt`` in one folder, the last N kept."""

    def __init__(self, directory: str | os.PathLike[str], keep_last: int) -> None:
        self.directory = Path(directory)
        self.keep_last = keep_last
        if self.directory.is_dir():  # temporary files of a save that never finished
            for stale in self.directory.glob(".ckpt-*.pt.tmp-*"):
                stale.unlink(missing_ok=True)

    def paths(self) -> list[Path]:
        """Existing checkpoint files, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir()
                 if (m := _NAME.match(p.name))]
        return [p for _, p in sorted(found)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        """Write ``state`` atomically as the checkpoint of ``step``; drop the oldest."""
        if not is_plain(state):
            raise ZigguratError(
                "the program's state holds an object that cannot be saved safely (only "
                "tensors, numbers, strings, lists, tuples and dicts are); this is a bug in "
                "ziggurat or in a custom method's state, please report it."
            )
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self.directory / f"ckpt-{step:09d}.pt"
        tmp = self.directory / f".{final.name}.tmp-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save({"format": FORMAT, "state": state}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        # keep the newest keep_last files up to this one; never the one just written
        older = [p for p in self.paths() if _step_of(p) <= step]
        for old in older[:-self.keep_last]:
            if old != final:
                old.unlink(missing_ok=True)
        return final

    def load_latest(self) -> tuple[dict[str, Any], Path] | None:
        """The newest readable checkpoint (skipping truncated or corrupt ones), or None."""
        for path in reversed(self.paths()):
            try:
                payload = torch.load(path, weights_only=True, map_location="cpu")
            except Exception as err:  # a truncated or corrupt file: try the previous one
                warnings.warn(f"checkpoint {path} cannot be read ({type(err).__name__}: "
                              f"{err}); it is renamed to {path.name}.corrupt and the previous "
                              f"one is tried", stacklevel=2)
                path.rename(path.with_name(path.name + ".corrupt"))
                continue
            if not isinstance(payload, dict) or payload.get("format") != FORMAT:
                warnings.warn(f"checkpoint {path} is not a ziggurat checkpoint of format "
                              f"{FORMAT}; it is renamed to {path.name}.corrupt and the "
                              f"previous one is tried", stacklevel=2)
                path.rename(path.with_name(path.name + ".corrupt"))
                continue
            return payload["state"], path
        return None
