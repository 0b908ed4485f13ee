"""Betty's logging module: ``get_logger()`` (the "betty" Python logger, INFO to stdout),
``LoggerBase`` and ``logger(logger_type)``.

Metrics themselves go through ziggurat's metrics stream (console, TensorBoard, wandb
offline), chosen by ``EngineConfig.logger_type``; these classes carry Betty's message
calls (``self.logger.info(...)``) and ``log(stats, tag, step)`` for code that calls it.
"""

from __future__ import annotations

import logging as _logging
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["LoggerBase", "TensorBoardLogger", "WandBLogger", "get_logger", "logger"]

_logger: _logging.Logger | None = None


def get_logger() -> _logging.Logger:
    """The global "betty" logger (INFO and above to stdout)."""
    global _logger
    if _logger is None:
        log = _logging.getLogger("betty")
        log.propagate = False
        log.setLevel(_logging.INFO)
        handler = _logging.StreamHandler(stream=sys.stdout)
        handler.setFormatter(_logging.Formatter("[%(asctime)s] [%(levelname)s] %(message)s",
                                                "%Y-%m-%d %H:%M:%S"))
        log.addHandler(handler)
        _logger = log
    return _logger


class LoggerBase:
    """Message logging (to the "betty" logger) and a ``log`` that records stats."""

    def __init__(self) -> None:
        self.records: list[tuple[str | None, int | None, dict[str, Any]]] = []

    def log(self, stats: Mapping[str, Any] | None, tag: str | None = None,
            step: int | None = None) -> None:
        """Keep ``stats`` (visualisation loggers write them; see the module docstring)."""
        if stats is not None:
            self.records.append((tag, step, dict(stats)))

    @staticmethod
    def debug(msg: str, *args: Any, **kwargs: Any) -> None:
        get_logger().debug(msg, *args, **kwargs)

    @staticmethod
    def info(msg: str, *args: Any, **kwargs: Any) -> None:
        get_logger().info(msg, *args, **kwargs)

    @staticmethod
    def warning(msg: str, *args: Any, **kwargs: Any) -> None:
        get_logger().warning(msg, *args, **kwargs)

    @staticmethod
    def error(msg: str, *args: Any, **kwargs: Any) -> None:
        get_logger().error(msg, *args, **kwargs)


class TensorBoardLogger(LoggerBase):
    """Betty's name; metrics reach TensorBoard through EngineConfig(logger_type=...)."""


class WandBLogger(LoggerBase):
    """Betty's name; metrics reach wandb through EngineConfig(logger_type="wandb")."""


logger_mapping: dict[str, type[LoggerBase]] = {
    "none": LoggerBase, "tensorboard": TensorBoardLogger, "wandb": WandBLogger,
}


def logger(logger_type: str = "none") -> LoggerBase:
    """A logger object for ``logger_type`` ("none", "tensorboard" or "wandb")."""
    if logger_type not in logger_mapping:
        from ...errors import ConfigError

        raise ConfigError("betty logging", "logger_type", logger_type,
                          f"one of {sorted(logger_mapping)}")
    return logger_mapping[logger_type]()
