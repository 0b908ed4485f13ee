"""Starts a child Python process that imports betty, then exits with status 7: checks
that subprocesses resolve betty to ziggurat and that the runner passes the status on."""

import os
import subprocess
import sys
from pathlib import Path

import betty.problems

child = Path(__file__).with_name("_child.py")
out = subprocess.run([sys.executable, str(child)], capture_output=True, text=True, check=True)
print("parent:", betty.problems.ImplicitProblem.__module__)
print("child:", out.stdout.strip())
print("argv:", sys.argv[1:])
print("pythonpath:", os.environ.get("PYTHONPATH", ""))
sys.exit(7)
