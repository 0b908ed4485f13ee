"""CSV sink: one row per record, columns widened when a new metric name appears.

Columns: ``global_step, problem, step, kind, loss, lr, hypergrad_norm, wall_time``, then
one column per metric name in order of first appearance. When a record brings a metric
name not seen before, the file is rewritten with the wider header (earlier rows get an
empty cell there) through a temporary file and an atomic rename, so the file on disk
always has one header and rows of its width: ``csv.DictReader`` reads it at any moment.
Rows are re-read from disk for that, not kept in memory.

Cells: numbers as Python writes them (``repr``: round-trips exactly; NaN / ±∞ as
``nan`` / ``inf`` / ``-inf``, which ``float()`` parses); an empty cell means "not given"
(``lr`` None, or a metric this row does not have). A metric named like a fixed column
(``loss``, ``lr``, ...) gets the column ``metrics.<name>``.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from .base import RECORD_FIELDS, MetricRecord, Sink, complete_lines


class CsvSink(Sink):
    """Writes one CSV row per record to ``path`` (created, or truncated), flushed per row."""

    filename = "metrics.csv"

    def __init__(self, path: str | os.PathLike[str], resume_step: int | None = None) -> None:
        self.path = Path(path)
        self._columns: list[str] = list(RECORD_FIELDS)
        self._metric_columns: dict[str, str] = {}
        rows: list[dict[str, str]] = []
        if resume_step is not None and self.path.exists():
            reader = csv.DictReader(io.StringIO(complete_lines(self.path)))
            self._columns = list(reader.fieldnames or RECORD_FIELDS)
            rows = [r for r in reader if int(r["global_step"]) <= resume_step]
            for column in self._columns[len(RECORD_FIELDS):]:
                name = column
                while name.startswith("metrics.") and name[len("metrics."):] in self._columns:
                    name = name[len("metrics."):]
                self._metric_columns[name] = column
        self._file = open(self.path, "w", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns, restval="")
        self._writer.writeheader()
        self._writer.writerows(rows)
        self._file.flush()

    @property
    def columns(self) -> list[str]:
        """The current header."""
        return list(self._columns)

    def _column(self, metric: str) -> str:
        column = self._metric_columns.get(metric)
        if column is None:
            taken = set(self._columns) | set(self._metric_columns.values())
            column = metric
            while column in taken:
                column = f"metrics.{column}"
            self._metric_columns[metric] = column
        return column

    def _widen(self, new_columns: list[str]) -> None:
        columns = self._columns + new_columns
        self._file.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(self.path, newline="", encoding="utf-8") as src, open(
            tmp, "w", newline="", encoding="utf-8"
        ) as dst:
            writer = csv.DictWriter(dst, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(csv.DictReader(src))
        os.replace(tmp, self.path)
        self._columns = columns
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.DictWriter(self._file, fieldnames=self._columns, restval="")

    def write(self, record: MetricRecord) -> None:
        row: dict[str, object] = {
            "global_step": record.global_step,
            "problem": record.problem,
            "step": record.step,
            "kind": record.kind,
            "loss": repr(record.loss),
            "lr": "" if record.lr is None else repr(record.lr),
            "hypergrad_norm": "" if record.hypergrad_norm is None else repr(record.hypergrad_norm),
            "wall_time": repr(record.wall_time),
        }
        new: list[str] = []
        for name, value in record.metrics.items():
            known = name in self._metric_columns
            column = self._column(name)
            if not known:
                new.append(column)
            row[column] = repr(value)
        if new:
            self._widen(new)
        self._writer.writerow(row)
        self._file.flush()

    def close(self) -> None:
        self._file.close()
