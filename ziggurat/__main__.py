"""Command line: ``ziggurat demo [NAME] [ARGS]`` lists and runs the demonstration programs."""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ziggurat`` command."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print("usage: ziggurat demo [NAME] [ARGS...]   (ziggurat demo --list shows the names)")
        return 0
    if args[0] != "demo":
        print(f"unknown command {args[0]!r}; the only command is 'demo'", file=sys.stderr)
        return 2
    from .demos import DEFAULT, demos

    available = demos()

    rest = args[1:]
    if rest and rest[0] == "--list":
        for name, (summary, _) in available.items():
            print(f"{name:16s}{summary}")
        return 0
    name = DEFAULT
    if rest and not rest[0].startswith("-"):
        name, rest = rest[0], rest[1:]
    if name not in available:
        print(f"unknown demo {name!r}; available: {', '.join(available)}", file=sys.stderr)
        return 2
    return available[name][1](rest)


if __name__ == "__main__":
    sys.exit(main())
