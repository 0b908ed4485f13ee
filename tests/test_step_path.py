"""The lean step path: the precomputed schedule, hooks detected at set-up, lazy progress.

The schedule is checked against a reference written from the rule in the engine's docstring
(counters only, no problems); hooks against exact parameter values; the lazy progress values
against the lines printed from the same values given eagerly.
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
import torch

import ziggurat as zg
from ziggurat.logging import Progress
from ziggurat.torch_compat import autocast_enabled

from helpers import Quad, Vec
from ridge import make_ridge, rel_err

DTYPE = torch.float64


def reference_schedule(
    order: Sequence[str], children: Mapping[str, Sequence[str]],
    configs: Mapping[str, zg.Config], iterations: int,
) -> tuple[list[list[str]], dict[str, list[int]]]:
    """The schedule rule on counters alone: every leaf steps; an upper problem steps once
    each lower problem has taken unroll_steps counted steps (warm-up steps do not count)
    since it last stepped. Returns who stepped at each iteration and the counts at which
    each problem began an unroll."""
    parents = {n: [u for u in order if n in children[u]] for n in order}
    count = dict.fromkeys(order, 0)
    pending = {(u, c): 0 for u in order for c in children[u]}
    open_unroll = dict.fromkeys(order, False)
    starts: dict[str, list[int]] = {n: [] for n in order}
    history = []
    for _ in range(iterations):
        stepped, finished = [], []
        for name in order:
            leaf = not children[name]
            if leaf or all(pending[(name, c)] >= configs[c].unroll_steps
                           for c in children[name]):
                counted = count[name] >= configs[name].warmup_steps
                if counted and not open_unroll[name]:
                    starts[name].append(count[name])
                    open_unroll[name] = True
                count[name] += 1
                if counted:
                    for u in parents[name]:
                        pending[(u, name)] += 1
                stepped.append(name)
                if not leaf:
                    for c in children[name]:
                        pending[(name, c)] = 0
                        finished.append(c)
        for c in finished:
            open_unroll[c] = False
        history.append(stepped)
    return history, starts


CHAINS = [  # (unroll, warm-up) of mid and of bottom in top -> mid -> bottom
    ((1, 0), (1, 0)),
    ((2, 0), (3, 0)),
    ((3, 2), (2, 5)),
    ((1, 4), (4, 1)),
    ((5, 0), (1, 3)),
]


@pytest.mark.parametrize(("mid", "bottom"), CHAINS)
def test_schedule_of_a_three_level_chain_matches_the_rule(
    mid: tuple[int, int], bottom: tuple[int, int]
) -> None:
    configs = {"top": zg.Config(),
               "mid": zg.Config(unroll_steps=mid[0], warmup_steps=mid[1]),
               "bottom": zg.Config(unroll_steps=bottom[0], warmup_steps=bottom[1])}
    top = Quad("top", lowers=["mid"], config=configs["top"])
    middle = Quad("mid", uppers=["top"], lowers=["bottom"], config=configs["mid"])
    low = Quad("bottom", uppers=["mid"], config=configs["bottom"])
    engine = zg.Engine([top, middle, low], zg.chain(top, middle, low))
    iterations = 60
    expected, starts = reference_schedule(
        engine.graph.order, engine.graph.children, configs, iterations)
    assert [engine.train_step() for _ in range(iterations)] == expected
    for p in (top, middle, low):
        assert p.unroll_starts == starts[p.name]
    assert sum("top" in s for s in expected) >= 2  # the upper levels did step


@pytest.mark.parametrize(("a", "b"), [((1, 0), (3, 0)), ((2, 3), (5, 1)), ((4, 0), (4, 2))])
def test_schedule_of_two_lower_problems_matches_the_rule(
    a: tuple[int, int], b: tuple[int, int]
) -> None:
    configs = {"upper": zg.Config(),
               "a": zg.Config(unroll_steps=a[0], warmup_steps=a[1]),
               "b": zg.Config(unroll_steps=b[0], warmup_steps=b[1])}
    upper = Quad("upper", lowers=["a", "b"], config=configs["upper"])
    pa = Quad("a", uppers=["upper"], config=configs["a"])
    pb = Quad("b", uppers=["upper"], config=configs["b"])
    engine = zg.Engine([upper, pa, pb], {"u2l": {"upper": ["a", "b"]},
                                         "l2u": {"a": ["upper"], "b": ["upper"]}})
    expected, starts = reference_schedule(
        engine.graph.order, engine.graph.children, configs, 50)
    assert [engine.train_step() for _ in range(50)] == expected
    assert pa.unroll_starts == starts["a"] and pb.unroll_starts == starts["b"]
    assert sum("upper" in s for s in expected) >= 3


# ----------------------------------------------------------------------------- hooks
class Single(zg.ImplicitProblem):
    """L = ½‖θ − t‖² with t = (3, −1): one SGD step with lr 0.5 gives θ ← (θ + t) / 2."""

    def training_step(self, batch: Any) -> torch.Tensor:
        return 0.5 * ((self() - torch.tensor([3.0, -1.0], dtype=DTYPE)) ** 2).sum()


def single(cls: type[Single]) -> Single:
    module = Vec([1.0, 1.0])
    return cls("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.5))


def test_no_hook_is_called_when_none_is_overridden() -> None:
    p = single(Single)
    zg.Engine([p])
    assert p._hooks == frozenset() and not p._prepares and p._viewers == []


def test_hooks_overridden_on_the_class_are_called_with_the_step_values() -> None:
    calls: list[tuple[str, list[float]]] = []

    class Hooked(Single):
        def grad_callback(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
            calls.append(("grad", grads[0].tolist()))
            return [2 * g for g in grads]  # doubles the step

        def before_optimizer_step(self, params: list[torch.Tensor]) -> None:
            calls.append(("before", params[0].grad.tolist()))  # type: ignore[union-attr]

        def param_callback(self, params: list[torch.Tensor]) -> None:
            calls.append(("param", params[0].tolist()))

    p = single(Hooked)
    engine = zg.Engine([p])
    engine.train_step()
    # ∇ = θ − t = (−2, 2); doubled (−4, 4); θ ← θ − 0.5·(−4, 4) = (3, −1)
    assert calls == [("grad", [-2.0, 2.0]), ("before", [-4.0, 4.0]), ("param", [3.0, -1.0])]
    assert p.module.theta.tolist() == [3.0, -1.0]


def test_hooks_assigned_on_the_instance_are_called() -> None:
    p = single(Single)
    seen: list[list[float]] = []
    p.grad_callback = lambda grads: [torch.zeros_like(g) for g in grads]  # type: ignore
    p.param_callback = lambda params: seen.append(params[0].tolist())  # type: ignore
    engine = zg.Engine([p])
    engine.train_step()
    engine.train_step()
    assert seen == [[1.0, 1.0], [1.0, 1.0]]  # zero gradients: θ never moves


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_lean_step_records_the_loss_detached_and_widened(dtype: torch.dtype) -> None:
    """The lean step's ``last_loss`` is the loss's value before the step (½‖θ − t‖² = 4 at
    θ = (1, 1)), cut from the graph (no grad_fn, no grad), not written by the step, and
    float32 for a half-precision loss (``_loss_of``); ``last_metrics`` is empty."""
    class Cast(Single):
        def training_step(self, batch: Any) -> torch.Tensor:
            return super().training_step(batch).to(dtype)

    p = single(Cast)
    zg.Engine([p]).train_step()
    loss = p.last_loss
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0
    assert loss.grad_fn is None and not loss.requires_grad
    assert loss.dtype == (torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype)
    assert loss.item() == 4.0 and p.last_metrics == {}
    assert p.module.theta.tolist() == [2.0, 0.0]  # the step ran on the same loss


def test_a_config_replaced_after_set_up_is_followed() -> None:
    autocast_seen: list[bool] = []

    class Watched(Single):
        def training_step(self, batch: Any) -> torch.Tensor:
            autocast_seen.append(autocast_enabled("cpu"))
            return super().training_step(batch)

    p = single(Watched)
    engine = zg.Engine([p])
    engine.train_step()
    p.config = zg.Config(precision="bf16")  # after the plan was fixed at set-up
    engine.train_step()
    assert autocast_seen == [False, True]


def test_a_replaced_method_is_followed() -> None:
    """A lower built with the default method (Darts) and given a config with CG afterwards
    computes with CG: on ridge at θ* (lower lr 0), dim θ CG iterations give the closed form
    −diag(e^λ θ*) H⁻¹ v; SAMA's per-step records follow the replaced method too."""
    r = make_ridge(10.0)
    seen: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, b: Any) -> torch.Tensor:
            return r.outer_loss(self.inner())

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append(grads[0].clone())

    inner_m, outer_m = Vec(r.theta_star()), Vec(r.lam)
    inner = zg.ImplicitProblem("inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.0),
                               training_step=lambda p, b: r.inner_loss(p(), p.outer()))
    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0))
    engine = zg.Engine([outer, inner], zg.chain(outer, inner),
                       zg.EngineConfig(summary=False, progress="off"))
    inner.config = zg.Config(type=zg.CG(iterations=6))
    engine.train_step()
    assert isinstance(inner.method, zg.CG)
    assert rel_err(seen[0], r.implicit_hypergrad(r.theta_star())) <= 1e-9
    assert not inner._prepares
    inner.config = zg.Config(type="sama")
    engine.train_step()
    assert isinstance(inner.method, zg.SAMA) and inner._prepares


def test_an_unrolled_problem_takes_a_replaced_method_at_its_next_unroll() -> None:
    """Mid-unroll the graph is reverse mode's: the unroll ends with it (its hypergradient
    equals an unreplaced run's), and forward mode starts with the next unroll."""
    def program(replace: bool) -> tuple[list[torch.Tensor], list[str]]:
        got: list[torch.Tensor] = []
        lm, um = Vec([0.2, -0.4]), Vec([0.5, 0.1])
        lower = zg.IterativeProblem("lower", lm, torch.optim.SGD(lm.parameters(), lr=0.3),
                                    config=zg.Config(type="reverse", unroll_steps=2),
                                    training_step=lambda p, b: ((p() - p.upper()) ** 2).sum())

        class Upper(zg.ImplicitProblem):
            def training_step(self, b: Any) -> torch.Tensor:
                return (self.lower() ** 3).sum()

            def grad_callback(self, grads: list[torch.Tensor]) -> None:
                got.append(grads[0].clone())

        upper = Upper("upper", um, torch.optim.SGD(um.parameters(), lr=0.1))
        engine = zg.Engine([upper, lower], zg.chain(upper, lower),
                           zg.EngineConfig(summary=False, progress="off"))
        methods = []
        for i in range(4):
            if replace and i == 1:
                lower.config = zg.Config(type="forward", unroll_steps=2)
            engine.train_step()
            methods.append(lower.method.name)
        return got, methods

    (plain, plain_methods), (replaced, methods) = program(False), program(True)
    assert plain_methods == ["reverse"] * 4
    assert methods == ["reverse", "reverse", "forward", "forward"]
    assert len(replaced) == 2 and torch.equal(replaced[0], plain[0])
    assert torch.allclose(replaced[1], plain[1], rtol=1e-12, atol=0)  # forward = reverse


def test_a_replaced_unroll_setting_is_followed_by_the_schedule() -> None:
    upper = Quad("upper", lowers=["lower"])
    lower = Quad("lower", uppers=["upper"], config=zg.Config(unroll_steps=1))
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    assert [engine.train_step() for _ in range(2)] == [["lower", "upper"]] * 2
    lower.config = zg.Config(unroll_steps=3)
    assert [engine.train_step() for _ in range(3)] == [["lower"], ["lower"],
                                                        ["lower", "upper"]]


def test_sama_records_before_each_lower_step_only_below_an_upper_problem() -> None:
    upper = Quad("upper", lowers=["lower"])
    lower = Quad("lower", uppers=["upper"], config=zg.Config(type="sama"))
    zg.Engine([upper, lower], zg.chain(upper, lower))
    assert lower._prepares and not upper._prepares
    alone = Quad("alone", config=zg.Config(type="sama"))
    zg.Engine([alone])
    assert not alone._prepares  # nobody above: nothing to record


# ----------------------------------------------------------------------------- progress
def _without_timing(text: str) -> list[str]:
    """Plain progress lines with the rate and elapsed time (which vary) blanked."""
    return [re.sub(r"\] +\d+% \S+ it/s \S+", "] <timing>", line)
            for line in text.splitlines()]


def test_lazy_progress_prints_the_lines_of_eager_values_and_reads_only_those() -> None:
    values = {step: {"lower": 1.0 / step, "upper": 2.0 + step} for step in range(1, 38)}
    eager, lazy = io.StringIO(), io.StringIO()
    reads: list[int] = []

    def reader(step: int) -> Any:
        def read() -> Mapping[str, float]:
            reads.append(step)
            return values[step]
        return read

    with Progress(37, "plain", eager, plain_every=5) as a, \
            Progress(37, "plain", lazy, plain_every=5) as b:
        for step in range(1, 38):
            a.update(step, values[step])
            b.update(step, reader(step))
    assert _without_timing(lazy.getvalue()) == _without_timing(eager.getvalue())
    assert reads == [5, 10, 15, 20, 25, 30, 35, 37]  # only the printed lines' values
    assert "lower=0.027" in lazy.getvalue().splitlines()[-1]  # 1/37


def test_lazy_progress_read_at_close_when_the_last_update_was_not_printed() -> None:
    out = io.StringIO()
    bar = Progress(100, "plain", out, plain_every=10)
    for step in range(1, 14):
        bar.update(step, lambda step=step: {"loss": float(step)})
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].endswith("loss=10") and lines[1].endswith("loss=13")


@pytest.mark.parametrize("mode", ["tqdm", "rich"])
def test_lazy_progress_on_a_live_bar_shows_the_last_values(mode: str) -> None:
    pytest.importorskip(mode)
    out = io.StringIO()
    reads = []
    with Progress(200, mode, out, force_terminal=True) as bar:
        for step in range(1, 201):
            bar.update(step, lambda step=step: reads.append(step) or {"loss": float(step)})
    assert reads[-1] == 200 and len(reads) < 200  # read at the redraw rate and at the end
    assert "loss=200" in out.getvalue()


def test_engine_progress_line_shows_the_last_losses(capsys: pytest.CaptureFixture[str]) -> None:
    upper = Quad("upper", lowers=["lower"])
    lower = Quad("lower", uppers=["upper"], config=zg.Config(unroll_steps=2))
    engine = zg.Engine([upper, lower], zg.chain(upper, lower),
                       zg.EngineConfig(train_iters=6, progress="plain", summary=False))
    engine.run()
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("[6/6]")
    for p in (upper, lower):
        assert p.last_loss is not None
        assert f"{p.name}/loss=" in last or f"{p.name}=" in last


# ----------------------------------------------------------- the direct step path's limits
def test_a_config_replaced_while_the_batch_is_drawn_is_followed_at_that_step() -> None:
    """An epoch_callback runs inside the draw; its clipping applies to the step it drew for
    (∇ = (−2, 2) clipped to norm 1e-6 moves θ by 0.5e-6, unclipped by 0.5·2√2)."""

    class Clipping(Single):
        def epoch_callback(self) -> None:
            self.config = zg.Config(gradient_clipping=1e-6)

    p = single(Clipping)
    p.train_data_loader = [None] * 2  # a pass of two batches: the callback at the third
    engine = zg.Engine([p])
    moves = []
    for _ in range(3):
        before = p.module.theta.detach().clone()
        engine.train_step()
        moves.append(float((p.module.theta - before).norm()))
    assert p.epoch == 1 and moves[0] > 0.1 and moves[1] > 0.01
    assert moves[2] == pytest.approx(0.5e-6, rel=1e-9)


def test_roll_back_switched_off_inside_an_unroll_still_replays_every_step() -> None:
    """The unroll's snapshot was taken with roll_back on: all three steps are recorded and
    retaken after the upper step, as with roll_back kept on all along."""

    def program(switch_off: bool) -> torch.Tensor:
        upper = Quad("upper", lowers=["lower"])
        lower = Quad("lower", uppers=["upper"],
                     config=zg.Config(type="darts", roll_back=True, unroll_steps=3))
        engine = zg.Engine([upper, lower], zg.chain(upper, lower))
        engine.train_step()
        if switch_off:
            lower.config = zg.Config(type="darts", roll_back=False, unroll_steps=3)
        engine.train_step()
        engine.train_step()
        return lower.module.theta.detach().clone()

    assert torch.equal(program(True), program(False))


def test_trainable_parameters_replaced_on_the_instance_after_set_up_is_followed() -> None:
    p = single(Single)
    engine = zg.Engine([p])
    p.trainable_parameters = lambda: []  # type: ignore[method-assign]
    engine.train_step()
    assert p.module.theta.tolist() == [1.0, 1.0] and p.count == 1


def test_a_problem_outside_a_program_refuses_to_step() -> None:
    p = single(Single)
    p.initialize()
    with pytest.raises(zg.ZigguratError, match="not part of an Engine"):
        p.step()
    assert p.module.theta.tolist() == [1.0, 1.0]


def test_a_rewiring_that_fails_leaves_the_engine_as_it_was() -> None:
    upper = Quad("upper", lowers=["lower"])
    lower = Quad("lower", uppers=["upper"])
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    with pytest.raises(zg.GraphError):
        engine.set_dependency(zg.chain(upper, "nobody"))
    assert engine.upper is upper and engine.lower is lower
    assert engine.train_step() == ["lower", "upper"]
