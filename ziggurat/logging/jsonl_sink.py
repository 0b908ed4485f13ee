"""JSON Lines sink: one JSON object per record, flushed after each write.

Non-finite numbers: JSON has no NaN or infinity, so a NaN is written as the string
``"nan"``, +∞ as ``"inf"`` and −∞ as ``"-inf"``; ``float(v)`` turns every numeric field
back into a number. ``null`` means "not given" (``lr`` or ``hypergrad_norm`` None), never
NaN. Every line is strict JSON (``json.loads`` with any parser).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .base import MetricRecord, Sink, complete_lines


def json_number(value: float | None) -> float | str | None:
    """``value`` as strict JSON: finite floats unchanged, "nan" / "inf" / "-inf", None."""
    if value is None or math.isfinite(value):
        return value
    if math.isnan(value):
        return "nan"
    return "inf" if value > 0 else "-inf"


def record_to_json(record: MetricRecord) -> dict[str, Any]:
    """Every field of ``record`` with non-finite numbers encoded as :func:`json_number`."""
    row = record.as_dict()
    for key in ("loss", "lr", "hypergrad_norm", "wall_time"):
        row[key] = json_number(row[key])
    row["metrics"] = {name: json_number(value) for name, value in record.metrics.items()}
    return row


class JsonlSink(Sink):
    """Writes ``record_to_json(record)`` as one line of ``path`` per record.

    The file is created (truncated if it exists) on construction and flushed after each
    line, so a crashed run leaves every line written so far readable.
    """

    filename = "metrics.jsonl"

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        if resume_step is not None and self.path.exists():
            keep = [line for line in complete_lines(self.path).splitlines()
                    if line.strip() and json.loads(line).get("global_step", 0) <= resume_step]
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(line + "\n" for line in keep), encoding="utf-8")
            os.replace(tmp, self.path)
            self._file = open(self.path, "a", encoding="utf-8")
        else:
            self._file = open(self.path, "w", encoding="utf-8")

    def write(self, record: MetricRecord) -> None:
        line = json.dumps(record_to_json(record), allow_nan=False, ensure_ascii=False)
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()
