"""Regression tests for the edge cases real programs hit: unused lower parameters, dropout,
schedulers under SAMA, never-moved Adam coordinates, several uppers sharing a lower,
failures mid-computation, BatchNorm buffers, and ill-formed programs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import ziggurat as zg

from helpers import Vec
from ridge import DTYPE, make_ridge, rel_err


# --------------------------------------------------------------------------- singular H
def test_cg_with_lower_parameters_unused_by_the_lower_loss() -> None:
    """v reaches H's null space (a 'head' only the outer loss reads): CG must return the
    solution on the used subspace, not overflow (it grew to 1e69 before the guard)."""
    r = make_ridge(40.0)
    ts = r.theta_star()
    theta = ts.clone().requires_grad_()
    head = torch.tensor([0.7, -0.3], dtype=DTYPE, requires_grad=True)
    lam = r.lam.clone().requires_grad_()
    obj = zg.InnerObjective([theta, head], [lam], lambda: r.inner_loss(theta, lam))
    v = [r.v(ts), torch.tensor([1.0, 2.0], dtype=DTYPE)]
    for iterations in (6, 10, 30):
        out = zg.CG(iterations=iterations)(obj, v)[0]
        assert rel_err(out, r.implicit_hypergrad(ts)) <= 1e-8


def test_cg_stops_at_negative_curvature_instead_of_diverging() -> None:
    """Indefinite H: the first direction has negative curvature, so x stays 0 there, and a
    positive-definite part is still solved exactly."""
    theta = torch.tensor([1.0, 1.0], dtype=DTYPE, requires_grad=True)
    lam = torch.tensor([1.0, 1.0], dtype=DTYPE, requires_grad=True)
    # L = ½(2θ₀² − θ₁²)·… with λ coupling; H = diag(2λ₀, −λ₁)
    obj = zg.InnerObjective([theta], [lam],
                            lambda: lam[0] * theta[0] ** 2 - 0.5 * lam[1] * theta[1] ** 2)
    out = zg.CG(iterations=5)(obj, [torch.tensor([0.0, 1.0], dtype=DTYPE)])[0]
    assert torch.equal(out, torch.zeros(2, dtype=DTYPE))
    out = zg.CG(iterations=5)(obj, [torch.tensor([1.0, 0.0], dtype=DTYPE)])[0]
    # x = H⁻¹v = [1/2, 0]; mixed = ∂²/∂λ∂θ · x = [2θ₀x₀, −θ₁x₁] = [1, 0]
    assert torch.allclose(out, torch.tensor([-1.0, 0.0], dtype=DTYPE), rtol=0, atol=1e-15)


# --------------------------------------------------------------------------- randomness
def test_finite_difference_sees_the_same_dropout_mask_on_both_sides() -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.5),
                              torch.nn.Linear(16, 1)).double()
    weights = torch.full((8,), 0.5, dtype=DTYPE, requires_grad=True)
    x, y = torch.randn(8, 5, dtype=DTYPE), torch.randn(8, dtype=DTYPE)
    params = list(net.parameters())

    def loss() -> torch.Tensor:
        return (weights * (net(x).squeeze(1) - y) ** 2).mean()

    obj = zg.InnerObjective(params, [weights], loss)
    v = [torch.randn_like(p) for p in params]
    before = torch.get_rng_state()
    fd = zg.Darts(mixed="fd")(obj, v)[0]
    assert torch.equal(torch.get_rng_state(), before), "the program's RNG must not advance"
    exact = zg.Darts(mixed="exact")(obj, v)[0]
    # ~3e-5 is the O(ε²) truncation of the difference on this quartic loss; with an
    # independent mask per side the error was ~100
    assert rel_err(fd, exact) <= 1e-4


def test_hypergradient_leaves_batchnorm_statistics_alone() -> None:
    """The methods re-run the lower forward pass; BatchNorm statistics must not move."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                              torch.nn.Linear(4, 1)).double()
    hp = Vec(torch.zeros(1, dtype=DTYPE))
    x, y = torch.randn(16, 3, dtype=DTYPE), torch.randn(16, dtype=DTYPE)
    bn = net[1]
    after_outer_forward: list[torch.Tensor] = []
    at_outer_step: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            loss = ((self.inner(batch[0]).squeeze(1) - batch[1]) ** 2).mean()
            after_outer_forward.append(torch.cat([bn.running_mean, bn.running_var,
                                                  bn.num_batches_tracked.reshape(1)]))
            return loss

        def grad_callback(self, grads: list[torch.Tensor]) -> None:  # after the hypergradient
            at_outer_step.append(torch.cat([bn.running_mean, bn.running_var,
                                            bn.num_batches_tracked.reshape(1)]))

    for method in ("darts", "cg", "sama"):
        inner = zg.ImplicitProblem(
            "inner", net, torch.optim.SGD(net.parameters(), lr=0.01),
            train_data_loader=[(x, y)], config=zg.Config(type=method),
            training_step=lambda p, b: ((p(b[0]).squeeze(1) - b[1]) ** 2).mean()
            + p.outer().exp().squeeze() * sum((q**2).sum() for q in p.module.parameters()),
        )
        outer = Outer("outer", hp, torch.optim.SGD(hp.parameters(), lr=0.0),
                      train_data_loader=[(x, y)])
        zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=2)).run()
    assert len(at_outer_step) == 6
    for a, b in zip(after_outer_forward, at_outer_step):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- SAMA
def _sama_two_level(scheduler: bool) -> torch.Tensor:
    r = make_ridge(2.0)
    inner_m, outer_m = Vec(r.theta_star() + 0.3), Vec(r.lam)
    opt = torch.optim.Adam(inner_m.parameters(), lr=0.01)
    sched = (torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 if step < 1 else 0.1)
             if scheduler else None)
    seen: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return r.outer_loss(self.inner())

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append(grads[0].clone())

    inner = zg.ImplicitProblem("inner", inner_m, opt, scheduler=sched,
                               config=zg.Config(type="sama"),
                               training_step=lambda p, b: r.inner_loss(p(), p.outer()))
    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0))
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=1)).run()
    return seen[0]


def test_sama_uses_the_learning_rate_of_the_step_not_the_schedulers_next_one() -> None:
    assert rel_err(_sama_two_level(scheduler=True), _sama_two_level(scheduler=False)) <= 1e-12


def test_sama_ignores_adam_coordinates_the_lower_loss_never_moved() -> None:
    """Rows of an embedding that only the outer loss reads: P = 0 there, and the finite
    difference still resolves the used rows (it returned exact zeros in float32 before)."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(10, 3)
    w = torch.nn.Parameter(torch.ones(5))
    opt = torch.optim.Adam(emb.parameters(), lr=0.01)
    seen_rows = torch.arange(5)

    def loss() -> torch.Tensor:
        return (w * (emb(seen_rows) ** 2).sum(1)).sum()

    state: dict[str, Any] = {}
    method = zg.SAMA()
    for _ in range(3):
        emb.weight.grad = torch.autograd.grad(loss(), [emb.weight])[0]
        method.before_optimizer_step(opt, [emb.weight], state)
        opt.step()
    v = [torch.ones_like(emb.weight)]
    obj = zg.InnerObjective([emb.weight], [w], loss, optimizer=opt, state=state)
    fd = zg.SAMA(mixed="fd")(obj, v)[0]
    exact = zg.SAMA(mixed="exact")(obj, v)[0]
    assert bool((fd != 0).all())
    assert rel_err(fd, exact) <= 1e-3  # float32 finite difference


def test_sama_per_group_decoupled_weight_decay() -> None:
    """One Adam with an L2 group and a decoupled group: each group's own rule applies."""
    r = make_ridge(2.0)
    a = torch.nn.Parameter(r.theta_star()[:3].clone())
    b = torch.nn.Parameter(r.theta_star()[3:].clone())
    opt = torch.optim.Adam([{"params": [a], "weight_decay": 0.5},
                            {"params": [b], "weight_decay": 0.5,
                             "decoupled_weight_decay": True}], lr=0.01)
    state: dict[str, Any] = {}
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        saved = copy.deepcopy(opt.state_dict())
        prev = [a.detach().clone(), b.detach().clone()]
        grads = [torch.randn(3, generator=gen, dtype=DTYPE) for _ in range(2)]
        a.grad, b.grad = grads[0].clone(), grads[1].clone()
        zg.SAMA().before_optimizer_step(opt, [a, b], state)
        opt.step()

    def update(ga: torch.Tensor, gb: torch.Tensor) -> torch.Tensor:
        pa, pb = torch.nn.Parameter(prev[0].clone()), torch.nn.Parameter(prev[1].clone())
        o = torch.optim.Adam([{"params": [pa], "weight_decay": 0.5},
                              {"params": [pb], "weight_decay": 0.5,
                               "decoupled_weight_decay": True}], lr=0.01)
        o.load_state_dict(copy.deepcopy(saved))
        pa.grad, pb.grad = ga.clone(), gb.clone()
        o.step()
        return torch.cat([prev[0] - pa.detach(), prev[1] - pb.detach()])

    h = 1e-6
    jac = (update(grads[0] + h, grads[1] + h) - update(grads[0] - h, grads[1] - h)) / (2 * h)
    lam = r.lam.clone().requires_grad_()
    obj = zg.InnerObjective([a, b], [lam],
                            lambda: r.inner_loss(torch.cat([a, b]), lam), optimizer=opt,
                            state=state)
    v = r.v(torch.cat([a, b]).detach())
    out = zg.SAMA(mixed="exact")(obj, [v[:3], v[3:]])[0]
    expected = -r.mixed(torch.cat([a, b]).detach(), jac * v)
    assert rel_err(out, expected) <= 1e-6


# --------------------------------------------------------------------------- warm starts
def test_fixed_point_warm_start_is_kept_per_request() -> None:
    r = make_ridge(40.0)
    ts = r.theta_star()
    theta, lam = ts.clone().requires_grad_(), r.lam.clone().requires_grad_()
    state: dict[str, Any] = {}
    method = zg.FixedPoint(iterations=15, alpha=0.02)
    va, vb = r.v(ts), -3.0 * r.v(ts).flip(0)

    def call(v: torch.Tensor, key: str) -> torch.Tensor:
        return method(r.objective(theta, lam, state=state, key=key), [v])[0]

    call(va, "a")
    call(vb, "b")
    second_a = call(va, "a")
    cold = zg.FixedPoint(iterations=30, alpha=0.02, warm_start=False)
    assert rel_err(second_a, cold(r.objective(theta, lam), [va])[0]) <= 1e-12


def test_warm_starts_are_dropped_when_the_parameter_list_changes() -> None:
    """A lower parameter frozen between calls (θ = [a, b] → [b], equal shapes): the kept
    solution and power-iteration vector no longer fit, so the call is a cold one: equal to a
    fresh FixedPoint on [b] (the shapes alone would not tell: compare the lists' lengths)."""
    lam = torch.tensor([0.5, 2.0], dtype=DTYPE, requires_grad=True)
    a, b = (torch.tensor([1.0, -1.0], dtype=DTYPE, requires_grad=True) for _ in range(2))

    def loss() -> torch.Tensor:
        return 0.5 * (lam.exp() * (a ** 2 + 2 * b ** 2)).sum()

    state: dict[str, Any] = {}
    method = zg.FixedPoint(iterations=20, power_iterations=20)
    v = torch.tensor([0.3, 0.7], dtype=DTYPE)
    method(zg.InnerObjective([a, b], [lam], loss, state=state), [v, v])
    after = method(zg.InnerObjective([b], [lam], loss, state=state), [v])[0]
    fresh = method(zg.InnerObjective([b], [lam], loss), [v])[0]
    assert torch.allclose(after, fresh, rtol=1e-14, atol=0)


def test_two_uppers_reading_one_lower_get_their_own_exact_hypergradients() -> None:
    r = make_ridge(40.0)
    inner_m = Vec(r.theta_star())
    ups = {"a": Vec(r.lam), "b": Vec(r.lam)}
    targets = {"a": r.yv, "b": -r.yv}
    got: dict[str, list[torch.Tensor]] = {"a": [], "b": []}

    class Upper(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            res = r.Xv @ self.inner() - targets[self.name]
            return 0.5 * (res @ res) / r.Xv.shape[0]

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got[self.name].append(grads[0].clone())

    a = Upper("a", ups["a"], torch.optim.SGD(ups["a"].parameters(), lr=0.0))
    b = Upper("b", ups["b"], torch.optim.SGD(ups["b"].parameters(), lr=0.0))
    inner = zg.ImplicitProblem(
        "inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.0),
        config=zg.Config(type=zg.FixedPoint(iterations=400, warm_start=True)),
        training_step=lambda p, bt: r.inner_loss(p(), 0.5 * (p.a() + p.b())),
    )
    zg.Engine([a, b, inner], {"u2l": {a: [inner], b: [inner]}, "l2u": {inner: [a, b]}},
              zg.EngineConfig(train_iters=4)).run()
    th = inner_m.theta.detach()
    h_inv_v = {}
    for name in ("a", "b"):
        v = r.Xv.T @ (r.Xv @ th - targets[name]) / r.Xv.shape[0]
        h_inv_v[name] = torch.linalg.solve(r.hessian(), v)
        expected = -0.5 * r.mixed(th, h_inv_v[name])  # λ enters as (λ_a + λ_b)/2
        assert rel_err(got[name][-1], expected) <= 1e-8


# --------------------------------------------------------------------------- failures
def test_theta_is_restored_when_a_finite_difference_evaluation_fails() -> None:
    theta0 = torch.tensor([0.3, -0.4], dtype=DTYPE)
    theta = theta0.clone().requires_grad_()
    lam = torch.ones(2, dtype=DTYPE, requires_grad=True)
    calls = {"n": 0}

    def loss() -> torch.Tensor:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom on the second evaluation")
        return (lam * theta**2).sum()

    with pytest.raises(RuntimeError, match="boom"):
        zg.Darts(mixed="fd")(zg.InnerObjective([theta], [lam], loss), [torch.ones(2, dtype=DTYPE)])
    assert torch.allclose(theta.detach(), theta0, rtol=1e-15, atol=1e-17)
    with pytest.raises(zg.HypergradientError):
        zg.Darts(mixed="fd")(zg.InnerObjective([theta], [lam], lambda: (theta**2).sum()),
                   [torch.ones(2, dtype=DTYPE)])
    assert torch.allclose(theta.detach(), theta0, rtol=1e-15, atol=1e-17)


def test_parameters_shared_between_levels_are_rejected() -> None:
    shared = Vec(torch.ones(2, dtype=DTYPE))
    up = zg.ImplicitProblem("up", shared, torch.optim.SGD(shared.parameters(), lr=0.1),
                            training_step=lambda p, b: (p.low() ** 2).sum())
    low = zg.ImplicitProblem("low", shared, torch.optim.SGD(shared.parameters(), lr=0.1),
                             training_step=lambda p, b: (p() * p.up()).sum())
    with pytest.raises(zg.GraphError, match="'up' and 'low' train the same parameter"):
        zg.Engine([up, low], zg.chain(up, low))


def test_plain_problem_below_another_is_rejected_at_construction() -> None:
    m1, m2 = Vec(torch.ones(2)), Vec(torch.ones(2))
    up = zg.ImplicitProblem("up", m1, torch.optim.SGD(m1.parameters(), lr=0.1),
                            training_step=lambda p, b: (p.low() ** 2).sum())
    low = zg.Problem("low", m2, torch.optim.SGD(m2.parameters(), lr=0.1),
                     training_step=lambda p, b: (p() * p.up()).sum())
    with pytest.raises(zg.GraphError, match=r"'low' lies below .*'up'.*ImplicitProblem"):
        zg.Engine([up, low], zg.chain(up, low))
