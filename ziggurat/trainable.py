"""A module's trainable parameters, remembered between steps and checked before each use.

``[p for p in module.parameters() if p.requires_grad]`` walks the module tree through
several layers of generators every time (about 3 µs for a single ``nn.Linear``, hundreds of
µs for a deep network); a problem needs that list at every step. ``TrainableParameters``
keeps the list and, before handing it out, checks by identity that nothing it was derived
from has changed since:

* the root module is the same object;
* each module the walk reached has the same class, the same ``_parameters`` and
  ``_modules`` dicts, holding the same objects in the same order (a parameter or submodule
  added, deleted, replaced or re-ordered, by ``setattr``, ``del``, ``register_*``,
  ``torch.nn.utils.parametrize``, ``torch.func.functional_call`` or a direct write to the
  dicts, changes one of these);
* every parameter has the same ``requires_grad`` flag.

``module.parameters()`` is a function of exactly these (the walk visits ``_modules`` and
reads ``_parameters`` of each module it reaches, skipping None and repeats), so when all of
them hold, the walk would return the remembered list; otherwise the list is taken again
by walking. A module tree whose walk is customised (a class overriding ``parameters``,
``named_parameters``, ``_named_members``, ``modules`` or ``named_modules``, the same set on
a module as instance attributes, or a class comparing modules by value) is walked every
time. Cost of the check: one pass over the modules and the parameters, in C loops where
possible (1.5 µs against 3.1 µs of walking for a single ``nn.Linear``; 80 against 220 µs
for a 90-module network).
"""

from __future__ import annotations

from collections.abc import Mapping
from operator import attrgetter, is_
from typing import Any

import torch
from torch import Tensor

_requires_grad = attrgetter("requires_grad")
_Base = torch.nn.Module

#: the methods ``module.parameters()`` goes through: on the root, and ``named_modules`` on
#: every submodule (on the class or, as instance attributes, on the module itself)
_ROOT_WALK = frozenset(
    {"parameters", "named_parameters", "_named_members", "modules", "named_modules"})
_SUB_WALK = frozenset({"named_modules"})

#: per module reached: (module, its class, _parameters, their values, _modules, their values)
_Entry = tuple[_Base, type, Mapping[str, Any], tuple[Any, ...], Mapping[str, Any],
               tuple[Any, ...]]


class TrainableParameters:
    """A module's parameters with ``requires_grad`` (in ``module.parameters()`` order),
    remembered and walked again only when the module tree has changed."""

    def __init__(self) -> None:
        self._root: _Base | None = None
        self._entries: list[_Entry] = []
        self._all: list[Tensor] = []  # module.parameters(), trainable or not
        self._flags: list[bool] = []
        self._trainable: list[Tensor] = []

    def current(self, module: _Base) -> list[Tensor]:
        """The module's trainable parameters now (a new list at each call)."""
        # (one method, no helper call: it runs at every step)
        if (module is not self._root or module is None
                or not module.__dict__.keys().isdisjoint(_ROOT_WALK)):
            return self._take(module)
        # every module reached: same class, same dicts holding the same objects in order
        for m, kind, params, pvalues, modules, mvalues in self._entries:
            if (type(m) is not kind or m._parameters is not params
                    or m._modules is not modules
                    or len(params) != len(pvalues) or len(modules) != len(mvalues)
                    or "named_modules" in m.__dict__
                    or not all(map(is_, params.values(), pvalues))
                    or (mvalues and not all(map(is_, modules.values(), mvalues)))):
                return self._take(module)
        if list(map(_requires_grad, self._all)) != self._flags:
            return self._take(module)
        return list(self._trainable)

    def _take(self, module: _Base) -> list[Tensor]:
        """Walk, and remember the result with what it was derived from (unless the walk is
        customised: then every call walks)."""
        self.clear()
        all_params: list[Tensor] = list(module.parameters())
        trainable = [p for p in all_params if p.requires_grad]
        if not _plain_walk(module, _ROOT_WALK):
            return trainable
        entries: list[_Entry] = []
        for m in module.modules():
            if not _plain_walk(m, _SUB_WALK):
                return trainable
            params, modules = m._parameters, m._modules
            entries.append((m, type(m), params, tuple(params.values()), modules,
                            tuple(modules.values())))
        self._root = module
        self._entries = entries
        self._all = all_params
        self._flags = list(map(_requires_grad, all_params))
        self._trainable = trainable
        return list(trainable)

    def clear(self) -> None:
        """Forget the remembered list (the next call walks)."""
        self._root = None
        self._entries = []
        self._all = []
        self._flags = []
        self._trainable = []


def _plain_walk(module: object, methods: frozenset[str]) -> bool:
    """Whether ``module`` walks its parameters with ``nn.Module``'s own ``methods``, on its
    class and not replaced on the instance, and compares modules by identity (as the walk's
    memo of visited modules assumes)."""
    kind = type(module)
    return (isinstance(module, _Base)
            and all(getattr(kind, name, None) is getattr(_Base, name) for name in methods)
            and module.__dict__.keys().isdisjoint(methods)
            and kind.__hash__ is _Base.__hash__ and kind.__eq__ is _Base.__eq__)
