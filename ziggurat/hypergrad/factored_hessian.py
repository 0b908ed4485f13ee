"""Exact Hessian-vector products whose linear-layer parts stay thin factors.

For y = x Wᵀ + b the graph of g = ∇_θ L_in holds the layer's backward
dx = dy W, g_W = dyᵀ x, g_b = Σ dy. A product H p is one more backward through that graph
with cotangent p; at this layer it needs

    ∂/∂dy: a Wᵀ + x p_Wᵀ + p_b,   ∂/∂x: dy p_W,   ∂/∂W: dyᵀ a   (a: the cotangent of dx)

and, through the forward y = x Wᵀ + b with cotangent c on y, ∂/∂x: c W and ∂/∂W: cᵀ x.
The two weight parts are rank-n factors whose one side (dy, x) is fixed by the graph, so
every Krylov vector of W is a ``FactorSum`` of at most 2n rows per call (plus v's own n),
and the products with p_W (x p_Wᵀ, dy p_W) are thin. Per layer a product then costs two
full matrix products (a Wᵀ, c W) where double backward takes six, and the graph's own
weight gradient dyᵀ x, whose value no product reads, is never formed. Exact by
construction (tests/test_factored_hessian.py checks it against double backward).

``HessianCapture`` is a torch function mode active while L_in is evaluated for the graph:
each ``F.linear`` on a watched weight runs as ``_GraphLinear``. Afterwards ``factored``
lists the weights whose gradient comes only from such calls (read from the graph itself),
whose cotangents may then be handed over as ``FactorSum`` (``cotangents``) instead of as
tensors; any other weight gets its cotangent as a tensor and products still return its
entry as a ``FactorSum`` with the rest R from autograd. Outside of the capture's own
passes (``building``, ``collecting``) both functions are ``F.linear``'s usual derivative,
differentiable again, so a user's ``autograd.grad`` inside the loss sees nothing different.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from ..torch_compat import autocast_enabled
from .factored import _linear_arguments, _saving_through_hooks, _transformed, watched_weights
from .lowrank import FactorSum, Term

_LINEAR = torch.nn.functional.linear
_SLOTS = itertools.count()

#: weights smaller than this many entries are left to plain double backward (the Python
#: bookkeeping of the factored path costs more than it saves there)
MIN_ENTRIES = 1 << 16


def _rows(t: Tensor) -> Tensor:
    return t.reshape(-1, t.shape[-1])


def worth_factoring(rows: int, shape: Sequence[int]) -> bool:
    """A Krylov vector of a layer called on n rows has up to 3n factor rows (2n from the
    graph, n from v); they pay when 3n (in + out) < in · out."""
    out_features, in_features = shape
    return 3 * rows * (in_features + out_features) < in_features * out_features


class _GraphLinear(torch.autograd.Function):
    """F.linear. Its backward, while the capture builds the graph of ∇_θ L_in, is
    ``_GraphLinearGrad`` (differentiable); while the capture collects a product, the weight
    part cᵀ x is recorded as factors instead of formed; otherwise the usual backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None,
                capture: HessianCapture, key: Hashable) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.capture, ctx.key, ctx.has_bias = capture, key, bias is not None
        ctx.slot = ("x", next(_SLOTS))
        return _LINEAR(x, weight, bias)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        capture: HessianCapture = ctx.capture
        if capture.is_building and torch.is_grad_enabled():
            dx, dw, db = _GraphLinearGrad.apply(dy, x, weight, capture, ctx.key, need_x,
                                                need_b and ctx.has_bias)
            return dx, dw, db, None, None
        rows = _rows(dy)
        dx = dy.matmul(weight) if need_x else None
        db = rows.sum(0) if need_b and ctx.has_bias else None
        dw = None
        if need_w:
            x_rows = _rows(x)
            if capture.collecting and not torch.is_grad_enabled():
                capture.record(ctx.key, ctx.slot, (x_rows.detach(), rows.detach(), True))
            else:
                dw = rows.t().mm(x_rows)
        return dx, dw, db, None, None


class _GraphLinearGrad(torch.autograd.Function):
    """(dx, g_W, g_b) = (dy W, dyᵀ x, Σ dy) of one ``_GraphLinear`` call, as a node of the
    graph of ∇_θ L_in. g_W's value is a zero-strided placeholder (no product reads it; the
    graph is what they use); its backward is the factored one of the module doc."""

    @staticmethod
    def forward(ctx: Any, dy: Tensor, x: Tensor, weight: Tensor, capture: HessianCapture,
                key: Hashable, need_x: bool, need_b: bool
                ) -> tuple[Tensor | None, Tensor, Tensor | None]:
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(dy, x, weight)
        ctx.capture, ctx.key, ctx.slot = capture, key, ("dy", next(_SLOTS))
        ctx.need_b = need_b
        dx = dy.matmul(weight) if need_x else None
        placeholder = torch.zeros((), dtype=weight.dtype, device=weight.device)
        gw = placeholder.expand(weight.shape)
        db = _rows(dy).sum(0) if need_b else None
        return dx, gw, db

    @staticmethod
    def backward(ctx: Any, a: Tensor | None, p: Tensor | None, q: Tensor | None
                 ) -> tuple[Tensor | None, ...]:
        dy, x, weight = ctx.saved_tensors
        capture: HessianCapture = ctx.capture
        need_dy, need_x, need_w = ctx.needs_input_grad[:3]
        dy_rows, x_rows = _rows(dy), _rows(x)
        cot = capture.cotangent(ctx.key)
        d_dy: Tensor | None = None
        d_x: Tensor | None = None
        if cot is not None or p is not None:
            if need_dy:
                d_dy = (cot.right_product(x_rows) if cot is not None
                        else x_rows.mm(p.t()))  # type: ignore[union-attr]
            if need_x:
                d_x = (cot.left_product(dy_rows) if cot is not None
                       else dy_rows.mm(p))  # type: ignore[arg-type]
        d_w = None
        if a is not None:
            a_rows = _rows(a)
            if need_dy:
                part = a_rows.mm(weight.t())
                d_dy = part if d_dy is None else d_dy.add_(part)
            if need_w:
                if capture.collecting and not torch.is_grad_enabled():
                    capture.record(ctx.key, ctx.slot, (a_rows.detach(), dy_rows.detach(), False))
                else:
                    d_w = dy_rows.t().mm(a_rows)
        if q is not None and need_dy:
            d_dy = q.expand(dy_rows.shape) if d_dy is None else d_dy.add_(q)
        return (None if d_dy is None else d_dy.reshape(dy.shape),
                None if d_x is None else d_x.reshape(x.shape),
                d_w, None, None, None, None)


class HessianCapture(TorchFunctionMode):
    """Routes L_in's ``F.linear`` calls on watched weights through ``_GraphLinear`` while
    active; then holds the state of the products taken through the graph it built.

    ``weights`` maps a key (the parameter's position) to a weight.
    """

    def __init__(self, weights: Mapping[Hashable, Tensor]) -> None:
        super().__init__()
        self._keys = watched_weights(weights, MIN_ENTRIES)
        self.is_building = False
        self.collecting = False
        self._cotangents: dict[Hashable, FactorSum] = {}
        self._records: dict[Hashable, list[tuple[Hashable, Term]]] = {}

    @property
    def watching(self) -> bool:
        """Whether any weight is large enough to watch."""
        return bool(self._keys)

    def __torch_function__(self, func: Callable[..., Any], types: Iterable[type],
                           args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is _LINEAR and torch.is_grad_enabled():
            x, weight, bias = _linear_arguments(args, kwargs)
            key = self._keys.get(id(weight)) if isinstance(weight, Tensor) else None
            if (key is not None and type(x) is Tensor and x.layout == torch.strided
                    and x.dim() >= 1 and x.numel() > 0
                    and worth_factoring(x.numel() // x.shape[-1], weight.shape)
                    and not _transformed() and not _saving_through_hooks()
                    and not autocast_enabled(x.device.type)):
                return _GraphLinear.apply(x, weight, bias, self, key)
        return func(*args, **kwargs)

    @contextmanager
    def building(self) -> Iterator[None]:
        """The create_graph backward taken in this block builds the factored graph."""
        self.is_building = True
        try:
            yield
        finally:
            self.is_building = False

    @contextmanager
    def collecting_product(self, cotangents: Mapping[Hashable, FactorSum]) -> Iterator[None]:
        """A product pass: factored cotangents by key; weight parts recorded as factors."""
        self._cotangents = dict(cotangents)
        self._records = {}
        self.collecting = True
        try:
            yield
        finally:
            self.collecting = False
            self._cotangents = {}

    def cotangent(self, key: Hashable) -> FactorSum | None:
        return self._cotangents.get(key) if self.collecting else None

    def record(self, key: Hashable, slot: Hashable, term: Term) -> None:
        self._records.setdefault(key, []).append((slot, term))

    def take(self, key: Hashable, rest: Tensor | None, like: Tensor) -> FactorSum | None:
        """The product's entry for ``key``: its recorded factors and autograd's rest, or
        None when nothing was recorded for it."""
        parts = self._records.pop(key, None)
        if parts is None:
            return None
        out = FactorSum({}, None if rest is None else rest.detach(), like)
        for slot, term in parts:
            out.add_(FactorSum({slot: term}, None, like))
        return out

    def factored(self, grads: Mapping[Hashable, Tensor]) -> set[Hashable]:
        """Keys whose gradient g_W's graph is made only of ``_GraphLinearGrad`` nodes (and
        the additions that sum them): those may take a ``FactorSum`` cotangent."""
        watched = set(self._keys.values())
        return {key for key, g in grads.items()
                if key in watched and g.grad_fn is not None
                and _only_weight_gradients(g.grad_fn, g.output_nr, key)}


#: the position of g_W among ``_GraphLinearGrad``'s outputs (dx, g_W, g_b)
_WEIGHT_OUTPUT = 1


def _only_weight_gradients(node: Any, output: int, key: Hashable) -> bool:
    """Whether the gradient leaving ``node`` at ``output`` is a sum of g_W outputs of
    ``_GraphLinearGrad`` nodes of weight ``key`` (not their dx: a weight may also be the
    input of another factored call)."""
    if getattr(node, "_forward_cls", None) is _GraphLinearGrad:
        return output == _WEIGHT_OUTPUT and node.key == key
    if type(node).__name__ == "AddBackward0":
        return all(n is None or _only_weight_gradients(n, nr, key)
                   for n, nr in node.next_functions)
    return False
