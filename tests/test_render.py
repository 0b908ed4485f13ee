"""Rendering the program's graph: DOT and Mermaid parse with every node and edge styled by
kind, names of any characters stay valid, and the start-up summary fits on one screen."""

from __future__ import annotations

import re
import shutil
import subprocess
from typing import Any

import pytest
import torch

import ziggurat as zg
from ziggurat.errors import ConfigError
from ziggurat.render import method_text, summary, to_dot, to_mermaid

DTYPE = torch.float64


def _problem(
    name: str,
    n: int = 2,
    config: zg.Config | None = None,
    cls: type[zg.Problem] = zg.ImplicitProblem,
    opt: Any = torch.optim.SGD,
    lr: float = 0.1,
) -> zg.Problem:
    module = torch.nn.Linear(n, 1).to(DTYPE)
    return cls(name, module=module, optimizer=opt(module.parameters(), lr=lr), config=config,
               training_step=lambda p, b: sum(t.sum() for t in p.trainable_parameters()))


def _two_level() -> zg.Engine:
    outer = _problem("outer", 3, opt=torch.optim.Adam, lr=1e-3)
    inner = _problem("inner", 4, zg.Config(type="cg", cg_iterations=20, cg_damping=1e-3,
                                           unroll_steps=5, roll_back=True))
    return zg.Engine([outer, inner], zg.chain(outer, inner))


def _three_level() -> zg.Engine:
    top = _problem("top", 2)
    mid = _problem("mid", 3, zg.Config(type="neumann", neumann_iterations=7, warmup_steps=4))
    bottom = _problem("bottom", 5, zg.Config(type="reverse", unroll_steps=3),
                      cls=zg.IterativeProblem)
    return zg.Engine([top, mid, bottom], zg.chain(top, mid, bottom))


def _diamond() -> zg.Engine:
    """top reads a and b; a and b both read c."""
    top, a, b, c = (_problem(n, i + 2) for i, n in enumerate(["top", "a", "b", "c"]))
    deps = {"u2l": {top: [a, b], a: [c], b: [c]}, "l2u": {a: [top], b: [top], c: [a, b]}}
    return zg.Engine([top, a, b, c], deps)


def _odd_names() -> zg.Engine:
    names = ['outer "λ"', "inner model", "back\\slash", "semi;{brace}[x]", "new\nline"]
    problems = [_problem(n) for n in names]
    return zg.Engine(problems, zg.chain(*problems))


def _five() -> zg.Engine:
    top = _problem("hp", 3, opt=torch.optim.Adam, lr=1e-3)
    a = _problem("mid_a", 4, zg.Config(type="cg", cg_iterations=20, cg_damping=1e-3,
                                       unroll_steps=5, roll_back=True))
    b = _problem("mid_b", 5, zg.Config(type="neumann", unroll_steps=2, warmup_steps=10))
    c = _problem("low", 6, zg.Config(type=zg.FixedPoint(iterations=3, warm_start=False)))
    d = _problem("bottom", 7)
    deps = {"u2l": {top: [a, b], a: [c], b: [c], c: [d]},
            "l2u": {d: [top], c: [a, b], a: [top]}}
    return zg.Engine([top, a, b, c, d], deps)


PROGRAMS = {"two": _two_level, "three": _three_level, "diamond": _diamond,
            "odd_names": _odd_names, "five": _five}


def _edges(engine: zg.Engine) -> set[tuple[str, str, str]]:
    return {(kind, a, b) for kind, a, b in engine.graph.edges()}


# --------------------------------------------------------------------- a small DOT reader
_TOKEN = re.compile(r'\s*(?:("(?:[^"\\]|\\.)*")|(->|[{}\[\];=,])|([A-Za-z0-9_.]+))', re.S)


def _unquote(token: str) -> str:
    r"""A DOT string as a label reads it: \\ -> \, \" -> ", \n -> newline."""
    if not token.startswith('"'):
        return token
    out, body, i = [], token[1:-1], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append({"n": "\n", "\\": "\\", '"': '"'}.get(nxt, "\\" + nxt))
            i += 2
        else:
            out.append(body[i])
            i += 1
    return "".join(out)


def _tokens(text: str) -> list[str]:
    out, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        m = _TOKEN.match(text, pos)
        assert m is not None and m.end() > pos, f"unexpected DOT text at {text[pos:pos + 30]!r}"
        out.append(m.group(1) or m.group(2) or m.group(3))
        pos = m.end()
    return out


def _parse_dot(text: str) -> dict[str, Any]:
    """Nodes (id -> attrs), edges [(src, dst, attrs)] and same-rank groups of a flat digraph;
    asserts the grammar on the way (balanced braces, terminated statements)."""
    toks = _tokens(text)
    assert toks[:3] == ["digraph", "ziggurat", "{"] and toks[-1] == "}"
    depth = 0
    for t in toks:
        depth += {"{": 1, "}": -1}.get(t, 0)
        assert depth >= 0
    assert depth == 0, "unbalanced braces"
    nodes: dict[str, dict[str, str]] = {}
    edges: list[tuple[str, str, dict[str, str]]] = []
    ranks: list[list[str]] = []
    i = 3

    def attrs() -> dict[str, str]:
        nonlocal i
        out: dict[str, str] = {}
        if toks[i] != "[":
            return out
        i += 1
        while toks[i] != "]":
            key, eq, value = toks[i:i + 3]
            assert eq == "=", toks[i:i + 3]
            out[key] = _unquote(value)
            i += 3
            if toks[i] == ",":
                i += 1
        i += 1
        return out

    while toks[i] != "}":
        if toks[i] == "{":  # { rank=same; "a"; "b"; }
            assert toks[i + 1:i + 5] == ["rank", "=", "same", ";"]
            i += 5
            group = []
            while toks[i] != "}":
                group.append(_unquote(toks[i]))
                assert toks[i + 1] == ";"
                i += 2
            ranks.append(group)
            i += 1
            continue
        first = toks[i]
        i += 1
        if toks[i] == "=":  # graph attribute
            i += 2
        elif first in ("node", "edge"):
            attrs()
        elif toks[i] == "->":
            dst = toks[i + 1]
            i += 2
            edges.append((_unquote(first), _unquote(dst), attrs()))
        else:
            nodes[_unquote(first)] = attrs()
        assert toks[i] == ";", f"statement not terminated at token {i}: {toks[i]!r}"
        i += 1
    return {"nodes": nodes, "edges": edges, "ranks": ranks}


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("details", [False, True], ids=["names", "details"])
def test_dot_has_every_node_and_edge_styled_by_kind(program: str, details: bool) -> None:
    engine = PROGRAMS[program]()
    graph = engine.graph
    text = to_dot(graph, engine.problems if details else None)
    dot = _parse_dot(text)
    assert "rankdir=TB;" in text
    assert set(dot["nodes"]) == set(graph.names)
    for name, attrs in dot["nodes"].items():
        lines = attrs["label"].split("\n")
        assert "\n".join(lines[: len(lines) - (3 if details else 0)]) == name
        if details:
            p = {q.name: q for q in engine.problems}[name]
            count = sum(t.numel() for t in p.trainable_parameters())
            assert lines[-3:] == [f"{type(p).__name__} / {p.method.name}",
                                  f"unroll_steps={p.config.unroll_steps}", f"params={count:,}"]
    got = set()
    for src, dst, attrs in dot["edges"]:
        if attrs["style"] == "solid":
            kind = "u2l"
            assert "label" not in attrs
        else:
            kind = "l2u"
            assert attrs == {"style": "dashed", "label": "l2u", "constraint": "false"}
        got.add((kind, src, dst))
    assert got == _edges(engine) and len(dot["edges"]) == len(got)
    # ranks: every problem once, upper groups first, every edge from a higher rank down
    flat = [n for group in dot["ranks"] for n in group]
    assert sorted(flat) == sorted(graph.names)
    rank = {n: k for k, group in enumerate(dot["ranks"]) for n in group}
    for kind, a, b in graph.edges():
        upper, lower = (a, b) if kind == "u2l" else (b, a)
        assert rank[upper] < rank[lower]
    # nodes are declared top-down
    assert [rank[n] for n in dot["nodes"]] == sorted(rank[n] for n in dot["nodes"])


def test_dot_ranks_of_diamond_and_three_level_chain() -> None:
    dot = _parse_dot(to_dot(_diamond().graph))
    assert dot["ranks"] == [["top"], ["a", "b"], ["c"]]
    dot = _parse_dot(to_dot(_three_level().graph))
    assert dot["ranks"] == [["top"], ["mid"], ["bottom"]]


def test_dot_escapes_quotes_backslashes_and_line_breaks() -> None:
    text = to_dot(_odd_names().graph)
    assert '"outer \\"λ\\""' in text
    assert '"back\\\\slash"' in text
    assert '"new\\nline"' in text
    assert "\nline" not in text.replace("\\nline", "")  # no raw line break inside a string


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pydot's use of pyparsing
def test_dot_parses_with_pydot() -> None:
    pydot = pytest.importorskip("pydot")
    for make in PROGRAMS.values():
        engine = make()
        (g,) = pydot.graph_from_dot_data(to_dot(engine.graph, engine.problems))
        names = {_unquote(n.get_name()) for n in g.get_nodes()} - {"node", "edge"}
        assert names == set(engine.graph.names)
        edges = {("u2l" if e.get_style() == "solid" else "l2u",
                  _unquote(e.get_source()), _unquote(e.get_destination()))
                 for e in g.get_edges()}
        assert edges == _edges(engine)


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_dot_is_accepted_by_graphviz() -> None:
    for make in PROGRAMS.values():
        engine = make()
        run = subprocess.run(["dot", "-Tplain"], input=to_dot(engine.graph, engine.problems),
                             capture_output=True, text=True, timeout=30, check=False)
        assert run.returncode == 0 and not run.stderr, run.stderr
        nodes = [line for line in run.stdout.splitlines() if line.startswith("node ")]
        assert len(nodes) == len(engine.graph.names)


# --------------------------------------------------------------------- Mermaid
_NODE = re.compile(r'^    (n\d+)\["([^"]*)"\]$')
_EDGE = re.compile(r"^    (n\d+) (-->|-\.->\|l2u\|) (n\d+)$")


def _mermaid_label(text: str) -> str:
    text = text.replace("<br/>", "\n")
    return re.sub(r"#(\d+);", lambda m: chr(int(m.group(1))), text)


@pytest.mark.parametrize("program", sorted(PROGRAMS))
@pytest.mark.parametrize("details", [False, True], ids=["names", "details"])
def test_mermaid_one_line_per_node_and_edge(program: str, details: bool) -> None:
    engine = PROGRAMS[program]()
    graph = engine.graph
    lines = to_mermaid(graph, engine.problems if details else None).splitlines()
    assert lines[0] == "flowchart TB"
    ids: dict[str, str] = {}
    edges = set()
    n_edges = 0
    for line in lines[1:]:
        node, edge = _NODE.match(line), _EDGE.match(line)
        assert node or edge, f"not a node or edge line: {line!r}"
        if node:
            label = _mermaid_label(node.group(2)).split("\n")
            name = "\n".join(label[: len(label) - (3 if details else 0)])
            assert node.group(1) not in ids.values() and name not in ids
            ids[name] = node.group(1)
            raw = re.sub(r"#\d+;", "", node.group(2).replace("<br/>", ""))
            assert not set(raw) & set('"<>[]{}()|`;\\#&'), raw
        else:
            assert edge is not None
            n_edges += 1
            kind = "u2l" if edge.group(2) == "-->" else "l2u"
            edges.add((kind, edge.group(1), edge.group(3)))
    assert set(ids) == set(graph.names)
    assert list(ids.values()) == [f"n{i}" for i in range(len(ids))]
    expected = {(k, ids[a], ids[b]) for k, a, b in graph.edges()}
    assert edges == expected and n_edges == len(expected)


def test_mermaid_escapes_risky_characters() -> None:
    text = to_mermaid(_odd_names().graph)
    assert 'n0["outer #34;λ#34;"]' in text
    assert 'n3["semi#59;#123;brace#125;#91;x#93;"]' in text
    assert 'n4["new<br/>line"]' in text


# --------------------------------------------------------------------- summary
def test_summary_lists_problems_settings_edges_and_paths() -> None:
    engine = _five()
    text = summary(engine.graph, engine.problems)
    lines = text.splitlines()
    assert len(lines) <= 25
    assert lines[0] == ("ziggurat program: 5 problems, 5 u2l + 4 l2u edges, "
                        "5 hypergradient paths")
    header = lines[1].split()
    assert header == ["problem", "class", "method", "unroll", "warmup", "roll_back", "params",
                      "optimizer", "paths"]
    rows = {line.split()[0]: line for line in lines[3:8]}
    assert list(rows) == ["hp", "mid_a", "mid_b", "low", "bottom"]  # top-down
    assert "CG(iterations=20, damping=0.001)" in rows["mid_a"]
    assert re.search(r"CG\(.*\)\s+5\s+0\s+yes\s+5\s+SGD\(lr=0.1\)\s+1$", rows["mid_a"])
    assert re.search(r"Neumann\(iterations=10, alpha=None\)\s+2\s+10\s+no\s+6\s", rows["mid_b"])
    assert "FixedPoint(iterations=3, alpha=None, warm_start=False)" in rows["low"]
    assert re.search(r"Darts\(\)\s+1\s+0\s+no\s+4\s+Adam\(lr=0.001\)\s+3$", rows["hp"])
    assert re.search(r"\s0$", rows["bottom"])
    assert "u2l (upper -> lower): hp -> mid_a, hp -> mid_b, mid_a -> low" in text
    assert "l2u (lower -> upper): bottom -> hp, mid_a -> hp, low -> mid_a, low -> mid_b" in text
    chains = lines[lines.index("hypergradient paths (outer -> inner):") + 1:]
    assert [c.strip() for c in chains] == [
        "hp -> mid_a -> low -> bottom", "hp -> mid_b -> low -> bottom", "hp -> mid_a",
        "mid_a -> low", "mid_b -> low",
    ]


@pytest.mark.parametrize("program", sorted(PROGRAMS))
def test_summary_of_every_program(program: str) -> None:
    engine = PROGRAMS[program]()
    by_name = {p.name: p for p in engine.problems}
    text = summary(engine.graph, by_name)
    assert text == summary(engine.graph, engine.problems)
    assert len(text.splitlines()) <= 25
    for p in engine.problems:
        shown = p.name if p.name.isprintable() else repr(p.name)
        assert shown in text and method_text(p.method) in text
    for name in engine.graph.names:
        for path in engine.graph.paths[name]:
            chain = " -> ".join(n if n.isprintable() else repr(n) for n in path)
            assert "  " + chain in text.splitlines()


def test_summary_of_three_level_chain_shows_iterative_bottom() -> None:
    engine = _three_level()
    text = summary(engine.graph, engine.problems)
    assert re.search(r"^bottom\s+IterativeProblem\s+Reverse\(\)\s+3\s+0\s+no\s+6\s", text, re.M)
    assert re.search(r"^mid\s+ImplicitProblem\s+Neumann\(iterations=7, alpha=None\)\s+1\s+4",
                      text, re.M)
    assert text.endswith("hypergradient paths (outer -> inner):\n  top -> mid\n  mid -> bottom")


def test_summary_of_single_problem_and_many_paths() -> None:
    solo = _problem("solo")
    engine = zg.Engine([solo])
    text = summary(engine.graph, engine.problems)
    assert "u2l (upper -> lower): none" in text and "hypergradient paths (outer -> inner): none" \
        in text
    # a ladder with 2^k paths: the list is cut after 10 with a count
    levels = [_problem(f"p{i}") for i in range(9)]
    u2l: dict[Any, list[Any]] = {}
    for i in range(8):
        u2l.setdefault(levels[i], []).append(levels[i + 1])
        if i + 2 < 9 and i % 2 == 0:
            u2l[levels[i]].append(levels[i + 2])
    engine = zg.Engine(levels, {"u2l": u2l, "l2u": {levels[-1]: [levels[0]]}})
    out = summary(engine.graph, engine.problems).splitlines()
    n_paths = len(engine.graph.paths["p0"])
    assert n_paths > 10
    assert out[-1] == f"  ... and {n_paths - 10} more"
    assert all(len(line) <= 100 for line in out if line.startswith(("u2l", "l2u", " ")))


def test_method_text_shows_key_and_changed_settings() -> None:
    assert method_text(zg.CG()) == "CG(iterations=10, damping=0)"
    assert method_text(zg.CG(iterations=20, damping=1e-3, tol=1e-8)) == \
        "CG(iterations=20, damping=0.001, tol=1e-08)"
    assert method_text(zg.Darts()) == "Darts()"
    assert method_text(zg.Darts(fd_eps=0.02)) == "Darts(fd_eps=0.02)"
    assert method_text(zg.Reverse(truncate=3)) == "Reverse(truncate=3)"
    assert method_text(zg.EvolutionStrategies()) == "EvolutionStrategies(samples=16, sigma=0.01)"


def test_missing_or_wrong_problems_raise_config_error() -> None:
    engine = _two_level()
    with pytest.raises(ConfigError, match=r"problems.*missing \['inner'\]"):
        to_dot(engine.graph, [engine.problems[0]])
    with pytest.raises(ConfigError, match=r"render.problems"):
        to_mermaid(engine.graph, ["outer", "inner"])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"summary.problems"):
        summary(engine.graph, None)  # type: ignore[arg-type]
