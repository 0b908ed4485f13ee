"""CG's fused mixed product: M x = Σ_k α_k M p_k from the Hessian-vector products it takes
(one backward to θ and λ together per iteration), against the unfused M · solve(v) and the
closed form, in float64 (tests/ridge.py), and a count showing no separate mixed pass."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch

import ziggurat as zg
from ziggurat.hypergrad import Curvature

from helpers import Vec
from ridge import DTYPE, Ridge, krylov_solution, make_ridge, rel_err


@pytest.fixture
def grad_calls(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts backward passes: torch.autograd.grad calls and the engine runs that
    ``ziggurat.backward.grad`` starts itself (each goes through to the real function)."""
    calls = [0]

    def counting(real: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            calls[0] += 1
            return real(*args, **kwargs)
        return call

    monkeypatch.setattr(torch.autograd, "grad", counting(torch.autograd.grad))
    if hasattr(torch.autograd.graph, "_engine_run_backward"):  # (torch >= 2.3)
        monkeypatch.setattr(torch.autograd.graph, "_engine_run_backward",
                            counting(torch.autograd.graph._engine_run_backward))
    yield calls




def _unfused(method: zg.CG, obj: zg.InnerObjective, v: list[torch.Tensor]) -> torch.Tensor:
    """−M · solve(v): the solve, then the separate double-backward mixed product."""
    curvature = Curvature(obj)
    x = method.solve(obj, [t.detach() for t in v], curvature)
    return -curvature.mixed(x)[0]


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_fused_cg_equals_unfused_and_closed_form(k: int, damping: float,
                                                 grad_calls: list[int]) -> None:
    r = make_ridge(40.0)
    theta0 = r.theta_star() - 0.2
    theta, lam = theta0.clone().requires_grad_(), r.lam.clone().requires_grad_()
    method = zg.CG(iterations=k, damping=damping)
    v = [r.v(theta0)]
    grad_calls[0] = 0
    fused = method(r.objective(theta, lam), v)[0]
    # one call builds ∇_θ L_in's graph, then one per iteration: no separate mixed pass
    assert grad_calls[0] == 1 + k
    grad_calls[0] = 0
    unfused = _unfused(method, r.objective(theta, lam), v)
    assert grad_calls[0] == 1 + k + 1
    assert rel_err(fused, unfused) <= 1e-12
    h = r.hessian() + damping * torch.eye(theta0.numel(), dtype=DTYPE)
    x = krylov_solution(h, v[0], k)
    assert rel_err(fused, -r.mixed(theta0, x)) <= 1e-10
    if k == theta0.numel():  # exact after dim(θ) steps
        expected = -r.mixed(theta0, torch.linalg.solve(h, v[0]))
        assert rel_err(fused, expected) <= 1e-10


def test_fused_cg_gives_zeros_for_upper_parameters_the_lower_loss_does_not_read() -> None:
    r = make_ridge(2.0)
    ts = r.theta_star()
    theta, lam = ts.clone().requires_grad_(), r.lam.clone().requires_grad_()
    spare = torch.ones(3, dtype=DTYPE, requires_grad=True)  # read by no lower loss
    obj = zg.InnerObjective([theta], [lam, spare], lambda: r.inner_loss(theta, lam))
    out = zg.CG(iterations=6)(obj, [r.v(ts)])
    assert rel_err(out[0], r.implicit_hypergrad(ts)) <= 1e-10
    assert torch.equal(out[1], torch.zeros(3, dtype=DTYPE))


def test_fused_cg_with_tol_stopping_before_any_product() -> None:
    """v = 0 with a tolerance: no product is taken; the answer is a zero (the coupling of
    L_in to λ is still checked, as without fusion)."""
    r = make_ridge(2.0)
    ts = r.theta_star()
    theta, lam = ts.clone().requires_grad_(), r.lam.clone().requires_grad_()
    out = zg.CG(iterations=4, tol=1e-8)(r.objective(theta, lam),
                                         [torch.zeros_like(ts)])[0]
    assert torch.equal(out, torch.zeros_like(ts))
    obj = zg.InnerObjective([theta], [lam], lambda: (theta**2).sum(), name="inner",
                            upper_name="outer")
    with pytest.raises(zg.HypergradientError, match=r"'inner'.*'outer'"):
        zg.CG(iterations=4, tol=1e-8)(obj, [torch.zeros_like(ts)])


def test_fused_cg_tol_stop_equals_unfused() -> None:
    r = make_ridge(2.0)
    theta0 = r.theta_star() + 0.1
    theta, lam = theta0.clone().requires_grad_(), r.lam.clone().requires_grad_()
    method = zg.CG(iterations=50, tol=1e-6)
    v = [r.v(theta0)]
    fused = method(r.objective(theta, lam), v)[0]
    assert rel_err(fused, _unfused(method, r.objective(theta, lam), v)) <= 1e-12
    assert rel_err(fused, r.implicit_hypergrad(theta0)) <= 1e-5


def test_subclass_overriding_solve_is_not_fused(grad_calls: list[int]) -> None:
    """A subclass's own solve must be honoured: the mixed product is then taken of its x."""

    class HalfCG(zg.CG):
        def solve(self, objective: zg.InnerObjective, v: list[torch.Tensor],
                  curvature: Curvature) -> list[torch.Tensor]:
            return [0.5 * t for t in super().solve(objective, v, curvature)]

    r = make_ridge(2.0)
    ts = r.theta_star()
    theta, lam = ts.clone().requires_grad_(), r.lam.clone().requires_grad_()
    grad_calls[0] = 0
    out = HalfCG(iterations=6)(r.objective(theta, lam), [r.v(ts)])[0]
    assert grad_calls[0] == 1 + 6 + 1
    assert rel_err(out, 0.5 * r.implicit_hypergrad(ts)) <= 1e-10


def _program(r: Ridge, method: zg.CG, weight: float) -> list[torch.Tensor]:
    """Two levels: the upper loss reads its own λ (weight·½‖λ‖²) besides θ; returns the
    upper gradients seen at each step."""
    inner_m, outer_m = Vec(r.theta_star()), Vec(r.lam)
    got: list[torch.Tensor] = []

    class Outer(zg.ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            lam_ = self.module()
            return r.outer_loss(self.inner()) + 0.5 * weight * (lam_ @ lam_)

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(grads[0].clone())

    outer = Outer("outer", outer_m, torch.optim.SGD(outer_m.parameters(), lr=0.0))
    inner = zg.ImplicitProblem(
        "inner", inner_m, torch.optim.SGD(inner_m.parameters(), lr=0.0),
        config=zg.Config(type=method),
        training_step=lambda p, bt: r.inner_loss(p(), p.outer()),
    )
    zg.Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
              zg.EngineConfig(train_iters=2)).run()
    return got


@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_fused_cg_in_a_program_whose_upper_loss_reads_its_own_parameters(
        damping: float) -> None:
    r = make_ridge(40.0)
    ts = r.theta_star()
    got = _program(r, zg.CG(iterations=6, damping=damping), weight=0.7)
    h = r.hessian() + damping * torch.eye(ts.numel(), dtype=DTYPE)
    expected = 0.7 * r.lam - r.mixed(ts, torch.linalg.solve(h, r.v(ts)))
    assert got and all(rel_err(g, expected) <= 1e-10 for g in got)


class _HalfSquare(torch.autograd.Function):
    """½‖θ‖² whose backward hands back a view of θ: the graph of ∇_θ L is a pass-through,
    so autograd returns the vector x itself as H x (H = I)."""

    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(theta)
        return 0.5 * (theta * theta).sum()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        (theta,) = ctx.saved_tensors
        return theta.view_as(theta)  # valid for grad = 1, the loss's own seed


def test_products_that_alias_their_vector_are_copied_before_in_place_updates() -> None:
    """H = I, M = I: Neumann / CG update H x in place; they must not write into x (or v)."""
    theta = torch.tensor([0.3, -1.2, 2.0], dtype=DTYPE, requires_grad=True)
    lam = torch.zeros(3, dtype=DTYPE, requires_grad=True)
    obj = zg.InnerObjective([theta], [lam],
                            lambda: _HalfSquare.apply(theta) + (lam * theta).sum())
    v = torch.tensor([1.0, 2.0, -3.0], dtype=DTYPE)
    alpha, k = 0.5, 3
    x = alpha * sum((1 - alpha) ** j for j in range(k + 1)) * v
    out = zg.Neumann(iterations=k, alpha=alpha)(obj, [v])[0]
    assert torch.allclose(out, -x, rtol=1e-15, atol=0)
    v_before = v.clone()
    out = zg.CG(iterations=2, damping=0.5)(obj, [v])[0]
    assert torch.allclose(out, -v / 1.5, rtol=1e-15, atol=0)
    assert torch.equal(v, v_before)
