"""Richardson iteration y ← y + α(v − H y), shared by the Neumann and fixed-point methods.

From y₀ = αv, K iterations give α Σ_{k=0}^{K} (I − αH)^k v, the Neumann series. It converges
to H⁻¹ v when every eigenvalue of H lies in (0, 2/α); the error shrinks by the factor
max_i |1 − α λ_i(H)| per iteration.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import HypergradientError
from . import linalg
from .base import Curvature, InnerObjective
from .linalg import TensorList


def step_size(
    objective: InnerObjective,
    curvature: Curvature,
    alpha: float | None,
    power_iterations: int,
    refresh: int,
    key: str,
) -> float | Tensor:
    """α as given, or 1/λ̂_max(H) from power iteration, re-estimated every ``refresh`` calls.

    With an accurate estimate, 1/λ̂ is half the divergence bound 2/λ_max; the Rayleigh
    quotient approaches λ_max from below, so a poor estimate (few power iterations, a
    cluster of eigenvalues near λ_max) can shrink that margin. The estimate and the last
    power iterate are kept in ``objective.state`` under ``key``: refreshes restart from the
    iterate, so the estimate sharpens over the run. The first start is a fixed-seed random
    vector (the program's random stream is not used); so is the start after the parameter
    list changed, which drops what was kept.
    """
    if alpha is not None:
        return alpha
    state: dict[str, Any] = objective.state.setdefault(key, {"calls": 0})
    params = list(objective.params)
    start = state.get("vector")
    if start is not None and not linalg.same_shapes(start, params):
        # the parameter list changed (a tensor frozen or unfrozen): H is another matrix
        state.clear()
        state["calls"] = 0
        start = None
    if "alpha" not in state or state["calls"] % refresh == 0:
        if start is None:
            generator = torch.Generator().manual_seed(0)
            start = [torch.randn(p.shape, dtype=p.dtype, generator=generator).to(
                p.device, non_blocking=p.device.type == "cuda") for p in params]
        estimate, vector = linalg.power_iteration(curvature.hvp, start, power_iterations)
        # kept as tensors: a factored iterate would hold this call's activations, and the
        # state is checkpointed (weights_only)
        state["vector"] = linalg.densify(vector)
        lam = float(estimate)
        if not lam > 0.0 or lam != lam or lam == float("inf"):
            raise HypergradientError(
                f"the Hessian of problem '{objective.name}' shows no positive curvature "
                f"(power-iteration estimate of λ_max = {lam}), so a Neumann / fixed-point step "
                f"size cannot be chosen. Use CG with damping, or set alpha explicitly."
            )
        state["alpha"] = 1.0 / lam
        state["lambda_max"] = lam
    state["calls"] += 1
    return float(state["alpha"])


def richardson(
    curvature: Curvature,
    v: TensorList,
    alpha: float | Tensor,
    iterations: int,
    start: TensorList | None = None,
) -> TensorList:
    """Run ``iterations`` steps of y ← y + α(v − H y) from ``start`` (or y₀ = αv, free)."""
    if start is None:
        y = linalg.scale(alpha, v)
    else:
        y = linalg.clone(start)
    for _ in range(iterations):
        # y += α(v − Hy), written into the fresh product Hy (no θ-sized temporary)
        hy = curvature.hvp(y)
        linalg.axpy_(-1.0, v, hy)
        linalg.axpy_(-alpha, hy, y)
    return y
