"""Differentiable (functional) optimizers that match torch.optim step for step.

``FunctionalOptimizer.step(params, grads, state, hyper)`` returns new parameters and state
without touching its inputs, so unrolled steps can be differentiated with respect to the
parameters, the gradients and the hyperparameters (0-dim tensors that require grad).
``from_torch`` turns a torch.optim optimizer (SGD, Adam, AdamW, RMSprop, Adagrad; exact
types) into its twin, settings and current state; ``write_back`` stores a functional state
back into the torch optimizer.

>>> import torch
>>> w = torch.tensor([1.0, -2.0], requires_grad=True)
>>> opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
>>> fopt, state, hyper = from_torch(opt, [w])
>>> (w1,), state = fopt.step([w], [2 * w], state, hyper)
>>> w1.detach()
tensor([ 0.8000, -1.6000])
"""

from __future__ import annotations

from .bridge import SUPPORTED, from_torch, functional_twin, write_back
from .functional import (
    FUNCTIONAL_OPTIMIZERS,
    FunctionalAdagrad,
    FunctionalAdam,
    FunctionalAdamW,
    FunctionalOptimizer,
    FunctionalRMSprop,
    FunctionalSGD,
    Hyper,
    State,
    by_name,
    safe_sqrt,
)

__all__ = [
    "FUNCTIONAL_OPTIMIZERS",
    "SUPPORTED",
    "FunctionalAdagrad",
    "FunctionalAdam",
    "FunctionalAdamW",
    "FunctionalOptimizer",
    "FunctionalRMSprop",
    "FunctionalSGD",
    "Hyper",
    "State",
    "by_name",
    "from_torch",
    "functional_twin",
    "safe_sqrt",
    "write_back",
]
