"""Differentiable twins of torch.optim's SGD, Adam, AdamW, RMSprop and Adagrad.

``step`` builds new parameter and state tensors out of place and never writes into its
inputs, so K steps can be unrolled and differentiated with respect to the initial parameters,
the gradients and every hyperparameter (lr, momentum, betas, eps, weight_decay, ...: each
may be a 0-dim tensor that requires grad). With Python-number hyperparameters each step runs
the kernels of torch's single-tensor code path in torch's order (``lerp``, ``addcmul``,
``addcdiv``, ``add(alpha=...)``), so its iterates equal torch.optim's to the last bit or so.

Hyperparameters are per parameter (``Hyper``: one dict per parameter, usually its param
group's settings, keys as in torch, Adam's ``betas`` split into ``beta1`` and ``beta2``);
a missing key takes torch's default. State is one dict of tensors per parameter (``State``),
in torch's own format (same keys; ``step`` a 0-dim CPU tensor), so it converts both ways.

A gradient of ``None`` skips its parameter (torch skips a ``p.grad`` of None): the parameter
and its state come back unchanged and the step counter does not advance.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
from torch import Tensor

from ..errors import ConfigError, ZigguratError

State = list[dict[str, Tensor]]
"""One dict of state tensors per parameter, keys as torch.optim's ``optimizer.state[p]``."""

Hyper = list[dict[str, float | Tensor]]
"""One dict of hyperparameters per parameter (its param group's settings)."""

Scalar = float | Tensor
"""A hyperparameter value: a Python number, or a 1-element tensor (possibly requiring grad)."""

StateIn = Sequence[Mapping[str, Tensor]]
HyperIn = Sequence[Mapping[str, float | Tensor]]


# --------------------------------------------------------------------------- arithmetic
# Each helper computes what torch's in-place kernel computes, out of place: with a Python
# number it is that very kernel (bit-identical), with a tensor the same expression in the
# kernel's order of operations, so that the tensor is differentiated through.


def _add(x: Tensor, y: Tensor, alpha: Scalar) -> Tensor:
    """x + alpha·y (``x.add_(y, alpha=alpha)``)."""
    if isinstance(alpha, Tensor):
        return x + alpha * y
    return torch.add(x, y, alpha=alpha)


def _addcmul(x: Tensor, t1: Tensor, t2: Tensor, value: Scalar) -> Tensor:
    """x + value·t1·t2 (``x.addcmul_(t1, t2, value=value)``)."""
    if isinstance(value, Tensor):
        return x + value * t1 * t2
    return torch.addcmul(x, t1, t2, value=value)


def _addcdiv(x: Tensor, t1: Tensor, t2: Tensor, value: Scalar) -> Tensor:
    """x + value·t1/t2 (``x.addcdiv_(t1, t2, value=value)``)."""
    if isinstance(value, Tensor):
        return x + value * t1 / t2
    return torch.addcdiv(x, t1, t2, value=value)


def _lerp(x: Tensor, end: Tensor, weight: Scalar) -> Tensor:
    """x + weight·(end − x) (``x.lerp_(end, weight)``)."""
    if isinstance(weight, Tensor):
        return torch.lerp(x, end, weight.to(dtype=x.dtype, device=x.device))
    return torch.lerp(x, end, weight)


def safe_sqrt(x: Tensor) -> Tensor:
    """√x with torch's forward value everywhere, and derivative 0 (not ∞) where x ≤ 0.

    A second moment is exactly 0 on coordinates whose gradient has always been 0; there
    ∂√v/∂v = ∞ meets ∂v/∂(anything) = 2g·∂g = 0 and plain autograd returns NaN.
    """
    if not x.requires_grad:
        return x.sqrt()
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).sqrt(), x.detach().sqrt())


def _on(value: Scalar) -> bool:
    """Whether a term gated by ``value != 0`` in torch is applied: always for a tensor that
    requires grad (the term is 0 at 0 but its derivative is not), else when nonzero."""
    if isinstance(value, Tensor):
        return value.requires_grad or bool(value != 0)
    return value != 0


def _positive(value: Scalar) -> bool:
    return bool(value > 0)


def _scalar_dtype() -> torch.dtype:
    """dtype of torch.optim's ``step`` counters (``optimizer._get_scalar_dtype``)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def zero_step() -> Tensor:
    """A fresh step counter, as torch.optim creates it (0-dim, CPU)."""
    return torch.zeros((), dtype=_scalar_dtype())


# --------------------------------------------------------------------------- base class


class FunctionalOptimizer(ABC):
    """An optimizer step as a pure function (params, grads, state, hyper) ↦ (params, state).

    Subclasses give ``name``, the twin ``torch_type``, ``defaults`` (every hyperparameter
    they read, with torch's default), ``flags`` (those that must be True/False),
    ``state_keys``, and the per-parameter ``_init`` / ``_update``.
    """

    name: ClassVar[str]
    torch_type: ClassVar[type[torch.optim.Optimizer]]
    defaults: ClassVar[Mapping[str, float | bool]]
    flags: ClassVar[frozenset[str]]
    state_keys: ClassVar[frozenset[str]]
    real_view: ClassVar[bool] = True
    """Complex parameters are updated through ``view_as_real`` (as torch does)."""
    construction_settings: ClassVar[frozenset[str]] = frozenset()
    """Settings torch.optim reads only in its constructor, to build the first state there
    (Adagrad's initial_accumulator_value): a learned one rebuilds an unstepped state."""

    # ---------------------------------------------------------------- public interface

    def init_state(self, params: Sequence[Tensor], hyper: HyperIn) -> State:
        """The state torch.optim would create before the first step, one dict per param."""
        self._check_lengths(len(params), hyper=len(hyper))
        return [self._init(p, self.settings(h, i)) for i, (p, h) in enumerate(zip(params, hyper))]

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        state: StateIn,
        hyper: HyperIn,
    ) -> tuple[list[Tensor], State]:
        """One step of every parameter; returns NEW parameters and NEW state dicts."""
        self._check_lengths(len(params), grads=len(grads), state=len(state), hyper=len(hyper))
        new_params: list[Tensor] = []
        new_state: State = []
        for i, (p, g, s, h) in enumerate(zip(params, grads, state, hyper)):
            if g is None:
                new_params.append(p)
                new_state.append(dict(s))
                continue
            self._check_grad(p, g, i)
            settings = self.settings(h, i)
            if self.real_view and torch.is_complex(p):
                p_new, s_new = self._update_complex(p, g, s, settings, i)
            else:
                p_new, s_new = self._update(p, g, s, settings, i)
            new_params.append(p_new)
            new_state.append(s_new)
        return new_params, new_state

    def settings(self, hyper: Mapping[str, float | Tensor], index: int = 0) -> dict[str, Scalar]:
        """``hyper`` checked and completed with torch's defaults; 1-element tensors become
        0-dim, numbers become floats, flags stay bools."""
        out: dict[str, Scalar] = dict(self.defaults)
        owner = f"{self.name}.hyper[{index}]"
        for key, value in hyper.items():
            if key not in self.defaults:
                raise ConfigError(
                    owner,
                    key,
                    value,
                    f"not a setting of {self.name}; the settings are {sorted(self.defaults)}",
                )
            if key in self.flags:
                if not isinstance(value, bool):
                    raise ConfigError(owner, key, value, "True or False")
                out[key] = value
            elif isinstance(value, Tensor):
                if value.numel() != 1 or value.is_complex():
                    raise ConfigError(owner, key, value, "a number or a 1-element real tensor")
                out[key] = value.reshape(())
            elif isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(owner, key, value, "a number or a 1-element real tensor")
            else:
                out[key] = float(value)
        self._check_settings(out, owner)
        return out

    def hyper_from_group(self, group: Mapping[str, object]) -> dict[str, float | Tensor]:
        """The hyperparameters a torch param group holds for this optimizer."""
        out: dict[str, float | Tensor] = {}
        for key in self.defaults:
            if key in group:
                out[key] = group[key]  # type: ignore[assignment]
        return out

    # ---------------------------------------------------------------- for subclasses

    @abstractmethod
    def _init(self, param: Tensor, h: dict[str, Scalar]) -> dict[str, Tensor]:
        """The fresh state of one parameter."""

    @abstractmethod
    def _update(
        self,
        param: Tensor,
        grad: Tensor,
        state: Mapping[str, Tensor],
        h: dict[str, Scalar],
        index: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One step of one (real) parameter."""

    def _check_settings(self, h: dict[str, Scalar], owner: str) -> None:
        """Cross-field checks of one parameter's completed settings (none by default)."""
        return

    def _need(self, state: Mapping[str, Tensor], key: str, index: int) -> Tensor:
        """state[key], or an error saying the state was built for other settings."""
        value = state.get(key)
        if value is None:
            raise ZigguratError(
                f"{self.name}: the state of parameter {index} has no '{key}' (it has "
                f"{sorted(state)}): it was built for other settings, e.g. amsgrad, momentum or "
                f"centered switched on after the optimizer stepped. Build it with "
                f"init_state(...) for the current settings, or keep the settings fixed."
            )
        return value

    def _advance(self, state: Mapping[str, Tensor], index: int) -> tuple[Tensor, float]:
        """The incremented step counter (a new tensor) and its value as a float."""
        step_t = self._need(state, "step", index).detach() + 1
        return step_t, float(step_t.item())

    # ---------------------------------------------------------------- internals

    def _update_complex(
        self, p: Tensor, g: Tensor, s: Mapping[str, Tensor], h: dict[str, Scalar], index: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """torch's treatment of a complex parameter: the update runs on real views."""
        complex_keys = {k for k, v in s.items() if torch.is_complex(v)}
        real_state = {k: torch.view_as_real(v) if k in complex_keys else v for k, v in s.items()}
        p_new, s_new = self._update(
            torch.view_as_real(p), torch.view_as_real(g), real_state, h, index
        )
        back = {k: torch.view_as_complex(v) if k in complex_keys else v for k, v in s_new.items()}
        return torch.view_as_complex(p_new), back

    def _check_lengths(self, n: int, **others: int) -> None:
        bad = {k: v for k, v in others.items() if v != n}
        if bad:
            listed = ", ".join(f"{k}: {v}" for k, v in bad.items())
            raise ZigguratError(
                f"{self.name}.step/init_state got {n} params but {listed}; pass one gradient, "
                f"one state dict and one hyperparameter dict per parameter."
            )

    def _check_grad(self, p: Tensor, g: Tensor, index: int) -> None:
        if g.is_sparse:
            raise ZigguratError(
                f"{self.name}: the gradient of parameter {index} is sparse; functional "
                f"optimizers take dense gradients only (pass grad.to_dense())."
            )
        if g.shape != p.shape:
            raise ZigguratError(
                f"{self.name}: the gradient of parameter {index} has shape {tuple(g.shape)} "
                f"but the parameter has shape {tuple(p.shape)}; pass gradients in the order "
                f"of the parameters."
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


# --------------------------------------------------------------------------- optimizers


class FunctionalSGD(FunctionalOptimizer):
    """torch.optim.SGD: g ← ±∇ + λθ; b ← g on the first step (no dampening), else
    b ← μb + (1−τ)g; g ← g + μb (nesterov) or b; θ ← θ − ηg."""

    name = "sgd"
    torch_type: ClassVar[type[torch.optim.Optimizer]] = torch.optim.SGD
    defaults: ClassVar[Mapping[str, float | bool]] = {
        "lr": 1e-3,
        "momentum": 0.0,
        "dampening": 0.0,
        "weight_decay": 0.0,
        "nesterov": False,
        "maximize": False,
    }
    flags = frozenset({"nesterov", "maximize"})
    state_keys = frozenset({"momentum_buffer"})
    real_view = False

    def _check_settings(self, h: dict[str, Scalar], owner: str) -> None:
        if h["nesterov"] and (not _positive(h["momentum"]) or _on(h["dampening"])):
            raise ConfigError(
                owner, "nesterov", True, "only with momentum > 0 and dampening = 0 (as torch)"
            )

    def _init(self, param: Tensor, h: dict[str, Scalar]) -> dict[str, Tensor]:
        return {}

    def _update(
        self,
        param: Tensor,
        grad: Tensor,
        state: Mapping[str, Tensor],
        h: dict[str, Scalar],
        index: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        new = dict(state)
        g = -grad if h["maximize"] else grad
        if _on(h["weight_decay"]):
            g = _add(g, param, h["weight_decay"])
        momentum = h["momentum"]
        # a learned momentum at 0 still has a derivative, but only without dampening is
        # torch's step continuous there (at 0 it takes g; just above, (1 − d) g)
        if _on(momentum) if not _on(h["dampening"]) else bool(momentum != 0):
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = g.clone()  # torch: the first buffer is the gradient, undampened
            else:
                buf = _add(buf * momentum, g, 1 - h["dampening"])
            new["momentum_buffer"] = buf
            g = _add(g, buf, momentum) if h["nesterov"] else buf
        return _add(param, g, -h["lr"]), new


class FunctionalAdam(FunctionalOptimizer):
    """torch.optim.Adam: g ← ±∇ (+ λθ, or θ ← θ(1 − ηλ) when decoupled); m ← lerp(m, g, 1−β₁);
    v ← β₂v + (1−β₂)g²; (amsgrad: v̄ ← max(v̄, v)); θ ← θ − η/(1−β₁ᵗ) · m /
    (√v / √(1−β₂ᵗ) + ε)."""

    name = "adam"
    torch_type: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adam
    defaults: ClassVar[Mapping[str, float | bool]] = {
        "lr": 1e-3,
        "beta1": 0.9,
        "beta2": 0.999,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "amsgrad": False,
        "maximize": False,
        "decoupled_weight_decay": False,
    }
    flags = frozenset({"amsgrad", "maximize", "decoupled_weight_decay"})
    state_keys = frozenset({"step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq"})

    def hyper_from_group(self, group: Mapping[str, object]) -> dict[str, float | Tensor]:
        out = super().hyper_from_group(group)
        betas = group.get("betas")
        if isinstance(betas, tuple | list) and len(betas) == 2:
            out["beta1"], out["beta2"] = betas[0], betas[1]
        return out

    def settings(self, hyper: Mapping[str, float | Tensor], index: int = 0) -> dict[str, Scalar]:
        """As the base, also taking torch's ``betas=(β₁, β₂)`` for ``beta1`` and ``beta2``."""
        if "betas" in hyper:
            betas: object = hyper["betas"]
            owner = f"{self.name}.hyper[{index}]"
            if not isinstance(betas, tuple | list) or len(betas) != 2:
                raise ConfigError(owner, "betas", betas, "a pair (beta1, beta2)")
            if "beta1" in hyper or "beta2" in hyper:
                raise ConfigError(owner, "betas", betas, "given without beta1 / beta2")
            hyper = {k: v for k, v in hyper.items() if k != "betas"}
            hyper["beta1"], hyper["beta2"] = betas[0], betas[1]
        return super().settings(hyper, index)

    def _init(self, param: Tensor, h: dict[str, Scalar]) -> dict[str, Tensor]:
        state = {
            "step": zero_step(),
            "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
            "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
        }
        if h["amsgrad"]:
            state["max_exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update(
        self,
        param: Tensor,
        grad: Tensor,
        state: Mapping[str, Tensor],
        h: dict[str, Scalar],
        index: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        new = dict(state)
        step_t, step = self._advance(state, index)
        new["step"] = step_t
        lr, beta1, beta2, wd = h["lr"], h["beta1"], h["beta2"], h["weight_decay"]
        g = -grad if h["maximize"] else grad
        if _on(wd):
            if h["decoupled_weight_decay"]:
                param = param * (1 - lr * wd)
            else:
                g = _add(g, param, wd)
        exp_avg = _lerp(self._need(state, "exp_avg", index), g, 1 - beta1)
        exp_avg_sq = _addcmul(self._need(state, "exp_avg_sq", index) * beta2, g, g, 1 - beta2)
        new["exp_avg"], new["exp_avg_sq"] = exp_avg, exp_avg_sq

        bias_correction1 = 1 - beta1**step
        bias_correction2 = 1 - beta2**step
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        second = exp_avg_sq
        if h["amsgrad"]:
            second = torch.maximum(self._need(state, "max_exp_avg_sq", index), exp_avg_sq)
            new["max_exp_avg_sq"] = second
        denom = safe_sqrt(second) / bias_correction2_sqrt + h["eps"]
        return _addcdiv(param, exp_avg, denom, -step_size), new


class FunctionalAdamW(FunctionalAdam):
    """torch.optim.AdamW: Adam with decoupled weight decay θ ← θ(1 − ηλ) (default λ = 0.01)."""

    name = "adamw"
    torch_type: ClassVar[type[torch.optim.Optimizer]] = torch.optim.AdamW
    defaults: ClassVar[Mapping[str, float | bool]] = {
        k: v for k, v in FunctionalAdam.defaults.items() if k != "decoupled_weight_decay"
    } | {"weight_decay": 1e-2}
    flags = frozenset({"amsgrad", "maximize"})

    def settings(self, hyper: Mapping[str, float | Tensor], index: int = 0) -> dict[str, Scalar]:
        out = super().settings(hyper, index)
        out["decoupled_weight_decay"] = True
        return out


class FunctionalRMSprop(FunctionalOptimizer):
    """torch.optim.RMSprop: g ← ±∇ + λθ; v ← αv + (1−α)g²; centered: ḡ ← lerp(ḡ, g, 1−α),
    d ← √(v − ḡ²) + ε, else d ← √v + ε; momentum: b ← μb + g/d, θ ← θ − ηb; else
    θ ← θ − ηg/d."""

    name = "rmsprop"
    torch_type: ClassVar[type[torch.optim.Optimizer]] = torch.optim.RMSprop
    defaults: ClassVar[Mapping[str, float | bool]] = {
        "lr": 1e-2,
        "alpha": 0.99,
        "eps": 1e-8,
        "weight_decay": 0.0,
        "momentum": 0.0,
        "centered": False,
        "maximize": False,
    }
    flags = frozenset({"centered", "maximize"})
    state_keys = frozenset({"step", "square_avg", "momentum_buffer", "grad_avg"})

    def _init(self, param: Tensor, h: dict[str, Scalar]) -> dict[str, Tensor]:
        state = {
            "step": zero_step(),
            "square_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
        }
        if _positive(h["momentum"]):
            state["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        if h["centered"]:
            state["grad_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        return state

    def _update(
        self,
        param: Tensor,
        grad: Tensor,
        state: Mapping[str, Tensor],
        h: dict[str, Scalar],
        index: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        new = dict(state)
        new["step"], _ = self._advance(state, index)
        alpha, lr = h["alpha"], h["lr"]
        g = -grad if h["maximize"] else grad
        if _on(h["weight_decay"]):
            g = _add(g, param, h["weight_decay"])
        square_avg = _addcmul(self._need(state, "square_avg", index) * alpha, g, g, 1 - alpha)
        new["square_avg"] = square_avg
        if h["centered"]:
            grad_avg = _lerp(self._need(state, "grad_avg", index), g, 1 - alpha)
            new["grad_avg"] = grad_avg
            avg = safe_sqrt(torch.addcmul(square_avg, grad_avg, grad_avg, value=-1))
        else:
            avg = safe_sqrt(square_avg)
        avg = avg + h["eps"]
        if _positive(h["momentum"]):
            buf = self._need(state, "momentum_buffer", index) * h["momentum"]
            buf = torch.addcdiv(buf, g, avg)
            new["momentum_buffer"] = buf
            return _add(param, buf, -lr), new
        return _addcdiv(param, g, avg, -lr), new


class FunctionalAdagrad(FunctionalOptimizer):
    """torch.optim.Adagrad: g ← ±∇ + λθ; η_t = η / (1 + (t−1)·lr_decay); s ← s + g²;
    θ ← θ − η_t g / (√s + ε), with s₀ = initial_accumulator_value."""

    name = "adagrad"
    torch_type: ClassVar[type[torch.optim.Optimizer]] = torch.optim.Adagrad
    defaults: ClassVar[Mapping[str, float | bool]] = {
        "lr": 1e-2,
        "lr_decay": 0.0,
        "weight_decay": 0.0,
        "initial_accumulator_value": 0.0,
        "eps": 1e-10,
        "maximize": False,
    }
    flags = frozenset({"maximize"})
    state_keys = frozenset({"step", "sum"})
    construction_settings = frozenset({"initial_accumulator_value"})  # (s₀)

    def _init(self, param: Tensor, h: dict[str, Scalar]) -> dict[str, Tensor]:
        init = h["initial_accumulator_value"]
        if isinstance(init, Tensor):
            real = torch.view_as_real(param) if torch.is_complex(param) else param
            total = torch.zeros_like(real, memory_format=torch.preserve_format) + init.to(real)
            if torch.is_complex(param):
                total = torch.view_as_complex(total)
        else:
            value = complex(init, init) if torch.is_complex(param) else init
            total = torch.full_like(param, value, memory_format=torch.preserve_format)
        return {"step": zero_step(), "sum": total}

    def _update(
        self,
        param: Tensor,
        grad: Tensor,
        state: Mapping[str, Tensor],
        h: dict[str, Scalar],
        index: int,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        new = dict(state)
        step_t, step = self._advance(state, index)
        new["step"] = step_t
        g = -grad if h["maximize"] else grad
        if _on(h["weight_decay"]):
            g = _add(g, param, h["weight_decay"])
        clr = h["lr"] / (1 + (step - 1) * h["lr_decay"])
        total = torch.addcmul(self._need(state, "sum", index), g, g, value=1)
        new["sum"] = total
        std = safe_sqrt(total) + h["eps"]
        return _addcdiv(param, g, std, -clr), new


FUNCTIONAL_OPTIMIZERS: dict[str, type[FunctionalOptimizer]] = {
    cls.name: cls
    for cls in (
        FunctionalSGD,
        FunctionalAdam,
        FunctionalAdamW,
        FunctionalRMSprop,
        FunctionalAdagrad,
    )
}
"""The functional optimizers by ``name``."""


def by_name(name: str) -> FunctionalOptimizer:
    """The functional optimizer called ``name`` ("sgd", "adam", "adamw", "rmsprop",
    "adagrad")."""
    cls = FUNCTIONAL_OPTIMIZERS.get(name)
    if cls is None:
        raise ConfigError("optim", "name", name, f"one of {sorted(FUNCTIONAL_OPTIMIZERS)}")
    return cls()
