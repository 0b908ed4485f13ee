"""Whole programs on the device named by ``--device`` (default cpu), against exact answers.

On a GPU machine: ``pytest --device cuda tests/test_device.py`` (``benchmarks/device_suite.sh``
runs it). Every check runs the engine end to end with the parameters on the device and the
data loaders yielding CPU tensors (the engine moves each batch to its problem's device), and
compares in float64 with an answer that does not depend on the device: a closed form, or
(``cross-device`` tests, skipped when the device is the CPU) the same program run on the CPU,
itself tested against closed forms elsewhere. Results must come back on the device.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F

import ziggurat as zg
from ziggurat.data import to_device
from ziggurat.hypergrad import sama

from helpers import DTYPE, Vec
from ridge import Ridge, fit_on, inner_loss_on, make_ridge, rel_err

QUIET = {"summary": False, "progress": "off"}
NOT_CPU = "compares the device with the CPU: needs --device other than cpu"


def _rng_state(device: torch.device) -> torch.Tensor:
    return torch.cuda.get_rng_state(device) if device.type == "cuda" else torch.get_rng_state()


def _ridge_program(r: Ridge, method: Any, device: torch.device, lower_lr: float = 0.0,
                   optimizer: Callable[..., torch.optim.Optimizer] = torch.optim.SGD,
                   offset: float = 0.0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One lower step (from θ* + offset) and one upper step of the ridge program on ``device``, the
    batches handed out on the CPU; returns (hypergradient dL_out/dλ, θ when it was taken)."""
    rd = r.to(device)
    inner_m, outer_m = Vec(r.theta_star() + offset).to(device), Vec(r.lam).to(device)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    cpu_batches = [(r.X, r.y)], [(r.Xv, r.yv)]

    def inner_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        assert b[0].device == p.device, "the engine hands each batch over on the problem's device"
        return inner_loss_on(b, p(), p.outer())

    class Outer(zg.ImplicitProblem):
        def training_step(self, b: Any) -> torch.Tensor:
            return fit_on(b, self.inner())

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append((grads[0].clone(), self.inner.module.theta.detach().clone()))

    inner = zg.ImplicitProblem("inner", inner_m, optimizer(inner_m.parameters(), lr=lower_lr),
                               train_data_loader=cpu_batches[0], training_step=inner_loss,
                               config=zg.Config(type=method))
    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0),
                  train_data_loader=cpu_batches[1])
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=1, **QUIET)).run()
    assert len(seen) == 1
    for t in seen[0]:
        assert t.device == rd.X.device and t.dtype == DTYPE
    return seen


@pytest.mark.parametrize("method", [zg.CG(iterations=6), zg.Neumann(iterations=400),
                                    zg.FixedPoint(iterations=400)], ids=["cg", "neumann",
                                                                        "fixed_point"])
def test_implicit_methods_reach_the_closed_form(device: torch.device,
                                                method: zg.HypergradMethod) -> None:
    """At θ* (lower learning rate 0), CG with dim θ iterations and Neumann / FixedPoint with
    (1 − 1/κ)^400 ≈ 1e-18 left give −diag(e^λ θ*) H⁻¹ v (κ = 10)."""
    r = make_ridge(10.0)
    (grad, theta), = _ridge_program(r, method, device)
    assert rel_err(grad.cpu(), r.implicit_hypergrad(theta.cpu())) <= 1e-9


@pytest.mark.parametrize("mixed", ["exact", "forward", "fd"])
def test_darts_equals_its_definition(device: torch.device, mixed: str) -> None:
    """Darts with scale s: −∂²_{λθ}L_in · s v = −e^λ ⊙ θ ⊙ s v(θ) at the θ after the lower step;
    a central difference of ∇_λL_in = ½ e^λ θ² (quadratic in θ) is exact up to rounding."""
    r = make_ridge(10.0)
    (grad, theta), = _ridge_program(r, zg.Darts(scale=0.3, mixed=mixed), device, lower_lr=0.05,
                                   offset=0.1)
    theta = theta.cpu()
    assert rel_err(theta, r.theta_star() + 0.1) > 1e-3, "the lower step moved θ"
    assert rel_err(grad.cpu(), -r.mixed(theta, 0.3 * r.v(theta))) <= 1e-9


def test_sama_with_sgd_is_darts_scaled_by_the_learning_rate(device: torch.device) -> None:
    """SAMA's P for SGD is the learning rate: −e^λ ⊙ θ ⊙ lr v(θ)."""
    r = make_ridge(10.0)
    (grad, theta), = _ridge_program(r, zg.SAMA(mixed="exact"), device, lower_lr=0.07,
                                   offset=0.1)
    theta = theta.cpu()
    assert rel_err(grad.cpu(), -r.mixed(theta, 0.07 * r.v(theta))) <= 1e-10


def test_sama_with_adam_equals_its_formula(device: torch.device) -> None:
    """One Adam step from zero state with gradient g: u = −lr ĝ/(|g| + ε) (bias-corrected m̂ = g,
    v̂ = g²), so P = ∂u/∂g = −lr ε/(|g| + ε)² elementwise; the hypergradient is
    −e^λ ⊙ θ ⊙ (lr ε/(|g| + ε)² ⊙ v) at θ after the step (SAMA's sign as for SGD above)."""
    r = make_ridge(10.0)
    eps = 1e-3  # large enough that P is not rounded away
    (grad, theta), = _ridge_program(
        r, zg.SAMA(mixed="exact"), device, lower_lr=0.01,
        optimizer=lambda ps, lr: torch.optim.Adam(ps, lr=lr, eps=eps), offset=0.1)
    theta0 = (r.theta_star() + 0.1).requires_grad_()
    g, = torch.autograd.grad(r.inner_loss(theta0, r.lam), theta0)
    theta = theta.cpu()
    assert torch.allclose(theta, theta0.detach() - 0.01 * g / (g.abs() + eps), rtol=1e-12)
    p = 0.01 * eps / (g.abs() + eps) ** 2
    assert rel_err(grad.cpu(), -r.mixed(theta, p * r.v(theta))) <= 1e-9


@pytest.mark.parametrize("mode", ["reverse", "forward"])
def test_unrolled_steps_equal_the_closed_form(device: torch.device, mode: str) -> None:
    """K steps of gradient descent on ½θᵀAθ − θᵀBλ: dL_out/dλ = Bᵀ η Σ_{k<K}(I − ηA)^k (θ_K − t)."""
    g = torch.Generator().manual_seed(0)
    n, m, eta, k = 4, 3, 0.1, 5
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=DTYPE))
    a = q @ torch.diag(torch.linspace(1, 5, n, dtype=DTYPE)) @ q.T
    b, t = torch.randn(n, m, generator=g, dtype=DTYPE), torch.randn(n, generator=g, dtype=DTYPE)
    ad, bd, td = a.to(device), b.to(device), t.to(device)
    inner_m = Vec(torch.randn(n, generator=g, dtype=DTYPE)).to(device)
    outer_m = Vec(torch.randn(m, generator=g, dtype=DTYPE)).to(device)
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return 0.5 * ((self.inner() - td) ** 2).sum()

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            seen.append((grads[0].clone(), self.inner.module.theta.detach().clone()))

    method = zg.Reverse() if mode == "reverse" else zg.Forward()
    inner = zg.IterativeProblem(
        "inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=eta),
        config=zg.Config(type=method, unroll_steps=k),
        training_step=lambda p, _: 0.5 * p() @ ad @ p() - p() @ (bd @ p.outer()))
    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0))
    zg.Engine([outer, inner], zg.chain(outer, inner),
              zg.EngineConfig(train_iters=2 * k, **QUIET)).run()
    assert len(seen) == 2
    steps = torch.eye(n, dtype=DTYPE) - eta * a
    total = sum(torch.linalg.matrix_power(steps, j) for j in range(k))
    for grad, theta_k in seen:
        assert grad.device == outer_m.theta.device
        expected = b.T @ (eta * total @ (theta_k.cpu() - t))
        assert rel_err(grad.cpu(), expected) <= 1e-10


def test_finite_difference_replays_the_devices_dropout_mask(device: torch.device) -> None:
    """Both sides of Darts' central difference see one dropout mask drawn from the device's
    generator, which is left where it was; with independent masks the error is ~100."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Dropout(0.5),
                              torch.nn.Linear(16, 1)).double().to(device)
    weights = torch.full((8,), 0.5, dtype=DTYPE, device=device, requires_grad=True)
    x = torch.randn(8, 5, dtype=DTYPE, device=device)
    y = torch.randn(8, dtype=DTYPE, device=device)
    params = list(net.parameters())
    obj = zg.InnerObjective(params, [weights],
                            lambda: (weights * (net(x).squeeze(1) - y) ** 2).mean())
    v = [torch.randn_like(p) for p in params]
    before = _rng_state(device)
    fd = zg.Darts(mixed="fd")(obj, v)[0]
    assert torch.equal(_rng_state(device), before), "the program's generator must not advance"
    exact = zg.Darts(mixed="exact")(obj, v)[0]
    assert fd.device == weights.device
    assert rel_err(fd, exact) <= 1e-4  # the O(ε²) truncation on this quartic loss: ~3e-5


def _resumable(tmp_path: Path, device: torch.device, iters: int, resume: bool,
               init_seed: int = 0) -> tuple[zg.Engine, torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(init_seed)
    data = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 6, generator=data), torch.randint(0, 3, (64,), generator=data)
    train = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 64, 16)]
    net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    decay = Vec(torch.full((1,), -2.0, dtype=torch.float32))
    net, decay = net.to(device), decay.to(device)
    # roll-back unrolls of 3 steps and a checkpoint every 4: the one at 4 falls inside an
    # unroll, so the resumed run replays a saved batch (on the device again after loading)
    inner = zg.ImplicitProblem(
        "inner", net, torch.optim.Adam(net.parameters(), lr=0.01), train_data_loader=train,
        config=zg.Config(type=zg.CG(iterations=2), unroll_steps=3, roll_back=True),
        training_step=lambda p, b: F.cross_entropy(p(b[0]), b[1]) + p.outer().exp().sum()
        * sum((w**2).sum() for w in p.module.parameters()))
    outer = zg.ImplicitProblem(
        "outer", decay, torch.optim.Adam(decay.parameters(), lr=0.05), train_data_loader=train,
        training_step=lambda p, b: F.cross_entropy(p.inner(b[0]), b[1]))
    engine = zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(
        train_iters=iters, checkpoint_dir=str(tmp_path), checkpoint_step=4, resume=resume,
        **QUIET))
    return engine, net, decay


def test_resumed_run_is_bit_identical_on_the_device(device: torch.device, tmp_path: Path) -> None:
    """8 iterations straight, or 4, a checkpoint on disk, and a new program resuming to 8:
    the same parameters and optimizer state, bit for bit, loaded back onto the device. (The
    resuming program starts from other initial weights: only the checkpoint makes it equal.)"""
    straight, net_a, decay_a = _resumable(tmp_path / "a", device, 8, False)
    straight.run()
    first, _, _ = _resumable(tmp_path / "b", device, 4, False)
    first.run()
    resumed, net_b, decay_b = _resumable(tmp_path / "b", device, 8, True, init_seed=1)
    assert not torch.equal(net_b[0].weight, net_a[0].weight)  # (before resuming)
    resumed.run()
    assert resumed.global_step == 8
    for a, b in zip([*net_a.parameters(), *decay_a.parameters()],
                    [*net_b.parameters(), *decay_b.parameters()]):
        assert b.device == a.device and b.device.type == device.type
        assert torch.equal(a, b)
    opt_a, opt_b = straight.problems[1].optimizer, resumed.problems[1].optimizer
    for pa, pb in zip(net_a.parameters(), net_b.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            assert opt_b.state[pb][key].device == pb.device
            assert torch.equal(opt_a.state[pa][key], opt_b.state[pb][key])


def test_bf16_forward_on_the_device_and_float32_hypergradient(device: torch.device) -> None:
    """precision="bf16": the lower's own forward runs under the device's bf16 autocast, its
    re-evaluation for the hypergradient in float32, and the hypergradient is float32."""
    dtypes: list[torch.dtype] = []
    lin = torch.nn.Linear(4, 1).to(device)
    hp = Vec(torch.zeros(1)).to(device)
    grads: list[torch.Tensor] = []

    def inner_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        out = p(torch.ones(2, 4, device=device))
        dtypes.append(out.dtype)
        return out.float().pow(2).mean() + p.outer().exp().squeeze() * lin.weight.pow(2).sum()

    inner = zg.ImplicitProblem("inner", lin, torch.optim.SGD(lin.parameters(), lr=0.1),
                               config=zg.Config(precision="bf16", type="cg"),
                               training_step=inner_loss)
    outer = zg.ImplicitProblem(
        "outer", hp, torch.optim.SGD(hp.parameters(), lr=0.1),
        training_step=lambda p, b: p.inner(torch.ones(1, 4, device=device)).float().sum())
    outer.grad_callback = lambda g: grads.append(g[0].clone())  # type: ignore[method-assign]
    zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(train_iters=1, **QUIET)).run()
    assert dtypes[:2] == [torch.bfloat16, torch.float32]
    assert grads[0].dtype == torch.float32 and grads[0].device.type == device.type
    assert bool(grads[0].isfinite().all())


class _Pair(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor


def test_batches_move_to_the_device_with_their_containers() -> None:
    """``to_device`` (what ``Problem.batch_to_device`` applies): every tensor at any depth moves
    ("meta" stands in for a second device here), named tuples and dict subclasses keep their
    type, and a batch already on the device is returned itself, not copied."""
    meta = torch.device("meta")
    batch = {"pair": _Pair(torch.ones(2), torch.zeros(3)), "rest": [torch.ones(1), "id", 3],
             "nested": OrderedDict(w=(torch.ones(4),))}
    moved = to_device(batch, meta)
    assert type(moved["pair"]) is _Pair and moved["pair"].x.device == meta
    assert moved["pair"].y.shape == (3,) and moved["rest"][1:] == ["id", 3]
    assert moved["rest"][0].device == meta
    assert type(moved["nested"]) is OrderedDict and moved["nested"]["w"][0].device == meta
    assert batch["pair"].x.device.type == "cpu"  # the loader's batch itself is left alone
    assert to_device(moved, meta) is moved
    keyed = defaultdict(list, {"x": torch.ones(1)})
    assert type(to_device(keyed, meta)) is defaultdict

    class Batch(dict):  # a dict subclass without a copy() of its own
        pass

    assert type(to_device(Batch(x=torch.ones(1)), meta)) is Batch
    t = torch.ones(2)
    twice = to_device((t, [t], "tag"), meta)
    assert twice[0] is twice[1][0]  # one tensor in two places: one copy in both


def test_parameters_on_the_cpu_leave_a_batch_where_the_loader_put_it() -> None:
    """Nothing moves towards the CPU ("meta" stands in for a GPU the loader used)."""
    m = Vec([1.0])
    p = zg.ImplicitProblem("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
                           training_step=lambda p, b: p().sum())
    batch = (torch.ones(2, device="meta"),)
    assert p.batch_to_device(batch, torch.device("cpu")) is batch


def test_every_batch_goes_through_the_hook_also_micro_batches_and_restored_ones(
        tmp_path: Path) -> None:
    """A recording ``batch_to_device``: called with the parameters' device for every
    micro-batch drawn (accumulation) and again for each batch a checkpoint restores (the
    step's and the cut roll-back unroll's), and what it returns is what training_step gets."""
    calls: list[torch.device] = []
    got: list[int] = []

    class Recording(zg.ImplicitProblem):
        def batch_to_device(self, batch: Any, device: torch.device) -> Any:
            calls.append(device)
            return batch if isinstance(batch, tuple) and len(batch) == 3 else (*batch, "seen")

        def training_step(self, b: Any) -> torch.Tensor:
            got.append(len(b))
            x, y, _ = b
            return F.mse_loss(self(x).squeeze(-1), y) + self.outer().exp().sum() * (
                self.module.weight ** 2).sum()

    def program(iters: int, resume: bool) -> zg.Engine:
        torch.manual_seed(0)
        data = [(torch.randn(4, 3), torch.randn(4)) for _ in range(6)]
        lin, hp = torch.nn.Linear(3, 1), Vec(torch.full((1,), -2.0))
        inner = Recording("inner", lin, torch.optim.SGD(lin.parameters(), lr=0.1),
                          train_data_loader=data, config=zg.Config(
                              type="darts", unroll_steps=3, roll_back=True,
                              gradient_accumulation=2))
        outer = zg.ImplicitProblem("outer", hp, torch.optim.SGD(hp.parameters(), lr=0.1),
                                   train_data_loader=data[:1],
                                   training_step=lambda p, b: F.mse_loss(
                                       p.inner(b[0]).squeeze(-1), b[1]))
        return zg.Engine([outer, inner], zg.chain(outer, inner), zg.EngineConfig(
            train_iters=iters, checkpoint_dir=str(tmp_path), checkpoint_step=4,
            resume=resume, **QUIET))

    program(4, False).run()
    drawn = len(calls)
    assert drawn > 0 and set(calls) == {torch.device("cpu")} and set(got) == {3}
    resumed = program(4, True)
    resumed.run()  # (at its last iteration already: only the load runs)
    inner = resumed.problems[1]
    restored = len(calls) - drawn
    saved = sum(len(step) for step in inner._unroll_batches) + len(list(inner.cur_batch))
    assert inner._unroll_batches and restored == saved  # each restored batch went through it


def test_batch_to_device_overridden_keeps_the_batch_where_it_is(device: torch.device) -> None:
    """Overriding ``batch_to_device`` opts out of the move: the loader's CPU batch arrives as
    it is, and the hook is told the parameters' device."""
    seen: list[torch.device] = []
    told: list[torch.device] = []
    m = Vec([1.0, 2.0]).to(device)

    class Keeps(zg.ImplicitProblem):
        def batch_to_device(self, batch: Any, to: torch.device) -> Any:
            told.append(to)
            return batch

        def training_step(self, batch: Any) -> torch.Tensor:
            seen.append(batch.device)
            return (self() * batch.to(self.device)).sum()

    p = Keeps("p", m, torch.optim.SGD(m.parameters(), lr=0.1),
              train_data_loader=[torch.ones(2, dtype=DTYPE)])
    zg.Engine([p], config=zg.EngineConfig(train_iters=1, **QUIET)).run()
    assert seen == [torch.device("cpu")] and told == [m.theta.device]


# ------------------------------------------------------------- the same program on the CPU
class _Reweighting:
    """Meta-Weight-Net's structure in float64: a classifier with a 1024×1024 layer (1.1M
    parameters, so the factored Krylov vectors, forward-mode mixed products and SAMA's
    compiled Adam kernel are all on their large-model paths) trained on V(ℓ_i.detach())·ℓ_i;
    the meta net V judged on a clean batch."""

    def __init__(self, method: Any, optimizer: str, device: torch.device, seed: int = 0) -> None:
        torch.manual_seed(seed)
        g = torch.Generator().manual_seed(seed)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(32, 1024), torch.nn.Tanh(), torch.nn.Linear(1024, 1024),
            torch.nn.Tanh(), torch.nn.Linear(1024, 10)).double()
        self.meta = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(),
                                        torch.nn.Linear(16, 1), torch.nn.Sigmoid()).double()
        self.classifier, self.meta = self.classifier.to(device), self.meta.to(device)
        x = torch.randn(64, 32, generator=g, dtype=DTYPE)
        y = torch.randint(0, 10, (64,), generator=g)
        xv = torch.randn(64, 32, generator=g, dtype=DTYPE)
        yv = torch.randint(0, 10, (64,), generator=g)
        self.grads: list[torch.Tensor] = []
        # Adam's ε = 1e-3: P = ηε/(|g| + ε)² is dominated by the near-zero gradients, and a
        # small ε amplifies the devices' different rounding of g (ε = 1e-8: a relative 1e-14
        # change of the weights moves the hypergradient by 1e-9)
        opt = (torch.optim.Adam(self.classifier.parameters(), lr=1e-3, eps=1e-3)
               if optimizer == "adam" else torch.optim.SGD(self.classifier.parameters(), lr=0.1))

        def weighted(p: zg.Problem, b: Any) -> torch.Tensor:
            losses = F.cross_entropy(p(b[0]), b[1], reduction="none")
            return (p.meta(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

        self.lower = zg.ImplicitProblem("lower", self.classifier, opt,
                                        train_data_loader=[(x, y)], training_step=weighted,
                                        config=zg.Config(type=method))

        class Meta(zg.ImplicitProblem):
            def grad_callback(inner_self, grads: list[torch.Tensor]) -> None:
                self.grads.append(torch.cat([g.reshape(-1) for g in grads]).clone())

        self.upper = Meta("meta", self.meta, torch.optim.SGD(self.meta.parameters(), lr=0.0),
                          train_data_loader=[(xv, yv)],
                          training_step=lambda p, b: F.cross_entropy(p.lower(b[0]), b[1]))

    def run(self, iters: int) -> list[torch.Tensor]:
        zg.Engine([self.upper, self.lower], zg.chain(self.upper, self.lower),
                  zg.EngineConfig(train_iters=iters, **QUIET)).run()
        return self.grads


@pytest.mark.parametrize("method,optimizer", [
    ("darts", "sgd"), ("sama", "adam"), (zg.CG(iterations=3), "sgd"),
    (zg.Neumann(iterations=3, alpha=0.1), "sgd"),
], ids=["darts", "sama-adam", "cg-3", "neumann-3"])
def test_large_model_hypergradients_equal_the_cpus(device: torch.device, method: Any,
                                                   optimizer: str) -> None:
    """Three meta-iterations on the device and on the CPU, float64, same initial state:
    the hypergradients agree to 1e-9 (the CPU's paths are tested against closed forms)."""
    if device.type == "cpu":
        pytest.skip(NOT_CPU)
    on_device = _Reweighting(copy.deepcopy(method), optimizer, device).run(3)
    if method == "sama":  # the compiled Adam kernel ran there (a failed compile falls back)
        assert "kernel_" in sama._compiled and sama._compiled.get("kernel", True) is not None
    on_cpu = _Reweighting(copy.deepcopy(method), optimizer, torch.device("cpu")).run(3)
    assert len(on_device) == len(on_cpu) == 3
    for d, c in zip(on_device, on_cpu):
        assert d.device.type == device.type
        assert rel_err(d.cpu(), c) <= 1e-9, f"{method}: {rel_err(d.cpu(), c):.1e}"


def test_resume_under_accumulation_when_the_batch_could_not_be_saved(tmp_path: Path) -> None:
    """Named-tuple batches are not saved (not plain): the restored micro-batches are None,
    and resuming must not iterate over them (it raised TypeError before)."""
    def program(iters: int, resume: bool) -> zg.Engine:
        m = Vec([1.0, -1.0])
        p = zg.ImplicitProblem(
            "p", m, torch.optim.SGD(m.parameters(), lr=0.1),
            train_data_loader=[_Pair(torch.ones(2, dtype=DTYPE), torch.zeros(2, dtype=DTYPE))],
            config=zg.Config(gradient_accumulation=2),
            training_step=lambda p, b: ((p() - b.x) ** 2).sum())
        return zg.Engine([p], config=zg.EngineConfig(
            train_iters=iters, checkpoint_dir=str(tmp_path), checkpoint_step=2, resume=resume,
            **QUIET))

    program(2, False).run()
    resumed = program(4, True)
    resumed.run()
    assert resumed.global_step == 4 and resumed.problems[0].count == 4
