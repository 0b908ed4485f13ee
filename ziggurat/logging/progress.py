"""A progress bar over engine iterations: rich, tqdm, plain lines, or nothing."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any, TextIO

from ..errors import ConfigError
from ..validation import check_int
from .base import format_number, importable, missing_package

PROGRESS_MODES: tuple[str, ...] = ("auto", "rich", "tqdm", "plain", "off")
#: metrics to show, or a function returning them (called only when they are displayed)
Latest = Mapping[str, float] | Callable[[], Mapping[str, float]]
#: seconds between two reads of lazy metrics by a live bar (rich and tqdm redraw at 10 Hz)
REFRESH_S = 0.1
_OWNER = "EngineConfig"
_FIELD = "progress"


def _is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if callable(isatty) else False
    except (ValueError, OSError):  # closed or detached stream
        return False


def resolve_progress_mode(mode: str, stream: TextIO, force_terminal: bool | None = None) -> str:
    """The concrete mode "rich", "tqdm", "plain" or "off" that ``mode`` means on ``stream``.

    "auto": rich if the stream is a terminal (or ``force_terminal``) and rich is
    importable, else tqdm if importable and a terminal, else plain. An explicit "rich" or
    "tqdm" whose package is missing raises ConfigError naming the package to install.
    """
    if mode not in PROGRESS_MODES:
        allowed = ", ".join(repr(m) for m in PROGRESS_MODES)
        raise ConfigError(_OWNER, _FIELD, mode, f"one of {allowed}")
    if mode == "auto":
        terminal = _is_terminal(stream) if force_terminal is None else force_terminal
        if terminal and importable("rich"):
            return "rich"
        if terminal and importable("tqdm"):
            return "tqdm"
        return "plain"
    if mode in ("rich", "tqdm") and not importable(mode):
        raise missing_package(_OWNER, _FIELD, mode, mode)
    return mode


def _format_metrics(latest: Mapping[str, float]) -> str:
    parts = []
    for name, value in latest.items():
        try:
            text = format_number(float(value), 4)
        except (TypeError, ValueError):
            text = str(value)
        parts.append(f"{name}={text}")
    return " ".join(parts)


def _format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


class Progress:
    """Progress over ``total`` engine iterations with iterations per second and metrics.

    Args:
        total: number of iterations of the run.
        mode: "auto", "rich", "tqdm", "plain" or "off" (see :func:`resolve_progress_mode`).
        stream: where to draw; None means ``sys.stderr``.
        plain_every: plain mode prints a line when at least this many iterations passed
            since the last line, and at the end; None means ``max(1, total // 20)``.
        initial: iterations already done (a resumed run); the rate counts from here.
        force_terminal: treat ``stream`` as a terminal (or not) regardless of isatty;
            passed on to rich.

    ``update(global_step, latest)`` takes ``global_step`` as the number of iterations done
    so far (1 after the first) and ``latest`` as metric name -> value to show, or a function
    returning them: it is called only when the values are shown (a plain line is printed,
    or a live bar redraws, at most every ``REFRESH_S`` seconds and at the last iteration),
    so values that cost a host sync are not read at iterations nobody sees. ``close``
    prints the last plain line if the last update was not printed; it is idempotent.

    Example:
        >>> import io
        >>> out = io.StringIO()
        >>> with Progress(4, "plain", out, plain_every=2) as bar:
        ...     for i in range(1, 5):
        ...         bar.update(i, {"loss": 1.0 / i})
        >>> len(out.getvalue().splitlines())
        2
    """

    def __init__(
        self,
        total: int,
        mode: str = "auto",
        stream: TextIO | None = None,
        *,
        plain_every: int | None = None,
        initial: int = 0,
        force_terminal: bool | None = None,
    ) -> None:
        check_int("Progress", "total", total, 1)
        check_int("Progress", "plain_every", plain_every, 1, allow_none=True)
        check_int("Progress", "initial", initial, 0)
        self.total = total
        self.stream: TextIO = stream if stream is not None else sys.stderr
        self.mode = resolve_progress_mode(mode, self.stream, force_terminal)
        self.plain_every = plain_every if plain_every is not None else max(1, total // 20)
        self.initial = initial
        self._start = time.perf_counter()
        self._step = initial
        self._latest: Mapping[str, float] = {}
        self._pending: Callable[[], Mapping[str, float]] | None = None  # lazy, not yet read
        self._read_at = -float("inf")  # when a live bar last read lazy metrics
        self._printed_step = initial
        self._closed = False
        self._bar: Any = None
        self._task: Any = None
        if self.mode == "rich":
            self._start_rich(force_terminal)
        elif self.mode == "tqdm":
            from tqdm import tqdm

            self._bar = tqdm(
                total=total, initial=initial, file=self.stream, unit="it", dynamic_ncols=True
            )

    def _start_rich(self, force_terminal: bool | None) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )
        from rich.progress import Progress as RichProgress

        console = Console(file=self.stream, force_terminal=force_terminal)
        self._bar = RichProgress(
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}", markup=False),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            TextColumn("{task.fields[metrics]}", markup=False),
            console=console,
            transient=False,
        )
        self._task = self._bar.add_task(
            "train", total=self.total, completed=self.initial, rate="? it/s", metrics=""
        )
        self._bar.start()

    def rate(self) -> float | None:
        """Iterations per second since the start (None before any time has passed)."""
        elapsed = time.perf_counter() - self._start
        return (self._step - self.initial) / elapsed if elapsed > 0 else None

    def _rate_text(self) -> str:
        rate = self.rate()
        return "? it/s" if rate is None else f"{format_number(rate, 3)} it/s"

    def _plain_line(self) -> str:
        elapsed = time.perf_counter() - self._start
        percent = 100.0 * self._step / self.total
        line = (
            f"[{self._step:>{len(str(self.total))}}/{self.total}] {percent:3.0f}% "
            f"{self._rate_text()} {_format_seconds(elapsed)}"
        )
        metrics = _format_metrics(self._read())
        return f"{line} {metrics}" if metrics else line

    def _take(self, latest: Latest) -> None:
        """Keep ``latest``: values now, a function until they are shown."""
        if callable(latest):
            self._pending = latest
        else:
            self._latest, self._pending = latest, None

    def _read(self) -> Mapping[str, float]:
        """The metrics to show (reading lazy ones now)."""
        if self._pending is not None:
            self._latest, self._pending = self._pending(), None
        return self._latest

    def update(self, global_step: int, latest: Latest) -> None:
        """Move to ``global_step`` iterations done and show ``latest`` (see the class)."""
        if self._closed or self.mode == "off":
            return
        self._step = global_step
        self._take(latest)
        if self.mode == "plain":
            if global_step - self._printed_step >= self.plain_every or global_step >= self.total:
                self._print_plain()
            return
        live = self._pending is None or global_step >= self.total
        if not live:  # lazy metrics: read them at the bar's redraw rate
            now = time.perf_counter()
            live = now - self._read_at >= REFRESH_S
            if live:
                self._read_at = now
        if self.mode == "rich":
            if live:
                self._bar.update(self._task, completed=global_step, rate=self._rate_text(),
                                 metrics=_format_metrics(self._read()))
            else:
                self._bar.update(self._task, completed=global_step, rate=self._rate_text())
        else:
            if live:
                self._bar.set_postfix_str(_format_metrics(self._read()), refresh=False)
            self._bar.update(global_step - self._bar.n)

    def _print_plain(self) -> None:
        print(self._plain_line(), file=self.stream, flush=True)
        self._printed_step = self._step

    def close(self) -> None:
        """Finish the display (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self.mode == "plain":
            if self._step != self._printed_step:
                self._print_plain()
        elif self.mode == "rich":
            if self._pending is not None:
                self._bar.update(self._task, metrics=_format_metrics(self._read()))
            self._bar.update(self._task, rate=self._rate_text())
            self._bar.stop()
        elif self.mode == "tqdm":
            if self._pending is not None:
                self._bar.set_postfix_str(_format_metrics(self._read()), refresh=False)
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
