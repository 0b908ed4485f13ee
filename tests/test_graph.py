"""Graph validation, structure (order / parents / children / paths / leaf) and rewiring.

Every invalid program must raise ``zg.GraphError`` whose message names the offending
problem(s) and says how to fix it.
"""

from __future__ import annotations

import pytest
import torch

import ziggurat as zg

from helpers import Vec

DTYPE = torch.float64




class Node:
    """The graph needs nothing of a problem but its name."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return f"Node({self.name!r})"


def quad_problem(
    name: str,
    parents: tuple[str, ...] = (),
    reads: tuple[str, ...] = (),
    config: zg.Config | None = None,
    init: float = 1.0,
) -> zg.ImplicitProblem:
    """L = ½‖θ − Σ_parents θ_u‖² + ½‖Σ_reads θ_c‖²: depends on its uppers, reads its lowers."""

    def step(p: zg.Problem, batch: object) -> torch.Tensor:
        target = sum((getattr(p, u)() for u in parents), torch.zeros(2, dtype=DTYPE))
        loss = 0.5 * ((p() - target) ** 2).sum()
        if reads:
            below = sum((getattr(p, c)() for c in reads), torch.zeros(2, dtype=DTYPE))
            loss = loss + 0.5 * (below**2).sum()
        return loss

    module = Vec([init, -init])
    return zg.ImplicitProblem(
        name,
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        config=config,
        training_step=step,
    )


def nodes(*names: str) -> dict[str, Node]:
    return {n: Node(n) for n in names}


# --------------------------------------------------------------------------- invalid programs
def test_duplicate_names_name_the_problem() -> None:
    a1, a2 = Node("alpha"), Node("alpha")
    with pytest.raises(zg.GraphError, match=r"two problems are named 'alpha'.*unique"):
        zg.build_graph([a1, Node("beta"), a2], None)


def test_duplicate_names_through_engine() -> None:
    with pytest.raises(zg.GraphError, match=r"two problems are named 'inner'"):
        zg.Engine([quad_problem("inner"), quad_problem("inner")])


@pytest.mark.parametrize("name", ["", None, 3])
def test_problem_without_a_string_name(name: object) -> None:
    with pytest.raises(zg.GraphError, match=r"non-empty string name; got " + repr(name)):
        zg.build_graph([Node("ok"), Node(name)], None)  # type: ignore[arg-type]


def test_problem_in_dependencies_but_not_in_problems() -> None:
    n = nodes("outer", "inner")
    stray = Node("stray")
    with pytest.raises(zg.GraphError) as info:
        zg.build_graph(
            [n["outer"], n["inner"]],
            {"u2l": {n["outer"]: [n["inner"], stray]}, "l2u": {n["inner"]: [n["outer"]]}},
        )
    msg = str(info.value)
    assert "'stray'" in msg
    assert "not in `problems`" in msg
    assert "known: ['inner', 'outer']" in msg
    assert "Add it to Engine(problems=[...])" in msg


def test_unknown_name_given_as_string() -> None:
    n = nodes("outer", "inner")
    with pytest.raises(zg.GraphError, match=r"\['l2u'\] key mention problem 'ghost'"):
        zg.build_graph(list(n.values()), {"u2l": {"outer": ["inner"]}, "l2u": {"ghost": ["outer"]}})


def test_dependency_key_is_a_different_object_with_a_known_name() -> None:
    outer, inner = Node("outer"), Node("inner")
    impostor = Node("outer")
    with pytest.raises(zg.GraphError) as info:
        zg.build_graph([outer, inner], {"u2l": {impostor: [inner]}, "l2u": {inner: [outer]}})
    msg = str(info.value)
    assert "['u2l'] key" in msg
    assert "'outer'" in msg
    assert "not the object passed in `problems`" in msg
    assert "pass the same problem objects to both" in msg


def test_dependency_value_is_a_different_object_with_a_known_name() -> None:
    outer, inner = quad_problem("outer"), quad_problem("inner", parents=("outer",))
    other_inner = quad_problem("inner")
    with pytest.raises(
        zg.GraphError,
        match=r"\['u2l'\]\['outer'\] name a problem 'inner' "
        r"that is not the object passed",
    ):
        zg.Engine([outer, inner], {"u2l": {outer: [other_inner]}, "l2u": {inner: [outer]}})


def test_dependency_item_that_is_neither_problem_nor_name() -> None:
    n = nodes("outer", "inner")
    with pytest.raises(
        zg.GraphError,
        match=r"contain 42, which is neither a problem nor a "
        r"problem name",
    ):
        zg.build_graph(list(n.values()), {"u2l": {"outer": [42]}})


def test_unknown_dependency_kind() -> None:
    n = nodes("outer", "inner")
    with pytest.raises(zg.GraphError) as info:
        zg.build_graph(
            list(n.values()),
            {"u2l": {"outer": ["inner"]}, "l2u": {"inner": ["outer"]}, "x2y": {"a": ["b"]}},
        )
    msg = str(info.value)
    assert "unknown keys ['x2y']" in msg
    assert "'u2l'" in msg and "'l2u'" in msg


def test_dependencies_not_a_dict() -> None:
    with pytest.raises(zg.GraphError, match=r"dependencies must be a dict.*got list"):
        zg.build_graph([Node("a")], [("u2l", "a", "b")])  # type: ignore[arg-type]


def test_dependency_table_not_a_dict() -> None:
    n = nodes("outer", "inner")
    with pytest.raises(zg.GraphError, match=r"dependencies\['u2l'\] must be a dict"):
        zg.build_graph(list(n.values()), {"u2l": [("outer", "inner")]})  # type: ignore[dict-item]


@pytest.mark.parametrize("kind", ["u2l", "l2u"])
def test_self_loop(kind: str) -> None:
    n = nodes("solo", "other")
    with pytest.raises(
        zg.GraphError,
        match=rf"dependencies\['{kind}'\] link problem 'solo' "
        r"to itself",
    ):
        zg.build_graph(list(n.values()), {kind: {"solo": ["solo"]}})


def test_two_cycle_shows_the_cycle() -> None:
    n = nodes("a", "b")
    with pytest.raises(zg.GraphError) as info:
        zg.build_graph(
            list(n.values()),
            {"u2l": {"a": ["b"], "b": ["a"]}, "l2u": {"b": ["a"], "a": ["b"]}},
        )
    msg = str(info.value)
    assert "the dependencies form a cycle: a -> b -> a" in msg
    assert "must be a DAG" in msg


def test_three_cycle_shows_the_cycle() -> None:
    n = nodes("a", "b", "c")
    with pytest.raises(zg.GraphError, match=r"form a cycle: a -> b -> c -> a "):
        zg.build_graph(
            list(n.values()),
            {
                "u2l": {"a": ["b"], "b": ["c"], "c": ["a"]},
                "l2u": {"b": ["a"], "c": ["b"], "a": ["c"]},
            },
        )


def test_l2u_pointing_the_wrong_way_is_a_cycle() -> None:
    # u2l says a is above b; l2u {a: [b]} says b's loss reads a, i.e. b is above a.
    n = nodes("a", "b")
    with pytest.raises(zg.GraphError, match=r"form a cycle: a -> b -> a"):
        zg.build_graph(list(n.values()), {"u2l": {"a": ["b"]}, "l2u": {"a": ["b"]}})


def test_u2l_edge_without_l2u_path_back() -> None:
    n = nodes("hp", "model")
    with pytest.raises(zg.GraphError) as info:
        zg.build_graph(list(n.values()), {"u2l": {"hp": ["model"]}})
    msg = str(info.value)
    assert "u2l edge 'hp' -> 'model' has no l2u path back" in msg
    assert "Add l2u {model: [hp]}" in msg
    assert "or remove the u2l edge" in msg


def test_u2l_shortcut_on_no_path_is_rejected() -> None:
    # a -> b -> c is a proper chain; the extra u2l edge a -> c is on no hypergradient path.
    n = nodes("a", "b", "c")
    with pytest.raises(zg.GraphError, match=r"u2l edge 'a' -> 'c' has no l2u path back"):
        zg.build_graph(
            list(n.values()),
            {"u2l": {"a": ["b", "c"], "b": ["c"]}, "l2u": {"b": ["a"], "c": ["b"]}},
        )


def test_l2u_edge_without_u2l_path_beneath() -> None:
    n = nodes("hp", "model")
    with pytest.raises(zg.GraphError) as info:
        zg.build_graph(list(n.values()), {"l2u": {"model": ["hp"]}})
    msg = str(info.value)
    assert "l2u says the loss of 'hp' reads the parameters of 'model'" in msg
    assert "'model' does not depend on 'hp' through u2l edges" in msg
    assert "Add u2l {hp: [model]}" in msg


@pytest.mark.parametrize(
    "name",
    [
        "module",
        "step",
        "config",
        "optimizer",
        "count",
        "name",
        "leaf",
        "paths",
        "training_step",
        "_private",
    ],
)
def test_problem_name_clashing_with_problem_attribute(name: str) -> None:
    clash = quad_problem(name, reads=("lower",))
    lower = quad_problem("lower", parents=(name,))
    with pytest.raises(zg.GraphError) as info:
        zg.Engine([clash, lower], zg.chain(clash, lower))
    msg = str(info.value)
    assert f"problem name '{name}' clashes" in msg
    assert "pick another name" in msg


@pytest.mark.parametrize("name", ["graph", "run", "global_step", "validation", "problems"])
def test_problem_name_clashing_with_engine_attribute(name: str) -> None:
    upper = quad_problem(name, reads=("lower",))
    lower = quad_problem("lower", parents=(name,))
    try:
        engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    except zg.GraphError as err:
        assert f"'{name}'" in str(err)
        return
    assert getattr(engine, name) is upper


# --------------------------------------------------------------------------- chain helper
def test_chain_two_and_three_problems() -> None:
    assert zg.chain("hp", "model") == {"u2l": {"hp": ["model"]}, "l2u": {"model": ["hp"]}}
    assert zg.chain("a", "b", "c") == {
        "u2l": {"a": ["b"], "b": ["c"]},
        "l2u": {"b": ["a"], "c": ["b"]},
    }
    a, b = Node("a"), Node("b")
    deps = zg.chain(a, b)
    assert deps["u2l"][a] == [b] and deps["l2u"][b] == [a]


@pytest.mark.parametrize("args", [(), ("only",)])
def test_chain_needs_two_problems(args: tuple[str, ...]) -> None:
    with pytest.raises(zg.GraphError, match=r"chain\(\.\.\.\) needs at least two problems"):
        zg.chain(*args)


# --------------------------------------------------------------------------- structure
def test_three_level_chain_structure() -> None:
    n = nodes("top", "mid", "bottom")
    # problems listed in an order unrelated to the levels
    g = zg.build_graph([n["mid"], n["bottom"], n["top"]], zg.chain("top", "mid", "bottom"))
    assert g.names == ("mid", "bottom", "top")
    assert g.order == ("bottom", "mid", "top")
    assert g.parents == {"top": (), "mid": ("top",), "bottom": ("mid",)}
    assert g.children == {"top": ("mid",), "mid": ("bottom",), "bottom": ()}
    assert g.reads == {"top": ("mid",), "mid": ("bottom",), "bottom": ()}
    assert g.paths == {"top": (("top", "mid"),), "mid": (("mid", "bottom"),), "bottom": ()}
    assert [g.is_leaf(x) for x in ("top", "mid", "bottom")] == [False, False, True]
    assert sorted(g.edges()) == sorted(
        [
            ("u2l", "top", "mid"),
            ("u2l", "mid", "bottom"),
            ("l2u", "mid", "top"),
            ("l2u", "bottom", "mid"),
        ]
    )


def test_top_reading_bottom_through_two_middles_has_two_paths() -> None:
    # diamond: top over m1 and m2, both over base; top reads m1, m2 and base itself.
    n = nodes("top", "m1", "m2", "base")
    deps = {
        "u2l": {"top": ["m1", "m2"], "m1": ["base"], "m2": ["base"]},
        "l2u": {"m1": ["top"], "m2": ["top"], "base": ["m1", "m2", "top"]},
    }
    g = zg.build_graph(list(n.values()), deps)
    assert g.order == ("base", "m1", "m2", "top")
    assert g.parents["base"] == ("m1", "m2")
    assert g.children["top"] == ("m1", "m2")
    assert g.reads["top"] == ("m1", "m2", "base")
    assert g.paths["top"] == (
        ("top", "m1"),
        ("top", "m2"),
        ("top", "m1", "base"),
        ("top", "m2", "base"),
    )
    assert g.paths["m1"] == (("m1", "base"),)
    assert g.paths["m2"] == (("m2", "base"),)
    assert g.paths["base"] == ()


def test_duplicate_edges_are_merged_and_single_values_accepted() -> None:
    n = nodes("u", "l")
    g = zg.build_graph(list(n.values()), {"u2l": {"u": ["l", "l"]}, "l2u": {"l": "u"}})
    assert g.children["u"] == ("l",)
    assert g.reads["u"] == ("l",)
    assert g.paths["u"] == (("u", "l"),)


def test_engine_diamond_with_problem_objects() -> None:
    # a lower with two uppers and an upper with two lowers, given as objects
    u1 = quad_problem("u1", reads=("low",))
    u2 = quad_problem("u2", reads=("low",))
    low = quad_problem("low", parents=("u1", "u2"))
    engine = zg.Engine([u1, u2, low], {"u2l": {u1: [low], u2: [low]}, "l2u": {low: [u1, u2]}})
    assert engine.graph.order == ("low", "u1", "u2")
    assert low.parents == [u1, u2]
    assert low.children == []
    assert low.leaf is True
    assert u1.children == [low] and u2.children == [low]
    assert u1.parents == [] and u1.leaf is False
    assert u1.paths == [[u1, low]]
    assert u2.paths == [[u2, low]]
    assert low.paths == []


def test_names_as_strings_give_the_same_graph_as_objects() -> None:
    a1, b1, c1 = (
        quad_problem("a", reads=("b",)),
        quad_problem("b", ("a",), ("c",)),
        quad_problem("c", ("b",)),
    )
    a2, b2, c2 = (
        quad_problem("a", reads=("b",)),
        quad_problem("b", ("a",), ("c",)),
        quad_problem("c", ("b",)),
    )
    by_name = zg.Engine([a1, b1, c1], zg.chain("a", "b", "c"))
    by_object = zg.Engine([a2, b2, c2], zg.chain(a2, b2, c2))
    assert by_name.graph == by_object.graph
    assert by_name.graph.order == ("c", "b", "a")


def test_engine_and_problem_attribute_access() -> None:
    outer = quad_problem("outer", reads=("inner",))
    inner = quad_problem("inner", parents=("outer",))
    engine = zg.Engine([outer, inner], zg.chain(outer, inner))
    assert engine.outer is outer
    assert engine.inner is inner
    assert outer.inner is inner
    assert inner.outer is outer
    assert "outer" in vars(engine) and "inner" in vars(outer)  # plain instance attributes
    assert not hasattr(zg.Engine, "__getattr__") and not hasattr(zg.Problem, "__getattr__")
    with pytest.raises(AttributeError, match=r"'Engine' object has no attribute 'nowhere'"):
        _ = engine.nowhere
    with pytest.raises(AttributeError, match="has no attribute 'outer'"):
        _ = outer.outer  # a problem does not reach itself by its own name


def test_a_missing_attribute_in_a_training_step_names_the_problem_and_the_program() -> None:
    outer = quad_problem("outer", reads=("inner",))
    inner = quad_problem("inner", parents=("outer",))
    inner._training_step_fn = lambda p, batch: p.outr().sum()
    engine = zg.Engine([outer, inner], zg.chain(outer, inner))
    with pytest.raises(AttributeError) as info:
        engine.train_step()
    msg = str(info.value)
    assert "problem 'inner'" in msg
    assert "no attribute 'outr'" in msg
    assert "problems in the program: ['outer']" in msg
    assert info.traceback[-1].name == "<lambda>"  # raised where the user wrote it
    # an AttributeError about anything else is left as it was
    inner._training_step_fn = lambda p, batch: p.module.nowhere
    with pytest.raises(AttributeError, match=r"^'Vec' object has no attribute 'nowhere'$"):
        engine.train_step()


def test_structure_properties_before_engine() -> None:
    p = quad_problem("lonely")
    for prop in ("parents", "children", "paths", "leaf"):
        with pytest.raises(
            zg.ZigguratError,
            match=r"problem 'lonely' is not part of an Engine "
            r"yet; pass it to zg.Engine",
        ):
            getattr(p, prop)


# --------------------------------------------------------------------------- rewiring
def test_set_dependency_rewires_the_schedule() -> None:
    # y's loss depends on x and z; first x is its upper, then z is.
    x = quad_problem("x", reads=("y",))
    z = quad_problem("z", reads=("y",))
    y = quad_problem("y", parents=("x", "z"), config=zg.Config(unroll_steps=2))
    engine = zg.Engine([x, y, z], zg.chain(x, y))
    assert engine.graph.order == ("y", "x", "z")
    assert y.parents == [x]
    first = [engine.train_step() for _ in range(4)]
    assert first == [["y", "z"], ["y", "x", "z"], ["y", "z"], ["y", "x", "z"]]
    assert (x.count, y.count, z.count) == (2, 4, 4)

    engine.set_dependency(zg.chain(z, y))
    assert engine.graph.order == ("x", "y", "z")
    assert y.parents == [z]
    assert x.leaf is True and x.children == []
    assert z.children == [y] and z.paths == [[z, y]]
    second = [engine.train_step() for _ in range(4)]
    assert second == [["x", "y"], ["x", "y", "z"], ["x", "y"], ["x", "y", "z"]]
    assert (x.count, y.count, z.count) == (6, 8, 6)
    assert engine.global_step == 8


def test_failed_rewire_keeps_the_previous_program() -> None:
    outer = quad_problem("outer", reads=("inner",))
    inner = quad_problem("inner", parents=("outer",), config=zg.Config(unroll_steps=2))
    engine = zg.Engine([outer, inner], zg.chain(outer, inner))
    assert engine.train_step() == ["inner"]
    with pytest.raises(zg.GraphError, match=r"u2l edge 'inner' -> 'outer' has no l2u path"):
        engine.set_dependency({"u2l": {inner: [outer]}})
    assert engine.graph.order == ("inner", "outer")
    assert inner.parents == [outer]
    # the pending unroll count survived the failed rewire
    assert engine.train_step() == ["inner", "outer"]
    assert (outer.count, inner.count) == (1, 2)


def test_single_objects_as_dependency_values() -> None:
    outer = quad_problem("outer", reads=("inner",))
    inner = quad_problem("inner", parents=("outer",))
    engine = zg.Engine([outer, inner], {"u2l": {outer: inner}, "l2u": {inner: outer}})
    assert engine.graph.children["outer"] == ("inner",)
    assert engine.graph.reads["outer"] == ("inner",)


def test_rewire_to_no_dependencies_makes_every_problem_a_leaf() -> None:
    outer = quad_problem("outer", reads=("inner",))
    inner = quad_problem("inner", parents=("outer",), config=zg.Config(unroll_steps=3))
    engine = zg.Engine([outer, inner], zg.chain(outer, inner))
    assert [engine.train_step() for _ in range(3)] == [["inner"], ["inner"], ["inner", "outer"]]
    engine.set_dependency(None)
    assert engine.graph.order == ("outer", "inner")
    assert outer.leaf and inner.leaf and inner.parents == []
    # outer's loss still uses inner's θ, but as a leaf it only differentiates its own θ
    assert [engine.train_step() for _ in range(2)] == [["outer", "inner"]] * 2
    assert (outer.count, inner.count) == (3, 5)
