"""Hypergradient methods of iterative (unrolled) problems: settings objects.

An IterativeProblem runs K = ``unroll_steps`` optimizer steps θ_{k+1} = Φ(θ_k, s_k, λ) with a
differentiable twin of its torch optimizer, then hands (dθ_K/dλ)ᵀ v up the path:

* ``Reverse``: backpropagation through the stored steps (memory O(K)); optionally only
  through the last T steps, or first-order (gradients treated as constants).
* ``Forward``: the tangents dθ_k/dλ_j carried along with the steps (memory O(1) in K, one
  extra backward per step and per scalar of λ).
* ``EvolutionStrategies``: no derivative of the lower steps at all; antithetic Gaussian
  smoothing over re-runs of the unroll.
* ``Reinforce``: lower levels that sample; the score-function estimator.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from ..errors import ConfigError
from ..registry import Family, Method, register
from ..validation import check_bool, check_float, check_int


@dataclass(frozen=True)
class Reverse(Method):
    """Reverse-mode differentiation through the unrolled steps.

    Args:
        truncate: backpropagate through the last T steps of each unroll only (the earlier
            steps are taken without a graph); None: all K steps (exact for the program).
        first_order: treat every inner gradient as a constant (first-order MAML): keeps
            dθ_{k+1}/dθ_k = I for SGD and the dependence on optimizer hyperparameters, drops
            all second derivatives of the inner loss.

    Exact: equals the derivative of the unrolled program (K steps of the real optimizer).
    Memory grows with the number of differentiated steps; the graph is released once the
    upper problems have stepped.
    """

    name: ClassVar[str] = "reverse"
    family: ClassVar[Family] = "iterative"

    truncate: int | None = None
    first_order: bool = False

    def __post_init__(self) -> None:
        check_int("Reverse", "truncate", self.truncate, 1, allow_none=True)
        check_bool("Reverse", "first_order", self.first_order)


@dataclass(frozen=True)
class Forward(Method):
    """Forward-mode differentiation: tangents dθ_k/dλ carried with the steps.

    Memory is O(1) in the number of steps and O(dim λ · dim θ) in the tangents; every step
    costs one extra backward with graph plus one backward per scalar of λ. Use it for a few
    upper-level scalars (learning rates, a handful of hyperparameters) and long unrolls.

    Args:
        max_upper_numel: refuse upper problems with more scalars than this...
        allow_large: ...unless this is True.
    """

    name: ClassVar[str] = "forward"
    family: ClassVar[Family] = "iterative"

    max_upper_numel: int = 64
    allow_large: bool = False

    def __post_init__(self) -> None:
        check_int("Forward", "max_upper_numel", self.max_upper_numel, 1)
        check_bool("Forward", "allow_large", self.allow_large)


@dataclass(frozen=True)
class EvolutionStrategies(Method):
    """Zeroth order: antithetic Gaussian smoothing of F(λ) = ⟨v, θ_K(λ)⟩.

    ĝ = 1/(2σN) Σ_i [F(λ + σε_i) − F(λ − σε_i)] ε_i, ε_i ~ N(0, I), an unbiased estimate of
    the gradient of the smoothed E_ε[F(λ + σε)]. Each sample re-runs the K recorded lower
    steps twice (same batches, same random numbers) with the real torch optimizer, so the
    lower problem needs no differentiable path from λ. Cost 2N·K lower steps per call.

    Args:
        samples: N antithetic pairs.
        sigma: smoothing radius σ.
        seed: seed of the perturbations (the program's random stream is not used).
    """

    name: ClassVar[str] = "es"
    family: ClassVar[Family] = "iterative"

    samples: int = 16
    sigma: float = 0.01
    seed: int = 0

    def __post_init__(self) -> None:
        check_int("EvolutionStrategies", "samples", self.samples, 1)
        check_float("EvolutionStrategies", "sigma", self.sigma, strict=True)
        check_int("EvolutionStrategies", "seed", self.seed, 0)


@dataclass(frozen=True)
class Reinforce(Method):
    """Score-function (REINFORCE) estimator for lower levels that sample.

    The lower problem draws random choices z ~ p_λ(z) (data selections, architectures,
    masks) and records log p_λ(z) of each draw with ``record_log_prob``; its steps are
    ordinary torch steps. With F = ⟨v, θ_K⟩ the linearised upper objective,

        ĝ = (F − b) ∇_λ Σ_k log p_λ(z_k),

    unbiased for ∇_λ E_z[F] because the baseline b (an exponential average of earlier F
    values, 0 at first) does not depend on the current draws.

    Args:
        baseline_decay: weight of the old baseline in b ← decay·b + (1 − decay)·F.
    """

    name: ClassVar[str] = "reinforce"
    family: ClassVar[Family] = "iterative"

    baseline_decay: float = 0.9

    def __post_init__(self) -> None:
        check_float("Reinforce", "baseline_decay", self.baseline_decay)
        if self.baseline_decay > 1.0:
            raise ConfigError("Reinforce", "baseline_decay", self.baseline_decay,
                              "a number in [0, 1]")


for _cls in (Reverse, Forward, EvolutionStrategies, Reinforce):
    register(_cls)
