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

* ``LinearCapture`` (during the upper loss): each ``F.linear`` on a watched W computes with a
  detached stand-in of W, so autograd's backward to W skips it, and records (X_c, y_c); the
  upper's backward then asks for ∂L_out/∂y_c beside its other gradients. R is what that
  backward still returns for W (None when W has no other use). Exact by construction.
* ``FactoredTangents`` (during the dual evaluation of L_in): an ``F.linear`` on W's stand-in
  adds x v_Wᵀ to its output's tangent; any other operation on the stand-in gets W with the
  whole v_W as tangent, formed on first use. So every use of W in L_in sees v_W exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.autograd import forward_ad
from torch.overrides import TorchFunctionMode

_LINEAR = torch.nn.functional.linear

#: Set to False to turn the factored path off everywhere (upper backward forms every v_W).
ENABLED = True

_DIFFERENTIATED_STAND_IN = (
    "a gradient with respect to the weight {key} of a linear layer was taken inside the "
    "upper problem's training_step. While the upper loss is built, ziggurat computes the "
    "linear layers of a lower problem whose method takes v in factors (Darts, SAMA with SGD, "
    "forward mode) with stand-ins for their weights, so a gradient with respect to those "
    "weights taken there would miss those layers. Set "
    "ziggurat.hypergrad.factored.ENABLED = False for this program."
)

#: Operations that only read a tensor's metadata: a stand-in answers them as W would.
_METADATA: frozenset[Any] = frozenset({
    Tensor.dim, Tensor.size, Tensor.numel, Tensor.stride, Tensor.is_contiguous,
    Tensor.is_floating_point, Tensor.__len__, Tensor.shape.__get__,  # type: ignore[attr-defined]
    Tensor.dtype.__get__, Tensor.device.__get__,  # type: ignore[attr-defined]
    Tensor.requires_grad.__get__, Tensor.ndim.__get__,  # type: ignore[attr-defined]
})


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


class LinearCapture(TorchFunctionMode):
    """While active, records the ``F.linear`` calls of the upper loss on watched weights.

    ``weights`` maps a key (e.g. (problem name, position)) to a weight. Each recorded call
    computes with the weight's stand-in (``W.detach()`` that requires grad and is never
    differentiated), so the outputs ``outputs()`` are what the backward must also return
    the gradients of, and ``factors(...)`` builds v_W from them.
    """

    def __init__(self, weights: Mapping[Hashable, Tensor]) -> None:
        super().__init__()
        self._keys = {id(w): k for k, w in weights.items() if w.dim() == 2}
        self._weights = dict(weights)
        self._stand_ins: dict[Hashable, Tensor] = {}
        self._calls: list[tuple[Hashable, Tensor, Tensor]] = []  # (key, X rows, y)

    def __torch_function__(self, func: Callable[..., Any], types: Iterable[type],
                           args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is _LINEAR and torch.is_grad_enabled():
            x, weight, bias = _linear_arguments(args, kwargs)
            key = self._keys.get(id(weight)) if isinstance(weight, Tensor) else None
            if key is not None and type(x) is Tensor and x.layout == torch.strided:
                stand_in = self._stand_ins.get(key)
                if stand_in is None:
                    stand_in = weight.detach().requires_grad_()
                    # the upper backward never reaches the stand-in (it is not among the
                    # inputs asked for); anything that does differentiated the weight
                    stand_in.register_hook(_refuse(key))
                    self._stand_ins[key] = stand_in
                y = func(x, stand_in, bias)
                self._calls.append((key, x.detach().reshape(-1, x.shape[-1]), y))
                return y
        return func(*args, **kwargs)

    def outputs(self) -> list[Tensor]:
        """The recorded outputs, in call order (differentiate the loss with respect to them)."""
        return [y for _, _, y in self._calls]

    def factors(self, output_grads: Sequence[Tensor | None]) -> dict[Hashable, tuple[
        Tensor, Tensor
    ]]:
        """(X, Δ) per watched key, rows stacked over its calls; calls whose output the loss
        does not use (gradient None) are left out, and so are keys with no call left."""
        parts: dict[Hashable, tuple[list[Tensor], list[Tensor]]] = {}
        for (key, rows, y), grad in zip(self._calls, output_grads):
            if grad is None:
                continue
            xs, ds = parts.setdefault(key, ([], []))
            xs.append(rows)
            ds.append(grad.detach().reshape(-1, y.shape[-1]))
        self._calls = []
        return {key: (xs[0] if len(xs) == 1 else torch.cat(xs),
                      ds[0] if len(ds) == 1 else torch.cat(ds))
                for key, (xs, ds) in parts.items()}


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

    ``stand_ins`` maps id(stand-in) to (stand-in, W's primal value, factors); the module
    computes with the stand-in in place of W (``use_parameters``)."""

    def __init__(self, stand_ins: Mapping[int, tuple[Tensor, Tensor, LinearFactors]]) -> None:
        super().__init__()
        self._entries = dict(stand_ins)
        self._dense: dict[int, Tensor] = {}

    def __torch_function__(self, func: Callable[..., Any], types: Iterable[type],
                           args: Sequence[Any] = (), kwargs: Mapping[str, Any] | None = None
                           ) -> Any:
        kwargs = kwargs or {}
        if func is _LINEAR:
            x, weight, bias = _linear_arguments(args, kwargs)
            entry = self._entries.get(id(weight)) if isinstance(weight, Tensor) else None
            if entry is not None and not _holds_stand_in(x, self._entries) and not (
                    _holds_stand_in(bias, self._entries)):
                # primal and tangent by hand: forward mode's own formula for a weight with
                # no tangent multiplies x by a materialised zero matrix (one product wasted)
                x_primal, x_tangent = forward_ad.unpack_dual(x)
                b_primal, b_tangent = (forward_ad.unpack_dual(bias) if bias is not None
                                       else (None, None))
                y = func(x_primal, weight, b_primal)
                tangent = entry[2].right_product(x_primal).to(y.dtype)
                if x_tangent is not None:
                    tangent = tangent + func(x_tangent, weight)
                if b_tangent is not None:
                    tangent = tangent + b_tangent
                return forward_ad.make_dual(y, tangent)
        if func not in _METADATA and _holds_stand_in((args, kwargs), self._entries):
            args, kwargs = _replace((args, kwargs), self._dual)
        return func(*args, **kwargs)

    def _dual(self, t: Tensor) -> Tensor:
        """W with the whole v_W as tangent (formed once), for a use other than F.linear."""
        key = id(t)
        if key not in self._dense:
            _, primal, factors = self._entries[key]
            self._dense[key] = forward_ad.make_dual(primal, factors.dense().to(primal.dtype))
        return self._dense[key]


def _refuse(key: Hashable) -> Callable[[Tensor], None]:
    def hook(grad: Tensor) -> None:
        raise RuntimeError(_DIFFERENTIATED_STAND_IN.format(key=key))
    return hook


def _linear_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, Any, Any]:
    x = args[0] if args else kwargs.get("input")
    weight = args[1] if len(args) > 1 else kwargs.get("weight")
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    return x, weight, bias


def _holds_stand_in(obj: Any, entries: Mapping[int, Any]) -> bool:
    if isinstance(obj, Tensor):
        return id(obj) in entries
    if isinstance(obj, list | tuple):
        return any(_holds_stand_in(o, entries) for o in obj)
    if isinstance(obj, dict):
        return any(_holds_stand_in(o, entries) for o in obj.values())
    return False


def _replace(obj: Any, dual: Callable[[Tensor], Tensor]) -> Any:
    """obj with every stand-in (by ``dual``'s table) swapped for its dual (lists, tuples,
    dicts walked)."""
    if isinstance(obj, Tensor):
        try:
            return dual(obj)
        except KeyError:
            return obj
    if isinstance(obj, tuple):
        return tuple(_replace(o, dual) for o in obj)
    if isinstance(obj, list):
        return [_replace(o, dual) for o in obj]
    if isinstance(obj, dict):
        return {k: _replace(o, dual) for k, o in obj.items()}
    return obj
