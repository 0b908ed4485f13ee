"""Console sink: one compact line per record on standard output."""

from __future__ import annotations

import sys
from typing import TextIO

from .base import RECORD_FIELDS, MetricRecord, Sink, format_number

_RESERVED = frozenset((*RECORD_FIELDS, "t"))


class ConsoleSink(Sink):
    """Prints ``[step N] problem: loss=… metric=… lr=… hypergrad_norm=… t=…s`` per record.

    Floats carry 6 significant digits; validation records read ``[step N] problem:
    validation loss=…``; lr and hypergrad_norm are left out when None; a metric named like a
    record field (``loss``, ``lr``, ...) is shown as ``metrics.<name>``.

    Args:
        stream: where to print; None looks ``sys.stdout`` up at each write (so redirection
            by pytest, a notebook or a live progress display is honoured).

    Example:
        >>> sink = ConsoleSink()
        >>> sink.write(MetricRecord(3, "upper", 3, 0.123456789, {"acc": 0.5}, 0.01, None, 1.5))
        [step 3] upper: loss=0.123457 acc=0.5 lr=0.01 t=1.50s
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream

    def write(self, record: MetricRecord) -> None:
        parts = [f"[step {record.global_step}] {record.problem}:"]
        if record.kind != "train":
            parts.append(record.kind)
        parts.append(f"loss={format_number(record.loss)}")
        for name, value in record.metrics.items():
            label = f"metrics.{name}" if name in _RESERVED else name
            parts.append(f"{label}={format_number(value)}")
        if record.lr is not None:
            parts.append(f"lr={format_number(record.lr)}")
        if record.hypergrad_norm is not None:
            parts.append(f"hypergrad_norm={format_number(record.hypergrad_norm)}")
        parts.append(f"t={record.wall_time:.2f}s")
        stream = self._stream if self._stream is not None else sys.stdout
        print(" ".join(parts), file=stream, flush=True)

    def close(self) -> None:
        """Nothing to release (the stream is not ours to close)."""
