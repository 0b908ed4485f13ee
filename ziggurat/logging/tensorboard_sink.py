"""TensorBoard sink: scalars through ``torch.utils.tensorboard.SummaryWriter``.

Needs the ``tensorboard`` package (``pip install 'ziggurat[tensorboard]'``). Tags (see
:func:`~ziggurat.logging.base.scalar_tags`): ``{problem}/{kind}/loss``,
``{problem}/{kind}/{metric}``, ``{problem}/lr``, ``{problem}/hypergrad_norm``; the step
is the engine's ``global_step``. NaN and ±∞ are written as they are.
"""

from __future__ import annotations

import os
from pathlib import Path

from .base import MetricRecord, Sink, missing_package, scalar_tags


class TensorBoardSink(Sink):
    """Writes event files into ``log_dir`` (``tensorboard --logdir`` its parent).

    Args:
        log_dir: the run's directory; event files go directly in it.
        flush_secs: how often the writer flushes pending events to disk; ``close`` always
            flushes.
    """

    def __init__(self, log_dir: str | os.PathLike[str], flush_secs: int = 30,
                 purge_step: int | None = None) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            error = missing_package("EngineConfig", "logger_type", "tensorboard", "tensorboard")
            raise error from exc
        self.log_dir = Path(log_dir)
        # purge_step: a resumed run hides the events an interrupted one wrote after it
        self._writer = SummaryWriter(log_dir=str(self.log_dir), flush_secs=flush_secs,
                                     purge_step=purge_step)
        self._closed = False

    def write(self, record: MetricRecord) -> None:
        for tag, value in scalar_tags(record).items():
            self._writer.add_scalar(tag, value, global_step=record.global_step)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._writer.flush()
            self._writer.close()
