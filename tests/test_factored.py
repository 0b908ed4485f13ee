"""Linear layers' upper gradients kept as factors (``ziggurat.hypergrad.factored``).

Every program is run three ways in float64: factored (the default for Darts / SAMA-SGD in
forward mode), with the factored path switched off (dense v, forward mode), and with the exact
double-backward mixed product; the upper parameters after a few steps must agree to 1e-12.
Each test also checks that the factored path was really taken (so it could fail).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F

import ziggurat as zg
from ziggurat.hypergrad import base, factored

DTYPE = torch.float64
BATCH = 8
IN, HID, OUT = 12, 40, 3


@pytest.fixture(autouse=True)
def _float64() -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)
    yield
    torch.set_default_dtype(old)


class Spy:
    """Counts the factored entries that reach ``mixed_forward``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.factored = 0
        real = base.mixed_forward

        def spy(objective: Any, x: Any) -> Any:
            self.factored += sum(isinstance(t, factored.LinearFactors) for t in x)
            return real(objective, x)

        monkeypatch.setattr(base, "mixed_forward", spy)


def classifier(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.Tanh(),
                               torch.nn.Linear(HID, HID), torch.nn.Tanh(),
                               torch.nn.Linear(HID, OUT))


def data(seed: int, shape: tuple[int, ...] = (BATCH, IN)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=gen),
            torch.randint(0, OUT, shape[:-1], generator=gen))


LowerLoss = Callable[[Any, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]
UpperLoss = Callable[[Any, tuple[torch.Tensor, torch.Tensor]], torch.Tensor]


def reweighting_lower(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """mean_i V(ℓ_i.detach()) ℓ_i, the reweighting benchmark's lower loss."""
    logits = p.module(b[0])
    losses = F.cross_entropy(logits.reshape(-1, OUT), b[1].reshape(-1), reduction="none")
    w = p.meta.module(losses.detach().unsqueeze(1)).squeeze(1)
    return (w * losses).mean()


def plain_upper(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(p.classifier(b[0]).reshape(-1, OUT), b[1].reshape(-1))


def default_meta() -> torch.nn.Module:
    torch.manual_seed(1)
    return torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(), torch.nn.Linear(6, 1),
                               torch.nn.Sigmoid())


def run(method: zg.HypergradMethod, lower_loss: LowerLoss = reweighting_lower,
        upper_loss: UpperLoss = plain_upper,
        module_factory: Callable[[], torch.nn.Module] = classifier,
        meta_factory: Callable[[], torch.nn.Module] = default_meta, steps: int = 3,
        shape: tuple[int, ...] = (BATCH, IN), adam: bool = False) -> list[torch.Tensor]:
    """The upper parameters after ``steps`` meta-iterations (lower optimizer SGD with
    momentum, or Adam)."""
    module, meta = module_factory(), meta_factory()
    lower = zg.ImplicitProblem(
        name="classifier", module=module,
        optimizer=(torch.optim.Adam(module.parameters(), lr=0.01) if adam
                   else torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)),
        train_data_loader=[data(2, shape), data(3, shape)], config=zg.Config(type=method),
        training_step=lower_loss)
    upper = zg.ImplicitProblem(
        name="meta", module=meta, optimizer=torch.optim.SGD(meta.parameters(), lr=0.5),
        train_data_loader=[data(4, shape)], training_step=upper_loss)
    engine = zg.Engine([upper, lower], zg.chain(upper, lower),
                       zg.EngineConfig(train_iters=steps, summary=False, progress="off"))
    engine.run()
    return [p.detach().clone() for p in meta.parameters()]


def rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    num = sum(float((x - y).pow(2).sum()) for x, y in zip(a, b)) ** 0.5
    den = sum(float(y.pow(2).sum()) for y in b) ** 0.5
    return num / den


def three_ways(monkeypatch: pytest.MonkeyPatch, forward: zg.HypergradMethod,
               exact: zg.HypergradMethod, **kw: Any) -> int:
    """Factored vs dense forward mode vs exact; returns how many factored entries were used."""
    spy = Spy(monkeypatch)
    out = run(forward, **kw)
    used = spy.factored
    monkeypatch.setattr(factored, "ENABLED", False)
    dense = run(forward, **kw)
    monkeypatch.setattr(factored, "ENABLED", True)
    ref = run(exact, **kw)
    start = [p.detach() for p in kw.get("meta_factory", default_meta)().parameters()]
    assert rel(ref, start) > 1e-5  # the hypergradient moved the upper parameters
    assert rel(out, dense) <= 1e-12
    assert rel(out, ref) <= 1e-12
    return used


@pytest.mark.parametrize("method", ["darts", "darts-scaled", "sama-sgd"])
def test_factored_equals_dense_and_exact(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    forward: zg.HypergradMethod
    exact: zg.HypergradMethod
    if method == "darts":
        forward, exact = zg.Darts(mixed="forward"), zg.Darts(mixed="exact")
    elif method == "darts-scaled":
        forward, exact = zg.Darts(scale=0.3, mixed="forward"), zg.Darts(scale=0.3, mixed="exact")
    else:
        forward, exact = zg.SAMA(mixed="forward"), zg.SAMA(mixed="exact")
    # the 12→40 and 40→40 weights are factored on each of the 3 meta-iterations (the 40→3
    # one is formed: 8 rows · (40 + 3) ≥ 40 · 3, see worth_factoring)
    assert three_ways(monkeypatch, forward, exact) == 2 * 3


def test_weight_used_outside_linear_in_both_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    """W also enters L_out (a penalty: the rest R of v_W) and L_in (a λ-weighted penalty on
    W: its tangent must be the whole v_W, formed on that use) and a transposed use."""

    def lower(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        w2 = p.module[2].weight
        decay = p.meta.module[0].weight.sum()
        return reweighting_lower(p, b) + 1e-2 * decay * (w2 * w2).sum()

    def upper(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        net = p.classifier.module
        h = net[1](net[0](b[0]))
        h = F.linear(h, net[2].weight.t())  # W2ᵀ: an operation on W2, then F.linear
        return plain_upper(p, b) + 0.1 * h.pow(2).mean() + 0.05 * net[2].weight.pow(2).sum()

    used = three_ways(monkeypatch, zg.Darts(mixed="forward"), zg.Darts(mixed="exact"),
                      lower_loss=lower, upper_loss=upper)
    # W2 factored (with its rest); W0 is called twice (16 rows) and so formed
    assert used == 1 * 3


def test_upper_parameter_scaling_the_input(monkeypatch: pytest.MonkeyPatch) -> None:
    """λ enters L_in through the classifier's input: the factored tangent x v_Wᵀ must carry
    x's graph to λ."""
    class Meta(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gain = torch.nn.Parameter(torch.linspace(0.5, 1.5, IN))
            self.w = torch.nn.Sequential(torch.nn.Linear(1, 6), torch.nn.Tanh(),
                                         torch.nn.Linear(6, 1), torch.nn.Sigmoid())

    def lower(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x = b[0] * p.meta.module.gain
        # squared error: torch 2.13's reverse-over-forward through cross_entropy fails when
        # the tangent depends on λ (an in-place op in log_softmax's tangent), factored or not
        losses = (p.module(x) - F.one_hot(b[1], OUT)).pow(2).sum(1)
        return (p.meta.module.w(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

    def meta() -> torch.nn.Module:
        torch.manual_seed(7)
        return Meta()

    used = three_ways(monkeypatch, zg.Darts(mixed="forward"), zg.Darts(mixed="exact"),
                      lower_loss=lower, meta_factory=meta)
    assert used == 2 * 3


def test_tied_weights_and_sequences(monkeypatch: pytest.MonkeyPatch) -> None:
    """One weight in two linear layers, inputs with a sequence dimension (rows = batch ×
    length)."""

    def tied() -> torch.nn.Module:
        net = classifier()
        extra = torch.nn.Linear(HID, HID)
        extra.weight = net[2].weight  # tied: one parameter, two layers
        return torch.nn.Sequential(net[0], net[1], net[2], net[3], extra, torch.nn.Tanh(),
                                   net[4])

    used = three_ways(monkeypatch, zg.Darts(mixed="forward"), zg.Darts(mixed="exact"),
                      module_factory=tied, shape=(2, 3, IN))
    assert used == 2 * 3


@pytest.mark.parametrize("compiled", [False, True])
def test_sama_adam_factored_equals_dense_and_exact(
        compiled: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """SAMA with Adam: the upper backward gives the factored weights' v_W as factors, SAMA's
    solve forms them block by block with P applied in place (compiled kernel, or the eager
    loop); the upper parameters after three meta-iterations equal those of the dense path
    (factored off) and of the exact double-backward mixed product to 1e-12."""
    from ziggurat.hypergrad import sama

    if compiled:
        monkeypatch.setattr(sama, "COMPILE_MIN_ELEMENTS", 1)
        monkeypatch.setattr(sama, "FUSED_BLOCK", 3 * HID)  # 3 rows: 40 = 13 · 3 + 1
    else:
        monkeypatch.setattr(sama, "COMPILE", False)
    seen = {"factors": 0}
    real = sama.adam_preconditioned_factors

    def spy(*args: Any, **kwargs: Any) -> torch.Tensor:
        seen["factors"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(sama, "adam_preconditioned_factors", spy)
    out = run(zg.SAMA(mixed="forward"), adam=True)
    used = seen["factors"]
    monkeypatch.setattr(factored, "ENABLED", False)
    dense = run(zg.SAMA(mixed="forward"), adam=True)
    assert seen["factors"] == used  # (none with the factored path off)
    monkeypatch.setattr(factored, "ENABLED", True)
    ref = run(zg.SAMA(mixed="exact"), adam=True)
    start = [p.detach() for p in default_meta().parameters()]
    assert used == 2 * 3  # the 12→40 and 40→40 weights, on each of the 3 meta-iterations
    assert rel(ref, start) > 1e-5
    assert rel(out, dense) <= 1e-12
    assert rel(out, ref) <= 1e-12


def test_only_uniform_forward_methods_take_factors(monkeypatch: pytest.MonkeyPatch) -> None:
    """SAMA with Adam, CG, Neumann, exact and finite-difference modes see dense vectors (and
    stay exact: their own tests); Darts / SAMA-SGD in forward mode take factors."""
    theta = torch.nn.Parameter(torch.ones(3, 2))
    module = torch.nn.Linear(2, 3)
    obj = zg.InnerObjective([theta], [], lambda: theta.sum(), module=module)
    assert zg.Darts(mixed="forward").accepts_factors(obj)
    for method in (zg.Darts(mixed="exact"), zg.Darts(mixed="fd"), zg.CG(), zg.Neumann(),
                   zg.Darts(mixed="auto")):  # auto: forward mode from 1M parameters only
        assert not method.accepts_factors(obj), method
    opt = torch.optim.Adam([theta], lr=0.1)
    state: dict[str, Any] = {}
    theta.grad = torch.ones_like(theta)
    zg.SAMA().before_optimizer_step(opt, [theta], state)
    adam = zg.InnerObjective([theta], [], lambda: theta.sum(), module=module, optimizer=opt,
                             state=state)
    # SAMA with Adam takes factors in every mode: its solve forms them (P is elementwise)
    assert zg.SAMA(mixed="forward").accepts_factors(adam)
    assert zg.SAMA(mixed="exact").accepts_factors(adam)
    monkeypatch.setattr(factored, "ENABLED", False)
    assert not zg.Darts(mixed="forward").accepts_factors(obj)
    assert not zg.SAMA(mixed="forward").accepts_factors(adam)


def test_factored_entry_forms_the_matrix_when_factors_are_larger() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.zeros(5, 4)
    rest = torch.randn(5, 4, generator=gen)
    small = (torch.randn(1, 4, generator=gen), torch.randn(1, 5, generator=gen))
    big = (torch.randn(3, 4, generator=gen), torch.randn(3, 5, generator=gen))
    kept = factored.factored_entry(rest, weight, small)  # 1·(4+5) < 20
    formed = factored.factored_entry(rest, weight, big)  # 3·(4+5) ≥ 20
    assert isinstance(kept, factored.LinearFactors)
    assert isinstance(formed, torch.Tensor)
    for (x, d), entry in ((small, kept.dense()), (big, formed)):
        assert torch.allclose(entry, d.t() @ x + rest, rtol=0, atol=1e-14)
    probe = torch.randn(2, 7, 4, generator=gen)
    assert torch.allclose(kept.right_product(probe), probe @ kept.dense().t(), rtol=0,
                          atol=1e-13)


def _relu_inplace_classifier() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(IN, HID), torch.nn.ReLU(inplace=True),
                               torch.nn.Linear(HID, HID), torch.nn.ReLU(inplace=True),
                               torch.nn.Linear(HID, OUT))


def _input_gradient_penalty(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x = b[0].clone().requires_grad_()
    loss = F.cross_entropy(p.classifier(x), b[1])
    (gx,) = torch.autograd.grad(loss, x, create_graph=True)
    return loss + 0.5 * gx.pow(2).sum()


def _weight_gradient_penalty(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    loss = plain_upper(p, b)
    (gw,) = torch.autograd.grad(loss, p.classifier.module[2].weight, create_graph=True)
    return loss + 0.3 * gw.pow(2).sum()


def _checkpointed(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    out = torch.utils.checkpoint.checkpoint(p.classifier.module, b[0], use_reentrant=False)
    return F.cross_entropy(out, b[1])


def _output_scaled_in_place(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    logits = p.classifier(b[0])
    logits.mul_(2.0)  # in place on a captured layer's output
    return F.cross_entropy(logits, b[1])


@pytest.mark.parametrize("case,factored_entries", [
    ("in-place ReLU after each linear layer", 2 * 3),
    ("in-place op on a captured output", 2 * 3),
    ("input-gradient penalty (double backward)", 2 * 3),
    ("penalty on a gradient with respect to a lower weight", 2 * 3),
    ("activation checkpointing (recomputed in the backward)", 0),
])
def test_what_user_code_does_around_captured_layers(
        case: str, factored_entries: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found in review: each of these was silently wrong or crashed with an earlier capture
    (a detached stand-in weight read by ∂L/∂y); the captured layer's backward is F.linear's
    own except in the upper's single backward, and checkpointed regions are not captured."""
    kw: dict[str, Any] = {
        "in-place ReLU after each linear layer": {"module_factory": _relu_inplace_classifier},
        "in-place op on a captured output": {"upper_loss": _output_scaled_in_place},
        "input-gradient penalty (double backward)": {"upper_loss": _input_gradient_penalty},
        "penalty on a gradient with respect to a lower weight": {
            "upper_loss": _weight_gradient_penalty},
        "activation checkpointing (recomputed in the backward)": {"upper_loss": _checkpointed},
    }[case]
    assert three_ways(monkeypatch, zg.Darts(mixed="forward"), zg.Darts(mixed="exact"),
                      **kw) == factored_entries


def test_compiled_lower_module_and_vmap(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch.compile'd lower module (read by both losses) and a vmap over it in the upper
    loss: the factored path steps aside inside those transforms and the result stays exact."""

    def compiled() -> torch.nn.Module:
        return torch.compile(classifier(), backend="eager")  # type: ignore[return-value]

    monkeypatch.setattr(base, "FORWARD_MODE_MIN_PARAMETERS", 0)  # "auto": forward mode
    three_ways(monkeypatch, zg.Darts(mixed="auto"), zg.Darts(mixed="exact"),
               module_factory=compiled)

    def vmapped(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        logits = torch.vmap(p.classifier.module)(b[0].unsqueeze(1)).squeeze(1)
        return F.cross_entropy(logits, b[1])

    assert three_ways(monkeypatch, zg.Darts(mixed="forward"), zg.Darts(mixed="exact"),
                      upper_loss=vmapped) == 0


def test_no_grad_block_in_the_lower_loss_is_a_constant(monkeypatch: pytest.MonkeyPatch) -> None:
    """A target computed from θ under torch.no_grad in L_in: double backward treats it as a
    constant; forward mode (factored and dense) must too (forward AD ignores grad mode, so it
    carried a tangent through the block: relative error 0.07 before; found in review)."""

    def lower(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.no_grad():
            target = p.module(b[0] * 1.1).softmax(-1)
        distill = (target * p.module(b[0]).log_softmax(-1)).sum(-1).mean()
        return reweighting_lower(p, b) + 0.1 * p.meta.module[0].weight.sum() * distill

    assert three_ways(monkeypatch, zg.Darts(mixed="forward"), zg.Darts(mixed="exact"),
                      lower_loss=lower) == 2 * 3


def test_autocast_in_the_upper_loss_steps_aside(monkeypatch: pytest.MonkeyPatch) -> None:
    """An upper loss under bfloat16 autocast computes its linear layers in bfloat16; the
    capture steps aside there (its backward would mix dtypes), so the run equals the dense
    one (it used to raise a dtype error)."""
    torch.set_default_dtype(torch.float32)  # (the fixture restores float64)

    def autocast_upper(p: Any, b: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return plain_upper(p, b).float()

    got = run(zg.Darts(mixed="forward"), upper_loss=autocast_upper)
    monkeypatch.setattr(factored, "ENABLED", False)
    assert rel(got, run(zg.Darts(mixed="forward"), upper_loss=autocast_upper)) == 0.0


def test_a_hooked_weight_is_not_captured(monkeypatch: pytest.MonkeyPatch) -> None:
    """A tensor hook on a lower weight (a pruning mask) must see its whole upper gradient,
    which the capture never forms: that weight keeps the dense path, and the run is exact."""
    def masked() -> torch.nn.Sequential:
        net = classifier()
        mask = (torch.arange(HID * HID).reshape(HID, HID) % 3 != 0).to(DTYPE)
        net[2].weight.register_hook(lambda g: g * mask)
        return net

    shapes: list[tuple[int, ...]] = []
    real = base.mixed_forward

    def spy(objective: Any, x: Any) -> Any:
        shapes.extend(tuple(t.shape) for t in x if isinstance(t, factored.LinearFactors))
        return real(objective, x)

    monkeypatch.setattr(base, "mixed_forward", spy)
    got = run(zg.Darts(mixed="forward"), module_factory=masked)
    assert shapes and (HID, HID) not in shapes  # the first layer's weight only
    monkeypatch.setattr(factored, "ENABLED", False)
    assert rel(got, run(zg.Darts(mixed="forward"), module_factory=masked)) < 1e-12
