"""SAMA: identity base Jacobian preconditioned by the lower optimizer's own update Jacobian.

For an optimizer step θ⁺ = θ − u(g), SAMA (Choe et al., 2023) takes x = P v with
P = ∂u/∂g, the exact diagonal derivative of the last update with respect to the gradient it
was given (optimizer state treated as constant), so that

    (dθ*/dλ)ᵀ v ≈ −∂²_{λθ} L_in · (P v),

the hypergradient of one unrolled optimizer step. P for torch.optim's optimizers, at step t
with (effective) gradient g:

* SGD, lr η, momentum μ, dampening d: P = η·(1 − d) (momentum, after the first step),
  η·(1 + μ(1 − d)) with nesterov, η on the first step (η·(1 + μ) nesterov), η without
  momentum. Weight decay adds to g but not to ∂u/∂g.
* Adam / AdamW, u = η m̂ / (√v̂ + ε), m̂ = m_t/(1−β₁ᵗ), v̂ = v_t/(1−β₂ᵗ):
  P = η [ (1−β₁)/(1−β₁ᵗ) · (√v̂ + ε) − m̂ · (1−β₂) g / ((1−β₂ᵗ) √v̂) ] / (√v̂ + ε)²,
  with g the gradient after Adam's L2 weight decay (AdamW decays θ directly), and η, β, ε
  as used by that step (recorded before a scheduler changes them); with amsgrad the second
  term is kept only where v_t is the running maximum; P = 0 where v_t = 0 (a coordinate
  L_in never moved).

Any other optimizer raises an error (never a silent zero or a silent SGD fallback).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor

from ..data import step_counts
from ..errors import HypergradientError
from .base import Curvature, HypergradMethod, InnerObjective, MixedMode
from .factored import LinearFactors
from .linalg import TensorList

SUPPORTED = "torch.optim.SGD, torch.optim.Adam and torch.optim.AdamW"


def _unwrap(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The local optimizer inside a ZeroRedundancyOptimizer, else the optimizer itself."""
    inner = getattr(optimizer, "optim", None)
    if isinstance(inner, torch.optim.Optimizer) and type(optimizer).__name__ == (
        "ZeroRedundancyOptimizer"
    ):
        return inner
    return optimizer


def _check_supported(optimizer: torch.optim.Optimizer, name: str) -> None:
    if type(optimizer) not in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        raise HypergradientError(
            f"SAMA cannot use the optimizer of problem '{name}' ({type(optimizer).__name__}): "
            f"it knows the update Jacobian of {SUPPORTED} only. Use one of those, or Darts / "
            f"CG / Neumann for this problem."
        )


def _group_of(optimizer: torch.optim.Optimizer) -> dict[int, dict[str, Any]]:
    return {id(p): g for g in optimizer.param_groups for p in g["params"]}


def _sgd_coefficient(group: dict[str, Any], first_step: bool) -> float:
    lr = float(group["lr"])
    mu = float(group.get("momentum", 0.0))
    if mu == 0.0:
        return lr
    damp = 0.0 if first_step else float(group.get("dampening", 0.0))
    if group.get("nesterov", False):
        return lr * (1.0 + mu * (1.0 - damp))
    return lr * (1.0 - damp)


@dataclass(frozen=True)
class AdamStep:
    """What one Adam step's update Jacobian needs beyond the optimizer's state after it:
    the hyperparameters it used (a scheduler may change them right after) and the
    effective gradient (after L2 weight decay)."""

    lr: float
    beta1: float
    beta2: float
    eps: float
    amsgrad: bool
    grad: Tensor


#: a param group's Adam settings as numbers: (lr, beta1, beta2, eps, amsgrad, weight decay,
#: decoupled)
_AdamGroup = tuple[float, float, float, float, bool, float, bool]


def _adam_group(optimizer: torch.optim.Optimizer, group: dict[str, Any]) -> _AdamGroup:
    """The group's settings read once per step, not per parameter (a tensor ``lr`` on a GPU,
    as capturable Adam allows, is a host sync per read)."""
    beta1, beta2 = (float(b) for b in group["betas"])
    decoupled = type(optimizer) is torch.optim.AdamW or group.get("decoupled_weight_decay", False)
    return (float(group["lr"]), beta1, beta2, float(group["eps"]),
            bool(group.get("amsgrad", False)), float(group.get("weight_decay", 0.0)),
            bool(decoupled))


def _adam_step(settings: _AdamGroup, p: Tensor) -> AdamStep:
    lr, beta1, beta2, eps, amsgrad, wd, decoupled = settings
    grad = p.grad.detach() if p.grad is not None else torch.zeros_like(p)
    # the gradient tensor itself, not a copy: torch.optim's SGD / Adam / AdamW never write
    # into p.grad (with maximize=False, enforced above), and the problem drops p.grad after
    # the step, so the record is its only holder (a copy cost one parameter-sized peak)
    grad = grad.add(p.detach(), alpha=wd) if wd != 0.0 and not decoupled else grad
    return AdamStep(lr, beta1, beta2, eps, amsgrad, grad)


#: Elements per block of ``adam_preconditioned``'s eager loop on CPU: its temporaries (three
#: blocks) stay in the cache, so each element of θ-sized memory is read once and written once.
BLOCK = 1 << 18

#: Tensors of at least this many elements get P v from one ``torch.compile``'d kernel (one
#: pass over memory; compiled once per process, ~15 s on CPU), when ``COMPILE`` is True. A
#: compile or run that fails warns once and leaves the eager loop for the rest of the process.
COMPILE = True
COMPILE_MIN_ELEMENTS = 1 << 20


def _adam_kernel(v: Tensor, m: Tensor, second: Tensor, g: Tensor, r_eps: Tensor,
                 ratio: Tensor, k1: Tensor, tiny: float) -> Tensor:
    """P v elementwise (formula of ``adam_preconditioned``), for ``torch.compile``."""
    s = torch.sqrt(second)
    d = s + r_eps
    s_floor = s.clamp_min(tiny)
    q = (m / s_floor) * (g / d)
    return v * (s / s_floor) * (1 + ratio * q) / d * k1


def _adam_kernel_(v: Tensor, m: Tensor, second: Tensor, g: Tensor, r_eps: Tensor,
                  ratio: Tensor, k1: Tensor, tiny: float) -> None:
    """``_adam_kernel`` written into v (one pass, no output allocated)."""
    v.copy_(_adam_kernel(v, m, second, g, r_eps, ratio, k1, tiny))


_compiled: dict[str, Any] = {}
_KERNELS = {"kernel": _adam_kernel, "kernel_": _adam_kernel_}


def _compiled_kernel(name: str = "kernel") -> Any | None:
    """The compiled kernel ``name`` ("kernel": P v into a new tensor, "kernel_": into v), or
    None once compiling either has failed in this process."""
    if _compiled.get("kernel", True) is None:
        return None
    if name not in _compiled:
        _compiled[name] = torch.compile(_KERNELS[name], dynamic=True)
    return _compiled[name]


def _kernel_scalars(r_eps: float, ratio: float, k1: float, like: Tensor) -> list[Tensor]:
    """The kernel's three coefficients as 0-dim tensors on ``like``'s device (passed as
    tensors, so that a new value is no recompilation). ``torch.full`` is a fill kernel on a
    GPU; ``torch.tensor`` would be a copy from the host that waits for the queued work."""
    return [torch.full((), x, dtype=like.dtype, device=like.device) for x in (r_eps, ratio, k1)]


def _compiled_product(vf: Tensor, m: Tensor, second: Tensor, g: Tensor,
                      scalars: list[Tensor], name: str = "kernel") -> Tensor | None:
    """P v by the compiled kernel ``name`` (returning the new tensor, or v itself for the
    in-place one), or None (with a warning, once) when it cannot be compiled or run;
    ``scalars`` from ``_kernel_scalars``."""
    kernel = _compiled_kernel(name)
    if kernel is None:
        return None
    try:
        out: Tensor | None = kernel(vf, m, second, g, *scalars, torch.finfo(vf.dtype).tiny)
        return vf if out is None else out
    except Exception as err:  # no compiler, an unsupported device...: the eager loop
        _compiled["kernel"] = None
        warnings.warn(
            f"SAMA: the compiled Adam preconditioner failed ({type(err).__name__}: "
            f"{str(err)[:200]}); using the eager one from now on (set "
            f"ziggurat.hypergrad.sama.COMPILE = False to skip the attempt).",
            RuntimeWarning, stacklevel=3)
        return None


def adam_preconditioned(v: Tensor, step: AdamStep, state: dict[str, Any],
                        inplace: bool = False, t: float | None = None) -> Tensor:
    """P v with P = ∂u/∂g (elementwise) of the last Adam step, from its state after the step.

    With s = √v_t, r = √(1−β₂ᵗ), D = s + rε (so √v̂ + ε = D/r) and k = η r (1−β₁)/(1−β₁ᵗ),
    the formula of the module docstring becomes

        P = (k / D) · [1 − (1−β₂)/(1−β₁) · (m / s) · (g / D)],

    written so that nothing underflows for tiny gradients (m/s and g/D stay of order one
    and g/ε), computed in float32 for half-precision tensors, by one compiled kernel for
    large tensors (``COMPILE_MIN_ELEMENTS``), else block by block (``BLOCK`` elements)
    into buffers reused across blocks, so that the temporaries stay in cache instead of
    sixteen passes over θ-sized ones (benchmarks/README.md, "SAMA with Adam"). Where the
    second moment is exactly zero (L_in has never moved that coordinate) P = 0 (a factor
    s / max(s, tiny), which is 1 wherever s > 0: √ of the smallest subnormal exceeds the
    smallest normal number), not Adam's degenerate η(1−β₁)/((1−β₁ᵗ)ε) at g = 0, which would
    dwarf every other entry of P v. With ``inplace`` P v is written into v (and v returned).
    ``t``: the step count, when already read (else ``float(state["step"])``).
    """
    r_eps, ratio, k1 = _coefficients(step, _step_count(state, t))
    second_all = state["max_exp_avg_sq"] if step.amsgrad else state["exp_avg_sq"]
    dtype = torch.float32 if v.dtype in (torch.float16, torch.bfloat16) else v.dtype
    vf, m, second, g = (_flat(x).to(dtype) for x in (v, state["exp_avg"], second_all,
                                                     step.grad))
    older = (_flat(state["max_exp_avg_sq"]) != _flat(state["exp_avg_sq"])
             if step.amsgrad else None)
    # into v itself when asked and v is its own flat view (else into a new tensor, copied)
    direct = inplace and vf.dtype == v.dtype and v.is_contiguous()
    if COMPILE and older is None and vf.numel() >= COMPILE_MIN_ELEMENTS:
        fused = _compiled_product(vf, m, second, g, _kernel_scalars(r_eps, ratio, k1, vf),
                                  name="kernel_" if direct else "kernel")
        if fused is not None:
            return _result(v, fused, inplace)
    out = vf if direct else torch.empty_like(vf)
    _eager_product(vf, m, second, g, older, r_eps, ratio, k1, out)
    return _result(v, out, inplace)


def _result(v: Tensor, out: Tensor, inplace: bool) -> Tensor:
    """P v (flat ``out``) in v's shape and dtype; written into v with ``inplace``."""
    if inplace:
        if out.data_ptr() != v.data_ptr():
            v.copy_(out.view(v.shape))
        return v
    return out.view(v.shape).to(v.dtype)


def _step_count(state: dict[str, Any], t: float | None) -> float:
    """``t``, else the state's step counter as a float."""
    return float(state["step"]) if t is None else t


def _coefficients(step: AdamStep, t: float) -> tuple[float, float, float]:
    """(r ε, −(1−β₂)/(1−β₁), k) of ``adam_preconditioned``'s formula for step ``t``."""
    bc1 = 1.0 - step.beta1**t
    bc2 = 1.0 - step.beta2**t
    r = bc2**0.5
    k1 = step.lr * r / bc1 * (1.0 - step.beta1)
    ratio = -(1.0 - step.beta2) / (1.0 - step.beta1)
    return r * step.eps, ratio, k1


def _eager_product(vf: Tensor, m: Tensor, second: Tensor, g: Tensor, older: Tensor | None,
                   r_eps: float, ratio: float, k1: float, out: Tensor) -> None:
    """P v of flat tensors into ``out`` (which may be vf itself: each block of v is read
    before its block of ``out`` is written) by the eager loop of ``adam_preconditioned``."""
    n = vf.numel()
    dtype = vf.dtype
    # on CPU in cache-sized blocks; elsewhere (no small shared cache to fit) in one
    size = max(1, min(BLOCK, n) if vf.device.type == "cpu" else n)
    buf_s, buf_d, buf_f, buf_q = (torch.empty(size, dtype=dtype, device=vf.device)
                                  for _ in range(4))
    tiny = torch.finfo(dtype).tiny
    for i in range(0, n, size):
        j = min(i + size, n)
        s, d, floor, q = buf_s[: j - i], buf_d[: j - i], buf_f[: j - i], buf_q[: j - i]
        torch.sqrt(second[i:j], out=s)
        torch.add(s, r_eps, out=d)
        torch.clamp_min(s, tiny, out=floor)
        torch.div(m[i:j], floor, out=q)
        q.mul_(g[i:j]).div_(d)  # (m/s)(g/D)
        if older is not None:  # the max branch: v̂ does not depend on g where the max is older
            q.masked_fill_(older[i:j], 0.0)
        q.mul_(ratio).add_(1.0)
        q.mul_(s.div_(floor))  # 0 where v_t = 0, else 1
        q.mul_(vf[i:j]).div_(d)
        torch.mul(q, k1, out=out[i:j])


#: Elements per block of ``adam_preconditioned_factors``: the rows of v_W = Δᵀ X (+ R) that
#: one product forms, preconditioned while they are still in cache.
FUSED_BLOCK = 1 << 20


def adam_preconditioned_factors(factors: LinearFactors, step: AdamStep,
                                state: dict[str, Any], t: float | None = None) -> Tensor:
    """P v_W for a weight's v_W = Δᵀ X + R given in factors (``factored.LinearFactors``).

    With the compiled kernel (a tensor of ``COMPILE_MIN_ELEMENTS`` or more, no amsgrad,
    float32 / float64), v_W is formed by blocks of rows (``FUSED_BLOCK`` elements), each one
    preconditioned in place right after its product, while it is in cache: one pass over
    θ-sized memory fewer than forming v_W and then computing P v_W, and no second θ-sized
    result. Else v_W is formed and P applied in place (``adam_preconditioned``). ``t`` as
    for ``adam_preconditioned``."""
    inputs = factors.inputs
    n_out, n_in = factors.shape
    dtype = inputs.dtype
    if not (COMPILE and not step.amsgrad and n_out * n_in >= COMPILE_MIN_ELEMENTS
            and dtype in (torch.float32, torch.float64)):
        return adam_preconditioned(factors.dense(), step, state, inplace=True, t=t)
    r_eps, ratio, k1 = _coefficients(step, _step_count(state, t))
    m, second, g = (_flat(x).to(dtype) for x in (state["exp_avg"], state["exp_avg_sq"],
                                                 step.grad))
    out = torch.empty((n_out, n_in), dtype=dtype, device=inputs.device)
    flat = out.view(-1)
    scalars = _kernel_scalars(r_eps, ratio, k1, out)  # (once: not one per block)
    rows = max(1, FUSED_BLOCK // max(1, n_in))
    for i in range(0, n_out, rows):
        j = min(i + rows, n_out)
        factors.dense_rows(i, j, out)
        a, b = i * n_in, j * n_in
        if _compiled_product(flat[a:b], m[a:b], second[a:b], g[a:b], scalars,
                             name="kernel_") is None:  # (warned): the rest by the eager loop
            factors.dense_rows(j, n_out, out)
            _eager_product(flat[a:], m[a:], second[a:], g[a:], None, r_eps, ratio, k1,
                           flat[a:])
            break
    return out



def _flat(x: Tensor) -> Tensor:
    """x as a 1-D tensor over the same memory when contiguous (else a contiguous copy)."""
    return x.reshape(-1) if x.is_contiguous() else x.contiguous().view(-1)


@dataclass(frozen=True)
class SAMA(HypergradMethod):
    """One-step hypergradient preconditioned by the optimizer's update Jacobian (SAMA).

    Args:
        mixed: "exact" (default via "auto") or "fd" (faster; wrong when the lower loss
            feeds a detached quantity back into itself, see ``Darts``).
        fd_eps: finite-difference radius numerator, ε = fd_eps/‖P v‖.

    The lower problem must use torch.optim.SGD, Adam or AdamW (also inside
    ZeroRedundancyOptimizer); ``maximize=True`` is refused.
    """

    name: ClassVar[str] = "sama"
    default_mixed: ClassVar[Literal["exact", "fd"]] = "exact"
    uses_hessian: ClassVar[bool] = False

    mixed: MixedMode = "auto"
    fd_eps: float = 0.01

    def __post_init__(self) -> None:
        self._check_mixed()

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], state: dict[str, Any]
    ) -> None:
        """Record, per parameter (by position), SGD's coefficient or the Adam step's inputs,
        as plain values and tensors (so the record can be checkpointed)."""
        opt = _unwrap(optimizer)
        name = state.get("problem_name", "inner")
        _check_supported(opt, name)
        groups = _group_of(opt)
        if opt is not optimizer:
            # ZeRO: this rank's shard is the local optimizer's, the settings of the step are
            # the wrapper's groups (a scheduler writes those; the wrapper copies them into
            # the local optimizer only inside its step, after this record)
            settings_of = _group_of(optimizer)
            groups = {key: settings_of.get(key, group) for key, group in groups.items()}
        record: dict[int, float | dict[str, Any]] = {}
        # (a group's settings read once, not per parameter: see ``_adam_group``)
        settings: dict[int, _AdamGroup] = {}
        coefficients: dict[tuple[int, bool], float] = {}
        for index, p in enumerate(params):
            group = groups.get(id(p))
            if group is None or p.grad is None:
                continue
            if group.get("maximize", False):
                raise HypergradientError(
                    f"SAMA does not support maximize=True in the optimizer of problem "
                    f"'{name}'; minimise the negated loss instead."
                )
            if type(opt) is torch.optim.SGD:
                buf = opt.state.get(p, {}).get("momentum_buffer")
                sgd = (id(group), buf is None)
                if sgd not in coefficients:
                    coefficients[sgd] = _sgd_coefficient(group, first_step=buf is None)
                record[index] = coefficients[sgd]
            else:
                key = id(group)
                if key not in settings:
                    settings[key] = _adam_group(opt, group)
                adam = _adam_step(settings[key], p)
                # not dataclasses.asdict: it deep-copies the gradient tensor (a θ-sized copy
                # per lower step)
                record[index] = {f.name: getattr(adam, f.name) for f in dataclasses.fields(adam)}
        state["sama"] = record

    def uniform_scale(self, objective: InnerObjective) -> float | None:
        """SGD with one coefficient for every parameter (one param group, the usual case):
        P = c·I. Not under ZeRO: a rank's record holds only its shard of the parameters
        (every rank must take the same path, ``solve`` and its ``sum_``)."""
        record = objective.state.get("sama")
        if objective.optimizer is None or not isinstance(record, dict):
            return None
        if objective.reduce is not None and objective.reduce.shards_optimizer_state:
            return None
        values = [record.get(i) for i in range(len(objective.params))]
        first = values[0] if values else None
        if isinstance(first, float) and all(
                isinstance(c, float) and c == first for c in values):
            return first
        return None

    def solves_factors(self, objective: InnerObjective) -> bool:
        """With Adam (a record with an Adam step) ``solve`` forms factored entries of v
        itself, preconditioned block by block (``adam_preconditioned_factors``)."""
        record = objective.state.get("sama")
        return (objective.optimizer is not None and isinstance(record, dict)
                and any(isinstance(r, dict) for r in record.values()))

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        if objective.optimizer is None or "sama" not in objective.state:
            raise HypergradientError(
                f"SAMA needs the optimizer of problem '{objective.name}' and at least one of "
                f"its steps taken through ziggurat before a hypergradient is asked for."
            )
        opt = _unwrap(objective.optimizer)
        record: dict[int, float | dict[str, Any]] = objective.state["sama"]
        params = objective.params
        adam = [i for i in range(len(params)) if isinstance(record.get(i), dict)]
        counts = dict(zip(adam, step_counts([opt.state[params[i]]["step"] for i in adam])))
        out: TensorList = []
        for index, (p, vi) in enumerate(zip(params, v)):
            rec = record.get(index)
            factors = vi if isinstance(vi, LinearFactors) else None
            if rec is None:
                out.append(torch.zeros_like(p))
            elif isinstance(rec, dict):
                step, t = AdamStep(**rec), counts[index]
                out.append(adam_preconditioned(vi, step, opt.state[p], t=t) if factors is None
                           else adam_preconditioned_factors(factors, step, opt.state[p], t=t))
            else:  # (a factored entry formed here is this call's own: scaled in place)
                out.append(vi * rec if factors is None else factors.dense().mul_(rec))
        if objective.reduce is not None and objective.reduce.shards_optimizer_state:
            # ZeRO: this rank knows P only on the parameters whose state it holds (zero
            # elsewhere); the sum over the ranks is the whole P v
            objective.reduce.sum_(out)
        return out
