"""Unrolled (iterative) hypergradients against closed forms, in float64.

Lower: L_in(θ, λ) = ½θᵀAθ − θᵀBλ, K steps of gradient descent with rate η:
    θ_K = (I − ηA)^K θ₀ + η Σ_{k<K} (I − ηA)^k B λ,   dθ_K/dλ = η Σ_{k<K} (I − ηA)^k B.
Upper: L_out = ½‖θ_K − t‖², v = θ_K − t, hypergradient Bᵀ η Σ_{k<K} (I − ηA)^k v → BᵀA⁻¹v.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ziggurat as zg

from helpers import DTYPE, Vec
from ridge import rel_err

N, M, ETA = 4, 3, 0.1


def _quadratic(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(N, N, generator=g, dtype=DTYPE))
    return {
        "A": q @ torch.diag(torch.linspace(1, 5, N, dtype=DTYPE)) @ q.T,
        "B": torch.randn(N, M, generator=g, dtype=DTYPE),
        "t": torch.randn(N, generator=g, dtype=DTYPE),
        "theta0": torch.randn(N, generator=g, dtype=DTYPE),
        "lam0": torch.randn(M, generator=g, dtype=DTYPE),
    }


def _bilevel(
    method: zg.registry.Method,
    k: int,
    make_opt: Any = None,
    q: dict[str, torch.Tensor] | None = None,
    iters: int | None = None,
    inner_cls: type[zg.IterativeProblem] = zg.IterativeProblem,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], zg.IterativeProblem, zg.Engine]:
    """Run one bilevel program; return (hypergradient, θ at that moment) per upper step."""
    q = q or _quadratic()
    inner_m, outer_m = Vec(q["theta0"]), Vec(q["lam0"])
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.inner() - q["t"]) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append((grads[0].clone(), self.inner.module.theta.detach().clone()))

    opt = (make_opt or (lambda ps: torch.optim.SGD(ps, lr=ETA)))(inner_m.parameters())
    inner = inner_cls(
        "inner", inner_m, opt, config=zg.Config(type=method, unroll_steps=k),
        training_step=lambda p, b: 0.5 * p() @ q["A"] @ p() - p() @ (q["B"] @ p.outer()),
    )
    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0))
    engine = zg.Engine([outer, inner], zg.chain(outer, inner),
                       zg.EngineConfig(train_iters=iters or k))
    engine.run()
    return seen, inner, engine


def _unrolled_closed_form(q: dict[str, torch.Tensor], theta_k: torch.Tensor, steps: int
                          ) -> torch.Tensor:
    m = torch.eye(N, dtype=DTYPE) - ETA * q["A"]
    s = sum(torch.linalg.matrix_power(m, j) for j in range(steps))
    return q["B"].T @ (ETA * s @ (theta_k - q["t"]))


@pytest.mark.parametrize("k", [1, 5, 20])
def test_reverse_mode_equals_the_unrolled_closed_form(k: int) -> None:
    q = _quadratic()
    seen, _, _ = _bilevel(zg.Reverse(), k, q=q, iters=3 * k)
    assert len(seen) == 3
    for grad, theta_k in seen:
        assert rel_err(grad, _unrolled_closed_form(q, theta_k, k)) <= 1e-10


def test_reverse_mode_approaches_the_implicit_hypergradient_as_k_grows() -> None:
    q = _quadratic()
    errors = []
    for k in (5, 20, 80, 250):
        (grad, theta_k), *_ = _bilevel(zg.Reverse(), k, q=q)[0]
        ift = q["B"].T @ torch.linalg.solve(q["A"], theta_k - q["t"])
        errors.append(rel_err(grad, ift))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] <= 1e-8  # (1 − η λ_min)^K = 0.9^250


@pytest.mark.parametrize("truncate", [1, 3])
def test_truncated_reverse_mode_equals_the_truncated_sum(truncate: int) -> None:
    q = _quadratic()
    seen, _, _ = _bilevel(zg.Reverse(truncate=truncate), 6, q=q, iters=12)
    for grad, theta_k in seen:
        assert rel_err(grad, _unrolled_closed_form(q, theta_k, truncate)) <= 1e-10


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=ETA),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=ETA, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.05, weight_decay=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5, centered=True),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_forward_mode_equals_reverse_mode(name: str) -> None:
    q = _quadratic(1)
    rev, _, _ = _bilevel(zg.Reverse(), 7, OPTIMIZERS[name], q=q, iters=14)
    fwd, _, _ = _bilevel(zg.Forward(), 7, OPTIMIZERS[name], q=q, iters=14)
    assert len(rev) == len(fwd) == 2
    for (a, _), (b, _) in zip(rev, fwd):
        assert rel_err(b, a) <= 1e-10


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_unrolled_trajectory_is_torch_optims_trajectory(name: str) -> None:
    """θ after the unrolls, and the optimizer state written back, equal plain torch training."""
    q = _quadratic(2)
    _, inner, _ = _bilevel(zg.Reverse(), 4, OPTIMIZERS[name], q=q, iters=8)
    ref = Vec(q["theta0"])
    opt = OPTIMIZERS[name](ref.parameters())
    for _ in range(8):
        opt.zero_grad()
        (0.5 * ref() @ q["A"] @ ref() - ref() @ (q["B"] @ q["lam0"])).backward()
        opt.step()
    assert rel_err(inner.module.theta.detach(), ref.theta.detach()) <= 1e-12
    mine = inner.optimizer.state[inner.module.theta]
    theirs = opt.state[ref.theta]
    assert set(mine) == set(theirs)
    for key, value in theirs.items():
        assert torch.allclose(torch.as_tensor(mine[key]), torch.as_tensor(value), rtol=1e-12,
                              atol=0)


def test_graph_is_released_after_each_upper_step() -> None:
    """The unrolled θ_K (and with it the graph of the K steps) dies with the upper step."""
    import gc
    import weakref

    refs: list[weakref.ref[torch.Tensor]] = []

    class Watched(zg.IterativeProblem):
        def param_callback(self, params: list[torch.Tensor]) -> None:
            assert self._theta is not None
            refs.append(weakref.ref(self._theta[0]))

    _, inner, _ = _bilevel(zg.Reverse(), 3, iters=9, inner_cls=Watched)
    gc.collect()
    assert len(refs) == 9
    assert all(r() is None for r in refs)
    assert inner.module.theta.grad_fn is None and inner.module.theta.is_leaf


# --------------------------------------------------------------------------- MAML style
class Maml(zg.IterativeProblem):
    def initial_parameters(self) -> list[torch.Tensor]:
        return list(self.outer.module.parameters())  # θ₀ = φ, the meta-parameters


def _maml(method: zg.registry.Method, k: int, make_opt: Any = None
          ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    q = _quadratic(3)
    inner_m, meta = Vec(q["theta0"]), Vec(q["theta0"] + 0.5)
    got: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.inner() - q["t"]) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(grads[0].clone())

    opt = (make_opt or (lambda ps: torch.optim.SGD(ps, lr=ETA)))(inner_m.parameters())
    inner = Maml("inner", inner_m, opt, config=zg.Config(type=method, unroll_steps=k),
                 training_step=lambda p, b: 0.5 * p() @ q["A"] @ p() - p() @ q["B"][:, 0])
    outer = Outer("outer", meta, torch.optim.SGD(meta.parameters(), lr=0.0))
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=k)).run()
    return got[0], inner_m.theta.detach().clone(), q


def test_maml_reverse_mode_closed_form() -> None:
    grad, theta_k, q = _maml(zg.Reverse(), 4)
    m = torch.eye(N, dtype=DTYPE) - ETA * q["A"]
    assert rel_err(grad, torch.linalg.matrix_power(m, 4) @ (theta_k - q["t"])) <= 1e-10


@pytest.mark.parametrize(
    ("make_opt", "factor"),
    [(lambda ps: torch.optim.SGD(ps, lr=ETA), 1.0),
     (lambda ps: torch.optim.Adam(ps, lr=0.05), 1.0),
     (lambda ps: torch.optim.SGD(ps, lr=ETA, weight_decay=0.3), (1 - ETA * 0.3) ** 4)],
    ids=["sgd", "adam", "sgd-weight-decay"],
)
def test_first_order_mode_is_the_gradient_at_the_adapted_parameters(
    make_opt: Any, factor: float
) -> None:
    """First-order MAML: the inner gradients are constants, so dθ_K/dθ₀ = I (times the
    weight-decay shrinkage (1 − ηw)^K, which is part of the optimizer, not of ∇L)."""
    grad, theta_k, q = _maml(zg.Reverse(first_order=True), 4, make_opt)
    assert rel_err(grad, factor * (theta_k - q["t"])) <= 1e-12


def test_forward_mode_maml_equals_reverse() -> None:
    a, _, _ = _maml(zg.Reverse(), 5, OPTIMIZERS["adam"])
    b, _, _ = _maml(zg.Forward(), 5, OPTIMIZERS["adam"])
    assert rel_err(b, a) <= 1e-10


# --------------------------------------------------------------------------- learned lr
class LearnedRate(zg.IterativeProblem):
    def optimizer_hyperparameters(self) -> dict[str, torch.Tensor]:
        return {"lr": self.outer().exp().squeeze()}


def _unrolled_loss_for_log_lr(log_lr: float, q: dict[str, torch.Tensor], k: int,
                              make_opt: Any) -> float:
    ref = Vec(q["theta0"])
    opt = make_opt(ref.parameters())
    for group in opt.param_groups:
        group["lr"] = float(torch.tensor(log_lr, dtype=DTYPE).exp())
    for _ in range(k):
        opt.zero_grad()
        (0.5 * ref() @ q["A"] @ ref() - ref() @ q["B"][:, 0]).backward()
        opt.step()
    return float(0.5 * ((ref.theta.detach() - q["t"]) ** 2).sum())


@pytest.mark.parametrize("name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_learned_learning_rate_matches_central_difference(name: str, mode: str) -> None:
    q = _quadratic(4)
    k = 6
    log_lr = Vec([-2.5])
    inner_m = Vec(q["theta0"])
    got: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.inner() - q["t"]) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(grads[0].clone())

    inner = LearnedRate("inner", inner_m, OPTIMIZERS[name](inner_m.parameters()),
                        config=zg.Config(type=mode, unroll_steps=k),
                        training_step=lambda p, b: 0.5 * p() @ q["A"] @ p() - p() @ q["B"][:, 0])
    outer = Outer("outer", log_lr, torch.optim.SGD(log_lr.parameters(), lr=0.0))
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=k)).run()
    h = 1e-5
    fd = (_unrolled_loss_for_log_lr(-2.5 + h, q, k, OPTIMIZERS[name])
          - _unrolled_loss_for_log_lr(-2.5 - h, q, k, OPTIMIZERS[name])) / (2 * h)
    assert float(got[0]) == pytest.approx(fd, rel=1e-7)


# --------------------------------------------------------------------------- zeroth order
def test_evolution_strategies_is_unbiased_for_the_smoothed_objective() -> None:
    """θ_K is linear in λ here, so the smoothed gradient is the true one; the mean over 40
    seeds must lie within 4 standard errors of it in every coordinate."""
    q = _quadratic()
    k = 5
    estimates = []
    exact = None
    for seed in range(40):
        seen, _, _ = _bilevel(zg.EvolutionStrategies(samples=20, sigma=0.05, seed=seed), k, q=q)
        grad, theta_k = seen[0]
        exact = _unrolled_closed_form(q, theta_k, k)
        estimates.append(grad)
    stack = torch.stack(estimates)
    mean, se = stack.mean(0), stack.std(0) / len(estimates) ** 0.5
    assert exact is not None
    assert bool(((mean - exact).abs() <= 4 * se).all())
    assert rel_err(mean, exact) <= 0.1


def test_evolution_strategies_works_where_the_lower_is_not_differentiable() -> None:
    """λ enters the lower loss through a step function: its derivative is zero almost
    everywhere, so reverse mode returns exactly 0, while ES estimates the gradient of the
    smoothed objective (non-zero) and leaves the lower's trajectory untouched."""
    q = _quadratic()

    def lower(p: zg.Problem, batch: Any) -> torch.Tensor:
        target = torch.round(q["B"] @ p.outer() * 4.0) / 4.0  # piecewise constant in λ
        return 0.5 * ((p() - target) ** 2).sum()

    def program(method: zg.registry.Method) -> tuple[list[torch.Tensor], torch.Tensor]:
        inner_m, outer_m = Vec(q["theta0"]), Vec(q["lam0"])
        got: list[torch.Tensor] = []

        class Outer(zg.ImplicitProblem):
            def training_step(self, batch: Any) -> torch.Tensor:
                return 0.5 * ((self.inner() - q["t"]) ** 2).sum()

            def grad_callback(self, grads: list[torch.Tensor]) -> None:
                got.append(grads[0].clone())

        inner = zg.IterativeProblem("inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.3),
                                    config=zg.Config(type=method, unroll_steps=3),
                                    training_step=lower)
        outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0))
        zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=6)).run()
        return got, inner_m.theta.detach()

    reverse, _ = program(zg.Reverse())
    assert all(torch.equal(g, torch.zeros_like(g)) for g in reverse)
    got, theta = program(zg.EvolutionStrategies(samples=8, sigma=0.3))
    assert len(got) == 2 and all(bool(torch.isfinite(g).all()) and float(g.norm()) > 0
                                 for g in got)
    ref = Vec(q["theta0"])
    opt = torch.optim.SGD(ref.parameters(), lr=0.3)
    for _ in range(6):
        opt.zero_grad()
        lower(type("P", (), {"outer": lambda self: q["lam0"], "__call__": lambda self: ref()})(),
              None).backward()
        opt.step()
    assert torch.equal(theta, ref.theta.detach())


# --------------------------------------------------------------------------- chains and errors
def test_iterative_bottom_under_implicit_middle_three_levels() -> None:
    """top λ → middle θ₂ (implicit, CG) → bottom θ₃ (unrolled GD); top reads θ₃."""
    g = torch.Generator().manual_seed(5)
    a2 = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE))
    b2 = torch.randn(3, 2, generator=g, dtype=DTYPE)
    q = _quadratic(6)
    b3 = torch.randn(N, 3, generator=g, dtype=DTYPE)
    m1, m2, m3 = Vec([0.3, -0.2]), Vec([0.1, 0.2, 0.3]), Vec(q["theta0"])
    got: list[tuple[torch.Tensor, torch.Tensor]] = []
    k = 4

    class Top(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.bottom() - q["t"]) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append((grads[0].clone(), m3.theta.detach().clone()))

    top = Top("top", m1, torch.optim.SGD(m1.parameters(), lr=0.0))
    mid = zg.ImplicitProblem("middle", m2, torch.optim.SGD(m2.parameters(), lr=0.0),
                             config=zg.Config(type=zg.CG(iterations=3)),
                             training_step=lambda p, b: 0.5 * p() @ a2 @ p() - p() @ (b2 @ p.top()))
    bot = zg.IterativeProblem("bottom", m3, torch.optim.SGD(m3.parameters(), lr=ETA),
                              config=zg.Config(unroll_steps=k),
                              training_step=lambda p, b: 0.5 * p() @ q["A"] @ p()
                              - p() @ (b3 @ p.middle()))
    zg.Engine([top, mid, bot], {"u2l": {top: [mid], mid: [bot]}, "l2u": {bot: [top]}},
              zg.EngineConfig(train_iters=k)).run()
    grad, theta_k = got[0]
    m = torch.eye(N, dtype=DTYPE) - ETA * q["A"]
    d3 = ETA * sum(torch.linalg.matrix_power(m, j) for j in range(k)) @ b3  # dθ₃/dθ₂
    d2 = torch.linalg.solve(a2, b2)  # dθ₂*/dλ
    assert rel_err(grad, d2.T @ d3.T @ (theta_k - q["t"])) <= 1e-10


def test_batchnorm_buffers_follow_training_in_an_unrolled_problem() -> None:
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, dtype=DTYPE), torch.randn(16, dtype=DTYPE)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                              torch.nn.Linear(4, 1)).double()
    ref = copy_module(net)
    hp = Vec([0.0])
    inner = zg.IterativeProblem(
        "inner", net, torch.optim.SGD(net.parameters(), lr=0.05), train_data_loader=[(x, y)],
        config=zg.Config(unroll_steps=3),
        training_step=lambda p, b: ((p(b[0]).squeeze(1) - b[1]) ** 2).mean()
        + p.outer().exp().squeeze() * 1e-3 * sum((w**2).sum() for w in p.module.parameters()),
    )
    outer = zg.ImplicitProblem("outer", hp, torch.optim.SGD(hp.parameters(), lr=0.0),
                               train_data_loader=[(x, y)],
                               training_step=lambda p, b: ((p.inner(b[0]).squeeze(1) - b[1]) ** 2
                                                           ).mean())
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=3)).run()
    opt = torch.optim.SGD(ref.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss = ((ref(x).squeeze(1) - y) ** 2).mean() + 1e-3 * sum(
            (w**2).sum() for w in ref.parameters())
        loss.backward()
        opt.step()
    ref(x)  # the outer's loss passes the batch through BatchNorm once more
    for a, b in zip(net.state_dict().values(), ref.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-14)


def copy_module(m: torch.nn.Module) -> torch.nn.Module:
    import copy

    return copy.deepcopy(m)


def test_forward_mode_refuses_large_upper_problems() -> None:
    q = _quadratic()
    with pytest.raises(zg.ConfigError, match="max_upper_numel=2"):
        _bilevel(zg.Forward(max_upper_numel=2), 2, q=q)
    seen, _, _ = _bilevel(zg.Forward(max_upper_numel=2, allow_large=True), 2, q=q)
    assert rel_err(seen[0][0], _unrolled_closed_form(q, seen[0][1], 2)) <= 1e-10


def test_method_family_must_match_the_problem_class() -> None:
    m = Vec([1.0])
    with pytest.raises(zg.ConfigError, match="'reverse' is a iterative method"):
        zg.ImplicitProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
                           config=zg.Config(type="reverse"))
    with pytest.raises(zg.ConfigError, match="'cg' is a implicit method"):
        zg.IterativeProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
                            config=zg.Config(type="cg"))


def _reinforce_run(seed: int, lam0: torch.Tensor, c: torch.Tensor, k: int, eta: float,
                   upper_steps: int) -> list[torch.Tensor]:
    """Hypergradients of L_out = ⟨c, θ_K⟩ (so v = c does not depend on the draws). With
    roll_back each unroll is retaken after the upper step; the derivative of E⟨c, θ_K⟩ does
    not depend on where the unroll starts."""
    torch.manual_seed(seed)
    inner_m, outer_m = Vec(torch.zeros(3, dtype=DTYPE)), Vec(lam0)
    got: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return (c * self.inner()).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(grads[0].clone())

    class Sampler(zg.IterativeProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            dist = torch.distributions.Bernoulli(probs=torch.sigmoid(self.outer()))
            z = dist.sample()
            self.record_log_prob(dist.log_prob(z))
            return 0.5 * ((self() - z) ** 2).sum()

    inner = Sampler("inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=eta),
                    config=zg.Config(type="reinforce", unroll_steps=k, roll_back=True))
    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0))
    zg.Engine([outer, inner], zg.chain(outer, inner),
              zg.EngineConfig(train_iters=k * upper_steps)).run()
    return got


def test_reinforce_is_unbiased_for_a_sampling_lower_level() -> None:
    """Each step draws z ~ Bernoulli(σ(λ)) and pulls θ towards z: from θ₀ = 0,
    E[θ_K] = (1 − (1−η)^K) σ(λ), so ∇_λ E⟨c, θ_K⟩ = (1 − (1−η)^K) c ⊙ σ'(λ). The mean of
    the estimates (after the baseline has warmed up) lies within 4 standard errors of it."""
    k, eta = 4, 0.5
    lam0 = torch.tensor([-1.0, 0.0, 1.5], dtype=DTYPE)
    c = torch.tensor([1.0, -2.0, 2.0], dtype=DTYPE)
    estimates = [g for seed in range(30) for g in _reinforce_run(seed, lam0, c, k, eta, 25)[5:]]
    stack = torch.stack(estimates)
    p = torch.sigmoid(lam0)
    exact = (1 - (1 - eta) ** k) * c * p * (1 - p)
    mean, se = stack.mean(0), stack.std(0) / stack.shape[0] ** 0.5
    assert bool(((mean - exact).abs() <= 4 * se).all())
    # power: the band excludes zero, so an estimator with mean zero would fail it
    assert bool((4 * se < exact.abs()).all())


def test_reinforce_needs_recorded_log_probabilities() -> None:
    inner_m, outer_m = Vec([0.0]), Vec([0.0])
    inner = zg.IterativeProblem("inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.1),
                                config=zg.Config(type="reinforce"),
                                training_step=lambda p, b: ((p() - p.outer()) ** 2).sum())
    outer = zg.ImplicitProblem("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.1),
                               training_step=lambda p, b: (p.inner() ** 2).sum())
    engine = zg.Engine([outer, inner], zg.chain(outer, inner))
    with pytest.raises(zg.HypergradientError, match="record_log_prob"):
        engine.train_step()


def test_iterative_middle_between_implicit_levels() -> None:
    """top λ (implicit) → middle θ₂ (unrolled GD, K steps) → bottom θ₃ (implicit, CG); the
    top reads θ₃: dL/dλ = (η Σ_k (I − ηA₂)^k B₂)ᵀ (A₃⁻¹B₃)ᵀ (θ₃ − t)."""
    g = torch.Generator().manual_seed(7)
    a2 = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE))
    b2 = torch.randn(3, 2, generator=g, dtype=DTYPE)
    a3 = torch.diag(torch.tensor([2.0, 1.0, 4.0, 3.0], dtype=DTYPE))
    b3 = torch.randn(4, 3, generator=g, dtype=DTYPE)
    t = torch.randn(4, generator=g, dtype=DTYPE)
    m1, m2, m3 = Vec([0.3, -0.2]), Vec([0.1, 0.2, 0.3]), Vec([0.0, 0.1, 0.2, 0.3])
    got: list[tuple[torch.Tensor, torch.Tensor]] = []
    k = 3

    class Top(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.bottom() - t) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append((grads[0].clone(), m3.theta.detach().clone()))

    top = Top("top", m1, torch.optim.SGD(m1.parameters(), lr=0.0))
    mid = zg.IterativeProblem("middle", m2, torch.optim.SGD(m2.parameters(), lr=ETA),
                              config=zg.Config(unroll_steps=k),
                              training_step=lambda p, b: 0.5 * p() @ a2 @ p()
                              - p() @ (b2 @ p.top()))
    bot = zg.ImplicitProblem("bottom", m3, torch.optim.SGD(m3.parameters(), lr=0.05),
                             config=zg.Config(type=zg.CG(iterations=4)),
                             training_step=lambda p, b: 0.5 * p() @ a3 @ p()
                             - p() @ (b3 @ p.middle()))
    zg.Engine([top, mid, bot], {"u2l": {top: [mid], mid: [bot]}, "l2u": {bot: [top]}},
              zg.EngineConfig(train_iters=2 * k)).run()
    assert len(got) == 2
    m = torch.eye(3, dtype=DTYPE) - ETA * a2
    d2 = ETA * sum(torch.linalg.matrix_power(m, j) for j in range(k)) @ b2
    d3 = torch.linalg.solve(a3, b3)
    for grad, theta3 in got:
        assert rel_err(grad, d2.T @ d3.T @ (theta3 - t)) <= 1e-10


def test_top_level_iterative_problem_keeps_no_graph() -> None:
    """With nothing above it, an IterativeProblem takes ordinary steps (no unroll, no graph)."""
    m = Vec([1.0, 2.0])
    single = zg.IterativeProblem("single", m, torch.optim.SGD(m.parameters(), lr=0.5),
                                 training_step=lambda p, b: 0.5 * (p() ** 2).sum())
    engine = zg.Engine([single])
    for _ in range(3):
        engine.train_step()
        assert single._theta is None
    assert torch.allclose(m.theta.detach(), torch.tensor([0.125, 0.25], dtype=DTYPE))
