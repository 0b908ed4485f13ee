"""The record every sink receives, and the sink interface.

A ``MetricRecord`` is one problem's step (or one validation) as the metrics stream sees
it. Construction normalises it: numbers become plain Python ``float`` / ``int`` (a
one-element tensor or NumPy scalar is accepted and converted), so sinks never touch
tensors and never force a device synchronisation of their own.
"""

from __future__ import annotations

import importlib.util
import math
import operator
import os
import sys
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ConfigError

RECORD_KINDS: tuple[str, ...] = ("train", "validation")

# Columns / keys a record owns; a user metric with one of these names is renamed
# "metrics.<name>" where the two would share a flat namespace (CSV columns).
RECORD_FIELDS: tuple[str, ...] = (
    "global_step",
    "problem",
    "step",
    "kind",
    "loss",
    "lr",
    "hypergrad_norm",
    "wall_time",
)


def _as_float(where: str, value: object) -> float:
    """``float(value)`` for a real number or one-element tensor/array; TypeError otherwise."""
    if isinstance(value, float):
        return value
    if isinstance(value, str) or isinstance(value, complex):
        raise TypeError(f"{where} must be a real number or a one-element tensor, got {value!r}")
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, RuntimeError) as exc:
        shape = getattr(value, "shape", None)
        got = repr(value) if shape is None else f"{type(value).__name__} of shape {tuple(shape)}"
        raise TypeError(
            f"{where} must be a real number or a one-element tensor, got {got}"
        ) from exc


def _as_int(where: str, value: object) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{where} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError as exc:
        raise TypeError(f"{where} must be an integer, got {value!r}") from exc


@dataclass(frozen=True)
class MetricRecord:
    """One problem's step as the metrics stream sees it.

    Args:
        global_step: engine iteration.
        problem: problem name.
        step: that problem's own step count.
        loss: the step's loss.
        metrics: user metrics (training_step's dict, validation metrics, ...); names are
            strings, values real numbers (one-element tensors are converted).
        lr: the first parameter group's learning rate, or None.
        hypergrad_norm: norm of the hypergradient the problem received, or None.
        wall_time: seconds since the run started.
        kind: "train" or "validation".

    Example:
        >>> import torch
        >>> r = MetricRecord(3, "upper", 3, torch.tensor(0.5), {"acc": 1}, None, None, 0.1)
        >>> r.loss, r.metrics
        (0.5, {'acc': 1.0})
    """

    global_step: int
    problem: str
    step: int
    loss: float
    metrics: Mapping[str, float]
    lr: float | None
    hypergrad_norm: float | None
    wall_time: float
    kind: str = "train"

    def __post_init__(self) -> None:
        if self.kind not in RECORD_KINDS:
            raise ValueError(
                f"MetricRecord.kind={self.kind!r} is not allowed: one of {RECORD_KINDS}"
            )
        if not isinstance(self.problem, str) or not self.problem:
            raise TypeError(
                f"MetricRecord.problem must be a non-empty string, got {self.problem!r}"
            )
        if not isinstance(self.metrics, Mapping):
            raise TypeError(
                f"MetricRecord.metrics of problem {self.problem!r} must be a mapping of metric "
                f"name to number, got {type(self.metrics).__name__}"
            )
        metrics: dict[str, float] = {}
        for name, value in self.metrics.items():
            if not isinstance(name, str) or not name:
                raise TypeError(
                    f"metric names of problem {self.problem!r} must be non-empty strings, "
                    f"got {name!r}"
                )
            metrics[name] = _as_float(f"metric {name!r} of problem {self.problem!r}", value)
        setattr_ = object.__setattr__
        setattr_(self, "metrics", metrics)
        setattr_(self, "global_step", _as_int("MetricRecord.global_step", self.global_step))
        setattr_(self, "step", _as_int("MetricRecord.step", self.step))
        setattr_(self, "loss", _as_float(f"loss of problem {self.problem!r}", self.loss))
        setattr_(self, "wall_time", _as_float("MetricRecord.wall_time", self.wall_time))
        for name in ("lr", "hypergrad_norm"):
            value = getattr(self, name)
            if value is not None:
                setattr_(self, name, _as_float(f"{name} of problem {self.problem!r}", value))

    def as_dict(self) -> dict[str, Any]:
        """Every field, ``metrics`` as a nested dict (a copy)."""
        return {
            "global_step": self.global_step,
            "problem": self.problem,
            "step": self.step,
            "kind": self.kind,
            "loss": self.loss,
            "metrics": dict(self.metrics),
            "lr": self.lr,
            "hypergrad_norm": self.hypergrad_norm,
            "wall_time": self.wall_time,
        }


def format_number(value: float | None, digits: int = 6) -> str:
    """``value`` with ``digits`` significant digits; "nan", "inf", "-inf"; "-" for None."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}g}"


def complete_lines(path: str | os.PathLike[str]) -> str:
    """The text of a log file up to its last line end: a last line without one was cut short
    by a crash (power loss, a full disk) and is dropped, so a resumed run reads the file."""
    text = Path(path).read_text(encoding="utf-8")
    return text[:text.rfind("\n") + 1]


class Sink(ABC):
    """One destination of metric records.

    ``write`` is called once per record, in engine order; ``close`` once at the end (a
    second ``close`` does nothing). A sink is also a context manager.
    """

    @abstractmethod
    def write(self, record: MetricRecord) -> None:
        """Record one step."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the destination; idempotent."""

    def __enter__(self) -> Sink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# pip extra that installs the package each optional sink or progress bar needs.
EXTRAS: dict[str, tuple[str, str]] = {
    # kind: (importable module, pip install argument)
    "tensorboard": ("tensorboard", "'ziggurat[tensorboard]'"),
    "wandb": ("wandb", "'ziggurat[wandb]'"),
    "rich": ("rich", "'ziggurat[progress]'"),
    "tqdm": ("tqdm", "tqdm"),
}


def importable(module: str) -> bool:
    """Whether ``module`` can be imported, without importing it."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a broken parent package, or a spec-less stand-in
        return module in sys.modules and sys.modules[module] is not None


def missing_package(owner: str, field: str, value: object, kind: str) -> ConfigError:
    """The ConfigError for a ``kind`` whose package is not importable: names the pip extra."""
    module, extra = EXTRAS[kind]
    return ConfigError(
        owner,
        field,
        value,
        f"{kind!r} needs the {module} package, which is not installed: "
        f"pip install {extra} (or choose another {field})",
    )


def scalar_tags(record: MetricRecord) -> dict[str, float]:
    """The record as flat scalar names, shared by TensorBoard and W&B.

    ``{problem}/{kind}/loss``, ``{problem}/{kind}/{metric}`` (a metric named ``loss``
    becomes ``{problem}/{kind}/metrics.loss``), ``{problem}/lr`` and
    ``{problem}/hypergrad_norm`` when not None.
    """
    prefix = f"{record.problem}/{record.kind}/"
    tags = {prefix + "loss": record.loss}
    for name, value in record.metrics.items():
        tag = prefix + name
        while tag in tags:
            tag = prefix + "metrics." + tag[len(prefix) :]
        tags[tag] = value
    if record.lr is not None:
        tags[f"{record.problem}/lr"] = record.lr
    if record.hypergrad_norm is not None:
        tags[f"{record.problem}/hypergrad_norm"] = record.hypergrad_norm
    return tags
