"""Regression tests for the unrolled-review defects of IterativeProblem (float64).

Each test states the correct behaviour precisely: a hypergradient against a central finite
difference of the whole program (re-implemented in plain torch) or a closed form, a state
against plain torch training, an error naming the culprit. They cover shared and nested
unrolls whose graphs save other problems' parameters (in-place updates), a loss reading an
unrolled module both through the problem and through ``module`` attributes, evolution
strategies' replays (schedulers, hooks, random numbers), optimizer-setting overrides,
expanded gradients, a run ending inside an unroll, and metrics holding graphs.
"""

from __future__ import annotations

import gc
import math
import re
import weakref
from collections.abc import Callable
from typing import Any

import pytest
import torch

import ziggurat as zg

from helpers import DTYPE, Vec
from ridge import rel_err


def _cfg(iters: int) -> zg.EngineConfig:
    return zg.EngineConfig(train_iters=iters, summary=False, progress="off")


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=DTYPE)


def _central_difference(f: Callable[[torch.Tensor], float], x: torch.Tensor,
                        h: float = 1e-6) -> torch.Tensor:
    """∂f/∂x by central differences, one coordinate at a time."""
    out = torch.zeros_like(x)
    for i in range(x.numel()):
        e = torch.zeros_like(x)
        e.view(-1)[i] = h
        out.view(-1)[i] = (f(x + e) - f(x - e)) / (2 * h)
    return out


T = _t([1.0, -0.5, 0.3])
THETA0 = [0.2, 0.1, -0.3]


# --------------------------------------------------------------------------- small networks
def _batches(seed: int, count: int = 6, n: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, generator=g, dtype=DTYPE),
             torch.randn(n, 1, generator=g, dtype=DTYPE)) for _ in range(count)]


TRAIN, VALID = _batches(0), _batches(1)


def _mlp(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(),
                               torch.nn.Linear(5, 1)).double()


def _mlp_lower_loss(module: torch.nn.Module, batch: Any, lam: torch.Tensor,
                    weight: float = 1e-2) -> torch.Tensor:
    """MSE plus exp(λ)·weight·‖w‖²: the same arithmetic in the programs and the references."""
    x, y = batch
    reg = sum((w**2).sum() for w in module.parameters())
    return ((module(x) - y) ** 2).mean() + torch.exp(lam) * weight * reg


def _mlp_program(method: zg.registry.Method | str, optimizer: torch.optim.Optimizer,
                 net: torch.nn.Module, k: int, scheduler: Any = None, weight: float = 1e-2,
                 iters: int = 1) -> tuple[zg.IterativeProblem, zg.Engine]:
    """inner (the MLP, ``method``, K = k) under outer (λ = 0, never moved: lr 0); the
    engine runs ``iters`` iterations (or the caller steps it with train_step)."""
    lam = Vec([0.0])
    inner = zg.IterativeProblem(
        "inner", net, optimizer, scheduler=scheduler, train_data_loader=TRAIN,
        config=zg.Config(type=method, unroll_steps=k),
        training_step=lambda p, b: _mlp_lower_loss(p.module, b, p.outer()[0], weight))
    outer = zg.ImplicitProblem("outer", lam, torch.optim.SGD(lam.parameters(), lr=0.0),
                               train_data_loader=VALID,
                               training_step=lambda p, b: ((p.inner(b[0]) - b[1]) ** 2).mean())
    return inner, zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(iters))


def _plain_mlp_training(optimizer_fn: Callable[[Any], torch.optim.Optimizer], steps: int,
                        scheduler_fn: Callable[[Any], Any] | None = None, weight: float = 1e-2
                        ) -> tuple[torch.nn.Module, torch.optim.Optimizer, Any, list[float]]:
    """The lower trained by plain torch (λ = 0); returns the lr after every step too."""
    net = _mlp(0)
    opt = optimizer_fn(net.parameters())
    sched = scheduler_fn(opt) if scheduler_fn else None
    lrs = []
    for i in range(steps):
        opt.zero_grad()
        loss = _mlp_lower_loss(net, TRAIN[i % len(TRAIN)], torch.tensor(0.0, dtype=DTYPE),
                               weight)
        loss.backward()
        opt.step()
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(float(loss.detach()))
        elif sched is not None:
            sched.step()
        lrs.append(opt.param_groups[0]["lr"])
    return net, opt, sched, lrs


def _assert_same_training_state(net: torch.nn.Module, opt: torch.optim.Optimizer,
                                ref: torch.nn.Module, ref_opt: torch.optim.Optimizer) -> None:
    for p, q in zip(net.parameters(), ref.parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-12
        mine, theirs = opt.state[p], ref_opt.state[q]
        assert set(mine) == set(theirs)
        for key, value in theirs.items():
            assert torch.allclose(torch.as_tensor(mine[key]).double(),
                                  torch.as_tensor(value).double(), rtol=1e-12, atol=1e-15), key
    assert opt.param_groups[0]["lr"] == pytest.approx(ref_opt.param_groups[0]["lr"], rel=1e-14)


# --------------------------------------------------------------------------- c2: shared lower
def _shared_lower_loss(theta: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return 0.5 * ((a * theta) ** 2).sum() - (theta * b).sum()


def _shared_lower_objective(a: torch.Tensor, b: torch.Tensor, own: torch.Tensor, k: int,
                            eta: float) -> float:
    """Plain re-implementation: k SGD steps on ½‖a⊙θ‖² − θ·b, then the upper loss."""
    theta = _t(THETA0)
    for _ in range(k):
        theta = theta - eta * (a * a * theta - b)
    return float(0.5 * ((theta - T) ** 2).sum() + 0.1 * (own**2).sum())


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_two_uppers_share_one_nonlinear_iterative_lower(mode: str) -> None:
    """Two upper problems ua (a) and ub (b) read one unrolled lower whose loss
    ½‖a⊙θ‖² − θ·b saves a for its backward pass. ua steps (in place) before ub asks for its
    hypergradient; both must equal the central difference of the unrolled program at the
    values the unroll used, with no in-place-modification error."""
    k, eta, upper_lr = 3, 0.2, 0.1
    a0, b0 = _t([1.0, 1.2, 0.8]), _t([0.3, -0.2, 0.5])
    ma, mb, mt = Vec(a0), Vec(b0), Vec(THETA0)
    got: dict[str, torch.Tensor] = {}

    class Upper(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.inner() - T) ** 2).sum() + 0.1 * (self.module.theta**2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got[self.name] = grads[0].clone()

    inner = zg.IterativeProblem(
        "inner", mt, torch.optim.SGD(mt.parameters(), lr=eta),
        config=zg.Config(type=mode, unroll_steps=k),
        training_step=lambda p, b: _shared_lower_loss(p(), p.ua(), p.ub()))
    ua = Upper("ua", ma, torch.optim.SGD(ma.parameters(), lr=upper_lr))
    ub = Upper("ub", mb, torch.optim.SGD(mb.parameters(), lr=upper_lr))
    zg.Engine([ua, ub, inner], {"u2l": {ua: [inner], ub: [inner]}, "l2u": {inner: [ua, ub]}},
              _cfg(k)).run()

    fd_a = _central_difference(lambda a: _shared_lower_objective(a, b0, a, k, eta), a0)
    fd_b = _central_difference(lambda b: _shared_lower_objective(a0, b, b, k, eta), b0)
    assert rel_err(got["ua"], fd_a) <= 1e-6
    assert rel_err(got["ub"], fd_b) <= 1e-6
    # both uppers really stepped (so the second one's backward ran after an in-place update)
    assert torch.allclose(ma.theta.detach(), a0 - upper_lr * got["ua"], rtol=1e-14, atol=0)
    assert torch.allclose(mb.theta.detach(), b0 - upper_lr * got["ub"], rtol=1e-14, atol=0)


# --------------------------------------------------------------------------- c3: three levels
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_iterative_middle_reading_the_implicit_problem_below_it(mode: str) -> None:
    """top λ → middle θ₂ (unrolled SGD, loss ½‖θ₂ − λ‖² + ½‖θ₂⊙θ₃‖², reading the bottom)
    → bottom θ₃ (implicit, ½‖θ₃ − θ₂‖², stepping in place between the middle's steps).
    The unroll holds θ₃ (and the middle's hypergradient from the bottom) as constants, so
    dθ₂/dλ is diagonal: J_{k+1} = (1 − η(1 + θ₃,k²)) J_k + η, and the top's hypergradient is
    J_K ⊙ (θ₂,K − t)."""
    k, eta = 3, 0.2
    m1, m2, m3 = Vec([0.5, -0.2, 0.1]), Vec(THETA0), Vec([0.3, 0.3, 0.3])
    bottoms: list[torch.Tensor] = []
    got: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Top(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.middle() - T) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append((grads[0].clone(), m2.theta.detach().clone()))

    class Middle(zg.IterativeProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return (0.5 * ((self() - self.top()) ** 2).sum()
                    + 0.5 * ((self() * self.bottom()) ** 2).sum())

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            bottoms.append(m3.theta.detach().clone())

    top = Top("top", m1, torch.optim.SGD(m1.parameters(), lr=0.1))
    mid = Middle("middle", m2, torch.optim.SGD(m2.parameters(), lr=eta),
                 config=zg.Config(type=mode, unroll_steps=k))
    bot = zg.ImplicitProblem("bottom", m3, torch.optim.SGD(m3.parameters(), lr=0.1),
                             training_step=lambda p, b: 0.5 * ((p() - p.middle()) ** 2).sum())
    zg.Engine([top, mid, bot], {"u2l": {top: [mid], mid: [bot]},
                                "l2u": {mid: [top], bot: [mid]}}, _cfg(2 * k)).run()
    assert len(got) == 2 and len(bottoms) == 2 * k
    assert not torch.equal(bottoms[0], bottoms[-1])  # the bottom did move in place
    for u, (grad, theta2) in enumerate(got):
        jac = torch.zeros(3, dtype=DTYPE)
        for theta3 in bottoms[u * k:(u + 1) * k]:
            jac = (1 - eta * (1 + theta3**2)) * jac + eta
        assert rel_err(grad, jac * (theta2 - T)) <= 1e-10


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_iterative_bottom_nonlinear_in_an_implicit_middle(mode: str) -> None:
    """top λ → middle θ₂ (implicit CG, ½‖θ₂ − λ‖², so dθ₂*/dλ = I, stepping in place just
    before the top asks) → bottom θ₃ (unrolled SGD on ½‖θ₃⊙θ₂‖² − Σθ₃, which saves θ₂);
    the top reads θ₃. With θ₃,k the unrolled iterates and θ₂ the value the unroll used:
    J_{k+1} = (1 − ηθ₂²) J_k − 2ηθ₂θ₃,k (diagonal), hypergradient J_K ⊙ (θ₃,K − t); it is
    also checked against a central difference of the plain unroll."""
    k, eta = 3, 0.2
    m1, m2, m3 = Vec([0.5, -0.2, 0.1]), Vec([0.9, 1.1, 0.7]), Vec([0.3, 0.3, 0.3])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (θ₂, θ₃,k) at each bottom step
    got: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Top(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.bottom() - T) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append((grads[0].clone(), m3.theta.detach().clone()))

    class Bottom(zg.IterativeProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self() * self.middle()) ** 2).sum() - self().sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append((m2.theta.detach().clone(), m3.theta.detach().clone()))

    top = Top("top", m1, torch.optim.SGD(m1.parameters(), lr=0.0))
    mid = zg.ImplicitProblem("middle", m2, torch.optim.SGD(m2.parameters(), lr=0.1),
                             config=zg.Config(type=zg.CG(iterations=3)),
                             training_step=lambda p, b: 0.5 * ((p() - p.top()) ** 2).sum())
    bot = Bottom("bottom", m3, torch.optim.SGD(m3.parameters(), lr=eta),
                 config=zg.Config(type=mode, unroll_steps=k))
    zg.Engine([top, mid, bot], {"u2l": {top: [mid], mid: [bot]}, "l2u": {bot: [top]}},
              _cfg(2 * k)).run()
    assert len(got) == 2 and len(seen) == 2 * k
    assert not torch.equal(seen[0][0], seen[-1][0])  # the middle did move in place

    def unroll(theta2: torch.Tensor, theta3: torch.Tensor) -> torch.Tensor:
        for _ in range(k):
            theta3 = theta3 - eta * (theta3 * theta2**2 - 1)
        return theta3

    for u, (grad, theta3_k) in enumerate(got):
        steps = seen[u * k:(u + 1) * k]
        theta2, start = steps[0][0], steps[0][1]
        assert all(torch.equal(s[0], theta2) for s in steps)
        assert rel_err(unroll(theta2, start), theta3_k) <= 1e-14
        jac = torch.zeros(3, dtype=DTYPE)
        for _, theta3 in steps:
            jac = (1 - eta * theta2**2) * jac - 2 * eta * theta2 * theta3
        assert rel_err(grad, jac * (theta3_k - T)) <= 1e-10
        fd = _central_difference(
            lambda x, s=start: float(0.5 * ((unroll(x, s) - T) ** 2).sum()), theta2)
        assert rel_err(grad, fd) <= 1e-6


# --------------------------------------------------------------------------- c12: module reads
@pytest.mark.parametrize("access", ["weight", "parameters"])
def test_upper_reading_the_unrolled_module_directly(access: str) -> None:
    """The upper's loss uses self.inner(x) and the lower's module parameters (one weight, or
    all of .parameters()); both are θ_K of the open unroll, so the hypergradient equals the
    central difference of the whole program (the module term was silently missing)."""
    k, lr = 3, 0.2

    def module_term(net: torch.nn.Module) -> torch.Tensor:
        if access == "weight":
            return 0.5 * (net[0].weight ** 2).sum()
        return 0.5 * sum((w**2).sum() for w in net.parameters())

    def upper_loss(net: torch.nn.Module, with_module_term: bool = True) -> torch.Tensor:
        x, y = VALID[0]
        loss = ((net(x) - y) ** 2).mean()
        return loss + module_term(net) if with_module_term else loss

    net, lam = _mlp(0), Vec([0.0])
    got: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            x, y = batch
            return ((self.inner(x) - y) ** 2).mean() + module_term(self.inner.module)

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(grads[0].clone())

    inner = zg.IterativeProblem(
        "inner", net, torch.optim.SGD(net.parameters(), lr=lr), train_data_loader=TRAIN,
        config=zg.Config(unroll_steps=k),
        training_step=lambda p, b: _mlp_lower_loss(p.module, b, p.outer()[0], 1e-1))
    outer = Outer("outer", lam, torch.optim.SGD(lam.parameters(), lr=0.0),
                  train_data_loader=VALID)
    zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(k)).run()

    def program(lam_value: torch.Tensor, with_module_term: bool = True) -> float:
        ref = _mlp(0)
        opt = torch.optim.SGD(ref.parameters(), lr=lr)
        for i in range(k):
            opt.zero_grad()
            _mlp_lower_loss(ref, TRAIN[i], lam_value[0], 1e-1).backward()
            opt.step()
        return float(upper_loss(ref, with_module_term).detach())

    fd = _central_difference(program, _t([0.0]))
    assert rel_err(got[0], fd) <= 1e-6
    # the module term matters: without it the hypergradient would be far off
    assert rel_err(_central_difference(lambda x: program(x, False), _t([0.0])), fd) > 0.1


# --------------------------------------------------------------------------- c5 / c13: schedulers
@pytest.mark.parametrize("scheduler_fn", [
    lambda o: torch.optim.lr_scheduler.ExponentialLR(o, 0.8),
    lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5),
], ids=["exponential", "step"])
def test_es_with_a_chainable_scheduler_trains_like_plain_torch(scheduler_fn: Any) -> None:
    """Evolution strategies replay the unroll (stepping the chainable scheduler each time)
    and must restore it: after two unrolls the lower's parameters, Adam state, lr and
    scheduler state equal plain torch training's."""
    steps, k = 8, 4
    net = _mlp(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    inner, engine = _mlp_program(zg.EvolutionStrategies(samples=2), opt, net, k,
                                 scheduler=scheduler_fn(opt), iters=steps)
    engine.run()
    ref, ref_opt, ref_sched, _ = _plain_mlp_training(
        lambda ps: torch.optim.Adam(ps, lr=0.05), steps, scheduler_fn)
    _assert_same_training_state(net, opt, ref, ref_opt)
    assert inner.scheduler.state_dict() == ref_sched.state_dict()
    assert opt.param_groups[0]["lr"] < 0.05 * 0.5  # the schedule did advance


@pytest.mark.parametrize("method", ["reverse", "es"])
def test_reduce_lr_on_plateau_inside_unrolls_matches_plain_torch(method: str) -> None:
    """ReduceLROnPlateau is stepped with each step's loss inside the unrolls (and through ES
    replays, then restored): the lr after every step and the final parameters equal plain
    torch training's with the same scheduler."""
    steps, k = 6, 3
    net = _mlp(0)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    chosen = zg.EvolutionStrategies(samples=2) if method == "es" else method
    _, engine = _mlp_program(chosen, opt, net, k, scheduler=sched, weight=1e-1)
    lrs = []
    for _ in range(steps):
        engine.train_step()
        lrs.append(opt.param_groups[0]["lr"])
    ref, _, _, ref_lrs = _plain_mlp_training(
        lambda ps: torch.optim.SGD(ps, lr=0.1), steps,
        lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5), 1e-1)
    assert lrs == ref_lrs
    assert len(set(lrs)) >= 3  # the plateau rule did fire, more than once
    for p, q in zip(net.parameters(), ref.parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-12


# --------------------------------------------------------------------------- c6 / c9: overrides
_HOOKS: dict[str, Callable[[Any], Any]] = {
    "optimizer_hyperparameters": lambda self: {"lr": self.outer()[0].exp()},
    "initial_parameters": lambda self: [self.outer() * 1.0],
}


@pytest.mark.parametrize("hook", sorted(_HOOKS))
@pytest.mark.parametrize("method", [zg.EvolutionStrategies(samples=2), zg.Reinforce()],
                         ids=["es", "reinforce"])
def test_zeroth_order_methods_refuse_the_differentiable_hooks(
    method: zg.registry.Method, hook: str
) -> None:
    """ES and REINFORCE take ordinary torch steps, which cannot use a learned optimizer
    setting or a learned θ₀: overriding either hook is a ConfigError naming it (it used to
    give a silently zero hypergradient), raised before any step."""
    hooked = type("Hooked", (zg.IterativeProblem,), {hook: _HOOKS[hook]})
    mt, ml = Vec(THETA0), Vec([-1.0, -1.0, -1.0])
    inner = hooked("inner", mt, torch.optim.SGD(mt.parameters(), lr=0.1),
                   config=zg.Config(type=method, unroll_steps=2),
                   training_step=lambda p, b: 0.5 * ((p() - 0.5) ** 2).sum())
    outer = zg.ImplicitProblem("outer", ml, torch.optim.SGD(ml.parameters(), lr=0.0),
                               training_step=lambda p, b: 0.5 * ((p.inner() - T) ** 2).sum())
    engine = zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(2))
    with pytest.raises(zg.ConfigError, match=re.escape(f"{hook}()")):
        engine.train_step()
    assert inner.count == 0
    assert torch.equal(mt.theta.detach(), _t(THETA0))


C = 0.5  # the lower's target in the override tests: L_in = ½‖θ − C‖²


def _override_program(optimizer: torch.optim.Optimizer, module: Vec, lam: Vec,
                      override: Callable[[Any], dict[str, Any]], mode: str, k: int,
                      iters: int, warmup: int = 0, outer_lr: float = 0.0,
                      roll_back: bool = False
                      ) -> tuple[list[torch.Tensor], list[Any], zg.IterativeProblem]:
    """inner ½‖θ − C‖² with optimizer_hyperparameters() = override(self); outer ½‖θ_K − t‖²
    (SGD, ``outer_lr``). Returns the upper's hypergradients and the param groups seen after
    each step."""
    got: list[torch.Tensor] = []
    groups: list[dict[str, Any]] = []

    class Inner(zg.IterativeProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self() - C) ** 2).sum()

        def optimizer_hyperparameters(self) -> dict[str, Any]:
            return override(self)

        def param_callback(self, params: list[torch.Tensor]) -> None:
            groups.append({k_: v for k_, v in self.optimizer.param_groups[0].items()
                           if k_ != "params"})

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.inner() - T) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(grads[0].clone())

    inner = Inner("inner", module, optimizer,
                  config=zg.Config(type=mode, unroll_steps=k, warmup_steps=warmup,
                                   roll_back=roll_back))
    outer = Outer("outer", lam, torch.optim.SGD(lam.parameters(), lr=outer_lr))
    zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(iters)).run()
    return got, groups, inner


def _plain_quadratic(optimizer_fn: Callable[[Any], torch.optim.Optimizer], steps: int
                     ) -> tuple[Vec, torch.optim.Optimizer]:
    ref = Vec(THETA0)
    opt = optimizer_fn(ref.parameters())
    for _ in range(steps):
        opt.zero_grad()
        (0.5 * ((ref() - C) ** 2).sum()).backward()
        opt.step()
    return ref, opt


def test_warm_up_steps_use_the_learned_learning_rate() -> None:
    """lr = exp(λ) = e⁻¹ replaces the group's 0.1 in every step, warm-up included: the param
    groups show it after each step, the trajectory is plain SGD with lr e⁻¹, and the
    hypergradient differentiates the 3 unrolled steps from the warmed-up θ₂:
    θ₅ = C + (1 − lr)³(θ₂ − C), dθ₅/dλ = −3 lr (1 − lr)²(θ₂ − C)."""
    lr = math.exp(-1.0)
    mt = Vec(THETA0)
    got, groups, _ = _override_program(
        torch.optim.SGD(mt.parameters(), lr=0.1), mt, Vec([-1.0]),
        lambda self: {"lr": self.outer()[0].exp()}, "reverse", k=3, iters=5, warmup=2)
    assert [g["lr"] for g in groups] == pytest.approx([lr] * 5, rel=1e-15)
    ref, _ = _plain_quadratic(lambda ps: torch.optim.SGD(ps, lr=lr), 5)
    assert rel_err(mt.theta.detach(), ref.theta.detach()) <= 1e-14
    theta2 = _plain_quadratic(lambda ps: torch.optim.SGD(ps, lr=lr), 2)[0].theta.detach()
    theta5 = ref.theta.detach()
    expected = (-3 * lr * (1 - lr) ** 2 * (theta2 - C) * (theta5 - T)).sum()
    assert len(got) == 1
    assert float(got[0]) == pytest.approx(float(expected), rel=1e-10)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_learned_adam_betas_override(mode: str) -> None:
    """{"betas": (σ(λ₀), σ(λ₁))} on Adam: the hypergradient equals the central difference
    of plain torch Adam with those betas; the param groups show the betas as numbers."""
    k, lam0 = 4, _t([1.0, 4.0])
    mt = Vec(THETA0)
    got, groups, _ = _override_program(
        torch.optim.Adam(mt.parameters(), lr=0.1), mt, Vec(lam0),
        lambda self: {"betas": (torch.sigmoid(self.outer()[0]), torch.sigmoid(self.outer()[1]))},
        mode, k=k, iters=k)

    def program(lam: torch.Tensor) -> float:
        betas = (float(torch.sigmoid(lam[0])), float(torch.sigmoid(lam[1])))
        ref, _ = _plain_quadratic(lambda ps: torch.optim.Adam(ps, lr=0.1, betas=betas), k)
        return float(0.5 * ((ref.theta.detach() - T) ** 2).sum())

    assert rel_err(got[0], _central_difference(program, lam0)) <= 1e-6
    expected = (float(torch.sigmoid(lam0[0])), float(torch.sigmoid(lam0[1])))
    assert groups[-1]["betas"] == pytest.approx(expected, rel=1e-15)
    ref, _ = _plain_quadratic(lambda ps: torch.optim.Adam(ps, lr=0.1, betas=expected), k)
    assert rel_err(mt.theta.detach(), ref.theta.detach()) <= 1e-12


@pytest.mark.parametrize("name", ["sgd", "rmsprop"])
def test_momentum_override_on_a_group_without_momentum(name: str) -> None:
    """The group has momentum 0 (no momentum buffer); {"momentum": σ(λ)} must act from the
    first unroll: the first hypergradient equals the central difference of plain torch with
    that momentum, and after two unrolls the parameters and written-back state equal plain
    torch's."""
    k, lam0 = 3, _t([0.5])
    make = {"sgd": lambda ps, **kw: torch.optim.SGD(ps, lr=0.1, **kw),
            "rmsprop": lambda ps, **kw: torch.optim.RMSprop(ps, lr=0.05, **kw)}[name]
    mt = Vec(THETA0)
    opt = make(mt.parameters())
    got, groups, _ = _override_program(
        opt, mt, Vec(lam0), lambda self: {"momentum": torch.sigmoid(self.outer()[0])},
        "reverse", k=k, iters=2 * k)
    momentum = float(torch.sigmoid(lam0[0]))

    def program(lam: torch.Tensor) -> float:
        m = float(torch.sigmoid(lam[0]))
        ref, _ = _plain_quadratic(lambda ps: make(ps, momentum=m), k)
        return float(0.5 * ((ref.theta.detach() - T) ** 2).sum())

    assert len(got) == 2
    assert rel_err(got[0], _central_difference(program, lam0)) <= 1e-6
    assert groups[-1]["momentum"] == pytest.approx(momentum, rel=1e-15)
    ref, ref_opt = _plain_quadratic(lambda ps: make(ps, momentum=momentum), 2 * k)
    assert rel_err(mt.theta.detach(), ref.theta.detach()) <= 1e-12
    mine, theirs = opt.state[mt.theta], ref_opt.state[ref.theta]
    assert "momentum_buffer" in mine
    for key in theirs:
        assert torch.allclose(torch.as_tensor(mine[key]).double(),
                              torch.as_tensor(theirs[key]).double(), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_roll_back_retakes_the_steps_with_the_updated_learned_setting(mode: str) -> None:
    """roll_back with lr = 0.1·e^λ: after each upper step the K steps are taken again from
    the unroll's start with the *updated* λ (on ½‖θ − C‖², θ_K = C + (1 − lr)^K (θ_s − C)),
    so every hypergradient is the closed form at the start the re-taken steps reached:
    dL/dλ = −K (1 − lr)^(K−1) lr (θ_s − C) · (θ_K − T)."""
    k, outer_lr, lam = 2, 0.5, -0.2
    mt = Vec(THETA0)
    got, groups, _ = _override_program(
        torch.optim.SGD(mt.parameters(), lr=0.1), mt, Vec([lam]),
        lambda self: {"lr": 0.1 * self.outer()[0].exp()}, mode, k=k, iters=3 * k,
        outer_lr=outer_lr, roll_back=True)
    start = _t(THETA0)
    assert len(got) == 3
    for g in got:
        lr = 0.1 * math.exp(lam)
        theta_k = C + (1 - lr) ** k * (start - C)
        expected = (-k * (1 - lr) ** (k - 1) * lr * (start - C) * (theta_k - T)).sum()
        assert float(g[0]) == pytest.approx(float(expected), rel=1e-12)
        lam -= outer_lr * float(expected)
        start = C + (1 - 0.1 * math.exp(lam)) ** k * (start - C)  # the re-taken steps
    assert rel_err(mt.theta.detach(), start) <= 1e-13
    assert groups[-1]["lr"] == pytest.approx(0.1 * math.exp(lam), rel=1e-13)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_learned_adagrad_initial_accumulator(mode: str) -> None:
    """torch builds Adagrad's state (s₀ = initial_accumulator_value) in its constructor; a
    learned s₀ = 0.5·e^λ still sets the first unroll's state: the hypergradient equals the
    central difference of plain torch Adagrad with that s₀, and so does the trajectory."""
    k, lam0 = 3, _t([0.2])
    mt = Vec(THETA0)
    got, _, _ = _override_program(
        torch.optim.Adagrad(mt.parameters(), lr=0.1), mt, Vec(lam0),
        lambda self: {"initial_accumulator_value": 0.5 * self.outer()[0].exp()}, mode, k=k,
        iters=k)

    def plain(lam: torch.Tensor) -> Vec:
        init = 0.5 * float(lam[0].exp())
        return _plain_quadratic(
            lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=init), k)[0]

    def program(lam: torch.Tensor) -> float:
        return float(0.5 * ((plain(lam).theta.detach() - T) ** 2).sum())

    assert len(got) == 1 and got[0].abs().max() > 1e-3
    assert rel_err(got[0], _central_difference(program, lam0)) <= 1e-6
    assert rel_err(mt.theta.detach(), plain(lam0).theta.detach()) <= 1e-13


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_roll_back_retakes_adagrad_from_the_updated_learned_first_state(mode: str) -> None:
    """After the upper step the re-taken steps start from s₀ = 0.5·e^λ at the *updated* λ
    (torch's Adagrad built its state from the constructor's s₀ = 0 and kept it)."""
    k, outer_lr = 2, 0.5
    mt = Vec(THETA0)
    got, _, _ = _override_program(
        torch.optim.Adagrad(mt.parameters(), lr=0.1), mt, Vec([0.2]),
        lambda self: {"initial_accumulator_value": 0.5 * self.outer()[0].exp()}, mode, k=k,
        iters=k, outer_lr=outer_lr, roll_back=True)
    updated = 0.2 - outer_lr * float(got[0][0])
    ref, _ = _plain_quadratic(lambda ps: torch.optim.Adagrad(
        ps, lr=0.1, initial_accumulator_value=0.5 * math.exp(updated)), k)
    assert abs(float(got[0][0])) > 1e-3
    assert rel_err(mt.theta.detach(), ref.theta.detach()) <= 1e-13


def test_a_learned_setting_not_used_yet_gives_a_zero_hypergradient() -> None:
    """SGD's first momentum step uses buf = g: a learned momentum has no effect on a first
    unroll of one step, so its hypergradient is exactly 0 (reverse mode as forward mode),
    not the "silently zero" error of an uncoupled program; the second unroll uses it."""
    runs = {}
    for mode in ("reverse", "forward"):
        mt = Vec(THETA0)
        runs[mode], _, _ = _override_program(
            torch.optim.SGD(mt.parameters(), lr=0.1, momentum=0.9), mt, Vec([0.5]),
            lambda self: {"momentum": torch.sigmoid(self.outer()[0])}, mode, k=1, iters=2)
    assert float(runs["reverse"][0][0]) == 0.0
    assert abs(float(runs["reverse"][1][0])) > 1e-3
    for a, b in zip(runs["reverse"], runs["forward"], strict=True):
        assert torch.allclose(a, b, rtol=1e-12, atol=0)


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_a_learned_momentum_at_zero_has_its_derivative(mode: str) -> None:
    """momentum = λ with λ = 0: torch's step skips the momentum term at 0, but the term's
    derivative is not 0 (θ₂ moves by −lr·μ·g₁): the hypergradient equals the one-sided
    difference of plain torch SGD in μ (the functional step gated the term on μ ≠ 0, so
    there was no graph to λ: reverse mode raised, forward mode returned 0)."""
    k = 2
    mt = Vec(THETA0)
    got, _, _ = _override_program(torch.optim.SGD(mt.parameters(), lr=0.1), mt, Vec([0.0]),
                                  lambda self: {"momentum": self.outer()[0]}, mode, k=k,
                                  iters=k)

    def program(mu: float) -> float:
        ref, _ = _plain_quadratic(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=mu), k)
        return float(0.5 * ((ref.theta.detach() - T) ** 2).sum())

    expected = (program(1e-7) - program(0.0)) / 1e-7  # (L_out is quadratic in μ: O(h) off)
    assert abs(float(got[0][0])) > 1e-3
    assert float(got[0][0]) == pytest.approx(expected, rel=1e-6)


def test_learned_betas_as_one_tensor_of_two() -> None:
    """{"betas": σ(λ)} with λ of two entries is the pair (σ(λ₀), σ(λ₁)): the same
    hypergradient and param groups; a tensor of three is refused, naming the setting."""
    lam0 = _t([1.0, 4.0])
    results = []
    for form in (lambda s: {"betas": torch.sigmoid(s.outer())},
                 lambda s: {"betas": (torch.sigmoid(s.outer()[0]),
                                      torch.sigmoid(s.outer()[1]))}):
        mt = Vec(THETA0)
        results.append(_override_program(torch.optim.Adam(mt.parameters(), lr=0.1), mt,
                                         Vec(lam0), form, "reverse", k=3, iters=3)[:2])
    (got, groups), (got_pair, groups_pair) = results
    assert torch.equal(got[0], got_pair[0])
    assert groups[-1]["betas"] == groups_pair[-1]["betas"]
    mt = Vec(THETA0)
    with pytest.raises(zg.ConfigError, match=r"betas.*\(3,\).*tensor of two"):
        _override_program(torch.optim.Adam(mt.parameters(), lr=0.1), mt, Vec([1.0, 2.0, 3.0]),
                          lambda s: {"betas": torch.sigmoid(s.outer())}, "reverse", k=2,
                          iters=2)


# --------------------------------------------------------------------------- c7: stride-0 grads
A2 = torch.diag(_t([1.0, 2.0, 3.0]))
B2 = _t([[0.5, -0.3], [0.2, 0.4], [-0.1, 0.6]])


@pytest.mark.parametrize("lower", ["iterative", "implicit"])
def test_upper_loss_with_a_sum_of_its_parameters(lower: str) -> None:
    """1e-3·λ.sum() gives autograd's expanded (stride-0) gradient, to which the hypergradient
    is added in place: the step must work and the gradient be exact.
    iterative: ½θᵀAθ − θᵀBλ, K SGD steps: Bᵀ η Σ_{j<K}(I − ηA)^j (θ_K − t) + 1e-3.
    implicit (CG): ½‖θ − λ‖², dθ*/dλ = I; upper ‖θ‖²: 2θ + 1e-3."""
    k, eta, upper_lr = 4, 0.1, 0.5
    got: list[tuple[torch.Tensor, torch.Tensor]] = []
    mt = Vec(THETA0)

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            read = self.inner()
            main = 0.5 * ((read - T) ** 2).sum() if lower == "iterative" else (read**2).sum()
            return main + 1e-3 * self.module.theta.sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append((grads[0].clone(), mt.theta.detach().clone()))

    if lower == "iterative":
        lam0 = _t([0.3, -0.7])
        inner: zg.Problem = zg.IterativeProblem(
            "inner", mt, torch.optim.SGD(mt.parameters(), lr=eta),
            config=zg.Config(unroll_steps=k),
            training_step=lambda p, b: 0.5 * p() @ A2 @ p() - p() @ (B2 @ p.outer()))
    else:
        k, lam0 = 1, _t([1.0, 2.0, 3.0])
        inner = zg.ImplicitProblem("inner", mt, torch.optim.SGD(mt.parameters(), lr=0.1),
                                   config=zg.Config(type=zg.CG(iterations=3)),
                                   training_step=lambda p, b: 0.5 * ((p() - p.outer()) ** 2).sum())
    ml = Vec(lam0)
    outer = Outer("outer", ml, torch.optim.SGD(ml.parameters(), lr=upper_lr))
    zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(k)).run()
    assert len(got) == 1
    grad, theta = got[0]
    if lower == "iterative":
        m = torch.eye(3, dtype=DTYPE) - eta * A2
        s = sum(torch.linalg.matrix_power(m, j) for j in range(k))
        expected = B2.T @ (eta * s @ (theta - T)) + 1e-3
    else:
        expected = 2 * theta + 1e-3
    assert rel_err(grad, expected) <= 1e-10
    assert torch.allclose(ml.theta.detach(), lam0 - upper_lr * grad, rtol=1e-14, atol=1e-16)


# --------------------------------------------------------------------------- c10: ES replays
GRAD_SCALE = 3.0


class _NoisyLower(zg.IterativeProblem):
    """Draws random numbers in get_batch (a bootstrap resample) and in training_step (noisy
    targets), and scales its gradients in grad_callback; λ = (log weight decay, shift)."""

    def get_batch(self) -> Any:
        x, y = super().get_batch()
        idx = torch.randint(0, x.shape[0], (x.shape[0],))
        return x[idx], y[idx]

    def training_step(self, batch: Any) -> torch.Tensor:
        return _noisy_lower_loss(self.module, batch, self.outer())

    def grad_callback(self, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        return [GRAD_SCALE * g for g in grads]


def _noisy_lower_loss(module: torch.nn.Module, batch: Any, lam: torch.Tensor) -> torch.Tensor:
    x, y = batch
    out = module(x)
    target = y + 0.1 * torch.randn_like(y)
    reg = sum((w**2).sum() for w in module.parameters())
    return (((out - target) ** 2).mean() + torch.exp(lam[0]) * 0.5 * reg
            + 0.3 * lam[1] * out.mean())


LAM_NOISY = [0.0, 0.2]


def _noisy_program(method: zg.registry.Method | str, k: int, iters: int, seed: int = 123
                   ) -> tuple[list[torch.Tensor], torch.nn.Module, torch.Tensor]:
    """Returns the upper's hypergradients, the lower's module and the global RNG state at
    the end of the run."""
    net, lam = _mlp(0), Vec(LAM_NOISY)
    got: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return ((self.inner(batch[0]) - batch[1]) ** 2).mean()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(grads[0].clone())

    inner = _NoisyLower("inner", net, torch.optim.SGD(net.parameters(), lr=0.05),
                        train_data_loader=TRAIN, config=zg.Config(type=method, unroll_steps=k))
    outer = Outer("outer", lam, torch.optim.SGD(lam.parameters(), lr=0.0),
                  train_data_loader=VALID)
    engine = zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(iters))
    torch.manual_seed(seed)
    engine.run()
    return got, net, torch.get_rng_state()


def test_es_replays_leave_training_as_plain_torch_with_the_same_hooks() -> None:
    """Reference: plain torch training of the lower from the same global seed, drawing the
    same random numbers in the same order (resample, then noisy targets) and applying the
    same gradient scaling. ES replays every unroll many times (perturbed λ, restored RNG
    states) between these steps; the real trajectory (and the program's random stream) must
    be exactly that of plain training: nothing of the replays may leak into it."""
    steps = 7  # two ES hypergradients, the run ends inside the third unroll
    got, net, rng = _noisy_program(zg.EvolutionStrategies(samples=3), k=3, iters=steps)
    assert len(got) == 2
    ref = _mlp(0)
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    lam = _t(LAM_NOISY)
    torch.manual_seed(123)
    for i in range(steps):
        x, y = TRAIN[i % len(TRAIN)]
        idx = torch.randint(0, x.shape[0], (x.shape[0],))
        loss = _noisy_lower_loss(ref, (x[idx], y[idx]), lam)
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        for p, g in zip(ref.parameters(), grads):
            p.grad = GRAD_SCALE * g
        opt.step()
    for p, q in zip(net.parameters(), ref.parameters()):
        assert rel_err(p.detach(), q.detach()) <= 1e-12
    assert torch.equal(rng, torch.get_rng_state())


def test_es_estimate_agrees_with_reverse_mode_on_a_noisy_hooked_lower() -> None:
    """ES estimates the gradient of λ ↦ v·θ_K(λ) for the random numbers actually drawn and
    the hooks actually applied, which reverse mode differentiates exactly (same seed, same
    draws). A replay that ignored grad_callback or redrew the noise would estimate another
    function; the mean over seeds must lie within 4 standard errors of reverse mode."""
    k = 3
    (exact,), _, _ = _noisy_program("reverse", k=k, iters=k)
    estimates = [_noisy_program(zg.EvolutionStrategies(samples=8, sigma=0.01, seed=s),
                                k=k, iters=k)[0][0] for s in range(24)]
    stack = torch.stack(estimates)
    mean, se = stack.mean(0), stack.std(0) / len(estimates) ** 0.5
    assert bool(((mean - exact).abs() <= 4 * se).all())
    assert bool((4 * se < exact.abs()).all())  # power: the band excludes zero
    assert rel_err(mean, exact) <= 0.2


# --------------------------------------------------------------------------- c11: mid-unroll end
def test_run_ending_inside_an_unroll_syncs_the_torch_optimizer() -> None:
    """train_iters = 6 with unroll_steps = 4: the run ends two steps into the second unroll.
    The torch optimizer (Adam: step, moments) and the parameters must equal plain torch's
    after 6 steps, and one more plain torch step must land on the same point."""
    steps, k = 6, 4
    net = _mlp(0)
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    lam = Vec([0.0])
    inner = zg.IterativeProblem(
        "inner", net, opt, train_data_loader=TRAIN, config=zg.Config(unroll_steps=k),
        training_step=lambda p, b: _mlp_lower_loss(p.module, b, p.outer()[0]))
    outer = zg.ImplicitProblem("outer", lam, torch.optim.SGD(lam.parameters(), lr=0.0),
                               train_data_loader=VALID,
                               training_step=lambda p, b: ((p.inner(b[0]) - b[1]) ** 2).mean())
    zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(steps)).run()
    assert inner.count == steps
    ref, ref_opt, _, _ = _plain_mlp_training(lambda ps: torch.optim.Adam(ps, lr=0.05), steps)
    for p in net.parameters():
        assert float(opt.state[p]["step"]) == steps
    _assert_same_training_state(net, opt, ref, ref_opt)
    zero = torch.tensor(0.0, dtype=DTYPE)
    for model, optimizer in ((net, opt), (ref, ref_opt)):
        optimizer.zero_grad()
        _mlp_lower_loss(model, TRAIN[steps % len(TRAIN)], zero).backward()
        optimizer.step()
    _assert_same_training_state(net, opt, ref, ref_opt)


# --------------------------------------------------------------------------- c4: metrics
def test_metric_with_a_graph_does_not_keep_the_unroll_alive() -> None:
    """training_step returns {"loss", "reg"} where reg has the graph of θ_k (and λ): the
    stored metric is detached, so once each upper step ends the unroll, every unrolled θ_k
    is freed."""
    k = 3
    refs: list[weakref.ref[torch.Tensor]] = []
    mt, ml = Vec(THETA0), Vec([0.3, -0.7])

    class Watched(zg.IterativeProblem):
        def training_step(self, batch: Any) -> dict[str, torch.Tensor]:
            reg = 0.5 * torch.exp(self.outer()[0]) * (self() ** 2).sum()
            return {"loss": 0.5 * self() @ A2 @ self() - self() @ (B2 @ self.outer()) + reg,
                    "reg": reg}

        def param_callback(self, params: list[torch.Tensor]) -> None:
            assert self._theta is not None
            refs.append(weakref.ref(self._theta[0]))

    inner = Watched("inner", mt, torch.optim.SGD(mt.parameters(), lr=0.1),
                    config=zg.Config(unroll_steps=k))
    outer = zg.ImplicitProblem("outer", ml, torch.optim.SGD(ml.parameters(), lr=0.01),
                               training_step=lambda p, b: 0.5 * ((p.inner() - T) ** 2).sum())
    zg.Engine([outer, inner], zg.chain(outer, inner), _cfg(3 * k)).run()
    gc.collect()
    assert len(refs) == 3 * k
    assert [r() is None for r in refs] == [True] * (3 * k)
    reg = inner.last_metrics["reg"]
    assert isinstance(reg, torch.Tensor) and reg.grad_fn is None and not reg.requires_grad


def test_an_unrolled_problem_below_another_is_refused() -> None:
    """An unroll below another differentiated through the middle's per-step copies of θ:
    reverse mode raised a false "does not depend" error, forward mode was 1.5x off (an
    audit against central differences); the program is refused when it is built."""
    m1, m2, m3 = Vec([0.5]), Vec([0.2]), Vec([0.1])
    top = zg.ImplicitProblem("top", m1, torch.optim.SGD(m1.parameters(), lr=0.1),
                             training_step=lambda p, b: (p.middle() ** 2).sum())
    mid = zg.IterativeProblem("middle", m2, torch.optim.SGD(m2.parameters(), lr=0.1),
                              training_step=lambda p, b: ((p() - p.top()) ** 2).sum()
                              + (p.bottom() ** 2).sum())
    bot = zg.IterativeProblem("bottom", m3, torch.optim.SGD(m3.parameters(), lr=0.1),
                              training_step=lambda p, b: ((p() - p.middle()) ** 2).sum())
    with pytest.raises(zg.GraphError, match=r"unrolled problem 'bottom' lies below the "
                                            r"unrolled problem\(s\) \['middle'\].*ImplicitProblem"):
        zg.Engine([top, mid, bot], zg.chain(top, mid, bot))
