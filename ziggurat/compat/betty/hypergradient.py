"""Betty's hypergradient methods on ziggurat's: the method each ``Config.type`` becomes,
and Betty's functional entry points (``darts``, ``sama``, ``neumann``, ``cg``,
``get_grads``) with its signatures.

Conventions kept from Betty (same numbers): darts is the identity approximation H⁻¹ ≈ I
with no learning-rate factor, x = v, and a central difference of radius
ε = darts_alpha/‖v‖ when ``mixed="fd"``; sama with SGD is darts (Betty preconditions SGD
by the identity), with radius sama_adam_alpha; neumann is α Σ_{k=0}^{K} (I − αH)^k v with
Betty's α and K.

Corrected: cg solves H x = v by textbook conjugate gradient for every ``cg_iterations``
(Betty's update uses the old residual and mixes α·H with H, so it is right for one
iteration only; its cg_alpha cancels in exact arithmetic, so it is accepted and has no
effect); sama with Adam uses the exact, bias-corrected derivative of Adam's update
(Betty drops the bias corrections); a neumann_alpha at which the series diverges
(α·λ_max(H) ≥ 2) raises a warning naming the safe range.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ...backward import grad as autograd_grad
from ...errors import ConfigError
from ...hypergrad import CG, SAMA, Darts, Neumann, linalg
from ...hypergrad.base import Curvature, InnerObjective, takes_factored_vectors
from ...hypergrad.linalg import TensorList
from ...registry import REGISTRY, Method

if TYPE_CHECKING:
    from .configs import Config

__all__ = ["cg", "darts", "get_grads", "jvp_fn_mapping", "neumann", "sama"]

IMPLICIT_TYPES = ("darts", "sama", "neumann", "cg")
ITERATIVE_TYPES = ("reverse", "forward", "es", "reinforce")


class NeumannDivergenceWarning(UserWarning):
    """neumann_alpha makes the Neumann series diverge for this problem's Hessian."""


@dataclass(frozen=True)
class BettyNeumann(Neumann):
    """Neumann with Betty's α and K, checking once every ``check_every`` calls (by power
    iteration on H) that α·λ_max(H) < 2, and warning with the safe range when it is not."""

    check_every: int = 100
    power_steps: int = 20

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        state: dict[str, Any] = objective.state.setdefault("betty_neumann", {"calls": 0})
        if state["calls"] % self.check_every == 0 and self.alpha is not None:
            _check_neumann(objective, curvature, self.alpha, self.power_steps)
        state["calls"] += 1
        return super().solve(objective, v, curvature)


takes_factored_vectors(BettyNeumann)  # its check and solve go through linalg and Curvature


def _check_neumann(objective: InnerObjective, curvature: Curvature, alpha: float,
                   steps: int) -> None:
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(p.shape, dtype=p.dtype, generator=generator).to(p.device)
             for p in objective.params]
    estimate, _ = linalg.power_iteration(curvature.hvp, start, steps)
    lam = float(estimate)
    if lam > 0.0 and alpha * lam >= 2.0:
        warnings.warn(
            f"problem '{objective.name}': neumann_alpha={alpha:g} makes the Neumann series "
            f"diverge: alpha·λ_max(H) ≈ {alpha * lam:.3g} >= 2 (λ_max ≈ {lam:.4g}), so each "
            f"term grows by |1 − alpha·λ_max| ≈ {abs(1 - alpha * lam):.3g}. Safe range: "
            f"0 < neumann_alpha < 2/λ_max ≈ {2.0 / lam:.4g} (about 1/λ_max ≈ {1.0 / lam:.4g} "
            f"converges fastest), or use type='cg'.",
            NeumannDivergenceWarning,
            stacklevel=2,
        )


@dataclass(frozen=True)
class BettySAMA(SAMA):
    """SAMA with Betty's convention for SGD (identity preconditioner, i.e. darts) and the
    exact Adam / AdamW update Jacobian otherwise."""

    @staticmethod
    def _plain_sgd(objective: InnerObjective) -> bool:
        opt = objective.optimizer
        inner = getattr(opt, "optim", None)  # ZeroRedundancyOptimizer's local optimizer
        if isinstance(inner, torch.optim.Optimizer):
            opt = inner
        return type(opt) is torch.optim.SGD

    def uniform_scale(self, objective: InnerObjective) -> float | None:
        return 1.0 if self._plain_sgd(objective) else super().uniform_scale(objective)

    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        if self._plain_sgd(objective):
            return list(v)
        return super().solve(objective, v, curvature)


def method_for(config: Config, iterative: bool) -> Method:
    """The ziggurat method of a Betty problem with ``config`` (``iterative``: an
    IterativeProblem, which always differentiates its unrolled steps)."""
    kind = config.type
    if iterative:
        if kind in ITERATIVE_TYPES:
            return REGISTRY[kind]()
        return REGISTRY["reverse"]()  # Betty's implicit types do not apply to an unroll
    if kind == "darts":
        return Darts(mixed=config.mixed, fd_eps=config.darts_alpha)  # type: ignore[arg-type]
    if kind == "sama":
        return BettySAMA(mixed=config.mixed, fd_eps=config.sama_adam_alpha)  # type: ignore[arg-type]
    if kind == "neumann":
        return BettyNeumann(iterations=config.neumann_iterations, alpha=config.neumann_alpha)
    if kind == "cg":
        if not (isinstance(config.cg_alpha, int | float) and config.cg_alpha > 0):
            raise ConfigError("betty Config", "cg_alpha", config.cg_alpha,
                              "a number > 0 (it rescales the system and cancels)")
        return CG(iterations=config.cg_iterations)
    raise ConfigError(
        "betty Config", "type", kind,
        f"one of {list(IMPLICIT_TYPES)} for an ImplicitProblem (Betty's 'reinforce' was never "
        f"implemented); use an IterativeProblem with type 'es' or 'reinforce' for a lower "
        f"level that is not differentiable",
    )


# ----------------------------------------------------------------- Betty's functional API
def _apply(kind: str, vector: Sequence[Tensor], curr: Any, prev: Any, sync: bool) -> Any:
    """(dθ*_curr/dθ_prev)ᵀ vector by ``kind`` with curr's settings; Betty's sign is
    included (the result is added to prev's gradient). With ``sync`` it is added to the
    ``.grad`` of prev's parameters and None is returned, as in Betty."""
    from dataclasses import replace

    from .configs import Config

    base = getattr(curr, "betty_config", None)
    config = replace(base, type=kind) if isinstance(base, Config) else Config(type=kind)
    method = method_for(config, iterative=False)
    out = method(curr.objective(prev), [v.detach() for v in vector])  # type: ignore[operator]
    if not sync:
        return out
    for p, g in zip(prev.trainable_parameters(), out):
        p.grad = g if p.grad is None else p.grad + g
    return None


def darts(vector: Sequence[Tensor], curr: Any, prev: Any, sync: bool = False) -> Any:
    """Identity-approximated hypergradient through ``curr`` toward ``prev`` (Betty's darts)."""
    return _apply("darts", vector, curr, prev, sync)


def sama(vector: Sequence[Tensor], curr: Any, prev: Any, sync: bool = False) -> Any:
    """SAMA through ``curr`` toward ``prev``."""
    return _apply("sama", vector, curr, prev, sync)


def neumann(vector: Sequence[Tensor], curr: Any, prev: Any, sync: bool = False) -> Any:
    """Neumann-series implicit hypergradient through ``curr`` toward ``prev``."""
    return _apply("neumann", vector, curr, prev, sync)


def cg(vector: Sequence[Tensor], curr: Any, prev: Any, sync: bool = False) -> Any:
    """Conjugate-gradient implicit hypergradient through ``curr`` toward ``prev``."""
    return _apply("cg", vector, curr, prev, sync)


jvp_fn_mapping = {"darts": darts, "sama": sama, "neumann": neumann, "cg": cg}


def get_grads(loss: Tensor, path: Sequence[Any], retain_graph: bool = False,
              do_sync: bool = False) -> Any:
    """The hypergradient of ``loss`` along a Betty path ``[upper, c, ..., upper]``: the
    vector ∂loss/∂θ_c carried through each problem to the last one, by each problem's own
    ``config.type``."""
    first = path[1]
    params = first.trainable_parameters()
    grads = autograd_grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    vec: Any = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    for i in range(1, len(path) - 1):
        kind = path[i].betty_config.type
        if kind not in jvp_fn_mapping:
            raise ConfigError(path[i].name, "config.type", kind, f"one of {IMPLICIT_TYPES}")
        vec = jvp_fn_mapping[kind](vec, path[i], path[i + 1], do_sync and i == len(path) - 2)
    return vec

