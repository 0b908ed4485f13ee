"""The upper gradient of a linear layer's weight kept as factors, never as a matrix.

For a weight W that the upper loss uses through ``F.linear`` calls c (inputs X_c flattened to
rows, outputs y_c), v_W = ∂L_out/∂W = Σ_c Δ_cᵀ X_c + R with Δ_c = ∂L_out/∂y_c and R the
gradient through every other use of W: a matrix of rank ≤ Σ_c n_c + rank R. Darts and SAMA
with SGD use v only through the directional derivative D_θ L_in[v] (``mixed_forward``), in
which every ``F.linear(x, W, b)`` of L_in contributes x v_Wᵀ = Σ_c (x X_cᵀ) Δ_c + x Rᵀ to its
output's tangent. Two thin products replace the product with an out × in matrix, and the
upper backward never forms ∂L_out/∂W (on the reweighting benchmark, the weight-gradient
products are a third of that backward's matrix products; see benchmarks/README.md).

Both halves are torch function modes, so they see every ``F.linear`` (``nn.Linear`` or a
user's own call) and nothing else changes:

* ``LinearCapture`` (during the upper loss): each ``F.linear`` on a watched W runs as a custom
  autograd function whose backward, during the upper's own backward only, records
  (X_c, Δ_c) and returns no gradient for W; R is what that backward still returns for W
  (None when W has no other use). Exact by construction; any other backward (a user's
  ``autograd.grad`` inside training_step, double backward, in-place ops on y_c) sees
  F.linear's usual derivative.
* ``FactoredTangents`` (during the dual evaluation of L_in): an ``F.linear`` on W's stand-in
  adds x v_Wᵀ to its output's tangent; any other operation on the stand-in gets W with the
  whole v_W as tangent, formed on first use. So every use of W in L_in sees v_W exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Container, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

from ..torch_compat import autocast_enabled, compiling

_LINEAR = torch.nn.functional.linear
#: tensor types whose ``F.linear`` ``FactoredTangents`` computes by hand (no subclass with
#: its own ``__torch_function__``)
_PLAIN = (Tensor, torch.nn.Parameter)

#: Set to False to turn the factored path off everywhere (upper backward forms every v_W).
ENABLED = True

#: calls through which L_in would see that θ's stand-ins do not require grad
_LOOKS_AT_GRAD: frozenset[Any] = frozenset({
    Tensor.requires_grad.__get__,  # type: ignore[attr-defined]
    torch.autograd.grad, torch.autograd.backward, Tensor.backward, Tensor.register_hook,
})

#: calls that ``FactoredTangents`` passes the stand-ins to as they are: reads of metadata
#: (a stand-in answers them as W would), and those of ``_LOOKS_AT_GRAD``
#: (``autograd.grad`` inside L_in differentiates the stand-in itself)
_AS_IS: frozenset[Any] = _LOOKS_AT_GRAD | {
    Tensor.dim, Tensor.size, Tensor.numel, Tensor.stride, Tensor.is_contiguous,
    Tensor.is_floating_point, Tensor.__len__, Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__, Tensor.device.__get__, Tensor.ndim.__get__,  # type: ignore[attr-defined]
}


class NeedsGradView(BaseException):
    """L_in looked at whether θ requires grad (or differentiated with θ) while θ's
    stand-ins did not: evaluate again with stand-ins that do (``FactoredTangents``). A
    ``BaseException``, so that an ``except Exception`` in L_in does not swallow it."""


@dataclass
class LinearFactors:
    """v_W = Δᵀ X + R for a weight of shape (out, in): X (n × in), Δ (n × out), R or None.

    Stands in a vector list in place of the dense v_W (``densify`` forms it)."""

    inputs: Tensor
    grads: Tensor
    rest: Tensor | None
    shape: torch.Size

    @property
    def rank(self) -> int:
        """n, the number of rows of the factors."""
        return int(self.inputs.shape[0])

    def dense(self) -> Tensor:
        """v_W as a matrix (one product of n × out by n × in)."""
        if self.rest is None:
            return self.grads.t().mm(self.inputs)
        return self.rest.addmm(self.grads.t(), self.inputs)

    def dense_rows(self, i: int, j: int, out: Tensor) -> None:
        """Rows i to j of v_W (``dense()[i:j]``) written into ``out[i:j]``."""
        if j <= i:
            return
        lhs = self.grads[:, i:j].t()
        if self.rest is None:
            torch.mm(lhs, self.inputs, out=out[i:j])
        else:
            torch.addmm(self.rest[i:j], lhs, self.inputs, out=out[i:j])

    def right_product(self, x: Tensor) -> Tensor:
        """x v_Wᵀ over x's last dimension: (x Xᵀ) Δ + x Rᵀ, never forming v_W."""
        rows = x.reshape(-1, x.shape[-1])
        out = rows.mm(self.inputs.t()).mm(self.grads)
        if self.rest is not None:
            out.addmm_(rows, self.rest.t())
        return out.reshape(*x.shape[:-1], out.shape[-1])


def densify(vector: Sequence[Tensor | LinearFactors]) -> list[Tensor]:
    """The vector with every factored entry formed as a matrix."""
    return [t.dense() if isinstance(t, LinearFactors) else t for t in vector]


def worth_factoring(rows: int, shape: Sequence[int]) -> bool:
    """Factors of n rows beat the matrix when x v_Wᵀ costs less through them:
    n (in + out) < in · out (the factors are also smaller than v_W then)."""
    out_features, in_features = shape
    return rows * (in_features + out_features) < in_features * out_features


def watched_weights(weights: Mapping[Hashable, Tensor],
                    min_entries: int = 0) -> dict[int, Hashable]:
    """id(W) → key for the matrices a capture may route through its own function: 2-D,
    at least ``min_entries`` entries, listed once, and without tensor hooks (a hook, e.g.
    a pruning mask, must see W's whole gradient, which the factored backward never forms).
    """
    counts: dict[int, int] = {}
    for w in weights.values():
        counts[id(w)] = counts.get(id(w), 0) + 1
    return {id(w): k for k, w in weights.items()
            if w.dim() == 2 and w.numel() >= min_entries and counts[id(w)] == 1
            and not w._backward_hooks}


def _transformed() -> bool:
    """True inside torch.compile tracing or a torch.func transform (vmap, grad, jvp): the
    factored path steps aside there (its custom autograd function and dual tensors are not
    written for them), and the dense path handles those calls."""
    return bool(compiling()
                or torch._C._functorch.peek_interpreter_stack() is not None)


def _saving_through_hooks() -> bool:
    """True under saved-tensor hooks (non-reentrant activation checkpointing, offloading):
    a checkpointed region is recomputed in the backward without this mode, so its calls
    must be the plain F.linear ones in the first place."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(False) is not None


class _CapturedLinear(torch.autograd.Function):
    """F.linear whose backward, while its capture is collecting, records (X rows, Δ rows)
    and returns no weight gradient (the product Δᵀ X is never formed); at any other time
    (a backward or ``autograd.grad`` inside the user's training_step, with or without
    create_graph) it is F.linear's usual backward, differentiable again."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                capture: LinearCapture, key: Hashable) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.capture, ctx.key, ctx.has_bias = capture, key, bias is not None
        return _LINEAR(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dy.matmul(weight) if need_x else None
        rows = dy.reshape(-1, dy.shape[-1])
        db = rows.sum(0) if need_b and ctx.has_bias else None
        dw = None
        if need_w:
            x_rows = x.reshape(-1, x.shape[-1])
            if ctx.capture.collecting:
                ctx.capture.record(ctx.key, x_rows.detach(), rows.detach())
            else:
                dw = rows.t().mm(x_rows)
        return dx, dw, db, None, None


class LinearCapture(TorchFunctionMode):
    """While active, routes the ``F.linear`` calls of the upper loss on watched weights
    through ``_CapturedLinear``; the backward taken inside ``collect()`` then records their
    factors instead of forming ∂L/∂W (``factors()``), and returns for W only the rest.

    ``weights`` maps a key (e.g. (problem name, position)) to a weight.
    """

    def __init__(self, weights: Mapping[Hashable, Tensor]) -> None:
        super().__init__()
        self._keys = watched_weights(weights)
        self.collecting = False
        self._parts: dict[Hashable, tuple[list[Tensor], list[Tensor]]] = {}

    def __torch_function__(self, func: Callable[..., Any], types: Iterable[type],
                           args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is _LINEAR and torch.is_grad_enabled():
            x, weight, bias = _linear_arguments(args, kwargs)
            key = self._keys.get(id(weight)) if isinstance(weight, Tensor) else None
            if (key is not None and type(x) is Tensor and x.layout == torch.strided
                    and x.dim() >= 1 and not _transformed() and not _saving_through_hooks()
                    and not autocast_enabled(x.device.type)):
                return _CapturedLinear.apply(x, weight, bias, self, key)
        return func(*args, **kwargs)

    @contextmanager
    def collect(self) -> Iterator[None]:
        """The backward taken in this block records factors (once: the upper's own)."""
        self.collecting = True
        try:
            yield
        finally:
            self.collecting = False

    def record(self, key: Hashable, x_rows: Tensor, grad_rows: Tensor) -> None:
        xs, ds = self._parts.setdefault(key, ([], []))
        xs.append(x_rows)
        ds.append(grad_rows)

    def factors(self) -> dict[Hashable, tuple[Tensor, Tensor]]:
        """(X, Δ) per watched key, rows stacked over its calls that the loss used."""
        parts, self._parts = self._parts, {}
        return {key: (xs[0] if len(xs) == 1 else torch.cat(xs),
                      ds[0] if len(ds) == 1 else torch.cat(ds))
                for key, (xs, ds) in parts.items()}


class RowGatherer(Protocol):
    """The collectives ``global_factors`` needs (``zg.distributed.Communicator``)."""

    world_size: int

    def gather_ints(self, values: Sequence[int]) -> list[list[int]]:
        """Every rank's ``values``, in rank order."""
        ...

    def all_gather_rows(self, tensors: Sequence[Tensor], rows: Sequence[Sequence[int]]
                        ) -> list[Tensor]:
        """Each tensor's rows over the ranks, concatenated in rank order."""
        ...


def global_factors(comm: RowGatherer, vectors: Sequence[list[Any]]) -> list[Tensor]:
    """Turn each rank's local vectors (lists of tensors and ``LinearFactors``) into the
    global mean over the ranks, in place in the lists, except for the dense tensors
    returned: the caller all-reduces those to their mean, which completes it.

    mean_r(Δ_rᵀ X_r + R_r) = (Δ_1; …; Δ_R)ᵀ (X_1; …; X_R) / R + mean_r R_r, so a factored
    entry's factors are all-gathered (n_r (in + out) numbers per rank instead of in · out),
    Δ scaled by 1/R, and its rest R joins the dense mean. An entry stays factored only when
    it is factored on every rank, with a rest on all of them or on none, and worth
    factoring with all the ranks' rows; otherwise each rank forms its local entry, averaged
    dense. Collectives: one for the row counts, one per dtype for the factors (none when
    nothing stays factored); every rank must call it."""
    entries = [(vec, i) for vec in vectors for i in range(len(vec))]
    # per entry: 2 n + (1 if it has a rest), or −1 for a dense entry
    table = comm.gather_ints([2 * vec[i].rank + (vec[i].rest is not None)
                              if isinstance(vec[i], LinearFactors) else -1
                              for vec, i in entries])
    kept: list[int] = []
    dense: list[Tensor] = []
    for e, (vec, i) in enumerate(entries):
        entry = vec[i]
        codes = [row[e] for row in table]
        counts = [c // 2 for c in codes]
        if (min(codes) >= 0 and len({c % 2 for c in codes}) == 1
                and worth_factoring(sum(counts), entry.shape)):
            kept.append(e)
            if entry.rest is not None:
                dense.append(entry.rest)
            continue
        if isinstance(entry, LinearFactors):
            vec[i] = entry.dense()
        dense.append(vec[i])
    if kept:
        factored = [entries[e][0][entries[e][1]] for e in kept]
        rows = [[row[e] // 2 for e in kept for _ in range(2)] for row in table]
        gathered = comm.all_gather_rows(
            [f for entry in factored for f in (entry.inputs, entry.grads)], rows)
        for k, (e, entry) in enumerate(zip(kept, factored)):
            vec, i = entries[e]
            grads = gathered[2 * k + 1].div_(comm.world_size)
            vec[i] = LinearFactors(gathered[2 * k], grads, entry.rest, entry.shape)
    return dense


def factored_entry(rest: Tensor | None, weight: Tensor,
                   pair: tuple[Tensor, Tensor]) -> Tensor | LinearFactors:
    """v_W from its factors and the rest: kept factored when ``worth_factoring``, else formed
    now (the same product autograd would have done)."""
    inputs, grads = pair
    grads = grads.to(weight.dtype)
    inputs = inputs.to(weight.dtype)
    factors = LinearFactors(inputs, grads, None if rest is None else rest.detach(), weight.shape)
    if worth_factoring(factors.rank, weight.shape):
        return factors
    return factors.dense()


class FactoredTangents(TorchFunctionMode):
    """During a dual evaluation of L_in, gives each factored weight its tangent v_W.

    ``stand_ins`` maps id(stand-in) to (stand-in, factors); the stand-in holds W's value,
    and the module computes with it in place of W (``use_parameters``); it may be empty. Also,
    under ``torch.no_grad`` an operation runs on the primal values and returns no tangent:
    double backward treats such a block as a constant, and forward mode alone would not
    (forward-mode AD ignores grad mode).

    ``F.linear`` is computed with primal and tangent by hand (``_linear``) unless
    ``hand_linear`` is False: its primal output carries no tangent in its backward graph.

    ``watched`` holds the ids of the tensors standing in for θ when they do not require
    grad (so that no graph to θ is recorded, and the activations are freed as the forward
    goes). L_in reading ``requires_grad`` of one of them or of any tensor computed from θ
    (one with a tangent: a ``requires_grad`` filter, ``trainable_parameters()``), or
    differentiating or hooking one (``autograd.grad`` in the loss: gradient penalties,
    which would also miss the hand-made layers' tangents) raises ``NeedsGradView``: the
    caller evaluates again with stand-ins that require grad as θ does and
    ``hand_linear=False`` (forward mode's own formula, exact).
    """

    def __init__(self, stand_ins: Mapping[int, tuple[Tensor, LinearFactors]],
                 hand_linear: bool = True, watched: frozenset[int] = frozenset()) -> None:
        super().__init__()
        self._entries = dict(stand_ins)
        self._dense: dict[int, Tensor] = {}
        self._hand_linear = hand_linear
        self._watched = watched

    def __torch_function__(self, func: Callable[..., Any], types: Iterable[type],
                           args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func in _LOOKS_AT_GRAD and self._watched and _reads_theta(
                (args, kwargs), self._watched):
            raise NeedsGradView(func)
        if not torch.is_grad_enabled() and func not in _AS_IS:
            args, kwargs = _replace((args, kwargs), _primal)
            return func(*args, **kwargs)
        if func is _LINEAR and self._hand_linear and not _transformed():
            x, weight, bias = _linear_arguments(args, kwargs)
            out = self._linear(func, x, weight, bias)
            if out is not None:
                return out
        if (self._entries and func not in _AS_IS
                and _holds_stand_in((args, kwargs), self._entries)):
            args, kwargs = _replace((args, kwargs), self._dual)
        return func(*args, **kwargs)

    def _linear(self, func: Callable[..., Any], x: Any, weight: Any,
                bias: Any) -> Tensor | None:
        """``F.linear(x, W, b)`` on dual tensors with primal and tangent by hand, or None
        (forward mode's own formula then) unless W carries a tangent (a stand-in's factors,
        or a dense one) or x does. The tangent is x_t Wᵀ + x v_Wᵀ + b_t, each term only
        where its tangent exists: forward mode's formula multiplies x by a materialised zero
        matrix for a W or x without one (a whole product wasted, e.g. on a first layer,
        whose input is data). With x_t, x and x_t go through W as one product of twice the
        rows (one pass over W instead of two; on the reweighting benchmark's 2578 × 2578
        layer, 18.9 against 22.2 ms)."""
        if not all(t is None or (type(t) in _PLAIN and t.layout == torch.strided)
                   for t in (x, weight, bias)) or x is None or weight is None:
            return None
        entries = self._entries
        entry = entries.get(id(weight)) if entries else None
        if entries and (_holds_stand_in(x, entries) or _holds_stand_in(bias, entries)):
            return None
        x_primal, x_tangent = forward_ad.unpack_dual(x)
        w_primal, w_tangent = ((weight, None) if entry is not None
                               else forward_ad.unpack_dual(weight))
        if entry is None and w_tangent is None and x_tangent is None:
            return None
        b_primal, b_tangent = (forward_ad.unpack_dual(bias) if bias is not None
                               else (None, None))
        parts: list[Tensor] = []
        if x_tangent is not None and x_tangent.shape == x_primal.shape:
            both = func(torch.stack((x_primal, x_tangent.to(x_primal.dtype))), w_primal)
            y = both[0] if b_primal is None else both[0] + b_primal
            parts.append(both[1])
        else:
            y = func(x_primal, w_primal, b_primal)
            if x_tangent is not None:
                parts.append(func(x_tangent, w_primal))
        if entry is not None:
            parts.append(entry[1].right_product(x_primal).to(y.dtype))
        elif w_tangent is not None:
            parts.append(func(x_primal, w_tangent))
        tangent = parts[0] if len(parts) == 1 else parts[0] + parts[1]
        if b_tangent is not None:
            tangent = tangent + b_tangent
        return forward_ad.make_dual(y, tangent)

    def _dual(self, t: Tensor) -> Tensor:
        """For a stand-in, W with the whole v_W as tangent (formed once, a view of the
        stand-in, so that a derivative inside L_in reaches it), for a use other than
        F.linear; any other tensor as it is."""
        key = id(t)
        if key not in self._entries:
            return t
        if key not in self._dense:
            stand_in, factors = self._entries[key]
            self._dense[key] = forward_ad.make_dual(stand_in,
                                                    factors.dense().to(stand_in.dtype))
        return self._dense[key]


def _primal(t: Tensor) -> Tensor:
    return forward_ad.unpack_dual(t).primal


def _linear_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    x = args[0] if args else kwargs.get("input")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, weight, bias


def _reads_theta(obj: Any, watched: Container[int]) -> bool:
    """Whether ``obj`` holds a stand-in for θ or a tensor computed from θ (a dual one)."""
    if isinstance(obj, Tensor):
        return id(obj) in watched or forward_ad.unpack_dual(obj).tangent is not None
    if isinstance(obj, list | tuple):
        return any(_reads_theta(o, watched) for o in obj)
    if isinstance(obj, dict):
        return any(_reads_theta(o, watched) for o in obj.values())
    return False


def _holds_stand_in(obj: Any, entries: Container[int]) -> bool:
    if isinstance(obj, Tensor):
        return id(obj) in entries
    if isinstance(obj, list | tuple):
        return any(_holds_stand_in(o, entries) for o in obj)
    if isinstance(obj, dict):
        return any(_holds_stand_in(o, entries) for o in obj.values())
    return False


def _replace(obj: Any, swap: Callable[[Tensor], Tensor]) -> Any:
    """obj with every tensor t replaced by swap(t) (lists, tuples, dicts walked)."""
    if isinstance(obj, Tensor):
        return swap(obj)
    if isinstance(obj, tuple):
        return tuple(_replace(o, swap) for o in obj)
    if isinstance(obj, list):
        return [_replace(o, swap) for o in obj]
    if isinstance(obj, dict):
        return {k: _replace(o, swap) for k, o in obj.items()}
    return obj
