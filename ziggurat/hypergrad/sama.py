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
  with g the gradient after Adam's L2 weight decay (AdamW decays θ directly); with amsgrad
  the second term is kept only where v_t is the running maximum.

Any other optimizer raises an error (never a silent zero or a silent SGD fallback).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, cast

import torch
from torch import Tensor

from ..errors import HypergradientError
from .base import Curvature, HypergradMethod, InnerObjective, MixedMode
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


def _kind(optimizer: torch.optim.Optimizer, name: str) -> str:
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) is torch.optim.AdamW:
        return "adamw"
    if type(optimizer) is torch.optim.Adam:
        decoupled = any(g.get("decoupled_weight_decay", False) for g in optimizer.param_groups)
        return "adamw" if decoupled else "adam"
    raise HypergradientError(
        f"SAMA cannot use the optimizer of problem '{name}' ({type(optimizer).__name__}): it "
        f"knows the update Jacobian of {SUPPORTED} only. Use one of those, or Darts / CG / "
        f"Neumann for this problem."
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


def adam_update_jacobian(
    group: dict[str, Any], state: dict[str, Any], grad: Tensor
) -> Tensor:
    """∂u/∂g (elementwise) of the last Adam step, from its state after the step."""
    beta1, beta2 = (float(b) for b in group["betas"])
    lr, eps = float(group["lr"]), float(group["eps"])
    step = float(state["step"])
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    m = state["exp_avg"]
    second = state["max_exp_avg_sq"] if group.get("amsgrad", False) else state["exp_avg_sq"]
    sqrt_vhat = second.sqrt() / bc2**0.5
    denom = sqrt_vhat + eps
    mhat = m / bc1
    safe = torch.where(sqrt_vhat > 0, sqrt_vhat, torch.ones_like(sqrt_vhat))
    dsqrt = torch.where(sqrt_vhat > 0, (1.0 - beta2) * grad / (bc2 * safe), torch.zeros_like(m))
    if group.get("amsgrad", False):
        dsqrt = torch.where(state["max_exp_avg_sq"] == state["exp_avg_sq"], dsqrt, 0.0)
    return lr * ((1.0 - beta1) / bc1 * denom - mhat * dsqrt) / denom**2


@dataclass(frozen=True)
class SAMA(HypergradMethod):
    """One-step hypergradient preconditioned by the optimizer's update Jacobian (SAMA).

    Args:
        mixed: "fd" (default via "auto"), "exact" or "auto".
        fd_eps: finite-difference radius numerator, ε = fd_eps/‖P v‖.

    The lower problem must use torch.optim.SGD, Adam or AdamW (also inside
    ZeroRedundancyOptimizer); ``maximize=True`` is refused.
    """

    name: ClassVar[str] = "sama"
    default_mixed: ClassVar[Literal["exact", "fd"]] = "fd"

    mixed: MixedMode = "auto"
    fd_eps: float = 0.01

    def __post_init__(self) -> None:
        self._check_mixed()

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], state: dict[str, Any]
    ) -> None:
        """Record what the update Jacobian needs: SGD's coefficients, Adam's gradient."""
        opt = _unwrap(optimizer)
        kind = _kind(opt, state.get("problem_name", "inner"))
        groups = _group_of(opt)
        record: list[float | Tensor | None] = []
        for p in params:
            group = groups.get(id(p))
            if group is None or p.grad is None:
                record.append(None)
                continue
            if group.get("maximize", False):
                raise HypergradientError(
                    f"SAMA does not support maximize=True in the optimizer of problem "
                    f"'{state.get('problem_name', 'inner')}'; minimise the negated loss instead."
                )
            if kind == "sgd":
                buf = opt.state.get(p, {}).get("momentum_buffer")
                record.append(_sgd_coefficient(group, first_step=buf is None))
            else:
                grad = p.grad.detach()
                wd = float(group.get("weight_decay", 0.0))
                if kind == "adam" and wd != 0.0:
                    record.append(grad.add(p.detach(), alpha=wd))
                else:
                    record.append(grad.clone())
        state["sama"] = (kind, record)

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        if objective.optimizer is None or "sama" not in objective.state:
            raise HypergradientError(
                f"SAMA needs the optimizer of problem '{objective.name}' and at least one of "
                f"its steps taken through ziggurat before a hypergradient is asked for."
            )
        opt = _unwrap(objective.optimizer)
        kind, record = objective.state["sama"]
        groups = _group_of(opt)
        out: TensorList = []
        for p, vi, rec in zip(objective.params, v, record):
            if rec is None:
                out.append(torch.zeros_like(vi))
            elif kind == "sgd":
                out.append(vi * float(rec))
            else:
                jac = adam_update_jacobian(groups[id(p)], opt.state[p], cast(Tensor, rec))
                out.append(vi * jac)
        return out
