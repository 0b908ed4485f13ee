"""The engine's schedule: exact step counts, unrolls, warm-up, roll-back, validation, stopping.

Problems are tiny float64 quadratics whose hypergradient (Darts) is cheap:
a problem's loss is ½‖θ − Σ_uppers θ_u‖² + ½‖Σ_lowers θ_c‖².
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any

import pytest
import torch

import ziggurat as zg

from helpers import Quad

DTYPE = torch.float64


def run_steps(engine: zg.Engine, n: int) -> list[list[str]]:
    return [engine.train_step() for _ in range(n)]


def bilevel(
    unroll: int = 1,
    warmup: int = 0,
    roll_back: bool = False,
    optimizer: Callable[[Any], torch.optim.Optimizer] | None = None,
) -> tuple[zg.Engine, Quad, Quad]:
    upper = Quad("upper", lowers=("lower",), init=(0.5, 0.25))
    lower = Quad(
        "lower",
        uppers=("upper",),
        config=zg.Config(unroll_steps=unroll, warmup_steps=warmup, roll_back=roll_back),
        optimizer=optimizer,
    )
    return zg.Engine([upper, lower], zg.chain(upper, lower)), upper, lower


# --------------------------------------------------------------------------- step counts
def test_bilevel_unroll_one() -> None:
    engine, upper, lower = bilevel(unroll=1)
    assert run_steps(engine, 4) == [["lower", "upper"]] * 4
    assert (lower.count, upper.count, engine.global_step) == (4, 4, 4)


def test_bilevel_unroll_three() -> None:
    engine, upper, lower = bilevel(unroll=3)
    steps = run_steps(engine, 9)
    assert steps == [["lower"], ["lower"], ["lower", "upper"]] * 3
    assert (lower.count, upper.count, engine.global_step) == (9, 3, 9)
    # one unroll starts after each upper step (and once at the beginning)
    assert lower.unroll_starts == [0, 3, 6]


def test_warmup_delays_the_first_upper_step() -> None:
    engine, upper, lower = bilevel(unroll=3, warmup=2)
    steps = run_steps(engine, 11)
    upper_at = [i + 1 for i, s in enumerate(steps) if "upper" in s]
    assert upper_at == [5, 8, 11]  # 2 warm-up steps + 3 counted lower steps, then every 3
    assert all(s[0] == "lower" for s in steps)
    assert (lower.count, upper.count) == (11, 3)
    # on_inner_loop_start once per unroll, never during warm-up
    assert lower.unroll_starts == [2, 5, 8]


def test_three_level_chain_with_different_unrolls() -> None:
    top = Quad("top", lowers=("mid",))
    mid = Quad("mid", uppers=("top",), lowers=("bottom",), config=zg.Config(unroll_steps=3))
    bottom = Quad("bottom", uppers=("mid",), config=zg.Config(unroll_steps=2))
    engine = zg.Engine([top, mid, bottom], zg.chain(top, mid, bottom))
    steps = run_steps(engine, 12)
    block = [
        ["bottom"],
        ["bottom", "mid"],
        ["bottom"],
        ["bottom", "mid"],
        ["bottom"],
        ["bottom", "mid", "top"],
    ]
    assert steps == block * 2
    assert (bottom.count, mid.count, top.count) == (12, 6, 2)
    assert bottom.unroll_starts == [0, 2, 4, 6, 8, 10]
    assert mid.unroll_starts == [0, 3]


def test_three_level_chain_with_warmup_in_the_middle() -> None:
    top = Quad("top", lowers=("mid",))
    mid = Quad(
        "mid", uppers=("top",), lowers=("bottom",), config=zg.Config(unroll_steps=2, warmup_steps=1)
    )
    bottom = Quad("bottom", uppers=("mid",), config=zg.Config(unroll_steps=2))
    engine = zg.Engine([top, mid, bottom], zg.chain(top, mid, bottom))
    steps = run_steps(engine, 10)
    # mid steps at 2, 4, 6, 8, 10; its first step is warm-up, so top steps at 6 and 10
    assert [i + 1 for i, s in enumerate(steps) if "mid" in s] == [2, 4, 6, 8, 10]
    assert [i + 1 for i, s in enumerate(steps) if "top" in s] == [6, 10]
    assert (bottom.count, mid.count, top.count) == (10, 5, 2)


def test_lower_with_two_uppers() -> None:
    u1 = Quad("u1", lowers=("low",))
    u2 = Quad("u2", lowers=("low",))
    low = Quad("low", uppers=("u1", "u2"), config=zg.Config(unroll_steps=2))
    engine = zg.Engine([u1, u2, low], {"u2l": {u1: [low], u2: [low]}, "l2u": {low: [u1, u2]}})
    steps = run_steps(engine, 6)
    assert steps == [["low"], ["low", "u1", "u2"]] * 3
    assert (low.count, u1.count, u2.count) == (6, 3, 3)
    # one unroll per pair of upper steps, not one per upper
    assert low.unroll_starts == [0, 2, 4]


def test_upper_with_two_lowers_steps_when_both_are_ready() -> None:
    top = Quad("top", lowers=("fast", "slow"))
    fast = Quad("fast", uppers=("top",), config=zg.Config(unroll_steps=2))
    slow = Quad("slow", uppers=("top",), config=zg.Config(unroll_steps=3))
    engine = zg.Engine(
        [top, fast, slow], {"u2l": {top: [fast, slow]}, "l2u": {fast: [top], slow: [top]}}
    )
    steps = run_steps(engine, 12)
    assert [i + 1 for i, s in enumerate(steps) if "top" in s] == [3, 6, 9, 12]
    assert all(s[:2] == ["fast", "slow"] for s in steps)
    assert (fast.count, slow.count, top.count) == (12, 12, 4)
    assert fast.unroll_starts == [0, 3, 6, 9]
    assert slow.unroll_starts == [0, 3, 6, 9]


def test_upper_with_two_lowers_one_warming_up() -> None:
    top = Quad("top", lowers=("a", "b"))
    a = Quad("a", uppers=("top",), config=zg.Config(unroll_steps=1))
    b = Quad("b", uppers=("top",), config=zg.Config(unroll_steps=1, warmup_steps=3))
    engine = zg.Engine([top, a, b], {"u2l": {top: [a, b]}, "l2u": {a: [top], b: [top]}})
    steps = run_steps(engine, 6)
    assert [i + 1 for i, s in enumerate(steps) if "top" in s] == [4, 5, 6]
    assert top.count == 3


def test_single_level_program_steps_every_iteration() -> None:
    solo = Quad("solo")
    engine = zg.Engine([solo])
    assert run_steps(engine, 3) == [["solo"]] * 3
    assert solo.count == 3
    assert solo.leaf is True


# --------------------------------------------------------------------------- roll back
def sgd_momentum(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def adam(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(ps, lr=0.05)


def opt_state(problem: zg.Problem) -> dict[str, Any]:
    (param,) = problem.trainable_parameters()
    return copy.deepcopy({k: v for k, v in problem.optimizer.state[param].items()})


def states_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    if set(a) != set(b):
        return False
    for k in a:
        x, y = a[k], b[k]
        if isinstance(x, torch.Tensor):
            if not (isinstance(y, torch.Tensor) and torch.equal(x, y)):
                return False
        elif x != y:
            return False
    return True


def _retaken(start_theta: torch.Tensor, start_state: Mapping[str, Any] | None, lam: torch.Tensor,
             make_opt: Callable[[Any], torch.optim.Optimizer], steps: int
             ) -> tuple[torch.Tensor, dict[str, Any]]:
    """`steps` plain torch steps of the lower's loss ½‖θ − λ‖² from a saved state."""
    theta = torch.nn.Parameter(start_theta.clone())
    opt = make_opt([theta])
    if start_state:
        opt.state[theta] = copy.deepcopy(dict(start_state))
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((theta - lam) ** 2).sum()).backward()
        opt.step()
    return theta.detach(), dict(opt.state[theta])


@pytest.mark.parametrize(
    ("make_opt", "keys"),
    [(sgd_momentum, {"momentum_buffer"}), (adam, {"step", "exp_avg", "exp_avg_sq"})],
)
def test_roll_back_retakes_the_unroll_with_the_updated_upper(
    make_opt: Callable[[Any], torch.optim.Optimizer], keys: set[str]
) -> None:
    """roll_back: the unroll is look-ahead; after the upper steps, the lower returns to the
    unroll's start (parameters and optimizer state) and takes the same K steps again with
    the new upper parameters."""
    # 2 warm-up steps so that the optimizer state is non-empty when the unroll begins
    engine, upper, lower = bilevel(unroll=3, warmup=2, roll_back=True, optimizer=make_opt)
    run_steps(engine, 2)
    start_theta = lower.module.theta.detach().clone()
    start_state = opt_state(lower)
    assert set(start_state) == keys
    upper_before = upper.module.theta.detach().clone()

    assert run_steps(engine, 2) == [["lower"], ["lower"]]
    assert engine.train_step() == ["lower", "upper"]
    lam = upper.module.theta.detach().clone()
    assert not torch.equal(lam, upper_before)  # the upper did step
    theta, state = _retaken(start_theta, start_state, lam, make_opt, 3)
    assert torch.equal(lower.module.theta.detach(), theta)
    assert states_equal(opt_state(lower), state)
    assert lower.count == 5  # the retaken steps are not counted again

    # the next unroll starts from there and is retaken in the same way
    start_theta, start_state = lower.module.theta.detach().clone(), opt_state(lower)
    run_steps(engine, 2)
    assert engine.train_step() == ["lower", "upper"]
    theta, state = _retaken(start_theta, start_state, upper.module.theta.detach(), make_opt, 3)
    assert torch.equal(lower.module.theta.detach(), theta)
    assert states_equal(opt_state(lower), state)


def test_roll_back_user_optimizer_identity_kept() -> None:
    engine, _upper, lower = bilevel(unroll=2, warmup=1, roll_back=True, optimizer=sgd_momentum)
    opt = lower.optimizer
    (param,) = lower.trainable_parameters()
    run_steps(engine, 5)
    assert lower.optimizer is opt
    assert lower.module.theta is param
    assert opt.param_groups[0]["params"][0] is param


@pytest.mark.parametrize("make_opt", [sgd_momentum, adam])
def test_without_roll_back_the_lower_keeps_its_unroll(
    make_opt: Callable[[Any], torch.optim.Optimizer],
) -> None:
    engine, _upper, lower = bilevel(unroll=3, warmup=2, roll_back=False, optimizer=make_opt)
    run_steps(engine, 2)
    start_theta = lower.module.theta.detach().clone()
    start_state = opt_state(lower)
    run_steps(engine, 2)
    mid_theta = lower.module.theta.detach().clone()
    assert engine.train_step() == ["lower", "upper"]
    assert not torch.equal(lower.module.theta, start_theta)
    assert not torch.equal(lower.module.theta, mid_theta)
    assert not states_equal(opt_state(lower), start_state)


def test_roll_back_with_empty_initial_optimizer_state() -> None:
    # no warm-up: the unroll starts before the first step, when SGD has no momentum buffer;
    # the retaken steps start from that empty state too
    engine, upper, lower = bilevel(unroll=2, roll_back=True, optimizer=sgd_momentum)
    init = lower.module.theta.detach().clone()
    assert run_steps(engine, 2) == [["lower"], ["lower", "upper"]]
    theta, state = _retaken(init, None, upper.module.theta.detach(), sgd_momentum, 2)
    assert torch.equal(lower.module.theta.detach(), theta)
    assert states_equal(opt_state(lower), state)


def test_roll_back_with_one_step_is_virtual_step_meta_step_real_step() -> None:
    """unroll 1: the lower's step is virtual, the upper steps on it, then the lower takes
    the real step from where it was, with the new upper (Meta-Weight-Net's scheme)."""
    engine, upper, lower = bilevel(unroll=1, roll_back=True, optimizer=sgd_momentum)
    for _ in range(3):
        start, state = lower.module.theta.detach().clone(), opt_state(lower)
        assert engine.train_step() == ["lower", "upper"]
        theta, _ = _retaken(start, state or None, upper.module.theta.detach(), sgd_momentum, 1)
        assert torch.equal(lower.module.theta.detach(), theta)


# --------------------------------------------------------------------------- validation
class ScriptedEngine(zg.Engine):
    def __init__(self, *args: Any, metrics: list[Mapping[str, Any] | None], **kw: Any) -> None:
        self.script = list(metrics)
        self.called_at: list[int] = []
        super().__init__(*args, **kw)

    def validation(self) -> Mapping[str, Any] | None:
        self.called_at.append(self.global_step)
        return self.script[len(self.called_at) - 1]


def scripted(config: zg.EngineConfig, metrics: list[Any]) -> tuple[ScriptedEngine, Quad, Quad]:
    upper = Quad("upper", lowers=("lower",), init=(0.5, 0.25))
    lower = Quad("lower", uppers=("upper",), config=zg.Config(unroll_steps=2))
    engine = ScriptedEngine([upper, lower], zg.chain(upper, lower), config=config, metrics=metrics)
    return engine, upper, lower


def test_validation_every_valid_step() -> None:
    metrics = [{"loss": 3.0}, None, {"loss": 1.0, "acc": 0.5}]
    engine, upper, lower = scripted(zg.EngineConfig(train_iters=10, valid_step=3), metrics)
    engine.run()
    assert engine.called_at == [3, 6, 9]
    # a validation returning None is not recorded
    assert engine.validation_history == [(3, {"loss": 3.0}), (9, {"loss": 1.0, "acc": 0.5})]
    assert (engine.global_step, lower.count, upper.count) == (10, 10, 5)
    assert engine.stopped_early is False


def test_no_validation_without_valid_step() -> None:
    engine, _, _ = scripted(zg.EngineConfig(train_iters=4), [])
    engine.run()
    assert engine.called_at == []
    assert engine.global_step == 4


@pytest.mark.parametrize(
    ("mode", "values", "patience", "min_delta", "stop_at"),
    [
        # min: 5 best, 4 best, 4.5 bad, 4.2 bad -> stop at the 4th validation
        ("min", [5.0, 4.0, 4.5, 4.2, 1.0, 1.0], 2, 0.0, 4),
        # an improvement resets the patience count
        ("min", [5.0, 6.0, 4.0, 7.0, 8.0, 9.0], 2, 0.0, 5),
        # equal is not an improvement
        ("min", [2.0, 2.0, 2.0, 2.0], 3, 0.0, 4),
        # min_delta: 4.6 is not better than 5 - 0.5; 4.4 is
        ("min", [5.0, 4.6, 4.4, 4.0, 3.95], 2, 0.5, 5),
        ("max", [0.1, 0.3, 0.2, 0.25, 0.9], 2, 0.0, 4),
        ("max", [0.1, 0.15, 0.35, 0.4, 0.44, 0.9], 2, 0.1, 5),
        ("max", [1.0, 0.0], 1, 0.0, 2),
    ],
)
def test_early_stopping(
    mode: str, values: list[float], patience: int, min_delta: float, stop_at: int
) -> None:
    valid_step = 2
    cfg = zg.EngineConfig(
        train_iters=100,
        valid_step=valid_step,
        early_stopping_metric="score",
        early_stopping_mode=mode,
        early_stopping_patience=patience,  # type: ignore[arg-type]
        early_stopping_min_delta=min_delta,
    )
    engine, upper, lower = scripted(cfg, [{"score": v, "other": -v} for v in values])
    engine.run()
    assert engine.stopped_early is True
    assert engine.global_step == stop_at * valid_step
    assert engine.called_at == [valid_step * (i + 1) for i in range(stop_at)]
    assert len(engine.validation_history) == stop_at
    assert (lower.count, upper.count) == (stop_at * valid_step, stop_at)


def test_no_early_stop_when_improving() -> None:
    cfg = zg.EngineConfig(
        train_iters=6, valid_step=2, early_stopping_metric="loss", early_stopping_patience=1
    )
    engine, _, _ = scripted(cfg, [{"loss": 3.0}, {"loss": 2.0}, {"loss": 1.0}])
    engine.run()
    assert engine.stopped_early is False
    assert engine.global_step == 6


def test_missing_early_stopping_metric() -> None:
    cfg = zg.EngineConfig(train_iters=10, valid_step=3, early_stopping_metric="loss")
    engine, _, _ = scripted(cfg, [{"acc": 0.9, "f1": 0.1}])
    with pytest.raises(zg.ZigguratError) as info:
        engine.run()
    msg = str(info.value)
    assert "early_stopping_metric='loss' is not among the metrics returned by validation()" in msg
    assert "['acc', 'f1']" in msg
    assert engine.global_step == 3


def test_nan_early_stopping_metric() -> None:
    cfg = zg.EngineConfig(train_iters=10, valid_step=2, early_stopping_metric="loss")
    engine, _, _ = scripted(cfg, [{"loss": 1.0}, {"loss": float("nan")}])
    with pytest.raises(zg.ZigguratError, match=r"validation metric 'loss' is NaN at step 4"):
        engine.run()


def test_tensor_metric_is_accepted_for_early_stopping() -> None:
    cfg = zg.EngineConfig(
        train_iters=50, valid_step=1, early_stopping_metric="loss", early_stopping_patience=1
    )
    metrics = [{"loss": torch.tensor(v, dtype=DTYPE)} for v in (2.0, 1.0, 1.5)]
    engine, _, _ = scripted(cfg, metrics)
    engine.run()
    assert engine.stopped_early is True
    assert engine.global_step == 3


def test_log_step_writes_one_console_line_per_problem(capsys: pytest.CaptureFixture[str]) -> None:
    engine, _upper, _lower = scripted(
        zg.EngineConfig(train_iters=4, log_step=2, summary=False, progress="off"), [])
    engine.run()
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4  # two problems, at steps 2 and 4
    assert [line.split()[:3] for line in lines] == [
        ["[step", "2]", "upper:"], ["[step", "2]", "lower:"],
        ["[step", "4]", "upper:"], ["[step", "4]", "lower:"]]
    assert all("loss=" in line for line in lines)


class Counting(torch.nn.Module):
    """θ plus a buffer counting how often the loss was evaluated."""

    def __init__(self) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([1.0, -2.0], dtype=DTYPE))
        self.register_buffer("calls", torch.zeros((), dtype=DTYPE))

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            self.calls.add_(1.0)
        return self.theta


@pytest.mark.parametrize(("roll_back", "calls_after_upper_step"), [(True, 3.0), (False, 4.0)])
def test_roll_back_restores_buffers(roll_back: bool, calls_after_upper_step: float) -> None:
    upper = Quad("upper", lowers=("lower",), init=(0.5, 0.25))
    module = Counting()
    lower = zg.ImplicitProblem(
        "lower",
        module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
        config=zg.Config(unroll_steps=2, warmup_steps=1, roll_back=roll_back),
        training_step=lambda p, b: 0.5 * ((p() - p.upper()) ** 2).sum(),
    )
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    engine.train_step()  # warm-up step: calls = 1, then the unroll starts
    assert float(module.calls) == 1.0
    assert run_steps(engine, 2) == [["lower"], ["lower", "upper"]]
    # 1 warm-up + 2 unroll steps + the upper's loss = 4 calls (the 2 evaluations by Darts'
    # central difference leave buffers as they were); rolled back, the buffer returns to its
    # value at the unroll start (1) and the 2 retaken steps add 2
    assert float(module.calls) == calls_after_upper_step
