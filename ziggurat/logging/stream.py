"""Building sinks from settings, and fanning records out to them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from ..errors import ConfigError
from .base import MetricRecord, Sink, importable, missing_package
from .console_sink import ConsoleSink
from .csv_sink import CsvSink
from .jsonl_sink import JsonlSink

LOGGER_KINDS: tuple[str, ...] = ("console", "jsonl", "csv", "tensorboard", "wandb")
FILE_KINDS: frozenset[str] = frozenset({"jsonl", "csv", "tensorboard", "wandb"})
_OWNER = "EngineConfig"


def check_sinks(
    kinds: Sequence[str] | str,
    log_dir: str | os.PathLike[str] | None,
    run_name: str,
) -> tuple[str, ...]:
    """The kinds, checked (each known, at most once, its package importable, log_dir and
    run_name usable when a kind writes files); creates nothing.

    A single string is taken as one kind. Raises ConfigError naming the EngineConfig field
    (``logger_type``, ``log_dir`` or ``run_name``) and the fix.
    """
    allowed = ", ".join(repr(k) for k in LOGGER_KINDS)
    if isinstance(kinds, str):
        kinds = (kinds,)
    if not isinstance(kinds, Sequence):
        raise ConfigError(_OWNER, "logger_type", kinds, f"a list of logger kinds from {allowed}")
    kinds = tuple(kinds)
    for kind in kinds:
        if kind not in LOGGER_KINDS:
            raise ConfigError(
                _OWNER, "logger_type", kinds,
                f"{kind!r} is not a logger kind; each kind must be one of {allowed}",
            )
    if len(set(kinds)) != len(kinds):
        raise ConfigError(_OWNER, "logger_type", kinds, "each logger kind at most once")
    for kind in kinds:
        if kind in ("tensorboard", "wandb") and not importable(kind):
            raise missing_package(_OWNER, "logger_type", kinds, kind)
    writes_files = [k for k in kinds if k in FILE_KINDS]
    if writes_files:
        if log_dir is None or not isinstance(log_dir, str | os.PathLike) or not str(log_dir):
            raise ConfigError(
                _OWNER, "log_dir", log_dir,
                f"a directory path: the {', '.join(writes_files)} logger writes files under "
                f"log_dir/run_name/; set log_dir, or keep only 'console' in logger_type",
            )
        if (
            not isinstance(run_name, str)
            or not run_name.strip()
            or run_name in (".", "..")
            or "/" in run_name
            or os.sep in run_name
            or (os.altsep is not None and os.altsep in run_name)
        ):
            raise ConfigError(
                _OWNER, "run_name", run_name,
                "a non-empty name without path separators (files go to log_dir/run_name/)",
            )
    return kinds


def make_sinks(
    kinds: Sequence[str] | str,
    log_dir: str | os.PathLike[str] | None,
    run_name: str,
    config: Mapping[str, Any] | None = None,
    resume_step: int | None = None,
) -> list[Sink]:
    """One sink per kind, in order; file sinks write under ``log_dir/run_name/`` (created).

    Kinds: "console" (stdout lines), "jsonl" (``metrics.jsonl``), "csv"
    (``metrics.csv``), "tensorboard" (event files in the run directory), "wandb" (offline
    run in ``run directory/wandb/``; ``config`` is recorded with it). Existing
    ``metrics.jsonl`` / ``metrics.csv`` are overwritten, unless ``resume_step`` is given (a
    run resumed from a checkpoint of that global step): then their records up to that step
    are kept and later ones (written after the checkpoint, before the interruption) dropped,
    and TensorBoard purges its events after that step. Errors as :func:`check_sinks`; if a
    sink fails to start, those already made are closed first.

    Example:
        >>> [type(s).__name__ for s in make_sinks(["console"], None, "run")]
        ['ConsoleSink']
    """
    kinds = check_sinks(kinds, log_dir, run_name)
    run_dir: Path | None = None
    if any(k in FILE_KINDS for k in kinds):
        assert log_dir is not None
        run_dir = Path(log_dir) / run_name
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(
                _OWNER, "log_dir", log_dir,
                f"a directory ziggurat can create and write to ({exc})",
            ) from exc
    sinks: list[Sink] = []
    try:
        for kind in kinds:
            sinks.append(_make_sink(kind, run_dir, run_name, config, resume_step))
    except BaseException:
        _close_all(sinks)
        raise
    return sinks


def _make_sink(
    kind: str, run_dir: Path | None, run_name: str, config: Mapping[str, Any] | None,
    resume_step: int | None = None,
) -> Sink:
    if kind == "console":
        return ConsoleSink()
    assert run_dir is not None
    if kind == "jsonl":
        return JsonlSink(run_dir / JsonlSink.filename, resume_step)
    if kind == "csv":
        return CsvSink(run_dir / CsvSink.filename, resume_step)
    if kind == "tensorboard":
        from .tensorboard_sink import TensorBoardSink

        return TensorBoardSink(run_dir, purge_step=None if resume_step is None
                               else resume_step + 1)
    from .wandb_sink import WandbSink

    return WandbSink(run_dir, run_name, config)


def _close_all(sinks: Sequence[Sink]) -> BaseException | None:
    """Close every sink; the first exception raised, or None."""
    first: BaseException | None = None
    for sink in sinks:
        try:
            sink.close()
        except Exception as exc:
            if first is None:
                first = exc
            else:
                warnings.warn(
                    f"{type(sink).__name__}.close() also failed: {exc!r}",
                    RuntimeWarning,
                    stacklevel=3,
                )
    return first


class MetricsStream:
    """Sends each record to every sink; closes them all.

    ``write`` delivers the record to every sink even if one raises, then re-raises the first
    error (later ones are warned). ``close`` closes every sink even if some raise, then
    raises the first error once; later calls do nothing. As a context manager, an error
    from closing does not replace an exception already leaving the ``with`` block (it is
    warned instead).

    Example:
        >>> with MetricsStream([ConsoleSink()]) as stream:
        ...     stream.write(MetricRecord(1, "lower", 1, 2.0, {}, None, None, 0.25))
        [step 1] lower: loss=2 t=0.25s
    """

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks: tuple[Sink, ...] = tuple(sinks)
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close`` has been called."""
        return self._closed

    def write(self, record: MetricRecord) -> None:
        """``sink.write(record)`` for every sink."""
        if self._closed:
            raise RuntimeError("MetricsStream.write() after close()")
        first: BaseException | None = None
        for sink in self.sinks:
            try:
                sink.write(record)
            except Exception as exc:
                if first is None:
                    first = exc
                else:
                    warnings.warn(
                        f"{type(sink).__name__}.write() also failed: {exc!r}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        if first is not None:
            raise first

    def close(self) -> None:
        """Close every sink (once)."""
        if self._closed:
            return
        self._closed = True
        first = _close_all(self.sinks)
        if first is not None:
            raise first

    def __enter__(self) -> MetricsStream:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as close_exc:
            warnings.warn(
                f"closing the metrics sinks failed while another error was raised: "
                f"{close_exc!r}",
                RuntimeWarning,
                stacklevel=2,
            )
