"""Training systems: accumulation, clipping, precision, schedulers, in every gradient path."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ziggurat as zg

from helpers import DTYPE, Vec
from ridge import fit_on, inner_loss_on, make_ridge, rel_err


def _ridge_program(method: Any, accumulation: int, batches: list[Any], outer_batches: list[Any],
                   upper_accumulation: int = 1, clip: float | None = None,
                   iterative: bool = False) -> tuple[list[torch.Tensor], Vec, Vec]:
    r = make_ridge(10.0)
    inner_m, outer_m = Vec(r.theta_star() + 0.1), Vec(r.lam)
    seen: list[torch.Tensor] = []

    def inner_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        return inner_loss_on(b, p(), p.outer())

    class Outer(zg.ImplicitProblem):
        def training_step(self, b: Any) -> torch.Tensor:
            return fit_on(b, self.inner())

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append(grads[0].clone())

    cls = zg.IterativeProblem if iterative else zg.ImplicitProblem
    inner = cls("inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.05),
                train_data_loader=batches, training_step=inner_loss,
                config=zg.Config(type=method, gradient_accumulation=accumulation,
                                 gradient_clipping=clip, unroll_steps=2 if iterative else 1))
    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.1),
                  train_data_loader=outer_batches,
                  config=zg.Config(gradient_accumulation=upper_accumulation))
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=4)).run()
    return seen, inner_m, outer_m


def _split(x: torch.Tensor, y: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.chunk(n), y.chunk(n)))


@pytest.mark.parametrize("method", ["cg", "neumann", "darts", "sama", "reverse", "forward"])
def test_accumulation_equals_one_step_on_the_concatenated_batch(method: str) -> None:
    """n micro-batches of equal size ≡ one batch of their concatenation, for the lower step,
    the upper step and the hypergradient in between (float64)."""
    r = make_ridge(10.0)
    iterative = method in ("reverse", "forward")
    method_obj: Any = {"cg": zg.CG(iterations=6), "neumann": zg.Neumann(iterations=50)}.get(
        method, method)
    whole, whole_in, whole_out = _ridge_program(method_obj, 1, [(r.X, r.y)], [(r.Xv, r.yv)],
                                                iterative=iterative)
    parts, parts_in, parts_out = _ridge_program(method_obj, 4, _split(r.X, r.y, 4),
                                                _split(r.Xv, r.yv, 2), upper_accumulation=2,
                                                iterative=iterative)
    assert len(whole) == len(parts) > 0
    for a, b in zip(whole, parts):
        assert rel_err(b, a) <= 1e-12
    assert rel_err(parts_in.theta.detach(), whole_in.theta.detach()) <= 1e-12
    assert rel_err(parts_out.theta.detach(), whole_out.theta.detach()) <= 1e-12


@pytest.mark.parametrize("iterative", [False, True])
def test_clipping_bound_holds_on_the_final_gradient(iterative: bool) -> None:
    """The gradient handed to the optimizer (hypergradient included) has norm ≤ the bound,
    and equals the unclipped one rescaled."""
    r = make_ridge(10.0)
    steps: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recorder(torch.optim.SGD):
        def step(self, closure: Any = None) -> Any:  # type: ignore[override]
            for group in self.param_groups:
                for p in group["params"]:
                    steps.append((p.detach().clone(), p.grad.detach().clone()))
            return super().step(closure)

    m = Vec(r.lam)
    inner_m = Vec(r.theta_star() + 2.0)
    inner = (zg.IterativeProblem if iterative else zg.ImplicitProblem)(
        "inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.05),
        train_data_loader=[(r.X, r.y)], config=zg.Config(type="reverse" if iterative else "cg"),
        training_step=lambda p, b: 0.5 * ((b[0] @ p() - b[1]) ** 2).mean()
        + 0.5 * (p.outer().exp() * p() ** 2).sum(),
    )
    outer = zg.ImplicitProblem(
        "outer", m, Recorder(m.parameters(), lr=0.1), train_data_loader=[(r.Xv, r.yv)],
        config=zg.Config(gradient_clipping=0.01),
        training_step=lambda p, b: 10.0 * ((b[0] @ p.inner() - b[1]) ** 2).mean(),
    )
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=3)).run()
    assert len(steps) == 3
    for _, grad in steps:
        assert float(grad.norm()) <= 0.01 * (1 + 1e-12)
        assert float(grad.norm()) > 0.009  # the raw gradient was larger: it was clipped


def test_clipping_inside_an_unrolled_step_is_differentiated() -> None:
    """With clipping active in the lower's steps the unrolled hypergradient still equals
    a central difference of the whole (clipped) program."""
    q = make_ridge(10.0)
    lam0 = q.lam.clone()

    def run(lam: torch.Tensor, record: list[torch.Tensor] | None) -> float:
        inner_m, outer_m = Vec(q.theta_star() + 1.0), Vec(lam)

        class Outer(zg.ImplicitProblem):
            def training_step(self, b: Any) -> torch.Tensor:
                return 0.5 * ((b[0] @ self.inner() - b[1]) ** 2).mean()

            def grad_callback(self, grads: list[torch.Tensor]) -> None:
                if record is not None:
                    record.append(grads[0].clone())

        inner = zg.IterativeProblem(
            "inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.1),
            train_data_loader=[(q.X, q.y)], config=zg.Config(unroll_steps=3,
                                                             gradient_clipping=0.5),
            training_step=lambda p, b: 0.5 * ((b[0] @ p() - b[1]) ** 2).mean()
            + 0.5 * (p.outer().exp() * p() ** 2).sum(),
        )
        outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0),
                      train_data_loader=[(q.Xv, q.yv)])
        zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=3)).run()
        with torch.no_grad():
            return float(0.5 * ((q.Xv @ inner_m.theta - q.yv) ** 2).mean())

    got: list[torch.Tensor] = []
    run(lam0, got)
    h = 1e-6
    for i in range(lam0.numel()):
        e = torch.zeros_like(lam0)
        e[i] = h
        fd = (run(lam0 + e, None) - run(lam0 - e, None)) / (2 * h)
        assert float(got[0][i]) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_bf16_on_cpu_reaches_the_float32_loss() -> None:
    """A small bilevel classification run in bf16 autocast ends within 5 % (relative) of the
    float32 run's validation loss; the hypergradient arithmetic stays in float32."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x = torch.tensor(data.data, dtype=torch.float32)
    x = (x - x.mean(0)) / x.std(0)
    y = torch.tensor(data.target, dtype=torch.float32)
    train, val = [(x[:300], y[:300])], [(x[300:], y[300:])]

    def run(precision: str) -> float:
        torch.manual_seed(0)
        net = torch.nn.Sequential(torch.nn.Linear(30, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
        hp = Vec(torch.full((1,), -3.0))
        inner = zg.ImplicitProblem(
            "inner", net, torch.optim.SGD(net.parameters(), lr=0.1), train_data_loader=train,
            config=zg.Config(type=zg.CG(iterations=3), precision=precision),
            training_step=lambda p, b: F.binary_cross_entropy_with_logits(
                p(b[0]).squeeze(-1).float(), b[1])
            + p.outer().exp().squeeze() * sum((w**2).sum() for w in p.module.parameters()),
        )
        outer = zg.ImplicitProblem(
            "outer", hp, torch.optim.Adam(hp.parameters(), lr=0.05), train_data_loader=val,
            config=zg.Config(precision=precision),
            training_step=lambda p, b: F.binary_cross_entropy_with_logits(
                p.inner(b[0]).squeeze(-1).float(), b[1]),
        )
        zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=200)).run()
        with torch.no_grad():
            return float(F.binary_cross_entropy_with_logits(net(x[300:]).squeeze(-1), y[300:]))

    fp32, bf16 = run("fp32"), run("bf16")
    assert bf16 == pytest.approx(fp32, rel=0.05)
    assert fp32 < 0.2  # the run learned something (baseline loss of a constant ≈ 0.66)


def test_bf16_autocast_is_really_used_for_the_problems_own_forward() -> None:
    dtypes: list[torch.dtype] = []
    lin = torch.nn.Linear(4, 1)
    hp = Vec(torch.zeros(1))

    def inner_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        out = p(torch.ones(2, 4))
        dtypes.append(out.dtype)
        return out.float().pow(2).mean() + p.outer().exp().squeeze() * lin.weight.pow(2).sum()

    inner = zg.ImplicitProblem("inner", lin, torch.optim.SGD(lin.parameters(), lr=0.1),
                               config=zg.Config(precision="bf16", type="cg"),
                               training_step=inner_loss)
    outer = zg.ImplicitProblem("outer", hp, torch.optim.SGD(hp.parameters(), lr=0.1),
                               training_step=lambda p, b: p.inner(torch.ones(1, 4)).float().sum())
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=1)).run()
    # the lower's own step in bf16; its re-evaluation for the hypergradient in float32
    assert dtypes[0] == torch.bfloat16 and dtypes[1] == torch.float32


def test_fp16_is_refused_on_cpu_with_the_fix() -> None:
    m = Vec([1.0])
    p = zg.ImplicitProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
                           config=zg.Config(precision="fp16"),
                           training_step=lambda p, b: p().sum())
    with pytest.raises(zg.ConfigError, match="'bf16' or 'fp32'"):
        zg.Engine([p])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 loss scaling needs CUDA")
def test_fp16_loss_scaling_on_cuda() -> None:  # pragma: no cover - needs a GPU
    m = Vec([1.0, -2.0]).cuda().float()
    p = zg.ImplicitProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
                           config=zg.Config(precision="fp16"),
                           training_step=lambda p, b: (p() ** 2).sum())
    zg.Engine([p], config=zg.EngineConfig(train_iters=5)).run()
    assert torch.allclose(m.theta.detach().cpu(), torch.tensor([1.0, -2.0]) * 0.8**5, rtol=1e-3)


def test_dynamic_loss_scaler_backs_off_and_grows() -> None:
    from ziggurat.systems import DynamicLossScaler

    s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    s.update(False)
    assert s.scale == 4.0
    s.update(True)
    s.update(True)
    assert s.scale == 8.0
    restored = DynamicLossScaler()
    restored.load_state_dict(s.state_dict())
    assert restored.scale == 8.0 and restored.good_steps == 0


# --------------------------------------------------------------------------- schedulers
SCHEDULERS = {
    "step": lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "onecycle": lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=10),
    "sequential": lambda o: torch.optim.lr_scheduler.SequentialLR(
        o, [torch.optim.lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=3),
            torch.optim.lr_scheduler.ExponentialLR(o, gamma=0.9)], milestones=[3]),
    "cosine_restarts": lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, T_0=3),
    "cyclic": lambda o: torch.optim.lr_scheduler.CyclicLR(o, base_lr=0.01, max_lr=0.1,
                                                          step_size_up=2),
    "plateau": lambda o: torch.optim.lr_scheduler.ReduceLROnPlateau(o, patience=0, factor=0.5),
    "lambda": lambda o: torch.optim.lr_scheduler.LambdaLR(o, lambda k: 1.0 / (k + 1)),
    "polynomial": lambda o: torch.optim.lr_scheduler.PolynomialLR(o, total_iters=8),
}


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
@pytest.mark.parametrize("iterative", [False, True])
def test_every_scheduler_kind_is_stepped_once_per_problem_step(name: str, iterative: bool
                                                               ) -> None:
    """The learning rates a problem uses equal those of a hand-written loop with the same
    scheduler (ReduceLROnPlateau fed the problem's loss)."""
    def loss_at(k: int, w: torch.Tensor) -> torch.Tensor:
        return ((w - torch.tensor([3.0, -1.0], dtype=DTYPE)) ** 2).sum() * (1.0 + 0.1 * (k % 3))

    m = Vec([0.0, 0.0])
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    lrs: list[float] = []
    counter = {"k": 0}

    def step_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        lrs.append(p.optimizer.param_groups[0]["lr"])
        k = counter["k"]
        counter["k"] += 1
        return loss_at(k, p())

    cls = zg.IterativeProblem if iterative else zg.ImplicitProblem
    problem = cls("p", m, opt, scheduler=SCHEDULERS[name](opt), training_step=step_loss)
    zg.Engine([problem], config=zg.EngineConfig(train_iters=8)).run()

    ref = Vec([0.0, 0.0])
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    ref_sched = SCHEDULERS[name](ref_opt)
    ref_lrs = []
    for k in range(8):
        ref_lrs.append(ref_opt.param_groups[0]["lr"])
        ref_opt.zero_grad()
        loss = loss_at(k, ref())
        loss.backward()
        ref_opt.step()
        if name == "plateau":
            ref_sched.step(float(loss.detach()))
        else:
            ref_sched.step()
    assert lrs == pytest.approx(ref_lrs, rel=1e-15)
    assert rel_err(m.theta.detach(), ref.theta.detach()) <= 1e-12


def test_plateau_scheduler_fed_by_a_named_metric() -> None:
    m = Vec([0.0])
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5, mode="max")
    problem = zg.ImplicitProblem(
        "p", m, opt, scheduler=sched, config=zg.Config(scheduler_metric="acc"),
        training_step=lambda p, b: {"loss": (p() ** 2).sum(), "acc": 0.5},
    )
    zg.Engine([problem], config=zg.EngineConfig(train_iters=3)).run()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**2)  # acc never improved
    bad = zg.ImplicitProblem("q", Vec([0.0]), None, config=zg.Config(scheduler_metric="nope"))
    bad.optimizer = torch.optim.SGD(bad.module.parameters(), lr=0.1)
    bad.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(bad.optimizer)
    bad._training_step_fn = lambda p, b: (p() ** 2).sum()
    with pytest.raises(zg.ConfigError, match="scheduler_metric"):
        zg.Engine([bad]).run()
