"""The one interface every implicit hypergradient method shares, and its sign convention.

Lower problem θ*(λ) = argmin_θ L_in(θ, λ). Given v = ∂L_out/∂θ, every method returns its
approximation of the best-response-Jacobian-vector product

    (dθ*/dλ)ᵀ v = −∂²_{λθ} L_in · x,    x ≈ H⁻¹ v,  H = ∂²_{θθ} L_in,

already carrying the minus sign: the caller *adds* the result to ∂_λ L_out. Methods differ
only in how they choose x (``solve``); the mixed product ∂²_{λθ} L_in · x is shared and is
computed exactly, by double backward or in forward mode (reverse over forward:
∇_λ of the directional derivative D_θ L_in[x], see ``mixed_forward``), or by a central
finite difference of ∇_λ L_in.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import torch
from torch import Tensor

from ..backward import grad as autograd_grad
from ..errors import ConfigError, HypergradientError
from ..registry import Family, Method
from ..unrolled.reparam import use_parameters
from ..validation import check_float
from . import factored, factored_hessian, linalg
from .factored import FactoredTangents, LinearFactors, NeedsGradView, densify
from .factored_hessian import HessianCapture
from .linalg import TensorList
from .lowrank import FactorSum

MixedMode = Literal["auto", "exact", "forward", "fd"]
MIXED_MODES: tuple[str, ...] = ("auto", "exact", "forward", "fd")
#: the call modes (``HypergradMethod._mode``) that take the mixed product in forward mode
_FORWARD_MODES = ("forward", "auto-forward")


class Reducer(Protocol):
    """Cross-process reductions of a data-parallel run (``zg.distributed.Communicator``).

    Each rank holds L_in on its own shard of the batch; the global L_in is their mean, so
    every product linear in L_in (H x, the mixed product) is the mean of the local ones.
    """

    @property
    def pending(self) -> bool:
        """True while the vector v handed to the method is still being all-reduced."""
        ...

    @property
    def shards_optimizer_state(self) -> bool:
        """True when each rank holds only its shard of the optimizer state (ZeRO)."""
        ...

    def wait(self) -> None:
        """Finish the all-reduce of v."""

    def mean_(self, tensors: list[Tensor]) -> None:
        """In-place mean over the ranks (one all-reduce)."""

    def sum_(self, tensors: list[Tensor]) -> None:
        """In-place sum over the ranks (one all-reduce)."""


@dataclass
class InnerObjective:
    """The lower problem as a hypergradient method sees it, at its current point.

    Attributes:
        params: θ, the lower problem's trainable tensors (leaves; may be perturbed in place
            and restored by finite-difference methods).
        upper_params: λ, the tensors of the upper problem the hypergradient is taken for.
        loss: recomputes L_in(θ, λ) at the current θ and λ (same batch every call).
        optimizer: the lower problem's optimizer, for methods that use its update (SAMA).
        state: per-problem scratch space that methods may keep between calls.
        name / upper_name: used in error messages.
        key: identifies the request (which upper problem, which path) for methods that
            keep per-request state, such as FixedPoint's warm start.
        reduce: data-parallel runs only: averages each Hessian-vector product over the
            ranks (so solvers iterate on the global H, identically on every rank).
        module: the module whose parameters include ``params`` and through which ``loss``
            reads them, or None. With it the exact mixed product can be taken in forward
            mode (``mixed_forward``): the module then computes with dual tensors in place
            of ``params``.
    """

    params: Sequence[Tensor]
    upper_params: Sequence[Tensor]
    loss: Callable[[], Tensor]
    optimizer: torch.optim.Optimizer | None = None
    state: dict[str, Any] = field(default_factory=dict)
    name: str = "inner"
    upper_name: str = "upper"
    key: Hashable = None
    reduce: Reducer | None = None
    module: torch.nn.Module | None = None

    def check(self) -> None:
        """Refuse what no hypergradient can be taken for: no λ, or a tensor in θ and λ."""
        if not self.upper_params:
            raise no_upper_parameters(self.upper_name, self.name)
        lower = {id(p) for p in self.params}
        shared = [i for i, t in enumerate(self.upper_params) if id(t) in lower]
        if shared:
            raise HypergradientError(
                f"upper_params{shared} of '{self.upper_name}' are also parameters of "
                f"'{self.name}' (the same tensors): a tensor is either θ or λ. Train each "
                f"tensor in one problem only.")


def no_upper_parameters(upper: str, lower: str) -> HypergradientError:
    """The error for a hypergradient asked for an upper problem without parameters."""
    return HypergradientError(
        f"problem '{upper}' has no trainable parameters (none of its tensors requires "
        f"grad), so it can take no hypergradient through '{lower}'. Give it a parameter "
        f"that requires grad, or remove the dependency between '{upper}' and '{lower}'.")


_NOT_COUPLED = (
    "{what} of problem '{name}' does not depend on the parameters of '{upper}', so its "
    "hypergradient would be silently zero. Check that '{name}'.training_step uses '{upper}' "
    "without detaching it, or remove the dependency between them."
)


@contextmanager
def fixed_randomness(tensors: Sequence[Tensor]) -> Iterator[Callable[[], None]]:
    """Yield ``replay()``, which resets the RNGs to their state at entry; leave them as found.

    Every loss evaluation of one hypergradient call replays the same random numbers (the
    same dropout masks on both sides of a finite difference), and the call consumes none of
    the program's random stream.
    """
    devices = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    # (what torch.random.fork_rng does, with the states it saves also used by replay: one
    # copy of each generator's state instead of two)
    cpu = torch.get_rng_state()
    cuda = [torch.cuda.get_rng_state(d) for d in devices]

    def replay() -> None:
        torch.set_rng_state(cpu)
        for d, s in zip(devices, cuda):
            torch.cuda.set_rng_state(s, d)

    try:
        yield replay
    finally:
        replay()


def _owned(out: Sequence[Any], params: Sequence[Tensor],
           x: Sequence[Tensor]) -> TensorList:
    """Detached products, zeros for None; a copy where autograd handed back the vector x
    itself (a pass-through path), so that callers can update products in place. A
    ``FactorSum`` (factored products) is the caller's already."""
    owned: list[Any] = [
        torch.zeros_like(p) if o is None
        else o if isinstance(o, FactorSum)
        else o.detach().clone() if isinstance(xi, Tensor) and o.data_ptr() == xi.data_ptr()
        else o.detach()
        for o, p, xi in zip(out, params, x)]
    return owned


def _upper_part(objective: InnerObjective, out: Sequence[Tensor | None]) -> TensorList:
    """The λ-gradients of a mixed product, zeros for unused λ; an error if every one is
    unused (the hypergradient would be silently zero)."""
    if all(o is None for o in out):
        raise HypergradientError(_NOT_COUPLED.format(
            what="∇_θ L", name=objective.name, upper=objective.upper_name))
    return [torch.zeros_like(p) if o is None else o.detach() if o.requires_grad else o
            for o, p in zip(out, objective.upper_params)]


class Curvature:
    """Second-order products of L_in at the current point, sharing one graph of ∇_θ L_in.

    The graph of g = ∇_θ L_in (built with create_graph) is made on first use and reused by
    every Hessian-vector product and by the exact mixed product. With ``factored`` (see
    ``factored_hessian``) large linear layers' weights enter the graph through factored
    nodes: products then return those entries as ``FactorSum`` and take them as such.
    """

    def __init__(self, objective: InnerObjective, factored: bool = False) -> None:
        self.objective = objective
        self._grad: tuple[Tensor, ...] | None = None
        capture = (HessianCapture(dict(enumerate(objective.params))) if factored else None)
        self._capture = capture if capture is not None and capture.watching else None
        self._factored: set[Hashable] = set()

    @property
    def factored(self) -> bool:
        """Whether products may return (and take) ``FactorSum`` entries."""
        return self._capture is not None

    def gradient(self) -> tuple[Tensor, ...]:
        """g = ∇_θ L_in with its graph (built once). Under ``factored`` the values of the
        factored weights' entries are placeholders: only the graph is used."""
        if self._grad is None:
            params = list(self.objective.params)
            capture = self._capture
            if capture is None:
                loss = self.objective.loss()
                grads = autograd_grad(loss, params, create_graph=True, allow_unused=True)
            else:
                with capture:
                    loss = self.objective.loss()
                with capture.building():
                    grads = autograd_grad(loss, params, create_graph=True, allow_unused=True)
                self._factored = capture.factored(
                    {i: g for i, g in enumerate(grads) if g is not None})
            # unused θ_i: a zero that carries no graph (so H has a zero row and column there)
            self._grad = tuple(
                torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)
            )
        return self._grad

    def _product(self, inputs: Sequence[Tensor], x: Sequence[Tensor | FactorSum],
                 retain: bool) -> list[Any]:
        """The backward of <g, x> to ``inputs``: their gradients (None where unused); under
        ``factored`` a θ entry that the factored nodes reached is a ``FactorSum``."""
        grad = self.gradient()
        capture = self._capture
        cotangents: dict[Hashable, FactorSum] = {}
        outs: list[Tensor] = []
        vecs: list[Tensor] = []
        for i, (g, xi) in enumerate(zip(grad, x)):
            if not g.requires_grad:
                continue
            if isinstance(xi, FactorSum):
                if i in self._factored:  # handed to the factored nodes directly
                    cotangents[i] = xi
                    xi = torch.zeros((), dtype=g.dtype, device=g.device).expand(g.shape)
                else:
                    xi = xi.dense()
            outs.append(g)
            vecs.append(xi)
        if not outs:
            return [None] * len(inputs)
        if capture is None:
            return list(autograd_grad(outs, list(inputs), vecs, retain_graph=retain,
                                      allow_unused=True))
        with capture.collecting_product(cotangents):
            out: list[Any] = list(autograd_grad(
                outs, list(inputs), vecs, retain_graph=retain, allow_unused=True))
        params = self.objective.params
        for i, p in enumerate(params[:len(inputs)]):
            if inputs[i] is p:
                entry = capture.take(i, out[i], p)
                if entry is not None:
                    out[i] = entry
        return out

    def hvp(self, x: Sequence[Tensor]) -> TensorList:
        """H x with H = ∂²_{θθ} L_in, as new tensors the caller may overwrite."""
        params = self.objective.params
        out = self._product(params, x, retain=True)
        hx = _owned(out, params, x)
        if self.objective.reduce is not None:  # the global H x (one all-reduce)
            self.objective.reduce.mean_(hx)
        return hx

    def mixed(self, x: Sequence[Tensor]) -> TensorList:
        """∂²_{λθ} L_in · x by double backward; releases the graph afterwards."""
        obj = self.objective
        out = self._product(obj.upper_params, x, retain=False)
        self._grad = None
        return _upper_part(obj, out)

    def hvp_and_mixed(self, x: Sequence[Tensor], retain: bool = True) -> tuple[
        TensorList, TensorList
    ]:
        """(H x, ∂²_{λθ} L_in · x) from one backward of <∇_θ L_in, x> to θ and λ together.

        Both are derivatives of the same scalar <g, x>, so one pass through the graph of g
        gives both; the λ part costs little beyond H x (on the reweighting workload, the
        backward through the small upper model only). In a data-parallel run H x is
        averaged over the ranks like ``hvp``'s, while the mixed part stays local: the
        caller's upper gradient is all-reduced once later. ``retain=False`` releases the
        graph (for the last product of a solve).
        """
        obj = self.objective
        params = list(obj.params)
        upper = list(obj.upper_params)
        out = self._product(params + upper, x, retain=retain)
        if not retain:
            self._grad = None
        hx = _owned(out[: len(params)], params, x)
        if obj.reduce is not None:  # the global H x (one all-reduce, as in ``hvp``)
            obj.reduce.mean_(hx)
        return hx, _upper_part(obj, out[len(params):])

    def release(self) -> None:
        """Drop the graph of ∇_θ L_in (a later product builds it again)."""
        self._grad = None


def upper_gradient(objective: InnerObjective) -> list[Tensor | None]:
    """∇_λ L_in at the current θ (no graph kept); None where a λ tensor is unused."""
    loss = objective.loss()
    grads = autograd_grad(loss, list(objective.upper_params), allow_unused=True)
    if all(g is None for g in grads):
        raise HypergradientError(_NOT_COUPLED.format(
            what="the loss", name=objective.name, upper=objective.upper_name))
    return list(grads)


def mixed_finite_difference(
    objective: InnerObjective, x: Sequence[Tensor], eps_scale: float
) -> TensorList:
    """∂²_{λθ} L_in · x ≈ [∇_λ L_in(θ + εx) − ∇_λ L_in(θ − εx)] / (2ε), ε = eps_scale/‖x‖.

    θ is perturbed in place and restored by the opposite additions (+εx, −2εx, +εx), so no
    copy of θ is made; θ is restored (up to rounding) even when an evaluation raises. Exact
    (up to rounding) when ∇_λ L_in is quadratic in θ. (Unlike exact mode, a λ that enters
    L_in only additively is not detected here: its difference is simply zero.)
    """
    params = list(objective.params)
    x = list(x)
    x_norm = float(linalg.norm(x))
    if x_norm == 0.0:
        return linalg.zeros_like(objective.upper_params)
    if not math.isfinite(x_norm):
        raise HypergradientError(
            f"the vector passed to the finite difference of problem '{objective.name}' is not "
            f"finite (norm {x_norm}); the upper loss or a lower level produced NaN/Inf."
        )
    eps = eps_scale / x_norm
    shifted = 0  # multiples of εx currently added to θ

    def shift_to(target: int) -> None:
        nonlocal shifted
        with torch.no_grad():
            torch._foreach_add_(params, x, alpha=(target - shifted) * eps)
        shifted = target

    try:
        shift_to(1)
        plus = upper_gradient(objective)
        shift_to(-1)
        minus = upper_gradient(objective)
    finally:
        shift_to(0)
    out: TensorList = []
    for gp, gm, lam in zip(plus, minus, objective.upper_params):
        if gp is None or gm is None:
            out.append(torch.zeros_like(lam))
        else:
            out.append((gp - gm) / (2.0 * eps))
    return out


#: Below this many lower parameters "auto" keeps double backward for Darts / SAMA: forward
#: mode runs some operators' tangents through Python decompositions (binary cross-entropy
#: with logits costs milliseconds a call), which dominates on small models
#: (benchmarks/overhead.py), while on large ones forward mode saves a backward through the
#: lower model (benchmarks/meta_iteration.py).
FORWARD_MODE_MIN_PARAMETERS = 1_000_000


def mixed_forward(objective: InnerObjective,
                  x: Sequence[Tensor | LinearFactors]) -> TensorList:
    """∂²_{λθ} L_in · x = ∇_λ (D_θ L_in[x]), exactly, by reverse over forward mode.

    One evaluation of L_in with the module computing on dual tensors θ + x·dε (forward mode
    carries the directional derivative D_θ L_in[x] = <∇_θ L_in, x> beside the loss), then
    one backward of that derivative to λ only. Unlike double backward it builds no graph of
    ∇_θ L_in and no backward through the lower model; unlike a finite difference it is
    exact and honours stop-gradients (a detached quantity has no tangent). Cost: about one
    forward pass with tangents (≈ a plain training step) plus the backward from the loss to
    λ. Entries of x given as ``LinearFactors`` enter through their factors (``factored``:
    two thin products per ``F.linear`` instead of one with the whole matrix). A
    ``torch.no_grad`` block of L_in carries no tangent (a constant, as in double backward).
    Needs ``objective.module``.
    """
    if objective.module is None:
        raise HypergradientError(
            f"mixed='forward' needs the module of problem '{objective.name}' (the "
            f"InnerObjective has module=None); pass module=... or use mixed='exact'."
        )
    try:
        tangent = _loss_tangent(objective, x, exact_view=False)
    except NeedsGradView:  # L_in looked at θ's requires_grad, or differentiated with θ
        tangent = _loss_tangent(objective, x, exact_view=True)
    upper = list(objective.upper_params)
    out = (autograd_grad(tangent, upper, allow_unused=True)
           if tangent is not None and tangent.requires_grad else [None] * len(upper))
    return _upper_part(objective, out)  # as in exact mode: never a silent zero hypergradient


def _loss_tangent(objective: InnerObjective, x: Sequence[Tensor | LinearFactors],
                  exact_view: bool) -> Tensor | None:
    """The tangent of L_in at θ in direction x (None: none reached the loss).

    First (``exact_view`` False) θ's stand-ins do not require grad, so no graph to θ is
    recorded and activations are freed as the forward goes, and linear layers' tangents are
    made by hand; ``NeedsGradView`` when L_in looked at ``requires_grad`` of θ or of a
    tensor computed from it, or differentiated with one (``FactoredTangents``). Then
    (``exact_view``) the stand-ins require grad as θ does, so that L_in sees them as it
    sees θ (a ``requires_grad`` filter, ``trainable_parameters()``, a derivative taken
    inside it), and ``F.linear`` takes forward mode's own formula."""
    params = list(objective.params)
    assert objective.module is not None
    with torch.autograd.forward_ad.dual_level():
        values: list[Tensor] = []
        stand_ins: dict[int, tuple[Tensor, LinearFactors]] = {}
        for p, xi in zip(params, x):
            if isinstance(xi, LinearFactors):
                stand_in = p.detach()  # a tensor of its own, recognised by identity
                stand_ins[id(stand_in)] = (stand_in, xi)
                values.append(stand_in)
            else:
                values.append(torch.autograd.forward_ad.make_dual(p.detach(), xi.to(p.dtype)))
        if exact_view:
            for p, value in zip(params, values):
                value.requires_grad_(p.requires_grad)
        watched = frozenset() if exact_view else frozenset(
            id(value) for p, value in zip(params, values) if p.requires_grad)
        tangents = FactoredTangents(stand_ins, hand_linear=not exact_view, watched=watched)
        with use_parameters(objective.module, params, values), tangents:
            loss = objective.loss()
        return torch.autograd.forward_ad.unpack_dual(loss).tangent


#: (``solve``, ``solve_mixed``) pairs that do all vector arithmetic through ``linalg`` (so
#: that ``FactorSum`` entries may flow through them), added by ``takes_factored_vectors``; a
#: subclass overriding either keeps dense vectors unless it is added too.
FACTORED_SOLVES: set[tuple[Callable[..., Any], Callable[..., Any]]] = set()


def takes_factored_vectors(cls: type[HypergradMethod]) -> type[HypergradMethod]:
    """Declare that ``cls``'s ``solve`` and ``solve_mixed`` handle vectors only through
    ``linalg`` and ``Curvature``, so that its Hessian-vector products may be factored."""
    FACTORED_SOLVES.add((cls.solve, cls.solve_mixed))
    return cls


class HypergradMethod(Method, ABC):
    """Base class: a method is a small frozen settings object that is also callable.

    ``method(objective, v)`` returns (dθ*/dλ)ᵀ v ≈ −∂²_{λθ} L_in · solve(v).
    Subclasses set ``name``, ``default_mixed`` and implement ``solve``.
    """

    family: ClassVar[Family] = "implicit"
    #: True for methods that multiply by H: they build ∇_θ L_in with its graph before solving
    uses_hessian: ClassVar[bool] = True
    #: mixed-product mode used when ``mixed="auto"`` ("exact" for every built-in method: the
    #: finite difference re-evaluates the loss at shifted θ, which also moves quantities the
    #: loss detached, so it disagrees with the stop-gradient semantics of the inner step).
    default_mixed: ClassVar[Literal["exact", "fd"]] = "exact"

    mixed: MixedMode
    fd_eps: float

    def _check_mixed(self) -> None:
        if self.mixed not in MIXED_MODES:
            raise ConfigError(type(self).__name__, "mixed", self.mixed, f"one of {MIXED_MODES}")
        check_float(type(self).__name__, "fd_eps", self.fd_eps, strict=True)

    def _mode(self, objective: InnerObjective) -> str:
        """The mixed-product mode of this call. "auto": forward mode for methods that build
        no graph of ∇_θ L_in (Darts, SAMA) when the objective carries its module and θ has
        at least ``FORWARD_MODE_MIN_PARAMETERS`` entries, since it is exact and cheaper than
        double backward there; else ``default_mixed``. Methods that multiply by H keep
        "exact": their graph of ∇_θ L_in exists already, and a backward through it to λ
        only costs less than a dual forward (CG even fuses it, ``solve_mixed``)."""
        if self.mixed != "auto":
            return self.mixed
        module = objective.module
        if (not self.uses_hessian and module is not None
                and sum(p.numel() for p in objective.params) >= FORWARD_MODE_MIN_PARAMETERS
                # RNNs keep their own list of weight tensors, which use_parameters cannot
                # reach: their tangents would be missing
                and not any(isinstance(m, torch.nn.RNNBase) for m in module.modules())):
            return "auto-forward"
        return self.default_mixed

    @abstractmethod
    def solve(self, objective: InnerObjective, v: TensorList, curvature: Curvature) -> TensorList:
        """Return x ≈ H⁻¹ v (or the method's stand-in for it)."""

    def solve_mixed(
        self, objective: InnerObjective, v: TensorList, curvature: Curvature
    ) -> TensorList | None:
        """∂²_{λθ} L_in · x for the x that ``solve`` returns, computed alongside the solve
        from the Hessian-vector products it takes anyway (``Curvature.hvp_and_mixed``),
        or None when the method does not fuse (default). Used for the exact mixed product
        only; it must equal ``curvature.mixed(solve(...))`` up to rounding and leave the
        graph of ∇_θ L_in released."""
        return None

    def uniform_scale(self, objective: InnerObjective) -> float | None:
        """c when ``solve`` returns c·v with one scalar c for every tensor (else None).

        The mixed product is linear in x, so the call then takes it of v and multiplies the
        λ-sized result by c, instead of writing a θ-sized copy c·v (one full pass over θ,
        with fresh pages, saved)."""
        return None

    def accepts_factors(self, objective: InnerObjective) -> bool:
        """Whether linear layers' parts of v may come as ``LinearFactors`` (the upper
        problem then never forms them; see ``factored``): when a call on ``objective`` uses
        v only through D_θ L_in[c·v] (a uniform scale and forward mode), or when its
        Hessian-vector products are factored (``_factored_products``)."""
        if not factored.ENABLED:
            return False
        mode = self._mode(objective)
        scale = self.uniform_scale(objective)
        return ((scale is not None and mode in _FORWARD_MODES)
                or (scale is None and self.solves_factors(objective))
                or self._factored_products(objective, mode))

    def solves_factors(self, objective: InnerObjective) -> bool:
        """Whether ``solve`` takes ``LinearFactors`` entries in v and returns dense tensors
        for them (default: no, v is formed before ``solve``). SAMA with Adam forms each
        v_W block by block with P applied while the block is in cache."""
        return False

    def _factored_products(self, objective: InnerObjective, mode: str) -> bool:
        """Whether this call's Hessian-vector products run on ``factored_hessian``'s graph:
        a Krylov solve declared with ``takes_factored_vectors`` (CG, Neumann: their vector
        arithmetic is ``linalg``'s, which takes ``FactorSum`` entries) with the exact mixed
        product, in one process, on float32 or
        float64 parameters, at least one of them a weight of ``factored_hessian.MIN_ENTRIES``
        entries. ``factored.ENABLED = False`` turns it off."""
        params = objective.params
        return (factored.ENABLED and self.uses_hessian and mode == "exact"
                and objective.reduce is None
                and (type(self).solve, type(self).solve_mixed) in FACTORED_SOLVES
                and all(p.dtype in (torch.float32, torch.float64) for p in params)
                and any(p.dim() == 2 and p.numel() >= factored_hessian.MIN_ENTRIES
                        for p in params))

    def before_optimizer_step(
        self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], state: dict[str, Any]
    ) -> None:
        """Called by the lower problem just before its optimizer steps (default: nothing)."""

    def _mixed_product(
        self, mode: str, objective: InnerObjective, curvature: Curvature,
        x: Sequence[Tensor | LinearFactors]
    ) -> TensorList:
        """∂²_{λθ} L_in · x in the call's mode (see ``_mode``)."""
        if mode == "exact":
            return curvature.mixed(densify(x))
        if mode == "forward":
            return mixed_forward(objective, x)
        if mode == "auto-forward":
            try:
                return mixed_forward(objective, x)
            except (RuntimeError, NotImplementedError):
                # an operator without a forward-mode formula: the exact double backward
                # (which re-raises any error that is not about forward mode)
                return curvature.mixed(densify(x))
        return mixed_finite_difference(objective, densify(x), self.fd_eps)

    def __call__(self, objective: InnerObjective,
                 v: Sequence[Tensor | LinearFactors]) -> TensorList:
        """(dθ*/dλ)ᵀ v, to be added to ∂_λ L_out (entries of v may be ``LinearFactors``
        when ``accepts_factors``; they are formed as matrices wherever a method needs them)."""
        params = list(objective.params)
        objective.check()
        if not linalg.same_shapes(v, params):
            raise HypergradientError(
                f"{type(self).__name__}: the vector has shapes {[tuple(a.shape) for a in v]} "
                f"but problem '{objective.name}' has parameters of shapes "
                f"{[tuple(p.shape) for p in params]}."
            )
        with fixed_randomness(params) as replay:
            loss = objective.loss

            def replayed_loss() -> Tensor:
                replay()
                return loss()

            objective = _with_loss(objective, replayed_loss)
            mode = self._mode(objective)
            curvature = Curvature(objective, factored=self._factored_products(objective, mode))
            if objective.reduce is not None and objective.reduce.pending:
                # data parallel: v is still being all-reduced; build ∇_θ L_in's graph meanwhile
                if self.uses_hessian or mode == "exact":
                    curvature.gradient()
                objective.reduce.wait()
            scale = self.uniform_scale(objective)
            if curvature.factored:  # the upper gradient's factors start the Krylov space
                starts: list[Any] = [
                    FactorSum({("v", i): (t.inputs, t.grads, True)}, t.rest, p)
                    if isinstance(t, LinearFactors) else t
                    for i, (t, p) in enumerate(zip(v, params))]
                v = starts
            elif scale is None and self.solves_factors(objective):
                pass  # ``solve`` forms the factored entries itself
            elif scale is None or mode not in _FORWARD_MODES:
                v = densify(v)
            # constants (a detach op only where an entry still carries a graph)
            vec: list[Any] = [t.detach() if isinstance(t, Tensor) and t.requires_grad else t
                              for t in v]
            if self.uses_hessian:
                # θ_i that L_in's gradient does not depend on has a zero row and column in H:
                # its best response does not move with λ, so its part of v contributes nothing
                # (and would make the solve singular).
                vec = [vi if g.requires_grad else torch.zeros_like(p)
                       for vi, g, p in zip(vec, curvature.gradient(), params)]
            # exact mode: a method that fuses takes the mixed product from its own
            # Hessian-vector products (no separate backward through the graph of ∇_θ L_in)
            fused = (self.solve_mixed(objective, vec, curvature)
                     if mode == "exact" and scale is None else None)
            if fused is not None:
                product = fused
            else:
                x = vec if scale is not None else self.solve(objective, vec, curvature)
                product = self._mixed_product(mode, objective, curvature, x)
        if scale is not None:
            return [p.mul_(-scale) for p in product]
        return [p.neg_() for p in product]


def _with_loss(objective: InnerObjective, loss: Callable[[], Tensor]) -> InnerObjective:
    """A shallow copy of ``objective`` (its class kept) with another ``loss``; the same as
    ``dataclasses.replace(objective, loss=loss)`` for these fields, without its field
    introspection at every hypergradient call."""
    if type(objective) is not InnerObjective:  # a subclass may have slots or be frozen
        return dataclasses.replace(objective, loss=loss)
    copy = object.__new__(InnerObjective)
    copy.__dict__.update(objective.__dict__)
    copy.loss = loss
    return copy
