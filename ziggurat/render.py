"""The program's graph of levels as text: Graphviz DOT, Mermaid, and a start-up summary.

Nothing here needs a binary or an extra package: each function returns a string. Paste
``to_dot`` output into ``dot -Tsvg``, ``to_mermaid`` output into a Markdown ```` ```mermaid ````
block, and print ``summary`` when a run starts.

Example:
    >>> from types import SimpleNamespace as P
    >>> import ziggurat as zg
    >>> graph = zg.build_graph([P(name="outer"), P(name="inner")], zg.chain("outer", "inner"))
    >>> print(to_mermaid(graph), end="")
    flowchart TB
        n0["outer"]
        n1["inner"]
        n0 --> n1
        n1 -.->|l2u| n0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from .errors import ConfigError
from .graph import ProgramGraph
from .problem import Problem
from .registry import Method

ProblemsArg = Mapping[str, Problem] | Sequence[Problem]

# Settings of each built-in method shown even at their defaults (others only when changed).
_KEY_SETTINGS: dict[str, tuple[str, ...]] = {
    "cg": ("iterations", "damping"),
    "neumann": ("iterations", "alpha"),
    "fixed_point": ("iterations", "alpha"),
    "es": ("samples", "sigma"),
}
_MAX_PATH_LINES = 10
_WIDTH = 100


# --------------------------------------------------------------------- graph helpers
def _top_down(graph: ProgramGraph) -> tuple[str, ...]:
    """Problems highest first (see ``_levels``), ties in the order they were given: every
    problem comes before all problems below it."""
    level = _levels(graph)
    index = {n: i for i, n in enumerate(graph.names)}
    return tuple(sorted(graph.names, key=lambda n: (-level[n], index[n])))


def _levels(graph: ProgramGraph) -> dict[str, int]:
    """Height of each problem: 0 with nothing below, else 1 + the highest problem below.

    "Below" is both kinds of edge (u2l children and l2u reads), so no edge joins two
    problems of the same height and every edge points from a higher to a lower one.
    """
    level: dict[str, int] = {}
    for name in graph.order:  # bottom-up: everything below is already placed
        below = set(graph.children[name]) | set(graph.reads[name])
        level[name] = 1 + max((level[b] for b in below), default=-1)
    return level


def _by_name(graph: ProgramGraph, problems: ProblemsArg | None) -> dict[str, Problem] | None:
    """``problems`` keyed by name, checked to cover every problem of ``graph``."""
    if problems is None:
        return None
    if isinstance(problems, Mapping):
        table = dict(problems)
    elif isinstance(problems, Sequence):
        table = {getattr(p, "name", ""): p for p in problems}
    else:
        table = {}
    if not table or not all(isinstance(p, Problem) for p in table.values()):
        raise ConfigError(
            "render", "problems", problems,
            "a dict of name -> zg.Problem or a list of zg.Problem (e.g. engine.problems)",
        )
    missing = [n for n in graph.names if n not in table]
    if missing:
        raise ConfigError(
            "render", "problems", sorted(table),
            f"every problem of the graph; missing {missing}. Pass engine.problems with "
            f"engine.graph",
        )
    return table


def _param_count(problem: Problem) -> int | None:
    """Trainable parameter elements, or None before the problem has a module."""
    try:
        return sum(p.numel() for p in problem.trainable_parameters())
    except AttributeError:  # module not built yet (None)
        return None


def _count_text(problem: Problem) -> str:
    count = _param_count(problem)
    return "?" if count is None else f"{count:,}"


def _value_text(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, str | bool) or value is None:
        return repr(value)
    try:
        return f"{float(value):g}"  # 0-d tensors (learned learning rates)
    except (TypeError, ValueError, RuntimeError):
        return repr(value)


def method_text(method: Method) -> str:
    """A method with its key settings and any changed from the default, e.g.
    ``CG(iterations=20, damping=0.001)``."""
    cls = type(method)
    if not dataclasses.is_dataclass(method):
        return f"{cls.__name__}()"
    key = _KEY_SETTINGS.get(method.name, ())
    parts = []
    for f in dataclasses.fields(method):
        if not f.init:
            continue
        value = getattr(method, f.name)
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = dataclasses.MISSING
        changed = default is dataclasses.MISSING or not _same(value, default)
        if f.name in key or changed:
            parts.append(f"{f.name}={_value_text(value)}")
    return f"{cls.__name__}({', '.join(parts)})"


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) and type(a) is type(b)
    except (TypeError, ValueError, RuntimeError):  # tensors and other ambiguous values
        return a is b


def _optimizer_text(problem: Problem) -> str:
    opt = problem.optimizer
    if opt is None:
        return "?"
    lrs: list[str] = []
    for group in getattr(opt, "param_groups", []):
        if "lr" in group:
            text = _value_text(group["lr"])
            if text not in lrs:
                lrs.append(text)
    name = type(opt).__name__
    return f"{name}(lr={'/'.join(lrs)})" if lrs else name


def _plain(name: str) -> str:
    """A name on one line: as is when printable, else its repr."""
    return name if name.isprintable() else repr(name)


# --------------------------------------------------------------------- DOT
def _dot_string(text: str) -> str:
    r"""A DOT double-quoted string: backslashes and quotes escaped, line breaks as ``\n``."""
    text = text.replace("\\", "\\\\").replace('"', '\\"')
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "\\n")
    return f'"{text}"'


def _label_lines(name: str, problem: Problem | None) -> list[str]:
    if problem is None:
        return [name]
    return [
        name,
        f"{type(problem).__name__} / {problem.method.name}",
        f"unroll_steps={problem.config.unroll_steps}",
        f"params={_count_text(problem)}",
    ]


def to_dot(graph: ProgramGraph, problems: ProblemsArg | None = None) -> str:
    """Graphviz DOT text of the program: one box per problem, upper levels on top.

    u2l edges (upper -> lower) are solid; l2u edges (lower -> upper: the upper problem's
    loss reads the lower one) are dashed, labelled "l2u" and do not affect the layout.
    Problems of the same height (longest chain of edges down to a bottom problem) share a
    rank. With ``problems`` (by name, or a list such as ``engine.problems``) each label
    adds the class, the method name, unroll_steps and the trainable parameter count.
    Names are quoted and escaped, so any name gives valid DOT.
    """
    table = _by_name(graph, problems)
    lines = [
        "digraph ziggurat {",
        "    rankdir=TB;",
        '    node [shape=box, style=rounded, fontname="Helvetica"];',
        '    edge [fontname="Helvetica"];',
    ]
    for name in _top_down(graph):
        label = "\n".join(_label_lines(name, None if table is None else table[name]))
        lines.append(f"    {_dot_string(name)} [label={_dot_string(label)}];")
    level = _levels(graph)
    for height in sorted(set(level.values()), reverse=True):
        members = " ".join(f"{_dot_string(n)};" for n in _top_down(graph) if level[n] == height)
        lines.append(f"    {{ rank=same; {members} }}")
    for kind, src, dst in graph.edges():
        attrs = ("style=solid" if kind == "u2l"
                 else 'style=dashed, label="l2u", constraint=false')
        lines.append(f"    {_dot_string(src)} -> {_dot_string(dst)} [{attrs}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- Mermaid
_MERMAID_UNSAFE = frozenset('"#&<>`[]{}()|;\\')


def _mermaid_text(text: str) -> str:
    """Label text safe inside ``["..."]``: risky characters as ``#code;`` entities."""
    out = []
    for ch in text.replace("\r\n", "\n").replace("\r", "\n"):
        if ch == "\n":
            out.append("<br/>")
        elif ch in _MERMAID_UNSAFE or not ch.isprintable():
            out.append(f"#{ord(ch)};")
        else:
            out.append(ch)
    return "".join(out)


def to_mermaid(graph: ProgramGraph, problems: ProblemsArg | None = None) -> str:
    """Mermaid flowchart text (``flowchart TB``) with the same content as ``to_dot``.

    Problems get the ids n0, n1, ... in top-down order; the name (and, with ``problems``,
    the details) is the escaped label. u2l edges are solid arrows, l2u edges dashed
    arrows labelled "l2u".
    """
    table = _by_name(graph, problems)
    ids = {name: f"n{i}" for i, name in enumerate(_top_down(graph))}
    lines = ["flowchart TB"]
    for name, node in ids.items():
        label = "<br/>".join(
            _mermaid_text(line)
            for line in _label_lines(name, None if table is None else table[name])
        )
        lines.append(f'    {node}["{label}"]')
    for kind, src, dst in graph.edges():
        arrow = "-->" if kind == "u2l" else "-.->|l2u|"
        lines.append(f"    {ids[src]} {arrow} {ids[dst]}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------- summary
def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for k, row in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def _wrapped(head: str, items: list[str]) -> list[str]:
    """``head`` then the comma-separated items, wrapped at the screen width."""
    if not items:
        return [f"{head} none"]
    lines: list[str] = []
    cur, filled = head, False
    for i, item in enumerate(items):
        piece = " " + item + ("," if i < len(items) - 1 else "")
        if filled and len(cur) + len(piece) > _WIDTH:
            lines.append(cur)
            cur, filled = " " * len(head), False
        cur += piece
        filled = True
    lines.append(cur)
    return lines


def summary(graph: ProgramGraph, problems: ProblemsArg) -> str:
    """A one-screen plain-text description of the program, for printing at start-up.

    A table with one row per problem, upper levels first (class, method and its key
    settings, unroll_steps, warmup_steps, roll_back, trainable parameters, optimizer and
    learning rate, number of hypergradient paths), then the u2l and l2u edges, then every
    hypergradient path as an ``outer -> ... -> inner`` chain (the first 10, then a count).
    ``problems``: by name, or a list such as ``engine.problems``.
    """
    table = _by_name(graph, problems)
    if table is None:
        raise ConfigError("summary", "problems", None, "the program's problems "
                          "(e.g. summary(engine.graph, engine.problems))")
    edges = graph.edges()
    n_paths = sum(len(graph.paths[n]) for n in graph.names)
    n_u2l = sum(1 for kind, _, _ in edges if kind == "u2l")
    lines = [
        f"ziggurat program: {len(graph.names)} problems, {n_u2l} u2l + {len(edges) - n_u2l} "
        f"l2u edges, {n_paths} hypergradient path{'' if n_paths == 1 else 's'}"
    ]
    rows = [["problem", "class", "method", "unroll", "warmup", "roll_back", "params",
             "optimizer", "paths"]]
    for name in _top_down(graph):
        p = table[name]
        rows.append([
            _plain(name), type(p).__name__, method_text(p.method),
            str(p.config.unroll_steps), str(p.config.warmup_steps),
            "yes" if p.config.roll_back else "no", _count_text(p), _optimizer_text(p),
            str(len(graph.paths[name])),
        ])
    lines += _table(rows)
    for kind, meaning in (("u2l", "upper -> lower"), ("l2u", "lower -> upper")):
        pairs = [f"{_plain(a)} -> {_plain(b)}" for k, a, b in edges if k == kind]
        lines += _wrapped(f"{kind} ({meaning}):", pairs)
    chains = [" -> ".join(map(_plain, path)) for n in _top_down(graph) for path in graph.paths[n]]
    lines.append("hypergradient paths (outer -> inner):" + ("" if chains else " none"))
    lines += [f"  {c}" for c in chains[:_MAX_PATH_LINES]]
    if len(chains) > _MAX_PATH_LINES:
        lines.append(f"  ... and {len(chains) - _MAX_PATH_LINES} more")
    return "\n".join(lines)
