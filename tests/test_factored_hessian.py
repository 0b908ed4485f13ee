"""Hessian-vector products with linear layers' entries as thin factors
(``ziggurat.hypergrad.factored_hessian`` and ``lowrank``).

Everything runs in float64 and is compared with the dense double backward (the factored path
switched off) to 1e-12; every test also checks that the factored path was taken, so that it
can fail. The models are small, so ``MIN_ENTRIES`` is lowered to watch their weights.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ziggurat as zg
from ziggurat.hypergrad import base, factored, factored_hessian, linalg
from ziggurat.hypergrad.lowrank import FactorSum

DTYPE = torch.float64
BATCH, IN, HID, OUT = 4, 30, 64, 3
TOL = 1e-12


@pytest.fixture(autouse=True)
def _small_models(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(factored_hessian, "MIN_ENTRIES", 1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(old)


def rel(a: Any, b: Any) -> float:
    """Relative error of a against b, entry lists or tensors (factors formed)."""
    a = linalg.densify(list(a) if isinstance(a, list | tuple) else [a])
    b = linalg.densify(list(b) if isinstance(b, list | tuple) else [b])
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / den


# --- FactorSum algebra against the matrices -------------------------------------------------

#: the fixed side of slot ("a", 0), shared by every sum (as one graph's slot would be)
FIXED = torch.randn(2, 30, generator=torch.Generator().manual_seed(0), dtype=DTYPE)


def random_sum(seed: int, shape: tuple[int, int] = (40, 30), rest: bool = False) -> FactorSum:
    gen = torch.Generator().manual_seed(seed)
    like = torch.empty(shape)
    terms = {("a", 0): (FIXED, torch.randn(2, shape[0], generator=gen), True),
             ("b", seed): (torch.randn(1, shape[1], generator=gen),
                           torch.randn(1, shape[0], generator=gen), False)}
    r = torch.randn(shape, generator=gen) if rest else None
    return FactorSum(terms, r, like)


@pytest.mark.parametrize("rest", [False, True])
def test_factor_sum_algebra_matches_matrices(rest: bool) -> None:
    a, b = random_sum(1, rest=rest), random_sum(2)
    da, db = a.dense(), b.dense()
    rows_in, rows_out = torch.randn(3, 30), torch.randn(3, 40)
    assert rel(a.right_product(rows_in), rows_in @ da.t()) < TOL
    assert rel(a.left_product(rows_out), rows_out @ da) < TOL
    assert rel(a.scaled(-0.3), -0.3 * da) < TOL
    assert rel(a.dot(b), (da * db).sum()) < TOL
    assert rel(b.dot(a), (da * db).sum()) < TOL
    assert rel(a.dot(db), (da * db).sum()) < TOL
    assert rel(a.dot(a), (da * da).sum()) < TOL
    # a slot both sums hold merges: its fixed side is kept, the varying sides add
    c = a.copy().add_(b, torch.tensor(0.7))
    assert rel(c, da + 0.7 * db) < TOL
    assert len(c.terms) == 3 and c.terms[("a", 0)][0] is a.terms[("a", 0)][0]
    assert rel(a, da) == 0.0  # the copy left a alone
    assert rel(c.copy().add_(db, -1.0), da + 0.7 * db - db) < TOL


def test_factor_sum_collapses_when_factors_stop_paying() -> None:
    """r (in + out) >= in · out: the sum becomes its matrix (2 × 2 with 1 + 1 rows each)."""
    like = torch.empty(2, 2)
    a = FactorSum({0: (torch.ones(1, 2), torch.ones(1, 2), True)}, None, like)
    b = FactorSum({1: (torch.ones(1, 2), 2 * torch.ones(1, 2), True)}, None, like)
    c = a.copy().add_(b)
    assert c.terms == {} and c.rest is not None
    assert rel(c, 3 * torch.ones(2, 2)) < TOL


def test_linalg_mixes_factored_and_dense_entries() -> None:
    a, b = random_sum(3), random_sum(4, rest=True)
    t, u = torch.randn(6), torch.randn(6)
    xs, ys = [a, t], [b, u]
    dense = [a.dense(), t], [b.dense(), u]
    assert rel(linalg.dot(xs, ys), (a.dense() * b.dense()).sum() + t @ u) < TOL
    assert rel(linalg.norm(xs), torch.cat([a.dense().reshape(-1), t]).norm()) < TOL
    assert rel(linalg.axpy(0.5, xs, ys), linalg.axpy(0.5, *dense)) < TOL
    assert rel(linalg.scale(2.0, xs), linalg.scale(2.0, dense[0])) < TOL
    out = [a.dense(), u.clone()]  # a dense entry meeting a FactorSum is replaced
    linalg.axpy_(torch.tensor(-1.5), [b, t], out)
    assert isinstance(out[0], FactorSum)
    assert rel(out, [a.dense() - 1.5 * b.dense(), u - 1.5 * t]) < TOL
    z = linalg.zeros_like(xs)
    assert isinstance(z[0], FactorSum) and float(linalg.norm(z)) == 0.0


# --- products of the factored graph against double backward ---------------------------------

def mlp(seed: int = 0, bias: bool = True) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID, bias=bias), torch.nn.Tanh(),
                               torch.nn.Linear(HID, HID, bias=bias), torch.nn.Softplus(),
                               torch.nn.Linear(HID, OUT, bias=bias))


def weighted_ce(module: torch.nn.Module, lam: Tensor,
                shape: tuple[int, ...] = (BATCH, IN)) -> Callable[[], Tensor]:
    """mean_i σ(λ_i) ℓ_i: λ enters the lower loss through per-sample weights."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(shape, generator=gen)
    y = torch.randint(0, OUT, shape[:-1], generator=gen)

    def loss() -> Tensor:
        logits = module(x).reshape(-1, OUT)
        per = F.cross_entropy(logits, y.reshape(-1), reduction="none")
        return (torch.sigmoid(lam) * per.reshape(lam.shape[0], -1).mean(1)).mean()

    return loss


def objective(module: torch.nn.Module, loss: Callable[[], Tensor],
              upper: list[Tensor]) -> zg.InnerObjective:
    return zg.InnerObjective(list(module.parameters()), upper, loss, module=module)


def check_products(obj: zg.InnerObjective, factored_keys: int) -> None:
    """H v, H (H v) with the factored product as the cotangent, hvp_and_mixed and mixed all
    agree with the dense curvature; ``factored_keys`` weights took factored cotangents."""
    fac, dense = base.Curvature(obj, factored=True), base.Curvature(obj)
    gen = torch.Generator().manual_seed(9)
    v = [torch.randn(p.shape, generator=gen) for p in obj.params]
    hv = fac.hvp(v)
    assert any(isinstance(t, FactorSum) for t in hv)
    assert len(fac._factored) == factored_keys
    ref = dense.hvp(v)
    assert rel(hv, ref) < TOL
    assert rel(fac.hvp(hv), dense.hvp(ref)) < TOL
    h2, m2 = fac.hvp_and_mixed(hv)
    r2, rm2 = dense.hvp_and_mixed(ref)
    assert rel(h2, r2) < TOL and rel(m2, rm2) < TOL
    assert rel(fac.mixed(h2), dense.mixed(r2)) < TOL


def test_products_on_an_mlp() -> None:
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    check_products(objective(module, weighted_ce(module, lam), [lam]), factored_keys=2)


def test_products_without_bias_and_on_sequences() -> None:
    """Rows of a (batch, time, features) input; layers without bias."""
    module, lam = mlp(bias=False), torch.randn(2, requires_grad=True)
    check_products(objective(module, weighted_ce(module, lam, shape=(2, 2, IN)), [lam]),
                   factored_keys=2)


def test_products_with_a_tied_weight() -> None:
    """One weight in two layers: its gradient is the sum of two factored nodes."""
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    extra = torch.nn.Linear(HID, HID)
    extra.weight = module[2].weight
    tied = torch.nn.Sequential(*module[:4], extra, torch.nn.Tanh(), module[4])
    check_products(objective(tied, weighted_ce(tied, lam), [lam]), factored_keys=2)


def test_products_with_a_weight_used_elsewhere() -> None:
    """λ-weighted decay on one weight: that weight takes dense cotangents (its gradient has
    a node that is not factored), and every product stays exact."""
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    decay = torch.tensor(0.3, requires_grad=True)
    data_loss = weighted_ce(module, lam)

    def loss() -> Tensor:
        return data_loss() + decay * module[2].weight.pow(2).sum()

    check_products(objective(module, loss, [lam, decay]), factored_keys=1)


def test_products_with_an_input_gradient_penalty() -> None:
    """The loss takes its own create_graph gradient (a penalty on ∂ℓ/∂x): the factored
    functions are F.linear's usual derivative there, and the result is still exact."""
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(BATCH, IN, generator=gen, requires_grad=True)

    def loss() -> Tensor:
        out = module(x).pow(2).sum(1)
        (gx,) = torch.autograd.grad(out.sum(), x, create_graph=True)
        return (torch.sigmoid(lam) * (out + gx.pow(2).sum(1))).mean()

    check_products(objective(module, loss, [lam]), factored_keys=0)


def test_products_with_lambda_inside_the_network() -> None:
    """λ scales a hidden activation (so the mixed product also runs through the layers)."""
    module = mlp()
    lam = torch.randn(HID, requires_grad=True)
    gen = torch.Generator().manual_seed(7)
    x, y = torch.randn(BATCH, IN, generator=gen), torch.randn(BATCH, OUT, generator=gen)

    def loss() -> Tensor:
        h = module[1](module[0](x)) * lam
        return F.mse_loss(module[4](module[3](module[2](h))), y)

    check_products(objective(module, loss, [lam]), factored_keys=2)


def factorisation_objective() -> zg.InnerObjective:
    """U is the input of one F.linear (U Vᵀ) and the weight of another (z Uᵀ); no biases,
    so every entry of every vector is factored."""
    gen = torch.Generator().manual_seed(12)
    u = (0.1 * torch.randn(8, 300, generator=gen)).requires_grad_()
    w = (0.1 * torch.randn(400, 300, generator=gen)).requires_grad_()
    lam = torch.randn(8, 400, generator=gen).requires_grad_()
    target, z = torch.randn(8, 400, generator=gen), torch.randn(2, 300, generator=gen)

    def loss() -> Tensor:
        h = F.linear(z, u)
        return (0.5 * ((F.linear(u, w) - target) ** 2 * torch.sigmoid(lam)).sum()
                + 0.5 * h.pow(2).sum() + torch.tanh(h).sum())

    return zg.InnerObjective([u, w], [lam], loss)


def test_products_with_a_weight_that_is_also_an_input() -> None:
    """U's gradient sums its own g_U and the dx of the call it feeds: not only weight
    gradients, so U takes dense cotangents (W factored ones), and products stay exact."""
    check_products(factorisation_objective(), factored_keys=1)


# --- the solvers: factored against dense, through the method call ----------------------------

METHODS = [zg.Neumann(iterations=3, alpha=0.5), zg.Neumann(iterations=2),
           zg.CG(iterations=4), zg.CG(iterations=3, damping=0.1), zg.CG(iterations=5, tol=1e-8)]


@pytest.mark.parametrize("method", METHODS, ids=repr)
@pytest.mark.parametrize("factored_v", [False, True])
def test_methods_agree_with_dense(monkeypatch: pytest.MonkeyPatch,
                                  method: zg.HypergradMethod, factored_v: bool) -> None:
    """The whole call (v dense, or v's weights as the upper gradient's factors) equals the
    dense method's result; the solve really ran on factored products."""
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    obj = objective(module, weighted_ce(module, lam), [lam])
    compare_with_dense(monkeypatch, method, obj, factored_v)


@pytest.mark.parametrize("method", METHODS, ids=repr)
def test_methods_with_every_entry_factored(monkeypatch: pytest.MonkeyPatch,
                                           method: zg.HypergradMethod) -> None:
    compare_with_dense(monkeypatch, method, factorisation_objective(), factored_v=True)


def compare_with_dense(monkeypatch: pytest.MonkeyPatch, method: zg.HypergradMethod,
                       obj: zg.InnerObjective, factored_v: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    rows = 2
    v: list[Any] = []
    for p in obj.params:
        if factored_v and p.dim() == 2:
            v.append(factored.LinearFactors(torch.randn(rows, p.shape[1], generator=gen),
                                            torch.randn(rows, p.shape[0], generator=gen),
                                            None, p.shape))
        else:
            v.append(torch.randn(p.shape, generator=gen))
    taken = []
    real = factored_hessian.HessianCapture.take

    def spy(self: Any, key: Any, rest: Any, like: Tensor) -> Any:
        out = real(self, key, rest, like)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(factored_hessian.HessianCapture, "take", spy)
    assert method.accepts_factors(obj)
    got = method(obj, v)
    assert any(taken)
    monkeypatch.setattr(factored, "ENABLED", False)
    assert not method.accepts_factors(obj)
    ref = method(obj, factored.densify(v))
    assert rel(got, ref) < TOL


def test_fixed_point_and_subclasses_stay_dense() -> None:
    """Only the built-in Krylov solves take factored vectors."""

    class MyCG(zg.CG):
        def solve(self, objective: Any, v: Any, curvature: Any) -> Any:
            return super().solve(objective, v, curvature)

    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    obj = objective(module, weighted_ce(module, lam), [lam])
    assert zg.CG().accepts_factors(obj) and zg.Neumann().accepts_factors(obj)
    class MyMixedCG(zg.CG):
        def solve_mixed(self, objective: Any, v: Any, curvature: Any) -> Any:
            return super().solve_mixed(objective, v, curvature)

    for method in (zg.FixedPoint(), MyCG(), MyMixedCG(), zg.CG(mixed="fd"),
                   zg.Neumann(mixed="forward")):
        assert not method.accepts_factors(obj), method
    from ziggurat.compat.betty.hypergradient import BettyNeumann
    assert BettyNeumann(alpha=0.1).accepts_factors(obj)


def test_power_iteration_state_holds_tensors(monkeypatch: pytest.MonkeyPatch) -> None:
    """Neumann's α estimate keeps its last power iterate between calls: as tensors (a
    checkpoint saves them with weights_only; factors would hold the call's activations)."""
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    obj = objective(module, weighted_ce(module, lam), [lam])
    v = [torch.randn(p.shape) for p in obj.params]
    got = zg.Neumann(iterations=2, alpha_refresh=1)(obj, v)
    assert all(type(t) is Tensor for t in obj.state["neumann"]["vector"])
    monkeypatch.setattr(factored, "ENABLED", False)
    dense_obj = objective(module, weighted_ce(module, lam), [lam])
    assert rel(got, zg.Neumann(iterations=2, alpha_refresh=1)(dense_obj, v)) < TOL


def test_hooked_and_repeated_weights_are_not_watched(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor hook (a pruning mask) must see the weight's whole gradient, and a weight
    listed twice gets both products: such weights stay on double backward, exactly."""
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    mask = (torch.arange(HID * IN).reshape(HID, IN) % 3 != 0).to(DTYPE)
    module[0].weight.register_hook(lambda g: g * mask)
    params = [*module.parameters(), module[2].weight]
    obj = zg.InnerObjective(params, [lam], weighted_ce(module, lam), module=module)
    capture = factored_hessian.HessianCapture(dict(enumerate(params)))
    assert sorted(capture._keys.values()) == [4]  # only the last layer's weight
    v = [torch.randn(p.shape) for p in params]
    # (Neumann: the masked H is not symmetric, and CG's curvature guard may stop at once)
    got = zg.Neumann(iterations=3, alpha=0.1)(obj, v)
    monkeypatch.setattr(factored, "ENABLED", False)
    ref = zg.Neumann(iterations=3, alpha=0.1)(obj, v)
    assert float(ref[0].norm()) > 0 and rel(got, ref) < TOL


def test_autocast_inside_the_loss_steps_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    """A loss that turns autocast on computes its linear layers in bfloat16: the factored
    functions step aside there (their backward would mix dtypes), as the dense path."""
    torch.set_default_dtype(torch.float32)  # (the fixture restores it)
    module, lam = mlp(), torch.randn(BATCH, requires_grad=True)
    loss = weighted_ce(module, lam)

    def autocast_loss() -> Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss().float()

    obj = zg.InnerObjective(list(module.parameters()), [lam], autocast_loss, module=module)
    v = [torch.randn(p.shape, dtype=torch.float32) for p in obj.params]
    got = zg.Neumann(iterations=2, alpha=0.5)(obj, v)
    monkeypatch.setattr(factored, "ENABLED", False)
    assert rel(got, zg.Neumann(iterations=2, alpha=0.5)(obj, v)) == 0.0


# --- a whole program ----------------------------------------------------------------------

def reweighting_run(method: zg.HypergradMethod, steps: int = 3) -> list[Tensor]:
    """The reweighting program of the benchmarks, small: the meta net's parameters after
    ``steps`` meta-iterations."""
    module = mlp()
    torch.manual_seed(1)
    meta = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1),
                               torch.nn.Sigmoid())

    def batch(seed: int) -> tuple[Tensor, Tensor]:
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(BATCH, IN, generator=gen), torch.randint(0, OUT, (BATCH,),
                                                                      generator=gen)

    def lower_loss(p: Any, b: tuple[Tensor, Tensor]) -> Tensor:
        losses = F.cross_entropy(p.module(b[0]), b[1], reduction="none")
        w = p.meta.module(losses.detach().unsqueeze(1)).squeeze(1)
        return (w * losses).mean()

    lower = zg.ImplicitProblem(
        name="classifier", module=module,
        optimizer=torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=[batch(2), batch(3)], config=zg.Config(type=method),
        training_step=lower_loss)
    upper = zg.ImplicitProblem(
        name="meta", module=meta, optimizer=torch.optim.SGD(meta.parameters(), lr=0.5),
        train_data_loader=[batch(4)],
        training_step=lambda p, b: F.cross_entropy(p.classifier(b[0]), b[1]))
    engine = zg.Engine([upper, lower], zg.chain(upper, lower),
                       zg.EngineConfig(train_iters=steps, summary=False, progress="off"))
    engine.run()
    return [p.detach().clone() for p in meta.parameters()]


@pytest.mark.parametrize("method", [zg.Neumann(iterations=3, alpha=0.5), zg.CG(iterations=3)],
                         ids=repr)
def test_engine_program_agrees_with_dense(monkeypatch: pytest.MonkeyPatch,
                                          method: zg.HypergradMethod) -> None:
    """Upper gradient as factors (the upper's backward never forms ∂L/∂W), factored
    products, the fused mixed product: the meta net after 3 steps equals the dense run's."""
    seen: list[int] = []
    real = base.HypergradMethod.__call__

    def spy(self: Any, objective: Any, v: Any) -> Any:
        seen.append(sum(isinstance(t, factored.LinearFactors) for t in v))
        return real(self, objective, v)

    monkeypatch.setattr(base.HypergradMethod, "__call__", spy)
    got = reweighting_run(method)
    assert max(seen) == 2  # the two large weights' upper gradients came as factors
    monkeypatch.setattr(factored, "ENABLED", False)
    seen.clear()
    ref = reweighting_run(method)
    assert max(seen) == 0
    assert rel(got, ref) < TOL


# --- dot products of sums whose terms cancel ------------------------------------------------


def test_dot_of_a_cancelled_sum_is_formed_as_a_matrix() -> None:
    """r = v − v' with v' = v + δ (as a CG residual near convergence): the Gram product of
    the factors is noise at ‖r‖² ≈ 1e-20 ‖v‖², ``linalg.dot`` forms the matrix instead."""
    gen = torch.Generator().manual_seed(3)
    x, d = torch.randn(3, 30, generator=gen), torch.randn(3, 40, generator=gen)
    like = torch.empty(40, 30)
    delta = 1e-10 * torch.randn(3, 40, generator=gen)
    v = FactorSum({("v", 0): (x, d, True)}, None, like)
    ap = FactorSum({("h", 0): (x.clone(), d + delta, True)}, None, like)  # another slot
    r = v.copy().add_(ap, -1.0)
    # (d − fl(d + δ) is exact; forming r costs ~1e-16 ‖v‖ per entry, 1e-6 of ‖r‖ here, as
    # the dense CG's r = v − αAp would)
    exact = float(((d - (d + delta)).t().mm(x)).pow(2).sum())
    value, error = r.dot_and_error(r)
    assert abs(float(value) - exact) > 0.5 * exact  # the factored value is noise here,
    assert float(error) > 1e-3 * exact  # its error estimate says so ...
    got = float(linalg.dot([r], [r]))
    assert abs(got - exact) < 1e-5 * exact  # ... and linalg.dot does not use it
    plain = random_sum(5)  # no cancellation: the factored value stands
    square = float(plain.dense().pow(2).sum())
    assert abs(float(linalg.dot([plain], [plain])) - square) < 1e-12 * square


@pytest.mark.parametrize("method", [zg.CG(iterations=3, damping=0.1), zg.CG(iterations=3),
                                    zg.CG(iterations=4, tol=1e-10)], ids=repr)
def test_cg_past_convergence_against_the_closed_form(monkeypatch: pytest.MonkeyPatch,
                                                     method: zg.CG) -> None:
    """L_in = softplus(s) Σ‖p‖² on an MLP: H = 2 softplus(s) I, so CG converges in one
    iteration and its later ones run on a residual whose factored terms cancel. The result
    is the closed form −2σ(s) <θ, v> / (2 softplus(s) + damping) for v with factored
    weight entries (with the Gram dot alone, 9 of these 40 v were off by 5x to 2700x)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(40, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
    s = torch.tensor(-1.0, requires_grad=True)
    params = list(net.parameters())
    worst = 0.0
    for seed in range(40):
        gen = torch.Generator().manual_seed(seed)
        v: list[Any] = [factored.LinearFactors(torch.randn(4, 40, generator=gen),
                                               0.1 * torch.randn(4, 64, generator=gen),
                                               None, params[0].shape)]
        v += [0.1 * torch.randn(p.shape, generator=gen) for p in params[1:]]
        obj = zg.InnerObjective(params, [s], lambda: F.softplus(s) * sum(
            p.pow(2).sum() for p in params))
        assert method.accepts_factors(obj)
        (got,) = method(obj, v)
        dense_v = factored.densify(v)
        exact = (-2 * torch.sigmoid(s) * sum((p * x).sum() for p, x in zip(params, dense_v))
                 / (2 * F.softplus(s) + method.damping))
        worst = max(worst, abs(float(got) - float(exact)) / abs(float(exact)))
    assert worst < 1e-12
