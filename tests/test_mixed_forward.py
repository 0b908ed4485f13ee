"""The forward-mode mixed product ∂²_{λθ} L_in · x = ∇_λ D_θ L_in[x] (reverse over
forward): exact against closed forms and against double backward, honours stop-gradients
(where the finite difference does not), and is what Darts / SAMA use by default when the
objective carries its module."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ziggurat as zg
from ziggurat.hypergrad import base, factored

from helpers import Vec
from ridge import DTYPE, make_ridge, rel_err


def _flat(xs: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in xs])


@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_forward_mixed_product_equals_the_ridge_closed_form(scale: float) -> None:
    r = make_ridge(30.0)
    theta0 = r.theta_star() + 0.1
    vec = Vec(theta0)
    lam = r.lam.clone().requires_grad_()
    obj = zg.InnerObjective([vec.theta], [lam], lambda: r.inner_loss(vec(), lam), module=vec)
    x = r.v(theta0)
    expected = -scale * r.mixed(theta0, x)
    out = zg.Darts(scale=scale, mixed="forward")(obj, [x])[0]
    assert rel_err(out, expected) <= 1e-13
    # θ is left exactly as it was, and a real leaf again
    assert torch.equal(vec.theta.detach(), theta0) and vec.theta.is_leaf


def _reweighting(dropout: float = 0.0, widths: tuple[int, ...] = (6, 12), batch: int = 16
                 ) -> tuple[torch.nn.Module, torch.nn.Module, zg.InnerObjective,
                            list[torch.Tensor]]:
    """Meta-Weight-Net's structure in float64: V fed the *detached* per-sample loss; the
    classifier's layers widths[0] → ... → widths[-1] → 3 (tanh, dropout after each)."""
    torch.manual_seed(0)
    hidden: list[torch.nn.Module] = []
    for a, b in itertools.pairwise(widths):
        hidden += [torch.nn.Linear(a, b), torch.nn.Tanh(), torch.nn.Dropout(dropout)]
    net = torch.nn.Sequential(*hidden, torch.nn.Linear(widths[-1], 3)).double()
    meta = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1),
                               torch.nn.Sigmoid()).double()
    x, y = torch.randn(batch, widths[0], dtype=DTYPE), torch.randint(0, 3, (batch,))

    def loss() -> torch.Tensor:
        losses = F.cross_entropy(net(x), y, reduction="none")
        return (meta(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

    params = list(net.parameters())
    obj = zg.InnerObjective(params, list(meta.parameters()), loss, module=net)
    v = [torch.randn_like(p) for p in params]
    return net, meta, obj, v


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_equals_double_backward_through_a_detached_loss(dropout: float) -> None:
    """Exact with a stop-gradient in L_in (and with dropout, same mask on every pass); the
    finite difference is not: it moves the detached input as well."""
    _, _, obj, v = _reweighting(dropout)
    for method in (zg.Darts, zg.SAMA):
        if method is zg.SAMA:
            continue  # needs an optimizer step; covered through the engine below
        exact = _flat(method(mixed="exact")(obj, v))
        forward = _flat(method(mixed="forward")(obj, v))
        assert rel_err(forward, exact) <= 1e-12
    fd = _flat(zg.Darts(mixed="fd")(obj, v))
    assert rel_err(fd, _flat(zg.Darts(mixed="exact")(obj, v))) > 1e-2


def test_forward_mode_reports_an_uncoupled_lower_loss_and_a_missing_module() -> None:
    vec = Vec([1.0, 2.0])
    lam = torch.ones(2, dtype=DTYPE, requires_grad=True)
    obj = zg.InnerObjective([vec.theta], [lam], lambda: (vec() ** 2).sum(), name="inner",
                            upper_name="outer", module=vec)
    with pytest.raises(zg.HypergradientError, match=r"'inner'.*'outer'"):
        zg.Darts(mixed="forward")(obj, [torch.ones(2, dtype=DTYPE)])
    bare = zg.InnerObjective([vec.theta], [lam], lambda: (lam * vec() ** 2).sum(),
                             name="inner")
    with pytest.raises(zg.HypergradientError, match=r"module=None.*mixed='exact'"):
        zg.Darts(mixed="forward")(bare, [torch.ones(2, dtype=DTYPE)])
    # without a module, "auto" stays on double backward and is still exact
    out = zg.Darts()(bare, [torch.ones(2, dtype=DTYPE)])[0]
    assert torch.allclose(out, torch.tensor([-2.0, -4.0], dtype=DTYPE), rtol=0, atol=1e-15)


def _program(method: zg.HypergradMethod, optimizer: str) -> zg.Engine:
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(6, 12), torch.nn.Tanh(),
                              torch.nn.Linear(12, 3)).double()
    meta = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1),
                               torch.nn.Sigmoid()).double()
    g = torch.Generator().manual_seed(2)
    batches = [(torch.randn(16, 6, generator=g, dtype=DTYPE), torch.randint(0, 3, (16,),
                                                                            generator=g))
               for _ in range(3)]
    opt = (torch.optim.Adam(net.parameters(), lr=0.01) if optimizer == "adam"
           else torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9))

    def inner(p: zg.Problem, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        losses = F.cross_entropy(p.module(b[0]), b[1], reduction="none")
        return (p.meta(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

    lower = zg.ImplicitProblem("classifier", net, opt, train_data_loader=batches,
                               config=zg.Config(type=method), training_step=inner)
    upper = zg.ImplicitProblem(
        "meta", meta, torch.optim.SGD(meta.parameters(), lr=0.5), train_data_loader=batches[:1],
        training_step=lambda p, b: F.cross_entropy(p.classifier(b[0]), b[1]))
    return zg.Engine([upper, lower], zg.chain(upper, lower),
                     zg.EngineConfig(train_iters=4, summary=False, progress="off"))


@pytest.mark.parametrize(("name", "optimizer"), [("darts", "sgd"), ("sama", "sgd"),
                                                 ("sama", "adam")])
def test_programs_default_to_forward_mode_and_match_double_backward(
    name: str, optimizer: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the engine, the default (forward mode: ImplicitProblem hands its module to
    the method; the size threshold lowered to this small net) trains the meta net exactly
    as double backward does, step for step."""
    monkeypatch.setattr(base, "FORWARD_MODE_MIN_PARAMETERS", 0)
    used: list[str] = []
    real = base.mixed_forward

    def recording(*args: object) -> list[torch.Tensor]:
        used.append("forward")
        return real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(base, "mixed_forward", recording)
    cls = zg.Darts if name == "darts" else zg.SAMA
    runs = {}
    for mixed in ("auto", "exact"):
        engine = _program(cls(mixed=mixed), optimizer)  # type: ignore[arg-type]
        engine.run()
        runs[mixed] = _flat([p.detach() for p in engine.meta.module.parameters()])
    start = _flat([p.detach() for p in _program(cls(), optimizer).meta.module.parameters()])
    assert used  # "auto" did take the forward-mode path
    assert rel_err(runs["auto"] - start, runs["exact"] - start) <= 1e-11
    assert float((runs["exact"] - start).norm()) > 1e-4  # the meta net did move


class _Cube(torch.autograd.Function):
    """x³ with a backward but no forward-mode formula (jvp)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (x,) = ctx.saved_tensors
        return 3 * x**2 * grad


def test_auto_falls_back_to_double_backward_without_a_forward_formula(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(base, "FORWARD_MODE_MIN_PARAMETERS", 0)
    vec = Vec([0.5, -1.0, 2.0])
    lam = torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE, requires_grad=True)
    obj = zg.InnerObjective([vec.theta], [lam], lambda: (lam * _Cube.apply(vec())).sum(),
                            module=vec)
    x = [torch.tensor([1.0, 1.0, -1.0], dtype=DTYPE)]
    with pytest.raises(RuntimeError):
        zg.Darts(mixed="forward")(obj, x)
    out = zg.Darts()(obj, x)[0]  # ∂²/∂λ∂θ (λ·θ³) x = 3θ² x
    expected = -3 * torch.tensor([0.25, 1.0, -4.0], dtype=DTYPE)
    assert torch.allclose(out, expected, rtol=0, atol=1e-14)
    assert vec.theta.is_leaf and torch.equal(vec.theta.detach(),
                                             torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE))


@pytest.mark.parametrize("lrs", [(0.1, 0.1), (0.1, 0.02)])
def test_sama_sgd_coefficients_uniform_or_per_group(lrs: tuple[float, float]) -> None:
    """SGD with one learning rate (P = lr·I: the product is taken of v and scaled) and with
    two groups (P v formed per tensor) both equal −∂²_{λθ}L_in · (P v), in closed form."""
    r = make_ridge(5.0)
    ts = r.theta_star() + 0.1
    a, b = torch.nn.Parameter(ts[:3].clone()), torch.nn.Parameter(ts[3:].clone())
    opt = torch.optim.SGD([{"params": [a], "lr": lrs[0]}, {"params": [b], "lr": lrs[1]}])
    state: dict[str, Any] = {}
    a.grad, b.grad = torch.ones(3, dtype=DTYPE), torch.ones(3, dtype=DTYPE)
    zg.SAMA().before_optimizer_step(opt, [a, b], state)
    with torch.no_grad():  # the step itself is not needed; keep θ where it was
        a.grad = b.grad = None
    lam = r.lam.clone().requires_grad_()
    obj = zg.InnerObjective([a, b], [lam], lambda: r.inner_loss(torch.cat([a, b]), lam),
                            optimizer=opt, state=state)
    assert zg.SAMA().uniform_scale(obj) == (lrs[0] if lrs[0] == lrs[1] else None)
    v = r.v(ts)
    coefficient = torch.cat([torch.full((3,), lrs[0], dtype=DTYPE),
                             torch.full((3,), lrs[1], dtype=DTYPE)])
    expected = -r.mixed(ts, coefficient * v)
    for mixed in ("exact", "fd"):
        out = zg.SAMA(mixed=mixed)(obj, [v[:3], v[3:]])[0]  # type: ignore[arg-type]
        assert rel_err(out, expected) <= 1e-10


def test_linear_layers_by_hand_equal_double_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forward mode computes ``F.linear``'s primal and tangent by hand (x and x_t through W
    as one product, no product with a missing tangent): a first layer on data, a layer
    without bias on a 3-D input, a frozen layer (no weight tangent) and a 1-D input equal
    the double-backward mixed product to 1e-12, and every one took the by-hand path."""
    from ziggurat.hypergrad import factored

    torch.manual_seed(3)
    first = torch.nn.Linear(5, 7).double()
    nobias = torch.nn.Linear(7, 6, bias=False).double()
    frozen = torch.nn.Linear(6, 4).double().requires_grad_(False)
    last = torch.nn.Linear(4, 3).double()
    net = torch.nn.ModuleList([first, nobias, frozen, last])
    lam = torch.randn(3, dtype=DTYPE, requires_grad=True)
    x = torch.randn(2, 8, 5, dtype=DTYPE)

    def loss() -> torch.Tensor:
        h = torch.tanh(first(x))
        h = torch.tanh(nobias(h))
        h = torch.tanh(frozen(h))
        out = last(h)  # (2, 8, 3)
        one = F.linear(h[0, 0], last.weight, last.bias)  # a 1-D input
        return (out * lam).pow(2).mean() + (one * lam).sum() * lam.sum()

    params = [p for p in net.parameters() if p.requires_grad]
    obj = zg.InnerObjective(params, [lam], loss, module=net)
    v = [torch.randn_like(p) for p in params]
    calls = {"by_hand": 0}
    real = factored.FactoredTangents._linear

    def spy(self: Any, *args: Any) -> Any:
        out = real(self, *args)
        calls["by_hand"] += out is not None
        return out

    monkeypatch.setattr(factored.FactoredTangents, "_linear", spy)
    forward = zg.Darts(mixed="forward")(obj, v)
    assert calls["by_hand"] == 5
    exact = zg.Darts(mixed="exact")(obj, v)
    assert rel_err(_flat(forward), _flat(exact)) <= 1e-12


def _penalised(penalty: str) -> tuple[torch.nn.Module, zg.InnerObjective, list[Any]]:
    """A two-layer lower model whose loss carries λ-weighted penalties that read the model
    the ways users write them: over ``trainable_parameters()``-style filters, through an
    input gradient, or through a weight gradient taken inside L_in (autograd.grad)."""
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(),
                              torch.nn.Linear(7, 3)).double()
    gain = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    x, y = torch.randn(4, 5, dtype=DTYPE), torch.randint(0, 3, (4,))

    def loss() -> torch.Tensor:
        inputs = x.clone().requires_grad_() if penalty == "input_grad" else x
        fit = F.cross_entropy(net(inputs), y)
        if penalty == "filtered":
            extra = sum((p ** 2).sum() for p in net.parameters() if p.requires_grad)
        elif penalty == "guarded":  # the re-evaluation's signal is not an Exception
            try:
                extra = sum((p ** 2).sum() for p in net.parameters() if p.requires_grad)
            except Exception:
                extra = torch.zeros((), dtype=DTYPE)
        elif penalty == "activation":  # requires_grad of a tensor computed from θ
            hidden = net[0](x)
            extra = (hidden ** 2).sum() if hidden.requires_grad else torch.zeros(())
        elif penalty == "input_grad":
            (g,) = torch.autograd.grad(fit, inputs, create_graph=True)
            extra = (g ** 2).sum()
        else:
            (g,) = torch.autograd.grad(fit, net[2].weight, create_graph=True)
            extra = (g ** 2).sum()
        return fit + gain.exp() * extra

    params = list(net.parameters())
    obj = zg.InnerObjective(params, [gain], loss, module=net)
    gen = torch.Generator().manual_seed(2)
    v: list[Any] = [torch.randn(p.shape, dtype=DTYPE, generator=gen) for p in params]
    # the second layer's entry as factors (Δᵀ X, rank 2), as the upper backward hands it over
    v[2] = factored.LinearFactors(torch.randn(2, 7, dtype=DTYPE, generator=gen),
                                  torch.randn(2, 3, dtype=DTYPE, generator=gen), None, (3, 7))
    return net, obj, v


@pytest.mark.parametrize("penalty", ["filtered", "guarded", "activation", "input_grad",
                                     "weight_grad"])
@pytest.mark.parametrize("factors", [True, False], ids=["factored-v", "dense-v"])
def test_forward_mode_sees_the_lower_model_as_double_backward_does(penalty: str,
                                                                   factors: bool) -> None:
    """Forward mode evaluates L_in with stand-ins for θ that require grad as θ does, and
    linear layers' tangents by hand only where no derivative inside L_in goes through them:
    a penalty filtered on ``requires_grad``, an input-gradient and a weight-gradient penalty
    all keep their part of ∂²_{λθ}L_in · x (double backward's value, 1e-12)."""
    _, obj, v = _penalised(penalty)
    if not factors:
        v = base.densify(v)
    exact = _flat(zg.Darts(mixed="exact")(obj, base.densify(v)))
    forward = _flat(zg.Darts(mixed="forward")(obj, v))
    assert exact.abs().max() > 1e-4  # the penalty's term is there to be kept
    assert rel_err(forward, exact) <= 1e-12


def test_forward_mode_records_no_graph_to_theta_unless_the_loss_looks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The first evaluation's stand-ins for θ do not require grad: on the reweighting loss no
    activation is kept for a backward to θ (what is saved and still alive at the tangent's
    backward is the meta net's few bytes); a loss that reads ``requires_grad`` of θ is
    evaluated again with stand-ins that require grad, which keeps the layers' inputs."""
    import gc
    import weakref

    net, _, obj, v = _reweighting(widths=(20, 256, 256), batch=32)
    saved: list[tuple[Any, int]] = []
    alive: list[int] = []
    backward = base.autograd_grad

    def spy(*args: Any, **kwargs: Any) -> Any:
        gc.collect()
        alive.append(sum(n for ref, n in saved if ref() is not None))
        return backward(*args, **kwargs)

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((weakref.ref(t), t.numel() * t.element_size()))
        return t

    monkeypatch.setattr(base, "autograd_grad", spy)
    looking = zg.InnerObjective(
        obj.params, obj.upper_params, module=net,
        loss=lambda: obj.loss() + 0 * sum(p.sum() for p in net.parameters() if p.requires_grad))
    for objective in (obj, looking):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            zg.Darts(mixed="forward")(objective, v)
    first, looked = alive
    activations = 32 * (20 + 256 + 256) * 8  # the three layers' inputs, float64
    assert first < activations / 10 and looked > activations
