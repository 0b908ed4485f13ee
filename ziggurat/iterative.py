"""IterativeProblem: a lower level whose hypergradient differentiates its own unrolled steps.

Within one unroll (``unroll_steps`` = K steps between two steps of its upper problems) the
problem's parameters are tensors θ_k computed by the differentiable twin of its torch
optimizer, θ_{k+1}, s_{k+1} = Φ(θ_k, s_k, ∇L(θ_k, λ), h(λ)), evaluated through the ordinary
module (``self.module(x)`` and ``self(x)`` compute with θ_k). The module's own parameters
hold the values of θ_k after every step (so the module is always current), and at the end
of the unroll the optimizer's state is written back, so the torch optimizer continues
exactly where the functional one stopped.

Upper problems read θ_K through stand-in leaves (``read_parameters``), so their own
gradient never runs through the unroll; the unroll enters only through
``best_response_vjp``, computed by the configured method (``Reverse``, ``Forward`` or
``EvolutionStrategies``). A problem that is itself an upper problem of others adds its
hypergradients as constants (they are not differentiated again).
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Mapping, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch
from torch import Tensor

from .backward import grad as autograd_grad
from .data import step_counts
from .errors import ConfigError, HypergradientError
from .hypergrad import fixed_randomness, linalg
from .hypergrad.base import no_upper_parameters
from .optim import FunctionalOptimizer, from_torch, functional_twin, write_back
from .optim.functional import FUNCTIONAL_OPTIMIZERS
from .problem import Problem
from .registry import Family, Method
from .snapshot import Snapshot
from .systems import clip_by_total_norm
from .unrolled import EvolutionStrategies, Forward, Reinforce, Reverse, use_parameters


def _zeros_if_none(grads: Sequence[Tensor | None], like: Sequence[Tensor]) -> list[Tensor]:
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, like)]


class IterativeProblem(Problem):
    """A problem differentiated through its unrolled optimization (MAML, learned learning
    rates, short horizons). Its ``config.type`` is "reverse" (default), "forward" or "es".

    Hooks beyond Problem's:
        initial_parameters(): θ₀ of each unroll as tensors that may depend on upper
            problems (MAML: the meta-parameters themselves); default: the current values.
        optimizer_hyperparameters(): optimizer settings to use instead of the param groups'
            (e.g. ``{"lr": self.outer().exp()}`` for a learned learning rate); they may be
            tensors with a graph to upper problems.
    """

    method_family: Family = "iterative"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._theta: list[Tensor] | None = None  # θ_k of the open unroll
        self._fopt: FunctionalOptimizer | None = None
        self._fstate: list[dict[str, Tensor]] = []
        self._proxies: list[Tensor] | None = None
        self._own = False  # evaluating our own loss (module computes with θ_k)
        self._unroll_step = 0
        self._tangents: dict[str, list[tuple[list[Tensor], list[dict[str, Tensor]]]]] = {}
        self._es_start: Snapshot | None = None
        self._es_steps: list[tuple[list[Any], tuple[Tensor, list[Tensor]]]] = []
        self._es_calls = 0
        self._es_scaler: dict[str, Any] | None = None
        self._log_probs: list[Tensor] = []
        self._unroll_open = False
        self._baselines: dict[Hashable, float] = {}

    def default_method(self) -> Method:
        return Reverse()

    # ----------------------------------------------------------------- user hooks
    def initial_parameters(self) -> Sequence[Tensor] | None:
        """θ₀ of each unroll (may depend on upper problems); None: the current values."""
        return None

    def optimizer_hyperparameters(self) -> Mapping[str, float | Tensor]:
        """Optimizer settings replacing the param groups' values (may be tensors)."""
        return {}

    def record_log_prob(self, log_prob: Tensor) -> None:
        """With ``type="reinforce"``: record log p_λ(z) of a random draw made in this step."""
        if isinstance(self.method, Reinforce) and self._unroll_open:
            self._log_probs.append(log_prob.sum())

    # ----------------------------------------------------------------- what others see
    def read_parameters(self) -> list[Tensor]:
        if self._theta is None:
            return self.trainable_parameters()
        if self._proxies is None:
            self._proxies = [t.detach().requires_grad_() for t in self._theta]
        return self._proxies

    def as_read(self, clone: bool = False) -> AbstractContextManager[Any]:
        """Within an unroll, others see θ_K through the stand-in leaves (so ``self.inner(x)``
        and ``self.inner.module`` agree); otherwise as an ordinary problem."""
        if self._theta is None:
            return super().as_read(clone)
        return use_parameters(self.module, self.trainable_parameters(), self.read_parameters())

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._own or self._theta is None:
            return self.module(*args, **kwargs)
        with use_parameters(self.module, self.trainable_parameters(), self.read_parameters()):
            return self.module(*args, **kwargs)

    # ----------------------------------------------------------------- unroll lifecycle
    def _refresh_method(self) -> None:
        # an open unroll keeps the method it started with (its graph, tangents or records
        # are that method's): a replaced config's method takes over at the next unroll
        if self.checkpointable:
            super()._refresh_method()

    def start_unroll(self) -> None:
        self._refresh_method()
        super().start_unroll()
        if self._scaler is not None and not isinstance(self.method, (EvolutionStrategies,
                                                                      Reinforce)):
            raise ConfigError(
                self.name, "config.precision", "fp16",
                "'bf16' or 'fp32' for an unrolled problem: a dynamic loss scale inside a "
                "differentiated unroll would be differentiated too",
            )
        if not self._graph_or_error().parents[self.name]:
            return  # nothing above differentiates through us: ordinary steps, no graph kept
        method = self.method
        if isinstance(method, EvolutionStrategies | Reinforce):
            for hook in ("initial_parameters", "optimizer_hyperparameters"):
                if getattr(type(self), hook) is not getattr(IterativeProblem, hook):
                    raise ConfigError(
                        self.name, "config.type", method.name,
                        f"'reverse' or 'forward' when {hook}() is overridden: {method.name} "
                        f"takes ordinary torch steps, which cannot use it",
                    )
        if isinstance(method, Reinforce):
            self._log_probs = []
            self._unroll_open = True
            return
        if isinstance(method, EvolutionStrategies):
            self._es_start = Snapshot(self.module, self.optimizer, self.scheduler)
            self._es_scaler = None if self._scaler is None else self._scaler.state_dict()
            self._es_steps = []
            return
        params = self.trainable_parameters()
        start = self.initial_parameters()
        if start is None:
            theta = [p.detach().clone().requires_grad_() for p in params]
        else:
            theta = list(start)
            if not linalg.same_shapes(theta, params):
                raise ConfigError(
                    self.name, "initial_parameters()", [tuple(t.shape) for t in theta],
                    f"one tensor per trainable parameter, shapes "
                    f"{[tuple(p.shape) for p in params]}",
                )
            if any(not t.requires_grad for t in theta):
                theta = [t if t.requires_grad else t.detach().clone().requires_grad_()
                         for t in theta]
        self._fopt, self._fstate, _ = from_torch(self.optimizer, params)
        if not any(self.optimizer.state.get(p) for p in params):
            # never stepped: build the state from the settings in force (overrides included)
            self._fstate = list(self._fopt.init_state(params, self._hyper(params)))
        else:
            learned = self._learned_first_state(params, self.optimizer_hyperparameters())
            self._fstate = learned or self._fstate
        self._theta = theta
        self._proxies = None
        self._unroll_step = 0
        self._sync_module()
        if isinstance(method, Forward):
            self._start_tangents(method, start is not None)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["iterative"] = {"es_calls": self._es_calls,
                              "baselines": [[list(k) if isinstance(k, tuple) else k, v]
                                            for k, v in self._baselines.items()]}
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        super().load_state_dict(state)
        extra = state.get("iterative", {})
        self._es_calls = int(extra.get("es_calls", 0))
        self._baselines = {tuple(k) if isinstance(k, list) else k: float(v)
                           for k, v in extra.get("baselines", [])}

    @property
    def checkpointable(self) -> bool:
        """Not while an unroll is open: its graph (or its recorded draws) cannot be saved."""
        return self._theta is None and self._es_start is None and not self._unroll_open

    def end_unroll(self) -> None:
        """Write θ_K and the optimizer state back, release the graph, then roll back."""
        if self._theta is not None:
            self._sync_module()
            write_back(self.optimizer, self.trainable_parameters(), self._fstate)
        self._theta = None
        self._fstate = []
        self._proxies = None
        self._tangents = {}
        self._es_start = None
        self._es_steps = []
        self._log_probs = []
        self._unroll_open = False
        super().end_unroll()

    def _settings_read(self, lam: Sequence[Tensor]) -> bool:
        """Whether ``optimizer_hyperparameters()`` depends on ``lam``: then a zero
        hypergradient can be exact (a setting the steps so far have not used, such as
        SGD's momentum before its second step), not a detached coupling."""
        values: list[Tensor] = []
        for value in self.optimizer_hyperparameters().values():
            for v in value if isinstance(value, tuple | list) else (value,):
                if isinstance(v, Tensor) and v.requires_grad:
                    values.append(v.sum())
        return bool(values) and any(
            g is not None for g in autograd_grad(values, list(lam), allow_unused=True))

    def _learned_first_state(self, params: Sequence[Tensor], override: Mapping[str, Any]
                             ) -> list[dict[str, Tensor]] | None:
        """The optimizer's first state built from the settings in force, when ``override``
        (``optimizer_hyperparameters()``) learns a setting torch reads only in its
        constructor (Adagrad's initial_accumulator_value, ``construction_settings``) and the
        optimizer has not stepped (step counters 0); else None (torch's state is the one)."""
        if not override.keys() & _CONSTRUCTION_SETTINGS:
            return None
        twin = functional_twin(self.optimizer)
        if not override.keys() & twin.construction_settings:
            return None
        counters = [self.optimizer.state.get(p, {}).get("step") for p in params]
        if any(c is None for c in counters) or any(step_counts(counters)):
            return None
        if self._fopt is None:
            self._fopt = twin
        return list(twin.init_state(params, self._hyper(params)))

    def _retake_step(self, batches: list[Any]) -> None:
        # as an ordinary step (``step``): the settings of optimizer_hyperparameters() in
        # force, now computed from the upper problems' updated parameters
        self._apply_overrides()
        super()._retake_step(batches)

    def _sync_module(self) -> None:
        assert self._theta is not None
        with torch.no_grad():
            for p, t in zip(self.trainable_parameters(), self._theta):
                p.copy_(t)

    # ----------------------------------------------------------------- one step
    def _draw_batches(self) -> list[Any]:
        batches = super()._draw_batches()
        if self._es_start is not None:  # record what a re-run of this step needs
            self._es_steps.append((batches, _all_rng_states()))
        return batches

    def step(self) -> None:
        if self._theta is None:  # warm-up, sampling (reinforce) and es: ordinary steps
            self._apply_overrides()
            super().step()
            return
        method = self.method
        batch = self._draw_batches()
        if isinstance(method, Forward):
            self._forward_mode_step(batch)
        else:
            assert isinstance(method, Reverse)
            k = self.config.unroll_steps
            in_window = method.truncate is None or self._unroll_step >= k - method.truncate
            new_theta, new_state = self._unrolled_update(
                batch, self._theta, self._fstate,
                create_graph=in_window and not method.first_order, record=True,
            )
            if not in_window:
                new_theta = [t.detach().requires_grad_() for t in new_theta]
                new_state = [{k_: v.detach() for k_, v in s.items()} for s in new_state]
            self._theta, self._fstate = new_theta, new_state
        self._after_step()

    def _after_step(self) -> None:
        self._proxies = None
        self._unroll_step += 1
        self._sync_module()
        self._apply_overrides()
        self._step_scheduler()
        self.param_callback(self.trainable_parameters())
        self.count += 1

    def _apply_overrides(self) -> None:
        """Show ``optimizer_hyperparameters()`` in the torch param groups (as numbers), so
        ordinary steps and anyone reading the groups use the values in force."""
        override = self.optimizer_hyperparameters()
        if not override:
            return
        pair = _numbers(self.name, override["betas"]) if "betas" in override else None
        values = {k: (float(v.detach()) if isinstance(v, Tensor) else v)
                  for k, v in override.items() if k != "betas"}
        for group in self.optimizer.param_groups:
            betas = list(group.get("betas", (0.0, 0.0)) if pair is None else pair)
            for key, value in values.items():
                if key == "beta1":
                    betas[0] = value
                elif key == "beta2":
                    betas[1] = value
                else:
                    group[key] = value
            if "betas" in group:
                group["betas"] = tuple(betas)
        if override.keys() & _CONSTRUCTION_SETTINGS:
            params = self.trainable_parameters()
            first = self._learned_first_state(params, override)
            if first is not None:  # the ordinary steps about to be taken start from it
                write_back(self.optimizer, params, [{k: v.detach() for k, v in st.items()}
                                                    for st in first])

    def sync(self) -> None:
        """Write the open unroll's θ and optimizer state into the module and the torch
        optimizer (the unroll itself stays open)."""
        if self._theta is not None:
            self._sync_module()
            write_back(self.optimizer, self.trainable_parameters(), self._fstate)

    def _hyper(self, params: Sequence[Tensor]) -> list[dict[str, float | Tensor]]:
        """Per-parameter optimizer settings: the param groups (read now, so schedulers
        apply) with ``optimizer_hyperparameters()`` on top."""
        assert self._fopt is not None
        groups = {id(p): g for g in self.optimizer.param_groups for p in g["params"]}
        override = dict(self.optimizer_hyperparameters())
        if "betas" in override:  # the functional optimizers take beta1 / beta2
            beta1, beta2 = _pair(self.name, override.pop("betas"))
            override.setdefault("beta1", beta1)
            override.setdefault("beta2", beta2)
        out = []
        for p in params:
            hyper = self._fopt.hyper_from_group(groups[id(p)])
            hyper.update(override)
            out.append(hyper)
        return out

    def _unrolled_update(
        self,
        batch: list[Any],
        theta: list[Tensor],
        state: list[dict[str, Tensor]],
        create_graph: bool,
        record: bool = False,
    ) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
        """Φ: one differentiable optimizer step from (θ, s) on the step's micro-batches
        (mean loss), with grad_callback and gradient clipping inside the step."""
        assert self._fopt is not None
        params = self.trainable_parameters()
        self._own = True
        try:
            with use_parameters(self.module, params, theta):
                # the other problems' parameters enter the graph as copies: their owners may
                # update them in place before this unroll is differentiated
                losses = self._batch_losses(batch, record=record, clone_others=True)
        finally:
            self._own = False
        loss = losses[0] if len(losses) == 1 else torch.stack(losses).mean()
        grads = self._gradients(loss, theta, create_graph=create_graph)
        if not create_graph:
            grads = [g.detach() for g in grads]
        if record:
            grads = self._final_gradients(grads, theta)
        if self.config.gradient_clipping is not None:
            grads = clip_by_total_norm(grads, self.config.gradient_clipping)
        new_theta, new_state = self._fopt.step(theta, grads, state, self._hyper(params))
        return list(new_theta), list(new_state)

    # ----------------------------------------------------------------- hypergradients
    def best_response_vjp(
        self, v: list[Tensor], upper: Problem, key: Hashable = None
    ) -> list[Tensor]:
        method = self.method
        lam = upper.read_parameters()
        if not lam:
            raise no_upper_parameters(upper.name, self.name)
        if isinstance(method, EvolutionStrategies):
            return self._es_vjp(method, v, lam)
        if isinstance(method, Reinforce):
            return self._reinforce_vjp(method, v, upper, key)
        if self._theta is None:
            raise HypergradientError(
                f"problem '{upper.name}' asked for a hypergradient through '{self.name}' "
                f"outside an unroll; step problems through zg.Engine."
            )
        if isinstance(method, Forward):
            return self._forward_vjp(v, upper)
        out = autograd_grad(self._theta, lam, v, retain_graph=True, allow_unused=True)
        if all(o is None for o in out) and not self._settings_read(lam):
            raise HypergradientError(
                f"the unrolled steps of problem '{self.name}' do not depend on the parameters "
                f"of '{upper.name}', so its hypergradient would be silently zero. Use "
                f"self.{upper.name}(...) in training_step, optimizer_hyperparameters() or "
                f"initial_parameters(), without detaching, or remove the dependency."
            )
        return _zeros_if_none(out, lam)

    # forward mode -----------------------------------------------------------------
    def _start_tangents(self, method: Forward, from_upper: bool) -> None:
        assert self._theta is not None
        self._tangents = {}
        for name in self._graph_or_error().parents[self.name]:
            upper = self._others[name]
            lam = upper.read_parameters()
            numel = sum(t.numel() for t in lam)
            if numel > method.max_upper_numel and not method.allow_large:
                raise ConfigError(
                    self.name, "config.type", method,
                    f"forward mode carries one tangent of θ (and of the optimizer state) per "
                    f"scalar of the upper problem; '{name}' has {numel} scalars > "
                    f"max_upper_numel={method.max_upper_numel}, i.e. {numel}× the memory of "
                    f"θ and {numel} extra backward passes per step. Use reverse mode, or "
                    f"Forward(allow_large=True) to accept the cost",
                )
            bases = [_basis(lam, j) for j in range(numel)]
            keys = [_float_keys(st) for st in self._fstate]
            state = [st[k] for st, ks in zip(self._fstate, keys) for k in ks]
            n = len(self._theta)
            # θ₀ may depend on the upper problem (MAML's initialisation), and so may the
            # optimizer's first state (a learned Adagrad initial_accumulator_value)
            if from_upper or any(t.requires_grad for t in state):
                starts = _jvps(list(self._theta) + state, lam, bases)
            else:
                starts = [[torch.zeros_like(x) for x in list(self._theta) + state]
                          for _ in bases]
            columns = []
            for start in starts:
                flat = iter(x.detach() for x in start[n:])
                columns.append(([x.detach() for x in start[:n]],
                                [{k: next(flat) for k in ks} for ks in keys]))
            self._tangents[name] = columns
        self._theta = [t.detach().requires_grad_() for t in self._theta]
        self._fstate = [{k: v.detach() for k, v in st.items()} for st in self._fstate]

    def _forward_mode_step(self, batch: list[Any]) -> None:
        assert self._theta is not None
        theta = self._theta
        state = [{k: (s.detach().requires_grad_() if torch.is_floating_point(s) else s)
                  for k, s in st.items()} for st in self._fstate]
        new_theta, new_state = self._unrolled_update(batch, theta, state, create_graph=True,
                                                     record=True)
        outputs = list(new_theta) + [s[k] for s in new_state for k in _float_keys(s)]
        state_in = [s[k] for s in state for k in _float_keys(s)]
        for name, columns in self._tangents.items():
            lam = self._others[name].read_parameters()
            updated = []
            tangent_sets = [
                list(t_theta) + [ts[k] for ts in t_state for k in sorted(ts)] + _basis(lam, j)
                for j, (t_theta, t_state) in enumerate(columns)
            ]
            n = len(theta)
            for tangent in _jvps(outputs, list(theta) + state_in + list(lam), tangent_sets):
                new_t_theta = [x.detach() for x in tangent[:n]]
                flat = iter(x.detach() for x in tangent[n:])
                new_t_state = [{k: next(flat) for k in _float_keys(s)} for s in new_state]
                updated.append((new_t_theta, new_t_state))
            self._tangents[name] = updated
        self._theta = [t.detach().requires_grad_() for t in new_theta]
        self._fstate = [{k: s.detach() for k, s in st.items()} for st in new_state]

    def _forward_vjp(self, v: list[Tensor], upper: Problem) -> list[Tensor]:
        columns = self._tangents.get(upper.name)
        if columns is None:
            raise HypergradientError(
                f"forward mode of '{self.name}' carries tangents for its upper problems "
                f"{sorted(self._tangents)} only, not '{upper.name}'."
            )
        lam = upper.read_parameters()
        flat = torch.stack([linalg.dot(v, t_theta) for t_theta, _ in columns])
        out, offset = [], 0
        for t in lam:
            out.append(flat[offset:offset + t.numel()].reshape(t.shape).to(t.dtype))
            offset += t.numel()
        return out

    # score function -----------------------------------------------------------------
    def _reinforce_vjp(
        self, method: Reinforce, v: list[Tensor], upper: Problem, key: Hashable
    ) -> list[Tensor]:
        lam = upper.read_parameters()
        if not self._log_probs:
            raise HypergradientError(
                f"REINFORCE through '{self.name}' needs the log-probabilities of its random "
                f"draws: call self.record_log_prob(dist.log_prob(z)) in training_step."
            )
        score = autograd_grad(torch.stack(self._log_probs).sum(), lam,
                              retain_graph=True, allow_unused=True)
        if all(s is None for s in score):
            raise HypergradientError(
                f"the recorded log-probabilities of '{self.name}' do not depend on the "
                f"parameters of '{upper.name}'; build the sampling distribution from "
                f"self.{upper.name}(...) without detaching."
            )
        value = float(linalg.dot(v, [p.detach() for p in self.trainable_parameters()]))
        baseline = self._baselines.get(key, 0.0)
        self._baselines[key] = (method.baseline_decay * baseline
                                + (1.0 - method.baseline_decay) * value)
        return [torch.zeros_like(t) if s is None else (value - baseline) * s
                for s, t in zip(score, lam)]

    # zeroth order -----------------------------------------------------------------
    def _es_vjp(self, method: EvolutionStrategies, v: list[Tensor], lam: list[Tensor]
                ) -> list[Tensor]:
        if self._es_start is None or not self._es_steps:
            raise HypergradientError(
                f"evolution strategies through '{self.name}' need a recorded unroll; step "
                f"problems through zg.Engine."
            )
        final = Snapshot(self.module, self.optimizer, self.scheduler)
        scaler = None if self._scaler is None else self._scaler.state_dict()
        bookkeeping = (self.count, self.last_loss, dict(self.last_metrics))
        saved_lam = [t.detach().clone() for t in lam]
        generator = torch.Generator().manual_seed(method.seed + self._es_calls)
        self._es_calls += 1
        estimate = [torch.zeros_like(t) for t in lam]
        params = self.trainable_parameters()
        try:
            with fixed_randomness(params):
                for _ in range(method.samples):
                    # (drawn on the CPU: the same numbers on every device; to a GPU, a copy
                    # that does not wait for the queued work)
                    eps = [torch.randn(t.shape, generator=generator, dtype=t.dtype).to(
                        t.device, non_blocking=t.device.type == "cuda") for t in lam]
                    values = []
                    for sign in (1.0, -1.0):
                        with torch.no_grad():
                            for t, s, e in zip(lam, saved_lam, eps):
                                t.copy_(s + sign * method.sigma * e)
                        self._es_replay()
                        # <v, θ> as a tensor: no host read per sample
                        values.append(linalg.dot(v, [p.detach() for p in params]))
                    scale = (values[0] - values[1]) / (2.0 * method.sigma * method.samples)
                    for acc, e in zip(estimate, eps):
                        acc.add_(e * scale.to(e.device, e.dtype))
        finally:
            with torch.no_grad():
                for t, s in zip(lam, saved_lam):
                    t.copy_(s)
            final.restore()
            if self._scaler is not None and scaler is not None:
                self._scaler.load_state_dict(scaler)
            self.count, self.last_loss, self.last_metrics = bookkeeping
        return estimate

    def _es_replay(self) -> None:
        """Re-run the recorded lower steps through the ordinary step (same batches, same
        random numbers, every hook), from the state at the start of the unroll."""
        assert self._es_start is not None
        self._es_start.restore()
        if self._scaler is not None and self._es_scaler is not None:
            self._scaler.load_state_dict(self._es_scaler)
        for batches, rng in self._es_steps:
            _set_all_rng_states(rng)
            Problem._step_on(self, batches)

#: the settings some optimizer reads only in its constructor (see _learned_first_state)
_CONSTRUCTION_SETTINGS = frozenset().union(
    *(cls.construction_settings for cls in FUNCTIONAL_OPTIMIZERS.values()))


def _float_keys(state: Mapping[str, Tensor]) -> list[str]:
    """The keys of an optimizer state's floating tensors, sorted: the order in which forward
    mode carries their tangents."""
    return [k for k in sorted(state) if torch.is_floating_point(state[k])]


def _pair(name: str, betas: object) -> tuple[float | Tensor, float | Tensor]:
    """An overridden ``betas``: a pair of numbers or 0-dim tensors, or a tensor of two."""
    if isinstance(betas, Tensor) and betas.numel() == 2:
        first, second = betas.reshape(2).unbind()
        return first, second
    if isinstance(betas, tuple | list) and len(betas) == 2 and all(
            isinstance(b, numbers.Real) or (isinstance(b, Tensor) and b.numel() == 1)
            for b in betas):
        return betas[0], betas[1]
    raise ConfigError(
        name, "optimizer_hyperparameters()['betas']",
        tuple(betas.shape) if isinstance(betas, Tensor) else betas,
        "two numbers or one-element tensors (beta1, beta2), or a tensor of two; or give "
        "'beta1' / 'beta2' on their own")


def _numbers(name: str, betas: object) -> tuple[float, float]:
    """``_pair`` as plain numbers (for the torch param groups)."""
    first, second = (float(b.detach()) if isinstance(b, Tensor) else float(b)
                     for b in _pair(name, betas))
    return first, second


def _all_rng_states() -> tuple[Tensor, list[Tensor]]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return torch.get_rng_state(), cuda


def _set_all_rng_states(states: tuple[Tensor, list[Tensor]]) -> None:
    torch.set_rng_state(states[0])
    if states[1]:
        torch.cuda.set_rng_state_all(states[1])


def _basis(lam: Sequence[Tensor], index: int) -> list[Tensor]:
    """The index-th unit vector over the scalars of ``lam``, as a tensor list."""
    out = [torch.zeros_like(t) for t in lam]
    for t in out:
        if index < t.numel():
            t.view(-1)[index] = 1.0
            break
        index -= t.numel()
    return out


def _jvps(
    outputs: Sequence[Tensor], inputs: Sequence[Tensor], tangent_sets: Sequence[Sequence[Tensor]]
) -> list[list[Tensor]]:
    """J·t for each tangent t, where outputs = f(inputs), by differentiating the
    vector-Jacobian product u ↦ Jᵀu with respect to u (the 'double-vjp' trick): one backward
    with graph shared by all tangents, then one backward per tangent."""
    outs = list(outputs)
    zeros = [[torch.zeros_like(o) for o in outs] for _ in tangent_sets]
    live = [k for k, o in enumerate(outs) if o.requires_grad]
    keep = [k for k, i in enumerate(inputs) if i.requires_grad]
    if not live or not keep or not tangent_sets:
        return zeros
    dummies = [torch.zeros_like(outs[k], requires_grad=True) for k in live]
    vjp = autograd_grad([outs[k] for k in live], [inputs[k] for k in keep], dummies,
                        create_graph=True, allow_unused=True)
    used = [(g, k) for g, k in zip(vjp, keep) if g is not None and g.requires_grad]
    if not used:
        return zeros
    results = []
    for tangents, result in zip(tangent_sets, zeros):
        jv = autograd_grad([g for g, _ in used], dummies, [tangents[k] for _, k in used],
                           retain_graph=True, allow_unused=True)
        for k, g in zip(live, jv):
            if g is not None:
                result[k] = g
        results.append(result)
    return results
