"""``torch.autograd.grad``'s result, from autograd's engine called directly where possible.

Before running the backward pass, ``torch.autograd.grad`` prepares its arguments in
Python: tensor-like filtering, the ``__torch_function__`` check, and ``_make_grads`` (a
shape comparison through the symbolic-shape helpers for each given output gradient, the
scalar checks and ``ones_like`` for each implicit one). That is about 400 bytecodes per
call, as much as 7 % of a small model's training step (a 50-feature logistic regression:
``benchmarks/overhead.py``). :func:`grad` does the same preparation only for plain cases,
in a few attribute reads, and hands the engine the same arguments:

* outputs and inputs are tensors (one, or a list or tuple), no argument has a
  ``__torch_function__`` override, no torch-function mode is active and torch.compile is
  not tracing; ``allow_unused`` is a bool;
* an output without a given gradient is a floating-point 0-dim tensor (its gradient is
  ``ones_like(output)``, as torch makes it), or does not require grad (None: the engine
  raises torch's own error);
* given output gradients come as a tensor, list or tuple, each a tensor of its output's
  shape, both complex or both not.

Anything else (and a torch without ``torch.autograd.graph._engine_run_backward``, the
function ``torch.autograd.grad`` itself ends in) goes to ``torch.autograd.grad``, which
raises its usual errors. The results are the same tensors ``torch.autograd.grad`` returns
(tests/test_backward.py compares them bit for bit). The signature is the part of
torch.autograd.grad's that the library uses (``retain_graph`` and after by keyword only; no
``only_inputs``, ``is_grads_batched`` or ``materialize_grads``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.autograd.graph
from torch import Tensor

from .torch_compat import compiling as _compiling

#: whether torch has the engine call ``torch.autograd.grad`` ends in,
#: ``torch.autograd.graph._engine_run_backward`` (torch >= 2.3; it keeps torch's logging
#: hooks and context stash); it is looked up at each call, so a patch of it (as
#: ``torch.compiler``'s non-strict tracing makes) applies here too. Without it every call
#: goes to torch.autograd.grad.
_HAS_ENGINE = hasattr(torch.autograd.graph, "_engine_run_backward")
_graph = torch.autograd.graph
_has_torch_function = torch._C._has_torch_function
_PRESERVE = torch.preserve_format


def grad(
    outputs: Tensor | Sequence[Tensor],
    inputs: Tensor | Sequence[Any],
    grad_outputs: Sequence[Tensor | None] | None = None,
    *,
    retain_graph: bool | None = None,
    create_graph: bool = False,
    allow_unused: bool = False,
) -> tuple[Tensor | None, ...]:
    """``torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=...,
    create_graph=..., allow_unused=...)``: the gradients of the outputs (weighted by
    ``grad_outputs``; ones for 0-dim outputs when None) with respect to ``inputs``.

    >>> w = torch.tensor([1.0, 2.0], requires_grad=True)
    >>> grad((w ** 2).sum(), [w])
    (tensor([2., 4.]),)
    """
    outs = _as_tuple(outputs)
    ins = _as_tuple(inputs)
    if (_HAS_ENGINE and outs is not None and ins and type(allow_unused) is bool
            and not _has_torch_function(outs + ins) and not _compiling()):
        seeds = _seeds(outs, grad_outputs)
        if seeds is not None:
            run: Callable[..., tuple[Tensor | None, ...]] = _graph._engine_run_backward
            return run(outs, seeds, create_graph if retain_graph is None else retain_graph,
                       create_graph, ins, allow_unused, accumulate_grad=False)
    return torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=retain_graph,
                               create_graph=create_graph, allow_unused=allow_unused)


def _as_tuple(arg: Any) -> tuple[Any, ...] | None:
    """A tensor or a list / tuple of them as a tuple, as torch.autograd.grad takes them;
    None for other kinds (a ``GradientEdge``, a dict of inputs: torch.autograd.grad's)."""
    if isinstance(arg, Tensor):
        return (arg,)
    if type(arg) is tuple or type(arg) is list:
        return tuple(arg)
    return None


def _seeds(outs: tuple[Any, ...], given: Sequence[Tensor | None] | None
           ) -> tuple[Tensor | None, ...] | None:
    """The output gradients ``_make_grads`` would pass the engine, or None where the case
    is not a plain one (``torch.autograd.grad`` then prepares them, and raises its errors)."""
    if given is None:
        if len(outs) == 1:  # (the common case, one loss: no lists)
            return _implicit_seed(outs[0])
        given = (None,) * len(outs)
    else:  # (a generator or another kind: torch.autograd.grad takes it, once)
        given = _as_tuple(given)
        if given is None:
            return None
    if len(given) != len(outs):
        return None
    seeds: list[Tensor | None] = []
    for out, g in zip(outs, given):
        if g is None:
            seed = _implicit_seed(out)
            if seed is None:
                return None
            seeds.append(seed[0])
        elif (not isinstance(out, Tensor) or not isinstance(g, Tensor) or out.is_nested
              or g.is_nested or g.shape != out.shape
              or g.dtype.is_complex != out.dtype.is_complex):
            return None
        else:
            seeds.append(g)
    return tuple(seeds)


def _implicit_seed(out: Any) -> tuple[Tensor | None] | None:
    """The gradient torch makes for an output given none, as a 1-tuple: ``ones_like`` of a
    0-dim floating tensor, None for a tensor that does not require grad (the engine raises
    torch's error); None (no tuple) for any other output, which torch must prepare."""
    if not isinstance(out, Tensor):
        return None
    if not out.requires_grad:
        return (None,)
    if out.dim() != 0 or not out.dtype.is_floating_point:
        return None
    return (torch.ones_like(out, memory_format=_PRESERVE),)
