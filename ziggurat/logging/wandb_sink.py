"""Weights & Biases sink: an offline run unless the environment says otherwise.

Needs the ``wandb`` package (``pip install 'ziggurat[wandb]'``). The run is started with
``mode="offline"`` (no network, no account; ``wandb sync`` uploads it later) unless the
environment sets ``WANDB_MODE``, which then decides. Keys are the TensorBoard tags (see
:func:`~ziggurat.logging.base.scalar_tags`), logged with ``step=global_step``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast

from .base import MetricRecord, Sink, missing_package, scalar_tags


class WandbSink(Sink):
    """One W&B run; ``close`` finishes it.

    Args:
        log_dir: wandb's ``dir``: it writes ``log_dir/wandb/offline-run-*/``.
        run_name: the run's display name.
        config: hyperparameters recorded with the run.
    """

    def __init__(
        self,
        log_dir: str | os.PathLike[str],
        run_name: str,
        config: Mapping[str, Any] | None = None,
    ) -> None:
        try:
            import wandb
        except ImportError as exc:
            raise missing_package("EngineConfig", "logger_type", "wandb", "wandb") from exc
        self.log_dir = Path(log_dir)
        # Read here rather than left to wandb: its settings singleton may predate the env.
        mode = cast(Any, os.environ.get("WANDB_MODE") or "offline")
        self._run: Any = wandb.init(
            mode=mode,
            dir=str(self.log_dir),
            name=run_name,
            config=dict(config) if config is not None else None,
        )
        self._closed = False

    @property
    def run_dir(self) -> Path | None:
        """The run's own directory (``.../wandb/<run>/``), or None for a disabled run."""
        directory = getattr(self._run, "dir", None)  # ".../<run>/files"
        return Path(directory).parent if directory else None

    def write(self, record: MetricRecord) -> None:
        self._run.log(scalar_tags(record), step=record.global_step)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._run.finish()
