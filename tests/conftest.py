"""Test configuration: float64 by default is not assumed; tests build float64 tensors."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
