"""``python -m ziggurat.compat.betty PROGRAM [ARGS...]``: run a Betty program on ziggurat.

The program runs as ``__main__`` with ``sys.argv = [PROGRAM, *ARGS]`` and its folder first
on ``sys.path`` (as ``python PROGRAM`` would), every ``import betty...`` resolving to
ziggurat's Betty layer; subprocesses it starts with Python (``python child.py``,
``torchrun``) resolve betty the same way through a shim folder put first on PYTHONPATH.
The program's exit status is the runner's.
"""

from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

USAGE = """\
usage: python -m ziggurat.compat.betty PROGRAM [ARGS...]
       python -m ziggurat.compat.betty -m MODULE [ARGS...]

Run a program written for Betty (betty-ml) on ziggurat, unchanged: every `import betty...`
in it, and in Python subprocesses it starts, resolves to ziggurat.compat.betty.

  PROGRAM       path of the Python file to run as __main__
  -m MODULE     run a module as __main__ instead (like python -m)
  ARGS          passed to the program as sys.argv[1:]
  -h, --help    show this message (only before PROGRAM)

See docs/migrating_from_betty.md for what changes (nothing) and every known difference.
"""


def _extend_pythonpath() -> None:
    """Shim folder first on PYTHONPATH (for subprocesses), then ziggurat's own location
    when it is not installed in site-packages; the user's entries are kept after."""
    import ziggurat

    from ._redirect import shim_dir

    entries = [str(shim_dir())]
    root = str(Path(ziggurat.__file__).resolve().parent.parent)
    if "site-packages" not in root and "dist-packages" not in root:
        entries.append(root)
    existing = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e]
    os.environ["PYTHONPATH"] = os.pathsep.join(
        entries + [e for e in existing if e not in entries])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the program; returns its exit status (0 when it returns normally)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, end="", file=sys.stdout if args else sys.stderr)
        return 0 if args else 2
    module = None
    if args[0] == "-m":
        if len(args) < 2:
            print("error: -m needs a module name\n\n" + USAGE, end="", file=sys.stderr)
            return 2
        module, rest = args[1], args[2:]
    else:
        program, rest = args[0], args[1:]
        path = Path(program)
        if not path.is_file():
            what = "is a folder, not a Python file" if path.is_dir() else "does not exist"
            print(f"error: program {program!r} {what} (working directory {os.getcwd()})",
                  file=sys.stderr)
            return 2
    _extend_pythonpath()
    from . import install

    install()
    if module is not None:
        sys.argv = [module, *rest]
        sys.path.insert(0, os.getcwd())
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    else:
        sys.argv = [program, *rest]
        sys.path.insert(0, str(path.resolve().parent))
        runpy.run_path(program, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
