"""Metrics logging: a record per problem step, sinks that store it, and a progress bar.

The engine builds sinks with :func:`make_sinks` from ``logger_type`` / ``log_dir`` /
``run_name``, wraps them in a :class:`MetricsStream`, writes one :class:`MetricRecord` per
problem step (and per validation), and closes the stream at the end. :class:`Progress`
draws a bar over engine iterations.

Sinks: console (stdout lines), jsonl (``metrics.jsonl``; NaN / ±∞ as the strings "nan",
"inf", "-inf", None as null), csv (``metrics.csv``; header widened by rewriting the file
when a new metric appears), tensorboard (needs ``ziggurat[tensorboard]``), wandb (offline
by default; needs ``ziggurat[wandb]``). Rich bars need ``ziggurat[progress]``.
"""

from __future__ import annotations

from .base import RECORD_KINDS, MetricRecord, Sink, scalar_tags
from .console_sink import ConsoleSink
from .csv_sink import CsvSink
from .jsonl_sink import JsonlSink, json_number, record_to_json
from .progress import PROGRESS_MODES, Progress, resolve_progress_mode
from .stream import LOGGER_KINDS, MetricsStream, check_sinks, make_sinks
from .tensorboard_sink import TensorBoardSink
from .wandb_sink import WandbSink

__all__ = [
    "LOGGER_KINDS",
    "PROGRESS_MODES",
    "RECORD_KINDS",
    "ConsoleSink",
    "CsvSink",
    "JsonlSink",
    "MetricRecord",
    "MetricsStream",
    "Progress",
    "Sink",
    "TensorBoardSink",
    "WandbSink",
    "check_sinks",
    "json_number",
    "make_sinks",
    "record_to_json",
    "resolve_progress_mode",
    "scalar_tags",
]

