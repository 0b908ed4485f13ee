"""The dependency graph of a multilevel program: validation, order and hypergradient paths.

Two kinds of edges, named as in Betty:

* ``u2l[A] = [B, ...]`` (upper to lower): B's loss depends on A's parameters, so B's
  solution θ_B*(θ_A) is a function of A. A is an *upper* problem (parent) of B.
* ``l2u[C] = [U, ...]`` (lower to upper): U's loss reads C's parameters, so U's
  hypergradient flows back through C.

For every l2u edge C → U, each chain of u2l edges U → P₁ → … → C is a *path*; the
hypergradient of U sums, over its paths, the vector ∂L_U/∂θ_C carried back edge by edge.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any, Protocol

from .errors import GraphError


class Named(Protocol):
    """Anything with a ``name``; the graph needs nothing else of a problem."""

    @property
    def name(self) -> str: ...


DependencySpec = Mapping[str, Mapping[Any, Iterable[Any]]]


@dataclass(frozen=True)
class ProgramGraph:
    """A validated program: problems by name, edges, bottom-up order and paths (by name)."""

    names: tuple[str, ...]
    parents: Mapping[str, tuple[str, ...]]  # upper problems (u2l sources)
    children: Mapping[str, tuple[str, ...]]  # lower problems (u2l targets)
    reads: Mapping[str, tuple[str, ...]]  # l2u: problems whose parameters U's loss reads
    paths: Mapping[str, tuple[tuple[str, ...], ...]]  # u2l chains U → … → C, one per read
    order: tuple[str, ...]  # bottom-up: every problem after all of its lower problems

    def is_leaf(self, name: str) -> bool:
        """A leaf has no lower problem; the engine steps it every iteration."""
        return not self.children[name]

    def edges(self) -> list[tuple[str, str, str]]:
        """All edges as (kind, from, to)."""
        out = [("u2l", a, b) for a in self.names for b in self.children[a]]
        out += [("l2u", c, u) for u in self.names for c in self.reads[u]]
        return out


def _name_of(item: Any, where: str, known: Mapping[str, Any]) -> str:
    if isinstance(item, str):
        name = item
    elif hasattr(item, "name") and isinstance(item.name, str):
        name = item.name
        if name in known and known[name] is not item:
            raise GraphError(
                f"dependencies {where} name a problem '{name}' that is not the object passed "
                f"in `problems` under that name; pass the same problem objects to both."
            )
    else:
        raise GraphError(
            f"dependencies {where} contain {item!r}, which is neither a problem nor a problem "
            f"name."
        )
    if name not in known:
        raise GraphError(
            f"dependencies {where} mention problem '{name}', which is not in `problems` "
            f"(known: {sorted(known)}). Add it to Engine(problems=[...])."
        )
    return name


def build_graph(
    problems: Sequence[Named],
    dependencies: DependencySpec | None,
    reserved_names: Collection[str] = (),
) -> ProgramGraph:
    """Validate ``problems`` and ``dependencies`` and return the program's graph.

    Raises GraphError for: duplicate names, a name that clashes with an attribute in
    ``reserved_names``, unknown dependency kinds, a problem in the dependencies but not in
    ``problems``, self-loops and cycles, a u2l edge on no hypergradient path, and an l2u
    edge with no u2l path beneath it.
    """
    known: dict[str, Named] = {}
    for p in problems:
        name = getattr(p, "name", None)
        if not isinstance(name, str) or not name:
            raise GraphError(f"every problem needs a non-empty string name; got {name!r}.")
        if name in known:
            raise GraphError(
                f"two problems are named '{name}'; names must be unique because problems "
                f"reach each other by name (self.{name})."
            )
        if name in reserved_names or name.startswith("_"):
            raise GraphError(
                f"problem name '{name}' clashes with an attribute every problem has (or is "
                f"private); problems reach each other as attributes, so pick another name."
            )
        known[name] = p
    names = tuple(known)

    deps: DependencySpec = dependencies or {}
    if not isinstance(deps, Mapping):
        raise GraphError(
            f"dependencies must be a dict like {{'u2l': {{upper: [lower]}}, 'l2u': {{lower: "
            f"[upper]}}}}; got {type(deps).__name__}."
        )
    unknown = set(deps) - {"u2l", "l2u"}
    if unknown:
        raise GraphError(
            f"dependencies have unknown keys {sorted(map(str, unknown))}; only 'u2l' (upper to "
            f"lower) and 'l2u' (lower to upper) are allowed."
        )

    def edges_of(kind: str) -> list[tuple[str, str]]:
        table = deps.get(kind, {}) or {}
        if not isinstance(table, Mapping):
            raise GraphError(f"dependencies['{kind}'] must be a dict of problem -> list.")
        out: list[tuple[str, str]] = []
        for key, values in table.items():
            src = _name_of(key, f"['{kind}'] key", known)
            if isinstance(values, str | bytes) or not isinstance(values, Iterable):
                values = [values]
            for value in values:
                dst = _name_of(value, f"['{kind}'][{src!r}]", known)
                if src == dst:
                    raise GraphError(
                        f"dependencies['{kind}'] link problem '{src}' to itself; a problem's "
                        f"own parameters are handled without a dependency."
                    )
                if (src, dst) not in out:
                    out.append((src, dst))
        return out

    u2l = edges_of("u2l")
    l2u = edges_of("l2u")
    parents: dict[str, list[str]] = {n: [] for n in names}
    children: dict[str, list[str]] = {n: [] for n in names}
    reads: dict[str, list[str]] = {n: [] for n in names}
    for a, b in u2l:
        children[a].append(b)
        parents[b].append(a)
    for c, u in l2u:
        reads[u].append(c)

    # "above" relation: u2l a→b and l2u c→u (u above c). Must be acyclic.
    below: dict[str, list[str]] = {n: list(children[n]) for n in names}
    for c, u in l2u:
        if c not in below[u]:
            below[u].append(c)
    order = _bottom_up(names, below)

    paths: dict[str, list[tuple[str, ...]]] = {n: [] for n in names}
    used: set[tuple[str, str]] = set()
    for c, u in l2u:
        found = _chains(u, c, children)
        if not found:
            raise GraphError(
                f"l2u says the loss of '{u}' reads the parameters of '{c}', but '{c}' does not "
                f"depend on '{u}' through u2l edges, so no hypergradient can flow. Add "
                f"u2l {{{u}: [{c}]}} (or a chain of u2l edges from '{u}' to '{c}'), or remove "
                f"the l2u edge."
            )
        for chain in found:
            paths[u].append(chain)
            used.update(pairwise(chain))
    for a, b in u2l:
        if (a, b) not in used:
            raise GraphError(
                f"u2l edge '{a}' -> '{b}' has no l2u path back: no problem at or above '{a}' "
                f"reads '{b}' or a problem below it, so '{a}' would never receive a "
                f"hypergradient through '{b}'. Add l2u {{{b}: [{a}]}} if the loss of '{a}' "
                f"reads '{b}', or remove the u2l edge."
            )
    return ProgramGraph(
        names=names,
        parents={n: tuple(v) for n, v in parents.items()},
        children={n: tuple(v) for n, v in children.items()},
        reads={n: tuple(v) for n, v in reads.items()},
        paths={n: tuple(v) for n, v in paths.items()},
        order=order,
    )


def _bottom_up(names: Sequence[str], below: Mapping[str, Sequence[str]]) -> tuple[str, ...]:
    """Topological order with every problem after all problems below it; GraphError on a cycle."""
    state: dict[str, int] = {}
    out: list[str] = []

    def visit(n: str, stack: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = [*stack[stack.index(n):], n]
            raise GraphError(
                f"the dependencies form a cycle: {' -> '.join(cycle)} (each arrow points from a "
                f"problem to one below it). A multilevel program must be a DAG; remove one edge."
            )
        state[n] = 1
        for m in below[n]:
            visit(m, [*stack, n])
        state[n] = 2
        out.append(n)

    for n in names:
        visit(n, [])
    return tuple(out)


def _chains(src: str, dst: str, children: Mapping[str, Sequence[str]]) -> list[tuple[str, ...]]:
    """Every chain of u2l edges from ``src`` down to ``dst`` (the graph is acyclic)."""
    if src == dst:
        return [(dst,)]
    return [(src, *rest) for c in children[src] for rest in _chains(c, dst, children)]


def chain(*problems: Hashable) -> dict[str, dict[Hashable, list[Hashable]]]:
    """Dependencies of a linear chain, listed top level first.

    ``chain(outer, inner)`` is ``{"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}``; for
    more levels each problem reads the one directly below it.

    Example:
        >>> chain("hp", "model")
        {'u2l': {'hp': ['model']}, 'l2u': {'model': ['hp']}}
    """
    if len(problems) < 2:
        raise GraphError("chain(...) needs at least two problems, listed top level first.")
    u2l: dict[Hashable, list[Hashable]] = {}
    l2u: dict[Hashable, list[Hashable]] = {}
    for upper, lower in pairwise(problems):
        u2l.setdefault(upper, []).append(lower)
        l2u.setdefault(lower, []).append(upper)
    return {"u2l": u2l, "l2u": l2u}
