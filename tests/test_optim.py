"""Functional optimizers: step-for-step agreement with torch.optim, conversion both ways,
hyperparameter gradients against finite differences, and the differentiability pitfalls."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from ziggurat.errors import ConfigError, ZigguratError
from ziggurat.optim import (
    FunctionalAdagrad,
    FunctionalAdam,
    FunctionalOptimizer,
    FunctionalRMSprop,
    FunctionalSGD,
    by_name,
    from_torch,
    functional_twin,
    write_back,
)
from ziggurat.optim import functional as F

D = torch.float64
Grads = Callable[[list[Tensor]], list[Tensor]]
OptimizerType = Callable[..., torch.optim.Optimizer]

# --------------------------------------------------------------------------- the problem


def make_problem(
    seed: int = 0, shapes: tuple[tuple[int, ...], ...] = ((4,), (2, 3))
) -> tuple[list[Tensor], Grads]:
    """Initial params (some exactly 0) and the gradient of a least-squares loss plus a
    smooth non-quadratic term; columns 2 and 6 of A are 0, so those coordinates get exactly
    zero gradients (and stay at 0 without weight decay)."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [int(torch.tensor(s).prod()) for s in shapes]
    n = sum(sizes)
    A = torch.randn(3 * n, n, dtype=D, generator=gen) / n**0.5
    A[:, 2] = 0.0
    A[:, 6] = 0.0
    b = torch.randn(3 * n, dtype=D, generator=gen)
    live = torch.ones(n, dtype=D)
    live[2] = live[6] = 0.0
    params = [torch.randn(s, dtype=D, generator=gen) for s in shapes]
    params[0].view(-1)[2] = 0.0
    params[1].view(-1)[2] = 0.0  # flat index 6

    def grads(xs: list[Tensor]) -> list[Tensor]:
        x = torch.cat([t.reshape(-1) for t in xs])
        g = A.T @ (A @ x - b) + 0.3 * live * torch.sin(2.0 * x)
        return [part.reshape(s) for part, s in zip(g.split(sizes), shapes)]

    return params, grads


def rel_err(a: Tensor, b: Tensor) -> float:
    scale = b.abs().max().clamp_min(1e-300)
    return float((a - b).abs().max() / scale)


def run_side_by_side(
    cls: OptimizerType,
    groups: list[dict[str, Any]],
    steps: int,
    seed: int = 0,
    check: bool = True,
) -> tuple[list[Tensor], list[Tensor]]:
    """torch.optim and its functional twin from the same start; asserts agreement
    (<= 1e-12 relative) after every step and returns both final parameter lists."""
    params, grads = make_problem(seed)
    leaves = [p.clone().requires_grad_() for p in params]
    opt = cls([{"params": [p], **g} for p, g in zip(leaves, groups)])
    fopt, state, hyper = from_torch(opt, leaves)
    fparams = [p.clone() for p in params]
    for _ in range(steps):
        for p, g in zip(leaves, grads([p.detach() for p in leaves])):
            p.grad = g
        opt.step()
        fparams, state = fopt.step(fparams, grads(fparams), state, hyper)
        if check:
            for f, t in zip(fparams, leaves):
                assert rel_err(f, t.detach()) <= 1e-12
    return fparams, [p.detach() for p in leaves]


# --------------------------------------------------------------------------- grids


def _grid(**axes: list[Any]) -> list[dict[str, Any]]:
    keys = list(axes)
    return [dict(zip(keys, values)) for values in itertools.product(*axes.values())]


SGD_GRID = [
    c
    for c in _grid(
        lr=[0.05],
        momentum=[0.0, 0.9],
        dampening=[0.0, 0.3],
        nesterov=[False, True],
        weight_decay=[0.0, 0.02],
        maximize=[False, True],
    )
    if not c["nesterov"] or (c["momentum"] > 0 and c["dampening"] == 0)
]
ADAM_GRID = _grid(
    lr=[0.01],
    betas=[(0.9, 0.999), (0.5, 0.9)],
    amsgrad=[False, True],
    weight_decay=[0.0, 0.05],
    maximize=[False, True],
    decoupled_weight_decay=[False, True],
)
ADAMW_GRID = _grid(
    lr=[0.02],
    betas=[(0.9, 0.999), (0.6, 0.95)],
    amsgrad=[False, True],
    weight_decay=[0.0, 0.05],
    maximize=[False, True],
    eps=[1e-8, 1e-3],
)
RMSPROP_GRID = _grid(
    lr=[0.01],
    alpha=[0.99, 0.8],
    centered=[False, True],
    momentum=[0.0, 0.5],
    weight_decay=[0.0, 0.05],
    maximize=[False, True],
)
ADAGRAD_GRID = _grid(
    lr=[0.1],
    lr_decay=[0.0, 0.05],
    initial_accumulator_value=[0.0, 0.5],
    weight_decay=[0.0, 0.05],
    maximize=[False, True],
    eps=[1e-10, 1e-2],
)

GRIDS: dict[OptimizerType, list[dict[str, Any]]] = {
    torch.optim.SGD: SGD_GRID,
    torch.optim.Adam: ADAM_GRID,
    torch.optim.AdamW: ADAMW_GRID,
    torch.optim.RMSprop: RMSPROP_GRID,
    torch.optim.Adagrad: ADAGRAD_GRID,
}


def _cases() -> list[Any]:
    """Every grid point as group 0, paired with a different grid point as group 1."""
    cases = []
    for cls, grid in GRIDS.items():
        half = len(grid) // 2 + 1
        for i, cfg in enumerate(grid):
            other = dict(grid[(i + half) % len(grid)])
            other["lr"] = other["lr"] * 0.5
            ident = f"{cls.__name__}-" + "-".join(f"{k}={v}" for k, v in cfg.items())
            cases.append(pytest.param(cls, [cfg, other], id=ident))
    return cases


# --------------------------------------------------------------------------- agreement


@pytest.mark.parametrize(("cls", "groups"), _cases())
def test_matches_torch_for_100_steps(cls: OptimizerType, groups: list[dict[str, Any]]) -> None:
    run_side_by_side(cls, groups, steps=100)


@pytest.mark.parametrize(
    ("cls", "kwargs"),
    [
        (torch.optim.SGD, {"lr": 0.05, "momentum": 0.9, "weight_decay": 0.01}),
        (torch.optim.Adam, {"lr": 0.01, "amsgrad": True, "weight_decay": 0.1}),
        (torch.optim.AdamW, {"lr": 0.01, "amsgrad": True}),
        (torch.optim.RMSprop, {"lr": 0.01, "centered": True, "momentum": 0.5}),
        (torch.optim.Adagrad, {"lr": 0.1, "lr_decay": 0.05, "initial_accumulator_value": 0.1}),
    ],
)
def test_complex_parameters_match_torch(cls: OptimizerType, kwargs: dict) -> None:
    gen = torch.Generator().manual_seed(3)
    z0 = torch.randn(5, dtype=torch.complex128, generator=gen)
    target = torch.randn(5, dtype=torch.complex128, generator=gen)
    leaf = z0.clone().requires_grad_()
    opt = cls([leaf], **kwargs)
    fopt, state, hyper = from_torch(opt, [leaf])
    z = z0.clone()
    for _ in range(30):
        leaf.grad = (leaf.detach() - target) * (1 + leaf.detach().abs())
        opt.step()
        (z,), state = fopt.step([z], [(z - target) * (1 + z.abs())], state, hyper)
        assert rel_err(z, leaf.detach()) <= 1e-12


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "rmsprop", "adagrad"])
def test_tensor_hyperparameters_give_the_same_iterates(name: str) -> None:
    """0-dim tensor hyperparameters take the tensor code path; same values to rounding
    (30 steps: near convergence RMSprop's g/√v bounces chaotically and amplifies the
    last-bit differences of the reordered arithmetic)."""
    fopt = by_name(name)
    settings = {
        "sgd": {"lr": 0.05, "momentum": 0.9, "dampening": 0.1, "weight_decay": 0.01},
        "adam": {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.01},
        "adamw": {"lr": 0.01, "beta1": 0.8, "beta2": 0.99, "eps": 1e-6, "weight_decay": 0.1},
        "rmsprop": {"lr": 0.01, "alpha": 0.9, "momentum": 0.5, "weight_decay": 0.01},
        "adagrad": {
            "lr": 0.1,
            "lr_decay": 0.05,
            "weight_decay": 0.01,
            "initial_accumulator_value": 0.2,
        },
    }[name]
    params, grads = make_problem(1)
    as_tensor: dict[str, float | Tensor] = {
        k: torch.tensor(v, dtype=D) for k, v in settings.items()
    }
    runs = []
    for h in (settings, as_tensor):
        hyper = [dict(h) for _ in params]
        state = fopt.init_state(params, hyper)
        xs = [p.clone() for p in params]
        for _ in range(30):
            xs, state = fopt.step(xs, grads(xs), state, hyper)
        runs.append(xs)
    for a, b in zip(*runs):
        assert rel_err(a, b) <= 1e-10


# --------------------------------------------------------------------------- conversion


CONTINUE_CASES = [
    (
        torch.optim.SGD,
        [
            {"lr": 0.05, "momentum": 0.9, "dampening": 0.2},
            {"lr": 0.02, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01},
        ],
    ),
    (torch.optim.Adam, [{"lr": 0.01, "amsgrad": True}, {"lr": 0.02, "weight_decay": 0.1}]),
    (torch.optim.AdamW, [{"lr": 0.01}, {"lr": 0.02, "amsgrad": True, "maximize": False}]),
    (
        torch.optim.RMSprop,
        [{"lr": 0.01, "centered": True, "momentum": 0.5}, {"lr": 0.01, "alpha": 0.9}],
    ),
    (
        torch.optim.Adagrad,
        [{"lr": 0.1, "lr_decay": 0.05}, {"lr": 0.05, "initial_accumulator_value": 0.3}],
    ),
]


@pytest.mark.parametrize(
    ("cls", "groups"), CONTINUE_CASES, ids=lambda c: getattr(c, "__name__", "")
)
def test_from_torch_mid_run_and_write_back(
    cls: OptimizerType, groups: list[dict[str, Any]]
) -> None:
    """torch 7 steps → functional 6 steps → write_back → torch 5 steps equals torch 18 steps,
    and the functional part equals torch's steps 8..13."""
    params, grads = make_problem(2)

    def torch_run(leaves: list[Tensor], opt: torch.optim.Optimizer, n: int) -> None:
        for _ in range(n):
            for p, g in zip(leaves, grads([p.detach() for p in leaves])):
                p.grad = g
            opt.step()

    ref = [p.clone().requires_grad_() for p in params]
    ref_opt = cls([{"params": [p], **g} for p, g in zip(ref, groups)])
    leaves = [p.clone().requires_grad_() for p in params]
    opt = cls([{"params": [p], **g} for p, g in zip(leaves, groups)])

    torch_run(ref, ref_opt, 7)
    torch_run(leaves, opt, 7)
    fopt, state, hyper = from_torch(opt, leaves)
    assert type(fopt).torch_type is cls
    for leaf, s in zip(leaves, state):  # detached clones, not the optimizer's tensors
        assert set(s) == set(opt.state[leaf])
        for key, value in s.items():
            assert not value.requires_grad
            assert value.data_ptr() != opt.state[leaf][key].data_ptr()
    xs = [p.detach().clone() for p in leaves]
    for _ in range(6):
        xs, state = fopt.step(xs, grads(xs), state, hyper)
    torch_run(ref, ref_opt, 6)
    for a, b in zip(xs, ref):
        assert rel_err(a, b.detach()) <= 1e-12

    write_back(opt, leaves, state)
    with torch.no_grad():
        for p, x in zip(leaves, xs):
            p.copy_(x)
    torch_run(leaves, opt, 5)
    torch_run(ref, ref_opt, 5)
    for a, b in zip(leaves, ref):
        assert rel_err(a.detach(), b.detach()) <= 1e-12
    # and the written state is torch's own format: same keys, dtypes and devices
    for a, b in zip(leaves, ref):
        assert set(opt.state[a]) == set(ref_opt.state[b])
        for key in opt.state[a]:
            assert opt.state[a][key].dtype == ref_opt.state[b][key].dtype
            assert opt.state[a][key].device == ref_opt.state[b][key].device


@pytest.mark.parametrize("cls", list(GRIDS), ids=lambda c: c.__name__)
def test_from_torch_before_any_step_matches_init_state(cls: OptimizerType) -> None:
    params, _ = make_problem(0)
    leaves = [p.clone().requires_grad_() for p in params]
    opt = cls(leaves, lr=0.1)
    fopt, state, hyper = from_torch(opt, leaves)
    fresh = fopt.init_state(params, hyper)
    for s, f in zip(state, fresh):
        assert set(s) == set(f)
        for key in s:
            assert torch.equal(s[key], f[key])
    assert hyper[0]["lr"] == 0.1


def test_betas_pair_is_taken_for_beta1_beta2() -> None:
    """torch's spelling ``betas=(β₁, β₂)`` (e.g. in an override dict) means beta1, beta2."""
    beta1 = torch.tensor(0.7, dtype=D, requires_grad=True)
    fopt = by_name("adamw")
    h = fopt.settings({"betas": (beta1, 0.9)})  # type: ignore[dict-item]
    assert h["beta1"] is not None and h["beta2"] == 0.9 and h["decoupled_weight_decay"]
    x = [torch.ones(3, dtype=D)]
    hyper: list[dict[str, Any]] = [{"betas": (beta1, 0.9)}]
    (y,), _ = fopt.step(x, x, fopt.init_state(x, hyper), hyper)
    (d,) = torch.autograd.grad(y.sum(), beta1)
    assert torch.isfinite(d)


def test_from_torch_reads_each_params_group() -> None:
    a, b, c = (torch.zeros(2, requires_grad=True) for _ in range(3))
    groups: list[dict[str, Any]] = [
        {"params": [a, b], "betas": (0.5, 0.6)},
        {"params": [c], "lr": 0.3},
    ]
    opt = torch.optim.Adam(groups, lr=0.1)
    fopt, _, hyper = from_torch(opt, [c, a])
    assert isinstance(fopt, FunctionalAdam)
    assert hyper[0]["lr"] == 0.3 and hyper[0]["beta1"] == 0.9
    assert hyper[1]["lr"] == 0.1 and (hyper[1]["beta1"], hyper[1]["beta2"]) == (0.5, 0.6)
    with pytest.raises(ZigguratError, match=r"params\[0\].*no param group"):
        from_torch(opt, [torch.zeros(2)])


# --------------------------------------------------------------------------- gradients


HYPER_CASES = {
    "sgd": {"lr": 0.05, "momentum": 0.8, "dampening": 0.1, "weight_decay": 0.02},
    "sgd_nesterov": {
        "lr": 0.05,
        "momentum": 0.8,
        "nesterov": True,
        "weight_decay": 0.02,
        "maximize": True,
    },
    "adam": {"lr": 0.02, "beta1": 0.8, "beta2": 0.95, "eps": 1e-3, "weight_decay": 0.05},
    "adamw": {
        "lr": 0.02,
        "beta1": 0.8,
        "beta2": 0.95,
        "eps": 1e-3,
        "weight_decay": 0.05,
        "maximize": True,
    },
    "rmsprop": {"lr": 0.01, "alpha": 0.9, "eps": 1e-3, "momentum": 0.5, "weight_decay": 0.05},
    "rmsprop_centered": {
        "lr": 0.01,
        "alpha": 0.9,
        "eps": 1e-3,
        "centered": True,
        "weight_decay": 0.05,
    },
    "adagrad": {
        "lr": 0.1,
        "lr_decay": 0.05,
        "eps": 1e-2,
        "weight_decay": 0.05,
        "initial_accumulator_value": 0.3,
    },
}


def _unroll(
    fopt: FunctionalOptimizer,
    hyper_values: dict[str, Any],
    steps: int,
    grads: Grads,
    params: list[Tensor],
) -> Tensor:
    hyper = [dict(hyper_values) for _ in params]
    state = fopt.init_state(params, hyper)
    xs = list(params)
    for _ in range(steps):
        xs, state = fopt.step(xs, grads(xs), state, hyper)
    return sum((x.square() * (1.0 + i) + x).sum() for i, x in enumerate(xs))  # type: ignore


@pytest.mark.parametrize("case", list(HYPER_CASES))
def test_hypergradient_matches_central_difference(case: str) -> None:
    """d(scalar of params after 20 steps)/d(every real hyperparameter) vs central FD."""
    fopt = by_name(case.split("_")[0])
    settings = HYPER_CASES[case]
    params, loss_grads = make_problem(4)

    def grads(xs: list[Tensor]) -> list[Tensor]:  # maximize: ascend −loss, which is bounded
        return [-g for g in loss_grads(xs)] if settings.get("maximize") else loss_grads(xs)

    reals = [k for k, v in settings.items() if not isinstance(v, bool)]
    tensors = {k: torch.tensor(settings[k], dtype=D, requires_grad=True) for k in reals}
    x0 = [p.clone().requires_grad_() for p in params]
    out = _unroll(fopt, {**settings, **tensors}, 20, grads, x0)
    analytic = torch.autograd.grad(out, [tensors[k] for k in reals] + x0)
    for key, value in zip(reals, analytic):
        h = 1e-4 * settings[key]
        with torch.no_grad():
            up = _unroll(fopt, {**settings, key: settings[key] + h}, 20, grads, params)
            down = _unroll(fopt, {**settings, key: settings[key] - h}, 20, grads, params)
        fd = float((up - down) / (2 * h))
        assert abs(float(value) - fd) <= 1e-6 * max(abs(fd), 1e-3), (key, float(value), fd)
    # and with respect to the initial parameters, along one random direction that leaves
    # the zero-gradient coordinates at 0: there the update ∝ g/(c|g| + ε) has a kink in θ,
    # and a central difference is only first-order accurate
    gen = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, dtype=D, generator=gen) for p in params]
    direction[0].view(-1)[2] = direction[1].view(-1)[2] = 0.0
    along = sum(float((g * d).sum()) for g, d in zip(analytic[len(reals) :], direction))
    h = 1e-5
    with torch.no_grad():
        up = _unroll(fopt, settings, 20, grads, [p + h * d for p, d in zip(params, direction)])
        down = _unroll(fopt, settings, 20, grads, [p - h * d for p, d in zip(params, direction)])
    fd = float((up - down) / (2 * h))
    assert abs(along - fd) <= 1e-6 * max(abs(fd), 1e-3)


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("adam", {"lr": 0.01}),
        ("adam", {"lr": 0.01, "amsgrad": True}),
        ("adamw", {"lr": 0.01, "weight_decay": 0.0}),
        ("rmsprop", {"lr": 0.01}),
        ("rmsprop", {"lr": 0.01, "centered": True, "momentum": 0.5}),
        ("adagrad", {"lr": 0.1}),
    ],
)
def test_no_nan_in_backward_with_zero_gradient_coordinates(name: str, settings: dict) -> None:
    fopt = by_name(name)
    params, grads = make_problem(6)
    lr = torch.tensor(settings["lr"], dtype=D, requires_grad=True)
    x0 = [p.clone().requires_grad_() for p in params]

    def unrolled() -> tuple[Tensor, list[dict[str, Tensor]]]:
        hyper = [{**settings, "lr": lr} for _ in x0]
        state = fopt.init_state(x0, hyper)
        xs = list(x0)
        for _ in range(5):
            xs, state = fopt.step(xs, grads(xs), state, hyper)
        return sum((x * x).sum() for x in xs), state  # type: ignore[return-value]

    out, state = unrolled()
    second = "sum" if name == "adagrad" else ("exp_avg_sq" if "adam" in name else "square_avg")
    assert (state[0][second].view(-1)[2] == 0) and (state[1][second].view(-1)[2] == 0)
    derivs = torch.autograd.grad(out, [lr, *x0])
    assert all(torch.isfinite(d).all() for d in derivs)
    assert float(derivs[0]) != 0.0

    # the test has teeth: a plain sqrt gives NaN here
    plain_sqrt = F.safe_sqrt
    try:
        F.safe_sqrt = torch.sqrt  # type: ignore[assignment]
        out, _ = unrolled()
        derivs = torch.autograd.grad(out, [lr, *x0])
    finally:
        F.safe_sqrt = plain_sqrt
    assert not all(torch.isfinite(d).all() for d in derivs)


def test_safe_sqrt_forward_is_torchs() -> None:
    x = torch.tensor([4.0, 0.0, -0.0, 2.0, -1.0], dtype=D, requires_grad=True)
    y = F.safe_sqrt(x)
    assert torch.equal(y.detach()[:4], x.detach()[:4].sqrt()) and torch.isnan(y[4])
    (g,) = torch.autograd.grad(y[:4].sum(), x)
    expected = torch.tensor([0.25, 0.0, 0.0, 1 / (2 * 2**0.5), 0.0], dtype=D)
    torch.testing.assert_close(g, expected, rtol=1e-15, atol=0.0)


# --------------------------------------------------------------------------- purity


@pytest.mark.parametrize(
    ("name", "settings"),
    [
        ("sgd", {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 0.1}),
        ("sgd", {"lr": 0.1, "momentum": 0.9, "dampening": 0.5, "maximize": True}),
        ("adam", {"lr": 0.1, "amsgrad": True, "weight_decay": 0.1}),
        ("adamw", {"lr": 0.1, "amsgrad": True, "maximize": True}),
        ("rmsprop", {"lr": 0.1, "centered": True, "momentum": 0.5, "weight_decay": 0.1}),
        ("adagrad", {"lr": 0.1, "lr_decay": 0.1, "weight_decay": 0.1}),
    ],
)
def test_inputs_are_not_mutated(name: str, settings: dict) -> None:
    fopt = by_name(name)
    params, grads = make_problem(7)
    hyper = [dict(settings) for _ in params]
    state = fopt.init_state(params, hyper)
    xs = params
    for _ in range(3):  # nonzero buffers (and SGD's momentum buffer present)
        xs, state = fopt.step(xs, grads(xs), state, hyper)
    gs = grads(xs)
    copies = (
        [x.clone() for x in xs],
        [g.clone() for g in gs],
        [{k: v.clone() for k, v in s.items()} for s in state],
    )
    versions = [t._version for t in [*xs, *gs, *(v for s in state for v in s.values())]]
    hyper_copy = [dict(h) for h in hyper]
    new_xs, new_state = fopt.step(xs, gs, state, hyper)
    assert all(torch.equal(a, b) for a, b in zip(xs, copies[0]))
    assert all(torch.equal(a, b) for a, b in zip(gs, copies[1]))
    for s, c, n in zip(state, copies[2], new_state):
        assert set(s) == set(c) and all(torch.equal(s[k], c[k]) for k in s)
        assert n is not s
    assert versions == [t._version for t in [*xs, *gs, *(v for s in state for v in s.values())]]
    assert hyper == hyper_copy
    assert all(a is not b for a, b in zip(new_xs, xs))


def test_none_gradient_skips_the_parameter() -> None:
    fopt = FunctionalAdam()
    params, grads = make_problem(8)
    hyper = [{"lr": 0.1} for _ in params]
    state = fopt.init_state(params, hyper)
    g = grads(params)
    xs, new_state = fopt.step(params, [g[0], None], state, hyper)
    assert xs[1] is params[1] and float(new_state[1]["step"]) == 0.0
    assert float(new_state[0]["step"]) == 1.0 and not torch.equal(xs[0], params[0])


# --------------------------------------------------------------------------- errors


class MySGD(torch.optim.SGD):
    pass


@pytest.mark.parametrize(
    ("make", "named"),
    [
        (lambda p: torch.optim.Adamax(p), "Adamax"),
        (lambda p: torch.optim.LBFGS(p), "LBFGS"),
        (lambda p: MySGD(p, lr=0.1), "MySGD"),
    ],
)
def test_unsupported_optimizer_is_refused_by_name(make: Callable, named: str) -> None:
    p = torch.zeros(2, requires_grad=True)
    opt = make([p])
    with pytest.raises(ZigguratError, match=named) as info:
        from_torch(opt, [p])
    assert "torch.optim.SGD" in str(info.value) and "torch.optim.Adagrad" in str(info.value)
    with pytest.raises(ZigguratError, match=named):
        write_back(opt, [p], [{}])
    with pytest.raises(ZigguratError, match=named):
        functional_twin(opt)
    if named == "MySGD":
        assert "subclass" in str(info.value)


def test_bad_settings_are_refused() -> None:
    x = [torch.zeros(3, dtype=D)]
    with pytest.raises(ConfigError, match="betas"):
        FunctionalAdam().init_state(x, [{"betas": 0.9}])
    with pytest.raises(ConfigError, match="betas"):
        FunctionalAdam().init_state(x, [{"betas": (0.9, 0.99), "beta1": 0.9}])  # type: ignore[dict-item]
    with pytest.raises(ConfigError, match="nesterov"):
        FunctionalSGD().init_state(x, [{"nesterov": True}])
    with pytest.raises(ConfigError, match="centered"):
        FunctionalRMSprop().init_state(x, [{"centered": 1.0}])
    with pytest.raises(ConfigError, match="lr"):
        FunctionalAdagrad().init_state(x, [{"lr": torch.ones(2)}])
    with pytest.raises(ConfigError, match="decoupled_weight_decay"):
        by_name("adamw").init_state(x, [{"decoupled_weight_decay": False}])
    with pytest.raises(ConfigError, match="adam"):
        by_name("adamax")
    fopt = FunctionalAdam()
    with pytest.raises(ZigguratError, match="state: 2"):
        fopt.step(x, [x[0]], [{}, {}], [{}])
    with pytest.raises(ZigguratError, match="shape"):
        fopt.step(x, [torch.zeros(1, dtype=D)], fopt.init_state(x, [{}]), [{}])
    state = fopt.init_state(x, [{}])
    with pytest.raises(ZigguratError, match="max_exp_avg_sq"):
        fopt.step(x, x, state, [{"amsgrad": True}])
