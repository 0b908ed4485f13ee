"""The trimmed step path: the remembered parameter list, the lean lower step, the cheaper
upper-step checks.

``trainable_parameters()`` is remembered between steps (``ziggurat.trainable``); every test
of the first part changes the module in one way a stale list would miss and checks the
list, by identity and order, against the answer written out by hand and against a fresh
walk of ``module.parameters()``. The end-to-end tests compare exact parameter values:
ziggurat's loop against the same arithmetic written by hand must agree bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import ziggurat as zg
from ziggurat.hypergrad import fixed_randomness
from ziggurat.trainable import TrainableParameters
from ziggurat.unrolled.reparam import use_parameters

from helpers import Quad

DTYPE = torch.float64


class Two(torch.nn.Module):
    """Parameters a, b (float64)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor([1.0, 2.0], dtype=DTYPE))
        self.b = torch.nn.Parameter(torch.tensor([3.0], dtype=DTYPE))

    def forward(self) -> Tensor:
        return torch.cat([self.a, self.b])


def walked(module: torch.nn.Module) -> list[Tensor]:
    return [p for p in module.parameters() if p.requires_grad]


def same(xs: list[Tensor], ys: list[Tensor]) -> bool:
    """The same tensor objects in the same order."""
    return len(xs) == len(ys) and all(x is y for x, y in zip(xs, ys))


class Counting(TrainableParameters):
    """Counts the walks, to show that an unchanged module is not walked again (so that the
    tests below exercise the remembered list, not a walk at every call)."""

    def __init__(self) -> None:
        super().__init__()
        self.walks = 0

    def _take(self, module: torch.nn.Module) -> list[Tensor]:
        self.walks += 1
        return super()._take(module)


def problem_of(module: torch.nn.Module) -> tuple[zg.Problem, Counting]:
    p = zg.Problem("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1))
    counting = Counting()
    p._trainable = counting
    return p, counting


def check(p: zg.Problem, expected: list[Tensor]) -> None:
    got = p.trainable_parameters()
    assert same(got, expected), (got, expected)
    assert same(got, walked(p.module))


# --------------------------------------------------------------- the remembered list
def test_an_unchanged_module_is_walked_once_and_each_call_gets_a_new_list() -> None:
    m = Two()
    p, counting = problem_of(m)
    first = p.trainable_parameters()
    first.append(torch.zeros(1))  # the caller's list: not the remembered one
    for _ in range(3):
        check(p, [m.a, m.b])
    assert counting.walks == 1


MUTATIONS: dict[str, Callable[[Two], Callable[[], list[Tensor]]]] = {}


def mutation(fn: Callable[[Two], Callable[[], list[Tensor]]]) -> None:
    MUTATIONS[fn.__name__] = fn


@mutation
def replace_by_setattr(m: Two) -> Callable[[], list[Tensor]]:
    new = torch.nn.Parameter(m.a.detach().clone())  # same shape and values, new tensor
    m.a = new
    return lambda: [new, m.b]


@mutation
def delete(m: Two) -> Callable[[], list[Tensor]]:
    del m.a
    return lambda: [m.b]


@mutation
def set_to_none(m: Two) -> Callable[[], list[Tensor]]:
    m.register_parameter("a", None)
    return lambda: [m.b]


@mutation
def add(m: Two) -> Callable[[], list[Tensor]]:
    c = torch.nn.Parameter(torch.zeros(2, dtype=DTYPE))
    m.c = c
    return lambda: [m.a, m.b, c]


@mutation
def reorder(m: Two) -> Callable[[], list[Tensor]]:
    a = m.a
    del m.a
    m.a = a  # the same tensors, now after b
    return lambda: [m.b, a]


@mutation
def freeze(m: Two) -> Callable[[], list[Tensor]]:
    m.a.requires_grad_(False)
    return lambda: [m.b]


@mutation
def freeze_all(m: Two) -> Callable[[], list[Tensor]]:
    m.requires_grad_(False)
    return lambda: []


@mutation
def write_the_dict(m: Two) -> Callable[[], list[Tensor]]:
    plain = torch.ones(2, dtype=DTYPE, requires_grad=True)  # not a Parameter, as stateless code
    m._parameters["a"] = plain  # type: ignore[assignment]
    return lambda: [plain, m.b]


@mutation
def replace_the_dict(m: Two) -> Callable[[], list[Tensor]]:
    b = m.b
    m._parameters = {"b": b}  # type: ignore[assignment]
    return lambda: [b]


@mutation
def add_submodule(m: Two) -> Callable[[], list[Tensor]]:
    sub = torch.nn.Linear(2, 1).double()
    m.sub = sub
    return lambda: [m.a, m.b, sub.weight, sub.bias]


@mutation
def parametrize(m: Two) -> Callable[[], list[Tensor]]:
    class Doubled(torch.nn.Module):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * x

    a = m.a
    torch.nn.utils.parametrize.register_parametrization(m, "a", Doubled())
    return lambda: [m.b, a]  # a is now parametrizations.a.original, after b


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_a_change_of_the_module_is_seen_at_the_next_call(name: str) -> None:
    m = Two()
    p, counting = problem_of(m)
    check(p, [m.a, m.b])
    check(p, [m.a, m.b])
    expected = MUTATIONS[name](m)
    check(p, expected())
    assert counting.walks == 2
    check(p, expected())  # and remembered again
    assert counting.walks == 2


def test_a_frozen_parameter_thawed_again_is_back_in_its_place() -> None:
    m = Two()
    p, _ = problem_of(m)
    m.a.requires_grad_(False)
    check(p, [m.b])
    m.a.requires_grad_(True)
    check(p, [m.a, m.b])


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = torch.nn.Linear(2, 3).double()
        self.second = torch.nn.Linear(3, 1).double()

    def forward(self, x: Tensor) -> Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_submodules_replaced_deleted_or_tied_are_seen() -> None:
    net = Net()
    p, counting = problem_of(net)
    check(p, [net.first.weight, net.first.bias, net.second.weight, net.second.bias])
    new = torch.nn.Linear(2, 3).double()
    net.first = new
    check(p, [new.weight, new.bias, net.second.weight, net.second.bias])
    # a parameter deep in the tree replaced directly (no setattr on the root)
    w = torch.nn.Parameter(torch.zeros(1, 3, dtype=DTYPE))
    net.second._parameters["weight"] = w
    check(p, [new.weight, new.bias, w, net.second.bias])
    net.second.bias.requires_grad_(False)
    check(p, [new.weight, new.bias, w])
    # one module in two places: its parameters once
    net.second = net.first  # type: ignore[assignment]
    check(p, [new.weight, new.bias])
    del net.second
    check(p, [new.weight, new.bias])
    assert counting.walks == 6


def test_a_replaced_module_is_walked() -> None:
    p, _ = problem_of(Two())
    other = Two()
    p.module = other
    check(p, [other.a, other.b])


def test_tensors_swapped_in_by_functional_call_and_use_parameters_are_seen() -> None:
    """Inside ``torch.func.functional_call`` and ``use_parameters`` the module holds other
    tensors (here one that does not require grad); the list follows them there, and the
    real parameters once they are back."""
    seen: list[list[Tensor]] = []

    class Recording(Two):
        def forward(self) -> Tensor:
            seen.append(p.trainable_parameters())
            return super().forward()

    m = Recording()
    p, _ = problem_of(m)
    a, b = m.a, m.b
    check(p, [a, b])
    a2 = torch.zeros(2, dtype=DTYPE, requires_grad=True)
    b2 = torch.zeros(1, dtype=DTYPE)  # requires_grad False: not trainable while swapped in
    torch.func.functional_call(m, {"a": a2, "b": b2}, ())
    assert same(seen[-1], [a2])
    check(p, [a, b])
    with use_parameters(m, [b], [b2]):
        m()
    assert same(seen[-1], [a])
    check(p, [a, b])


def test_a_module_with_its_own_walk_is_walked_every_time() -> None:
    class Rotating(Two):
        """parameters() rotates at every call: no list may be remembered."""

        calls = 0

        def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
            Rotating.calls += 1
            params = [self.a, self.b]
            yield from params[Rotating.calls % 2:] + params[:Rotating.calls % 2]

    m = Rotating()
    p, _ = problem_of(m)
    first, second = p.trainable_parameters(), p.trainable_parameters()
    assert same(first, second[::-1])

    instance = Two()
    q, counting = problem_of(instance)
    check(q, [instance.a, instance.b])
    instance.named_modules = lambda *a, **k: iter([("", instance)])  # type: ignore
    check(q, [instance.a, instance.b])
    instance.parameters = lambda recurse=True: iter([instance.b])  # type: ignore
    assert same(q.trainable_parameters(), [instance.b])
    assert counting.walks == 3


# --------------------------------------------------------------- through the engine
def test_a_parameter_frozen_mid_run_stops_moving_and_the_other_steps_exactly() -> None:
    """L = ½‖θ − t‖², SGD lr 0.5: θ ← (θ + t)/2 for the trainable entries only."""
    m = Two()
    target = torch.tensor([3.0, -1.0, 5.0], dtype=DTYPE)

    class Fit(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> Tensor:
            return 0.5 * ((self() - target) ** 2).sum()

    p = Fit("p", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.5))
    engine = zg.Engine([p])
    engine.train_step()
    assert m.a.tolist() == [2.0, 0.5] and m.b.tolist() == [4.0]
    m.a.requires_grad_(False)
    engine.train_step()
    assert m.a.tolist() == [2.0, 0.5] and m.b.tolist() == [4.5]
    assert m.a.grad is None  # never handed a gradient while frozen
    m.a.requires_grad_(True)
    engine.train_step()
    assert m.a.tolist() == [2.5, -0.25] and m.b.tolist() == [4.75]


def test_a_parameter_replaced_mid_run_is_the_one_stepped() -> None:
    m = Two()
    target = torch.tensor([3.0, -1.0, 5.0], dtype=DTYPE)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)

    class Fit(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> Tensor:
            return 0.5 * ((self() - target) ** 2).sum()

    p = Fit("p", module=m, optimizer=opt)
    engine = zg.Engine([p])
    engine.train_step()
    old = m.a
    new = torch.nn.Parameter(torch.tensor([7.0, 9.0], dtype=DTYPE))
    m.a = new
    opt.param_groups[0]["params"][0] = new
    engine.train_step()
    assert new.tolist() == [5.0, 4.0] and m.b.tolist() == [4.5]
    assert old.tolist() == [2.0, 0.5] and old.grad is None


FEATURES, SAMPLES = 6, 32


def logistic_hpo(unroll: int, outer: int, seed: int = 0) -> tuple[list[Tensor], list[Tensor]]:
    """benchmarks/overhead.py's program written out by hand: returns (θ, λ) after ``outer``
    outer iterations of ``unroll`` lower steps and one upper step."""
    model, decay, x, y, xv, yv = logistic_setup(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta = torch.optim.Adam(decay.parameters(), lr=0.05)
    params, lam = list(model.parameters()), list(decay.parameters())
    for _ in range(outer):
        for _ in range(unroll):
            grads = torch.autograd.grad(inner(model, decay, x, y), params)
            for p, g in zip(params, grads):
                p.grad = g
            opt.step()
        v = torch.autograd.grad(F.binary_cross_entropy_with_logits(model(xv), yv), params)
        g = torch.autograd.grad(inner(model, decay, x, y), params, create_graph=True)
        mixed = torch.autograd.grad(g, lam, v)
        for p, mx in zip(lam, mixed):
            p.grad = -mx
        meta.step()
    return [t.detach().clone() for t in params], [t.detach().clone() for t in lam]


class Decay(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.log_decay = torch.nn.Parameter(torch.full((FEATURES,), -1.0))

    def forward(self, weight: Tensor) -> Tensor:
        return 0.5 * (self.log_decay.exp() * weight.squeeze(0) ** 2).sum()


def inner(model: torch.nn.Module, decay: torch.nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(model(x), y) + decay(model.weight)


def logistic_setup(seed: int) -> tuple[torch.nn.Linear, Decay, Tensor, Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(FEATURES, 1, generator=g)
    x = torch.randn(SAMPLES, FEATURES, generator=g)
    xv = torch.randn(SAMPLES, FEATURES, generator=g)
    torch.manual_seed(seed)
    return (torch.nn.Linear(FEATURES, 1), Decay(), x, (x @ w > 0).float(), xv,
            (xv @ w > 0).float())


def test_the_overhead_benchmark_program_matches_the_hand_written_loop_bit_for_bit() -> None:
    """ziggurat's loop (lean lower step, remembered parameters, Darts with the exact mixed
    product) does the hand-written arithmetic: float32 values agree exactly."""
    unroll, outer = 7, 4
    theta, lam = logistic_hpo(unroll, outer)
    model, decay, x, y, xv, yv = logistic_setup(0)
    lower = zg.ImplicitProblem(
        name="model", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_data_loader=[(x, y)] * 3,  # passes end inside unrolls: the stream restarts
        config=zg.Config(type=zg.Darts(), unroll_steps=unroll),
        training_step=lambda p, b: inner(p.module, p.decay.module, b[0], b[1]))
    upper = zg.ImplicitProblem(
        name="decay", module=decay, optimizer=torch.optim.Adam(decay.parameters(), lr=0.05),
        train_data_loader=[(xv, yv)],
        training_step=lambda p, b: F.binary_cross_entropy_with_logits(p.model(b[0]), b[1]))
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    for _ in range(unroll * outer):
        engine.train_step()
    assert (lower.count, upper.count) == (unroll * outer, outer)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), theta))
    assert all(torch.equal(a, b) for a, b in zip(decay.parameters(), lam))
    assert not torch.equal(lam[0], torch.full((FEATURES,), -1.0))  # λ did move


# --------------------------------------------------------------- the step's records
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_last_loss_is_the_detached_loss_widened_from_half_precision(dtype: torch.dtype) -> None:
    m = Two()

    class Half(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> Tensor:
            return (0.5 * (self() ** 2).sum()).to(dtype)  # ½(1 + 4 + 9) = 7

    p = Half("p", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.0))
    zg.Engine([p]).train_step()
    assert p.last_loss is not None and not p.last_loss.requires_grad
    assert p.last_loss.shape == ()
    assert p.last_loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert float(p.last_loss) == 7.0


def test_a_one_element_loss_is_recorded_as_a_scalar() -> None:
    m = Two()

    class Shaped(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> Tensor:
            return (self()[2:] ** 2)  # shape (1,): b² = 9

    p = Shaped("p", module=m, optimizer=torch.optim.SGD(m.parameters(), lr=0.5))
    zg.Engine([p]).train_step()
    assert p.last_loss is not None and p.last_loss.shape == () and float(p.last_loss) == 9.0
    assert m.b.tolist() == [0.0]  # b ← b − 0.5·2b


def chain(lower_init: tuple[float, float], check: bool = True) -> tuple[zg.Engine, Quad]:
    """Quad chain: the upper's hypergradient is Darts' v = θ_lower (see helpers.Quad)."""
    upper = Quad("upper", lowers=["lower"], config=zg.Config(check_finite=check))
    lower = Quad("lower", uppers=["upper"], init=lower_init,
                 optimizer=lambda ps: torch.optim.SGD(ps, lr=0.0))
    return zg.Engine([upper, lower], zg.chain(upper, lower)), upper


def test_a_finite_hypergradient_whose_norm_overflows_is_not_an_error() -> None:
    """Entries 1e200: the norm overflows to inf, the entrywise check finds them finite."""
    engine, upper = chain((1e200, -1e200))
    engine.train_step()
    assert upper.last_hypergrad_norm == float("inf")
    # the upper gradient = own part θ_upper (1, −2) + hypergradient θ_lower; SGD lr 0.1
    assert upper.module.theta.tolist() == [1.0 - 0.1 * (1.0 + 1e200),
                                           -2.0 - 0.1 * (-2.0 - 1e200)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_hypergradient_is_still_an_error(bad: float) -> None:
    engine, _ = chain((bad, 1.0))
    with pytest.raises(zg.HypergradientError, match=r"not finite \(NaN or Inf in parameters "
                                                    r"\[0\]\)"):
        engine.train_step()
    engine, upper = chain((bad, 1.0), check=False)
    engine.train_step()  # check_finite=False lets it through
    assert upper.count == 1


# --------------------------------------------------------------- fixed randomness
def test_fixed_randomness_replays_and_restores_the_random_state() -> None:
    torch.manual_seed(3)
    params = [torch.zeros(2)]
    entry = torch.get_rng_state()
    with fixed_randomness(params) as replay:
        first = torch.rand(4)
        replay()
        assert torch.equal(torch.rand(4), first)
        torch.rand(10)
    assert torch.equal(torch.get_rng_state(), entry)
    with pytest.raises(RuntimeError, match="inside"), fixed_randomness(params):
        torch.rand(3)
        raise RuntimeError("inside")
    assert torch.equal(torch.get_rng_state(), entry)  # restored when the block raises too
    assert torch.equal(torch.rand(4), first)  # the program's stream never advanced


# --------------------------------------------------------------- other problems as attributes
def test_other_problems_are_attributes_that_follow_the_program() -> None:
    upper = Quad("upper", lowers=["lower"])
    lower = Quad("lower", uppers=["upper"])
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    assert lower.upper is upper and upper.lower is lower
    engine.set_dependency(zg.chain(upper, lower))  # rewiring: no clash with itself
    assert lower.upper is upper
    # the same problem in another program: the old names are gone, the new ones reached
    alone = Quad("alone", lowers=["lower"])
    zg.Engine([alone, lower], zg.chain(alone, lower))
    assert lower.alone is alone
    with pytest.raises(AttributeError, match=r"no attribute 'upper'"):
        _ = lower.upper
    assert "upper" not in lower._attribute_names() and "alone" not in lower._attribute_names()
    assert "training_step" in lower._attribute_names()


def test_an_attribute_the_user_sets_over_a_problem_name_shadows_it_and_then_clashes() -> None:
    upper = Quad("upper", lowers=["lower"])
    lower = Quad("lower", uppers=["upper"])
    engine = zg.Engine([upper, lower], zg.chain(upper, lower))
    lower.upper = "mine"  # type: ignore[assignment]
    assert lower.upper == "mine"
    with pytest.raises(zg.GraphError, match="problem name 'upper' clashes"):
        engine.set_dependency(zg.chain(upper, lower))
