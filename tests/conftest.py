"""Test configuration: float64 by default is not assumed; tests build float64 tensors.

``--device NAME`` (or ``ZIGGURAT_TEST_DEVICE=NAME``; default ``cpu``) is the device the
tests taking the ``device`` fixture run on (``tests/test_device.py``): ``pytest --device cuda
tests/test_device.py`` on a GPU machine. A device that is not there is a usage error, not a
skip, so that a GPU run that silently tested nothing cannot pass.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default=os.environ.get("ZIGGURAT_TEST_DEVICE", "cpu"),
                     help="device for the tests taking the `device` fixture (default: cpu, "
                          "or $ZIGGURAT_TEST_DEVICE)")


def pytest_configure(config: pytest.Config) -> None:
    name = config.getoption("--device")
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise pytest.UsageError(f"--device {name!r} is not a torch device ({e}); "
                                "use e.g. --device cpu or --device cuda") from e
    if device.type == "cuda" and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device {name!r}: torch {torch.__version__} sees no CUDA "
                                "device here; run without --device (cpu) on this machine")


@pytest.fixture
def device(pytestconfig: pytest.Config) -> torch.device:
    """The device named by ``--device`` (see the module docstring)."""
    return torch.device(pytestconfig.getoption("--device"))
