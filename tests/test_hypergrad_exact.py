"""Every implicit method against an exact answer, in float64, in the regime where it is exact."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import ziggurat as zg

from ridge import DTYPE, Ridge, condition_number, krylov_solution, make_ridge, rel_err

CONDITIONS = [2.0, 40.0]


@pytest.fixture(params=CONDITIONS, ids=["well", "ill"])
def ridge(request: pytest.FixtureRequest) -> Ridge:
    r = make_ridge(request.param)
    assert condition_number(r) == pytest.approx(request.param, rel=1e-6)
    return r


def _at(r: Ridge, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return theta.clone().requires_grad_(), r.lam.clone().requires_grad_()


def _run(method: zg.HypergradMethod, r: Ridge, theta0: torch.Tensor, **kw: object) -> torch.Tensor:
    theta, lam = _at(r, theta0)
    out = method(r.objective(theta, lam, **kw), [r.v(theta0)])
    # exact-mode methods never touch θ; finite differences restore it up to rounding
    assert torch.allclose(theta.detach(), theta0, rtol=1e-14, atol=1e-16)
    return out[0]


# --------------------------------------------------------------------------- IFT methods
@pytest.mark.parametrize("mixed", ["exact", "fd"])
def test_cg_reaches_implicit_hypergradient(ridge: Ridge, mixed: str) -> None:
    ts = ridge.theta_star()
    out = _run(zg.CG(iterations=ts.numel(), mixed=mixed), ridge, ts)  # type: ignore[arg-type]
    assert rel_err(out, ridge.implicit_hypergrad(ts)) <= 1e-8


def test_neumann_reaches_implicit_hypergradient(ridge: Ridge) -> None:
    ts = ridge.theta_star()
    out = _run(zg.Neumann(iterations=1500), ridge, ts)
    assert rel_err(out, ridge.implicit_hypergrad(ts)) <= 1e-8


def test_fixed_point_reaches_implicit_hypergradient(ridge: Ridge) -> None:
    ts = ridge.theta_star()
    out = _run(zg.FixedPoint(iterations=1500, warm_start=False), ridge, ts)
    assert rel_err(out, ridge.implicit_hypergrad(ts)) <= 1e-8


def test_implicit_methods_use_current_theta_away_from_optimum(ridge: Ridge) -> None:
    """Off the optimum the methods still compute −∂²_{λθ}L · H⁻¹v at the current θ."""
    theta0 = ridge.theta_star() + 0.3
    for method in (zg.CG(iterations=6), zg.Neumann(iterations=1500)):
        assert rel_err(_run(method, ridge, theta0), ridge.implicit_hypergrad(theta0)) <= 1e-8




@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_cg_partial_iterations_equal_krylov_minimiser(k: int, damping: float) -> None:
    """Each CG iterate is the exact Krylov-space minimiser (Betty's CG is wrong beyond k=1)."""
    r = make_ridge(40.0)
    theta0 = r.theta_star() - 0.2
    h = r.hessian() + damping * torch.eye(theta0.numel(), dtype=DTYPE)
    x = krylov_solution(h, r.v(theta0), k)
    out = _run(zg.CG(iterations=k, damping=damping), r, theta0)
    assert rel_err(out, -r.mixed(theta0, x)) <= 1e-10


def test_cg_damping_solves_shifted_system() -> None:
    r = make_ridge(40.0)
    ts = r.theta_star()
    h = r.hessian() + 0.25 * torch.eye(ts.numel(), dtype=DTYPE)
    expected = -r.mixed(ts, torch.linalg.solve(h, r.v(ts)))
    assert rel_err(_run(zg.CG(iterations=6, damping=0.25), r, ts), expected) <= 1e-10


def test_cg_tolerance_stops_early_but_stays_accurate() -> None:
    r = make_ridge(2.0)
    ts = r.theta_star()
    out = _run(zg.CG(iterations=50, tol=1e-12), r, ts)
    assert rel_err(out, r.implicit_hypergrad(ts)) <= 1e-10


@pytest.mark.parametrize("k", [0, 1, 3, 7])
def test_neumann_partial_sum_equals_its_definition(k: int) -> None:
    """K terms: x = α Σ_{j=0}^{K} (I − αH)^j v, with a given α."""
    r = make_ridge(40.0)
    theta0 = r.theta_star()
    h, v, alpha = r.hessian(), r.v(theta0), 0.03
    m = torch.eye(h.shape[0], dtype=DTYPE) - alpha * h
    x = alpha * sum(torch.linalg.matrix_power(m, j) @ v for j in range(k + 1))
    out = _run(zg.Neumann(iterations=k, alpha=alpha), r, theta0)
    assert rel_err(out, -r.mixed(theta0, x)) <= 1e-12


def test_neumann_chooses_a_safe_alpha_from_power_iteration() -> None:
    r = make_ridge(40.0)
    lam_max = float(torch.linalg.eigvalsh(r.hessian()).max())
    assert lam_max > 2.0, "the test needs λ_max > 2, where Betty's default α = 1 diverges"
    state: dict[str, object] = {}
    _run(zg.Neumann(iterations=5), r, r.theta_star(), state=state)
    info = state["neumann"]
    assert isinstance(info, dict)
    assert 0.0 < info["alpha"] < 2.0 / lam_max
    assert info["lambda_max"] == pytest.approx(lam_max, rel=1e-3)


def test_neumann_diverging_alpha_is_visible_not_silent() -> None:
    """With α > 2/λ_max the series blows up (the reason α is chosen by power iteration)."""
    r = make_ridge(40.0)
    ts = r.theta_star()
    good = _run(zg.Neumann(iterations=60), r, ts)
    bad = _run(zg.Neumann(iterations=60, alpha=1.0), r, ts)
    assert rel_err(good, r.implicit_hypergrad(ts)) < 0.5
    assert bad.norm() > 1e6 * good.norm()


def test_fixed_point_cold_start_equals_neumann() -> None:
    r = make_ridge(40.0)
    ts = r.theta_star()
    a = _run(zg.FixedPoint(iterations=9, alpha=0.02, warm_start=False), r, ts)
    b = _run(zg.Neumann(iterations=9, alpha=0.02), r, ts)
    assert rel_err(a, b) <= 1e-14


def test_fixed_point_warm_start_continues_the_iteration() -> None:
    """Two warm calls of K iterations equal one cold run of 2K iterations (same θ and v)."""
    r = make_ridge(40.0)
    ts = r.theta_star()
    state: dict[str, object] = {}
    warm = zg.FixedPoint(iterations=20, alpha=0.02, warm_start=True)
    _run(warm, r, ts, state=state)
    second = _run(warm, r, ts, state=state)
    cold = _run(zg.FixedPoint(iterations=40, alpha=0.02, warm_start=False), r, ts)
    assert rel_err(second, cold) <= 1e-12


# --------------------------------------------------------------------------- DARTS
@pytest.mark.parametrize("mixed", ["fd", "exact"])
@pytest.mark.parametrize("scale", [1.0, 0.05])
def test_darts_equals_its_definition(ridge: Ridge, mixed: str, scale: float) -> None:
    """darts = −scale · ∂²_{λθ} L_in · v; the central difference is exact for this loss."""
    theta0 = ridge.theta_star() + 0.1
    out = _run(zg.Darts(scale=scale, mixed=mixed), ridge, theta0)  # type: ignore[arg-type]
    expected = -scale * ridge.mixed(theta0, ridge.v(theta0))
    assert rel_err(out, expected) <= 1e-10


def test_darts_finite_difference_radius_and_truncation() -> None:
    """On a loss whose ∇_λ is cubic in θ the central difference has error ε²/6·∂³ — check it."""
    theta0 = torch.tensor([0.7, -1.2], dtype=DTYPE)
    lam0 = torch.tensor([0.3, 0.9], dtype=DTYPE)
    v = torch.tensor([1.0, 2.0], dtype=DTYPE)
    theta, lam = theta0.clone().requires_grad_(), lam0.clone().requires_grad_()
    obj = zg.InnerObjective([theta], [lam], lambda: (lam * theta**4).sum() / 4)
    fd_eps = 0.01
    out = zg.Darts(fd_eps=fd_eps, mixed="fd")(obj, [v])[0]
    # ∇_λ L = θ⁴/4 ⇒ [(θ+εv)⁴ − (θ−εv)⁴]/(8ε) = θ³v + θ v³ ε²  (exactly)
    eps = fd_eps / float(v.norm())
    expected = -(theta0**3 * v + theta0 * v**3 * eps**2)
    assert rel_err(out, expected) <= 1e-10
    exact = zg.Darts(mixed="exact")(obj, [v])[0]
    assert rel_err(exact, -(theta0**3 * v)) <= 1e-14


# --------------------------------------------------------------------------- SAMA
def _update_jacobian_by_differences(
    make_opt: object, theta_prev: torch.Tensor, state: dict, grad: torch.Tensor, h: float = 1e-5
) -> torch.Tensor:
    """∂u/∂g of the real torch.optim step by central differences (elementwise, float64)."""
    def update(g: torch.Tensor) -> torch.Tensor:
        p = torch.nn.Parameter(theta_prev.clone())
        opt = make_opt([p])  # type: ignore[operator]
        # load_state_dict shares tensors with its argument and step() mutates them: copy
        opt.load_state_dict(copy.deepcopy(state))
        p.grad = g.clone()
        opt.step()
        return theta_prev - p.detach()

    return (update(grad + h) - update(grad - h)) / (2 * h)


OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd_wd": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.3),
    "momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "momentum_damp": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True,
                                           weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "adam_wd": lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.95), weight_decay=0.1),
    "adam_amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_sama_uses_the_exact_update_jacobian_of_torch_optim(name: str, steps: int) -> None:
    """SAMA = −∂²_{λθ}L · (P v) with P the optimizer's true ∂u/∂g at its last step."""
    r = make_ridge(40.0)
    make_opt = OPTIMIZERS[name]
    theta = torch.nn.Parameter(r.theta_star() + 0.5)
    lam = r.lam.clone().requires_grad_()
    opt = make_opt([theta])
    method = zg.SAMA()
    method_state: dict[str, object] = {}
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        theta_prev = theta.detach().clone()
        saved = copy.deepcopy(opt.state_dict())
        # a gradient with entries of both signs and different sizes
        grad = torch.randn(theta.shape, generator=gen, dtype=DTYPE)
        theta.grad = grad.clone()
        method.before_optimizer_step(opt, [theta], method_state)
        opt.step()
    jac = _update_jacobian_by_differences(make_opt, theta_prev, saved, grad)
    v = r.v(theta.detach())
    obj = zg.InnerObjective([theta], [lam], lambda: r.inner_loss(theta, lam), optimizer=opt,
                            state=method_state)
    out = method(obj, [v])[0]
    expected = -r.mixed(theta.detach(), jac * v)
    # The differenced reference is accurate to ~1e-9 of the update's own size (lr · |v|), not
    # of a tiny Jacobian entry (Adam's first step has ∂u/∂g ≈ lr·ε/g²), so measure against it.
    lr = opt.param_groups[0]["lr"]
    size = float(r.mixed(theta.detach(), lr * v).norm())
    assert float((out - expected).norm()) <= 1e-7 * size
    assert float(out.norm()) > 0.0


def test_sama_adam_formula_to_1e10() -> None:
    """The documented Adam formula, written out here independently, to 1e-10."""
    r = make_ridge(2.0)
    theta = torch.nn.Parameter(r.theta_star() + 0.5)
    lam = r.lam.clone().requires_grad_()
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    opt = torch.optim.Adam([theta], lr=lr, betas=(b1, b2), eps=eps)
    method, state = zg.SAMA(), {}
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        g = torch.randn(theta.shape, generator=gen, dtype=DTYPE)
        theta.grad = g.clone()
        method.before_optimizer_step(opt, [theta], state)
        opt.step()
    s = opt.state[theta]
    t = 3
    m_hat = s["exp_avg"] / (1 - b1**t)
    sq = (s["exp_avg_sq"] / (1 - b2**t)).sqrt()
    jac = lr * ((1 - b1) / (1 - b1**t) * (sq + eps) - m_hat * (1 - b2) * g / ((1 - b2**t) * sq)) / (
        sq + eps
    ) ** 2
    v = r.v(theta.detach())
    obj = zg.InnerObjective([theta], [lam], lambda: r.inner_loss(theta, lam), optimizer=opt,
                            state=state)
    out = method(obj, [v])[0]
    assert rel_err(out, -r.mixed(theta.detach(), jac * v)) <= 1e-10


def test_sama_sgd_equals_darts_scaled_by_lr() -> None:
    r = make_ridge(40.0)
    theta = torch.nn.Parameter(r.theta_star())
    lam = r.lam.clone().requires_grad_()
    opt = torch.optim.SGD([theta], lr=0.07)
    state: dict[str, object] = {}
    theta.grad = torch.ones_like(theta)
    zg.SAMA().before_optimizer_step(opt, [theta], state)
    opt.step()
    obj = zg.InnerObjective([theta], [lam], lambda: r.inner_loss(theta, lam), optimizer=opt,
                            state=state)
    v = r.v(theta.detach())
    out = zg.SAMA()(obj, [v])[0]
    darts = zg.Darts(scale=0.07)(obj, [v])[0]
    assert rel_err(out, darts) <= 1e-10


@pytest.mark.parametrize(
    "make_opt",
    [lambda ps: torch.optim.Adamax(ps), lambda ps: torch.optim.RMSprop(ps),
     lambda ps: torch.optim.SGD(ps, lr=0.1, maximize=True)],
    ids=["adamax", "rmsprop", "maximize"],
)
def test_sama_refuses_optimizers_it_cannot_differentiate(make_opt: object) -> None:
    theta = torch.nn.Parameter(torch.ones(3, dtype=DTYPE))
    opt = make_opt([theta])  # type: ignore[operator]
    theta.grad = torch.ones_like(theta)
    with pytest.raises(zg.HypergradientError, match="SAMA") as err:
        zg.SAMA().before_optimizer_step(opt, [theta], {"problem_name": "inner"})
    assert "inner" in str(err.value)


# --------------------------------------------------------------------------- failure modes
def test_lower_loss_independent_of_upper_is_an_error_not_a_zero() -> None:
    theta = torch.ones(3, dtype=DTYPE, requires_grad=True)
    lam = torch.ones(3, dtype=DTYPE, requires_grad=True)
    obj = zg.InnerObjective([theta], [lam], lambda: (theta**2).sum(), name="inner",
                            upper_name="outer")
    for method in (zg.Darts(), zg.CG(iterations=2), zg.Neumann(iterations=2)):
        with pytest.raises(zg.HypergradientError, match=r"'inner'.*'outer'"):
            method(obj, [torch.ones(3, dtype=DTYPE)])


def test_wrong_vector_shape_is_reported() -> None:
    theta = torch.ones(3, dtype=DTYPE, requires_grad=True)
    lam = torch.ones(3, dtype=DTYPE, requires_grad=True)
    obj = zg.InnerObjective([theta], [lam], lambda: (lam * theta**2).sum(), name="inner")
    with pytest.raises(zg.HypergradientError, match="shapes"):
        zg.CG()(obj, [torch.ones(4, dtype=DTYPE)])


class _NoCompiler(Exception):
    pass


def _failing_kernel(*args: object) -> torch.Tensor:
    raise _NoCompiler("no C++ compiler")


@pytest.mark.parametrize("block", [1, 5, 1 << 18, "compiled", "compile-fails"])
@pytest.mark.parametrize("amsgrad", [False, True])
def test_sama_adam_product_by_blocks_equals_formula(
        block: int | str, amsgrad: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """P v computed block by block (any block size, a non-contiguous v, never-moved
    coordinates with P = 0, amsgrad's older maxima) or by the compiled kernel (or the eager
    loop after a failed compile, with a warning) equals the documented formula to 1e-12."""
    from ziggurat.hypergrad import sama

    if block == "compiled":
        if amsgrad:
            pytest.skip("amsgrad always takes the eager loop")
        monkeypatch.setattr(sama, "COMPILE_MIN_ELEMENTS", 1)
    elif block == "compile-fails":
        monkeypatch.setattr(sama, "COMPILE_MIN_ELEMENTS", 1)
        monkeypatch.setattr(sama, "_compiled", {"kernel": _failing_kernel})
    else:
        monkeypatch.setattr(sama, "COMPILE", False)
        monkeypatch.setattr(sama, "BLOCK", block)
    gen = torch.Generator().manual_seed(5)
    shape = (7, 3)  # 21 elements: not a multiple of 5
    lr, b1, b2, eps, t = 0.01, 0.8, 0.95, 1e-8, 4
    m = torch.randn(shape, generator=gen, dtype=DTYPE) * 1e-2
    sq = torch.rand(shape, generator=gen, dtype=DTYPE) * 1e-4
    g = torch.randn(shape, generator=gen, dtype=DTYPE) * 1e-2
    never = torch.zeros(shape, dtype=torch.bool)
    never[::3, 1] = True  # coordinates L_in never moved: v_t = m = g = 0
    for x in (m, sq, g):
        x.masked_fill_(never, 0.0)
    state = {"step": torch.tensor(float(t)), "exp_avg": m, "exp_avg_sq": sq}
    second = sq
    if amsgrad:
        second = torch.maximum(sq, torch.rand(shape, generator=gen, dtype=DTYPE) * 2e-4)
        second.masked_fill_(never, 0.0)
        state["max_exp_avg_sq"] = second
    v = torch.randn(shape[::-1], generator=gen, dtype=DTYPE).t()  # non-contiguous
    step = sama.AdamStep(lr, b1, b2, eps, amsgrad, g)
    if block == "compile-fails" and not amsgrad:
        with pytest.warns(RuntimeWarning, match="compiled Adam preconditioner failed"):
            out = sama.adam_preconditioned(v, step, state)
        assert sama._compiled["kernel"] is None  # not tried again in this process
    elif block == "compiled":
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
            out = sama.adam_preconditioned(v, step, state)
    else:
        out = sama.adam_preconditioned(v, step, state)

    sqrt_hat = (second / (1 - b2**t)).sqrt()
    second_term = (m / (1 - b1**t)) * (1 - b2) * g / ((1 - b2**t) * sqrt_hat)
    if amsgrad:
        second_term = second_term.masked_fill(second != sq, 0.0)
    jac = lr * ((1 - b1) / (1 - b1**t) * (sqrt_hat + eps) - second_term) / (sqrt_hat + eps) ** 2
    jac = jac.masked_fill(never, 0.0)
    assert out.shape == v.shape
    assert torch.equal(out[never], torch.zeros_like(out[never]))
    assert rel_err(out, jac * v) <= 1e-12
    if amsgrad:  # the max branch really is taken somewhere (else the case tests nothing)
        assert bool((second != sq).any())


def test_sama_adam_record_holds_the_gradient_not_a_copy() -> None:
    """The Adam record keeps p.grad itself (no θ-sized copy per lower step)."""
    theta = torch.nn.Parameter(torch.ones(4, 3))
    opt = torch.optim.Adam([theta], lr=0.01)
    state: dict[str, object] = {}
    theta.grad = torch.randn(4, 3)
    zg.SAMA().before_optimizer_step(opt, [theta], state)
    record = state["sama"]
    assert isinstance(record, dict)
    assert record[0]["grad"].data_ptr() == theta.grad.data_ptr()


def _adam_reference(v: torch.Tensor, m: torch.Tensor, sq: torch.Tensor, g: torch.Tensor,
                    lr: float, b1: float, b2: float, eps: float, t: int) -> torch.Tensor:
    """The module docstring's P v in float64 from the (upcast) state; 0 where v_t = 0."""
    v, m, sq, g = (x.double() for x in (v, m, sq, g))
    sqrt_hat = (sq / (1 - b2**t)).sqrt()
    second = (m / (1 - b1**t)) * (1 - b2) * g / ((1 - b2**t) * sqrt_hat)
    jac = lr * ((1 - b1) / (1 - b1**t) * (sqrt_hat + eps) - second) / (sqrt_hat + eps) ** 2
    return (jac.masked_fill(sq == 0, 0.0) * v)


@pytest.mark.parametrize("dtype,path,tol", [
    (torch.float32, "eager", 1e-5), (torch.float32, "compiled", 1e-5),
    (torch.float16, "eager", 5e-3), (torch.bfloat16, "eager", 2e-2)])
def test_sama_adam_product_tiny_gradients_and_half_precision(
        dtype: torch.dtype, path: str, tol: float, monkeypatch: pytest.MonkeyPatch) -> None:
    """Gradients from 1e-20 to 1 after one and five real Adam steps (the coordinates with
    the largest P ≈ η/ε are the tiny ones), and half-precision state: P v within rounding of
    the float64 formula (no floor on an underflowing denominator)."""
    from ziggurat.hypergrad import sama

    if path == "eager":
        monkeypatch.setattr(sama, "COMPILE", False)
    else:
        monkeypatch.setattr(sama, "COMPILE_MIN_ELEMENTS", 1)
    gen = torch.Generator().manual_seed(3)
    n = 400
    scales = 10.0 ** -torch.randint(0, 21, (n,), generator=gen).double()
    if dtype is torch.float16:  # fp16 cannot hold Adam's moments of tiny gradients
        scales = 10.0 ** -torch.randint(0, 3, (n,), generator=gen).double()
    theta = torch.nn.Parameter(torch.zeros(n, dtype=dtype))
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8 if dtype is not torch.float16 else 1e-4
    opt = torch.optim.Adam([theta], lr=lr, betas=(b1, b2), eps=eps)
    for t in range(1, 6):
        g = (torch.randn(n, generator=gen, dtype=torch.float64) * scales).to(dtype)
        theta.grad = g
        opt.step()
        if t in (1, 5):
            st = opt.state[theta]
            v = torch.randn(n, generator=gen, dtype=torch.float64).to(dtype)
            step = sama.AdamStep(lr, b1, b2, eps, False, g)
            out = sama.adam_preconditioned(v, step, st)
            ref = _adam_reference(v, st["exp_avg"], st["exp_avg_sq"], g, lr, b1, b2, eps, t)
            assert out.dtype == dtype
            assert rel_err(out.double(), ref) <= tol, (t, rel_err(out.double(), ref))


def _adam_state(shape: tuple[int, ...], amsgrad: bool, seed: int = 7) -> tuple[
        dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]:
    """An Adam state at step 4 with never-moved coordinates; (state, m, second, g)."""
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(shape, generator=gen, dtype=DTYPE) * 1e-2
    sq = torch.rand(shape, generator=gen, dtype=DTYPE) * 1e-4
    g = torch.randn(shape, generator=gen, dtype=DTYPE) * 1e-2
    never = torch.zeros(shape, dtype=torch.bool)
    never[::3, 1] = True
    for x in (m, sq, g):
        x.masked_fill_(never, 0.0)
    state = {"step": torch.tensor(4.0), "exp_avg": m, "exp_avg_sq": sq}
    second = sq
    if amsgrad:
        second = torch.maximum(sq, torch.rand(shape, generator=gen, dtype=DTYPE) * 2e-4)
        second.masked_fill_(never, 0.0)
        state["max_exp_avg_sq"] = second
    return state, m, second, g


def _adam_jacobian(m: torch.Tensor, sq: torch.Tensor, second: torch.Tensor, g: torch.Tensor,
                   lr: float, b1: float, b2: float, eps: float, t: int) -> torch.Tensor:
    """The module docstring's P (float64), 0 where the second moment is 0."""
    sqrt_hat = (second / (1 - b2**t)).sqrt()
    second_term = (m / (1 - b1**t)) * (1 - b2) * g / ((1 - b2**t) * sqrt_hat)
    second_term = second_term.masked_fill(second != sq, 0.0)  # amsgrad's older maxima
    jac = lr * ((1 - b1) / (1 - b1**t) * (sqrt_hat + eps) - second_term) / (sqrt_hat + eps) ** 2
    return jac.masked_fill(second == 0, 0.0)


@pytest.mark.parametrize("path", ["eager", "compiled", "compile-fails", "amsgrad"])
@pytest.mark.parametrize("with_rest", [False, True])
@pytest.mark.parametrize("rows_per_block", [1, 4, 100])
def test_sama_adam_product_of_factors_equals_formula(
        path: str, with_rest: bool, rows_per_block: int,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """P v_W for v_W = Δᵀ X (+ R) given in factors, formed block by block of rows (a block
    count that does not divide the rows, one row, all rows) and preconditioned in place by
    the compiled kernel (or the eager loop: without compiling, after a failed compile with
    a warning, with amsgrad) equals the formula applied to the formed matrix to 1e-12."""
    from ziggurat.hypergrad import factored, sama

    shape = (10, 6)
    monkeypatch.setattr(sama, "FUSED_BLOCK", rows_per_block * shape[1])
    if path == "eager":
        monkeypatch.setattr(sama, "COMPILE", False)
    else:
        monkeypatch.setattr(sama, "COMPILE_MIN_ELEMENTS", 1)
    if path == "compile-fails":
        monkeypatch.setattr(sama, "_compiled", {"kernel_": _failing_kernel})
    amsgrad = path == "amsgrad"
    state, m, second, g = _adam_state(shape, amsgrad)
    gen = torch.Generator().manual_seed(11)
    inputs = torch.randn(5, shape[1], generator=gen, dtype=DTYPE)
    grads = torch.randn(5, shape[0], generator=gen, dtype=DTYPE)
    rest = torch.randn(shape, generator=gen, dtype=DTYPE) if with_rest else None
    factors = factored.LinearFactors(inputs, grads, rest, torch.Size(shape))
    lr, b1, b2, eps = 0.01, 0.8, 0.95, 1e-8
    step = sama.AdamStep(lr, b1, b2, eps, amsgrad, g)
    if path == "compile-fails":
        with pytest.warns(RuntimeWarning, match="compiled Adam preconditioner failed"):
            out = sama.adam_preconditioned_factors(factors, step, state)
        assert sama._compiled["kernel"] is None  # neither kernel is tried again
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # a fallback would warn
            out = sama.adam_preconditioned_factors(factors, step, state)
    dense = grads.t() @ inputs + (rest if rest is not None else 0.0)
    expected = _adam_jacobian(m, state["exp_avg_sq"], second, g, lr, b1, b2, eps, 4) * dense
    assert out.shape == shape
    assert rel_err(out, expected) <= 1e-12


@pytest.mark.parametrize("path", ["eager", "compiled"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_sama_adam_product_in_place(path: str, contiguous: bool,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """``inplace=True`` writes P v into v (the same storage, also for a non-contiguous v)
    and equals the formula to 1e-12."""
    from ziggurat.hypergrad import sama

    if path == "eager":
        monkeypatch.setattr(sama, "COMPILE", False)
    else:
        monkeypatch.setattr(sama, "COMPILE_MIN_ELEMENTS", 1)
    shape = (7, 3)
    state, m, second, g = _adam_state(shape, amsgrad=False)
    gen = torch.Generator().manual_seed(2)
    v = (torch.randn(shape, generator=gen, dtype=DTYPE) if contiguous
         else torch.randn(shape[::-1], generator=gen, dtype=DTYPE).t())
    expected = _adam_jacobian(m, second, second, g, 0.01, 0.8, 0.95, 1e-8, 4) * v
    step = sama.AdamStep(0.01, 0.8, 0.95, 1e-8, False, g)
    ptr = v.data_ptr()
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        out = sama.adam_preconditioned(v, step, state, inplace=True)
    assert out is v and v.data_ptr() == ptr
    assert rel_err(v, expected) <= 1e-12
