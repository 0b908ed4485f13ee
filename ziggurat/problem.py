"""One level of a multilevel program: a module, its optimizer, its data and its loss.

A problem's step: draw a batch, compute the loss with ``training_step``, take the gradient
with respect to its own parameters plus, for every hypergradient path, the vector carried
back through the lower problems, then let its own optimizer step. The engine decides when
each problem steps; a problem never steps another.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .config import Config
from .data import BatchStream
from .errors import ConfigError, HypergradientError, ZigguratError
from .hypergrad import Darts, HypergradMethod, InnerObjective, linalg
from .registry import Family, Method
from .snapshot import Snapshot

if TYPE_CHECKING:
    from .graph import ProgramGraph

TrainingStepFn = Callable[["Problem", Any], Any]


class Problem:
    """A level of the program. Subclass it and write ``training_step(batch)``.

    Args:
        name: unique name; other problems reach this one as ``self.<name>``.
        module: the torch module whose trainable parameters this level optimizes (or
            override ``configure_module``).
        optimizer: a torch optimizer over those parameters, kept exactly as given (or
            override ``configure_optimizer``).
        scheduler: optional learning-rate scheduler, stepped after every optimizer step.
        train_data_loader: an iterable of batches (DataLoader, list of batches), or a list
            of DataLoaders whose batches are zipped into a tuple; None for no data (the
            batch is then None).
        config: ``zg.Config``; its ``type`` says how hypergradients pass *through* this
            problem to the problems above it.
        training_step: instead of subclassing, a function ``f(problem, batch)``.

    ``training_step`` returns the loss, or a dict with "loss" and other metrics to log.
    Calling the problem calls its module: ``self.inner(x)`` is ``inner.module(x)``.
    """

    def __init__(
        self,
        name: str,
        module: torch.nn.Module | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        scheduler: Any | None = None,
        train_data_loader: Iterable[Any] | Sequence[Iterable[Any]] | None = None,
        config: Config | None = None,
        training_step: TrainingStepFn | None = None,
    ) -> None:
        if not isinstance(name, str) or not name:
            raise ConfigError("Problem", "name", name, "a non-empty string")
        if config is not None and not isinstance(config, Config):
            raise ConfigError(name, "config", type(config).__name__, "a zg.Config")
        self._name = name
        self.config: Config = config if config is not None else Config()
        self.method: Method = self._resolve_method()
        self.module: torch.nn.Module = module  # type: ignore[assignment]
        self.optimizer: torch.optim.Optimizer = optimizer  # type: ignore[assignment]
        self.scheduler = scheduler
        self.train_data_loader = train_data_loader
        self._training_step_fn = training_step
        self.cur_batch: Any = None
        self.count = 0  # steps taken
        self.epoch = 0
        self.last_loss: Tensor | None = None
        self.last_metrics: dict[str, Any] = {}
        self.method_state: dict[str, Any] = {"problem_name": name}
        self._hypergrad_norm: Tensor | None = None
        self._others: dict[str, Problem] = {}
        self._graph: ProgramGraph | None = None
        self._stream: BatchStream | None = None
        self._snapshot: Snapshot | None = None
        self._initialized = False

    #: which family of methods this kind of problem uses (see ``zg.registry``)
    method_family: Family = "implicit"

    def default_method(self) -> Method:
        """The method used when ``config.type`` is None."""
        return Darts()

    def _resolve_method(self) -> Method:
        method = self.config.method if self.config.method is not None else self.default_method()
        if method.family != self.method_family:
            raise ConfigError(
                self._name, "config.type", self.config.type,
                f"a {self.method_family} method for a {type(self).__name__} ({method.name!r} "
                f"is a {method.family} method); change the type or the problem class",
            )
        return method

    # ----------------------------------------------------------------- identity and access
    @property
    def name(self) -> str:
        """The problem's unique name."""
        return self._name

    def __getattr__(self, item: str) -> Any:
        others = self.__dict__.get("_others")
        if others is not None and item in others:
            return others[item]
        raise AttributeError(
            f"'{type(self).__name__}' object (problem '{self.__dict__.get('_name', '?')}') has "
            f"no attribute '{item}'"
            + (f"; problems in the program: {sorted(others)}" if others else "")
        )

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r}, type={self.method.name!r})"

    @property
    def last_hypergrad_norm(self) -> float | None:
        """Norm of the hypergradient received at the last step (None before any)."""
        return None if self._hypergrad_norm is None else float(self._hypergrad_norm)

    @property
    def parents(self) -> list[Problem]:
        """Upper problems: those whose parameters this problem's loss depends on (u2l)."""
        return [self._others[n] for n in self._graph_or_error().parents[self.name]]

    @property
    def children(self) -> list[Problem]:
        """Lower problems: those whose losses depend on this problem's parameters (u2l)."""
        return [self._others[n] for n in self._graph_or_error().children[self.name]]

    @property
    def paths(self) -> list[list[Problem]]:
        """Hypergradient paths from this problem down to each problem its loss reads."""
        graph = self._graph_or_error()
        return [[self if n == self.name else self._others[n] for n in p]
                for p in graph.paths[self.name]]

    @property
    def leaf(self) -> bool:
        """True when no problem lies below this one."""
        return not self._graph_or_error().children[self.name]

    def _graph_or_error(self) -> ProgramGraph:
        if self._graph is None:
            raise ZigguratError(
                f"problem '{self.name}' is not part of an Engine yet; pass it to "
                f"zg.Engine(problems=[...], dependencies=...) first."
            )
        return self._graph

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters this problem optimizes (its module's, with requires_grad)."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def parameters(self) -> list[Tensor]:
        """All of the module's parameters."""
        return list(self.module.parameters())

    def read_parameters(self) -> list[Tensor]:
        """The tensors other problems differentiate with respect to when they read this one
        (its trainable parameters; an IterativeProblem substitutes its unrolled values)."""
        return self.trainable_parameters()

    # ----------------------------------------------------------------- user hooks
    def training_step(self, batch: Any) -> Any:
        """The loss of this level on ``batch`` (a tensor, or a dict with "loss")."""
        if self._training_step_fn is not None:
            return self._training_step_fn(self, batch)
        raise NotImplementedError(
            f"problem '{self.name}': subclass {type(self).__name__} and define "
            f"training_step(self, batch), or pass training_step=f(problem, batch)."
        )

    def configure_module(self) -> torch.nn.Module:
        """Build the module when none was passed."""
        raise ConfigError(self.name, "module", None, "a torch.nn.Module, or override "
                          "configure_module()")

    def configure_optimizer(self) -> torch.optim.Optimizer:
        """Build the optimizer when none was passed."""
        raise ConfigError(self.name, "optimizer", None, "a torch.optim.Optimizer over "
                          "the module's parameters, or override configure_optimizer()")

    def configure_scheduler(self) -> Any | None:
        """Build the scheduler when none was passed (default: no scheduler)."""
        return None

    def configure_train_data_loader(self) -> Iterable[Any] | Sequence[Iterable[Any]] | None:
        """Build the data loader(s) when none was passed (default: no data)."""
        return None

    def get_batch(self) -> Any:
        """The next batch; override for custom sampling."""
        if self._stream is None:
            raise ZigguratError(f"problem '{self.name}' has not been initialized by an Engine.")
        return self._stream.next()

    def on_inner_loop_start(self) -> None:
        """Called before the first step of each unroll (after warm-up)."""

    def grad_callback(self, grads: list[Tensor]) -> list[Tensor] | None:
        """Inspect or replace the final gradients (hypergradients included) before the step."""
        return None

    def param_callback(self, params: list[Tensor]) -> None:
        """Called with the trainable parameters after each optimizer step."""

    def epoch_callback(self) -> None:
        """Called when the (first) training data loader finishes a pass."""

    def custom_optimizer_step(self) -> None:
        """Override to replace ``optimizer.step()`` (gradients are in ``p.grad``)."""
        self.optimizer.step()

    # ----------------------------------------------------------------- engine interface
    def initialize(self) -> None:
        """Fill in what was not passed from the configure_* hooks; called by the Engine."""
        if self._initialized:
            return
        if self.module is None:
            self.module = self.configure_module()
        if not isinstance(self.module, torch.nn.Module):
            raise ConfigError(self.name, "module", type(self.module).__name__,
                              "a torch.nn.Module")
        if self.optimizer is None:
            self.optimizer = self.configure_optimizer()
        if not isinstance(self.optimizer, torch.optim.Optimizer):
            raise ConfigError(self.name, "optimizer", type(self.optimizer).__name__,
                              "a torch.optim.Optimizer")
        owned = {id(p) for g in self.optimizer.param_groups for p in g["params"]}
        missing = [i for i, p in enumerate(self.trainable_parameters()) if id(p) not in owned]
        if missing:
            raise ConfigError(
                self.name, "optimizer", type(self.optimizer).__name__,
                f"an optimizer over all trainable parameters of the module; parameters "
                f"{missing} of module.parameters() are not in its param_groups",
            )
        if self.scheduler is None:
            self.scheduler = self.configure_scheduler()
        if self.train_data_loader is None:
            self.train_data_loader = self.configure_train_data_loader()
        self._stream = BatchStream(self.train_data_loader, self.name, self._end_epoch)
        self._initialized = True

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.epoch_callback()

    def attach(self, graph: ProgramGraph, problems: Mapping[str, Problem]) -> None:
        """Join a program: know the graph and reach the other problems by name."""
        self._graph = graph
        self._others = {n: p for n, p in problems.items() if n != self.name}

    def start_unroll(self) -> None:
        """Begin an unroll: the hook, and a snapshot when roll_back is on."""
        self.on_inner_loop_start()
        if self.config.roll_back:
            self._snapshot = Snapshot(self.module, self.optimizer)

    def end_unroll(self) -> None:
        """Called once the upper problems have stepped: the unroll is over (roll back)."""
        self.roll_back()

    def roll_back(self) -> None:
        """Return to the snapshot taken at the start of the unroll (roll_back=True only)."""
        if self._snapshot is not None:
            self._snapshot.restore()
            self._snapshot = None

    def step(self) -> None:
        """One step: batch, loss, gradient (with hypergradients), optimizer, scheduler."""
        batch = self.get_batch()
        self.cur_batch = batch
        loss = self._loss_of(self.training_step(batch), record=True)
        params = self.trainable_parameters()
        grads = self._final_gradients(self._gradients(loss, params), params)
        for p, g in zip(params, grads):
            p.grad = g
        self.before_optimizer_step(params)
        self.custom_optimizer_step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.param_callback(params)
        for p in params:
            p.grad = None
        self.count += 1

    def _final_gradients(self, grads: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        """Apply ``grad_callback`` (checking what it returns)."""
        replaced = self.grad_callback(grads)
        if replaced is not None:
            grads = list(replaced)
            if len(grads) != len(params) or any(
                g.shape != p.shape for g, p in zip(grads, params)
            ):
                raise ZigguratError(
                    f"grad_callback of problem '{self.name}' returned gradients of shapes "
                    f"{[tuple(g.shape) for g in grads]} for parameters of shapes "
                    f"{[tuple(p.shape) for p in params]}; return one gradient per trainable "
                    f"parameter (or None to keep them)."
                )
        return grads

    def before_optimizer_step(self, params: list[Tensor]) -> None:
        """Called with gradients in place, just before the optimizer steps."""

    def _loss_of(self, out: Any, record: bool = False) -> Tensor:
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise ZigguratError(
                    f"training_step of problem '{self.name}' returned a dict without a 'loss' "
                    f"key (keys: {sorted(out)}); return the loss or {{'loss': loss, ...}}."
                )
            loss = out["loss"]
            if record:
                self.last_metrics = {k: v for k, v in out.items() if k != "loss"}
        else:
            loss = out
            if record:
                self.last_metrics = {}
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ZigguratError(
                f"training_step of problem '{self.name}' must return a scalar tensor loss; got "
                f"{type(loss).__name__}"
                + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else "")
                + "."
            )
        if record:
            self.last_loss = loss.detach()
        return loss.reshape(())

    def _gradients(
        self, loss: Tensor, params: list[Tensor], create_graph: bool = False
    ) -> list[Tensor]:
        """∂L/∂θ_self plus, for each hypergradient path, the carried-back vector.

        With ``create_graph`` the direct part keeps its graph (unrolled problems); the
        hypergradient part is always a constant.
        """
        graph = self._graph_or_error()
        read = list(graph.reads[self.name])
        read_params = [self._others[c].read_parameters() for c in read]
        inputs = params + [p for ps in read_params for p in ps]
        if not inputs:
            return []
        raw = torch.autograd.grad(loss, inputs, allow_unused=True, create_graph=create_graph)
        if create_graph:
            raw = raw[:len(params)] + tuple(
                None if g is None else g.detach() for g in raw[len(params):]
            )
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, raw)]
        if not read:
            return grads
        vectors: dict[str, list[Tensor]] = {}
        offset = len(params)
        for name, ps in zip(read, read_params):
            chunk = raw[offset:offset + len(ps)]
            offset += len(ps)
            if all(g is None for g in chunk):
                raise HypergradientError(
                    f"the loss of problem '{self.name}' does not depend on the parameters of "
                    f"'{name}', although l2u says it reads them; use self.{name}(...) in "
                    f"training_step without detaching, or remove the l2u edge."
                )
            vectors[name] = [torch.zeros_like(p) if g is None else g
                             for p, g in zip(ps, chunk)]
        hyper = [torch.zeros_like(p) for p in params]
        for path in graph.paths[self.name]:
            vec = vectors[path[-1]]
            for i in range(len(path) - 1, 0, -1):
                lower = self._others[path[i]]
                upper = self if i == 1 else self._others[path[i - 1]]
                vec = lower.best_response_vjp(vec, upper, key=path)
            torch._foreach_add_(hyper, vec)
        self._hypergrad_norm = linalg.norm(hyper)  # kept as a tensor: no host sync here
        if self.config.check_finite and not linalg.all_finite(hyper):
            bad = [i for i, h in enumerate(hyper) if not bool(torch.isfinite(h).all())]
            raise HypergradientError(
                f"the hypergradient of problem '{self.name}' at its step {self.count + 1} is "
                f"not finite (NaN or Inf in parameters {bad}); the run is stopped. Lower the "
                f"learning rates, add CG damping, or check the Neumann alpha of the problems "
                f"below it."
            )
        torch._foreach_add_(grads, hyper)
        return grads

    def best_response_vjp(
        self, v: list[Tensor], upper: Problem, key: Hashable = None
    ) -> list[Tensor]:
        """(dθ*_self/dθ_upper)ᵀ v: the vector carried one edge up a hypergradient path.

        ``key`` names the request (the path being carried) for per-request method state.
        """
        raise NotImplementedError(
            f"{type(self).__name__} cannot pass hypergradients to upper problems; use "
            f"zg.ImplicitProblem for problem '{self.name}'."
        )


class ImplicitProblem(Problem):
    """A problem whose hypergradient uses its configured implicit method (``config.type``).

    The best-response Jacobian-vector product is taken at the problem's current
    parameters and its most recent batch (``cur_batch``).
    """

    def objective(self, upper: Problem, key: Hashable = None) -> InnerObjective:
        """This problem's loss as a function of (θ_self, θ_upper), for the methods."""
        if self.count == 0:
            raise HypergradientError(
                f"problem '{upper.name}' asked for a hypergradient through '{self.name}' "
                f"before '{self.name}' took a step; the engine's schedule prevents this, so "
                f"step problems through zg.Engine."
            )
        batch = self.cur_batch
        return InnerObjective(
            params=self.trainable_parameters(),
            upper_params=upper.read_parameters(),
            loss=lambda: self._loss_of(self.training_step(batch)),
            optimizer=self.optimizer,
            state=self.method_state,
            name=self.name,
            upper_name=upper.name,
            key=key,
        )

    def best_response_vjp(
        self, v: list[Tensor], upper: Problem, key: Hashable = None
    ) -> list[Tensor]:
        # the method re-evaluates training_step: keep buffers (BatchNorm statistics) as they were
        buffers = list(self.module.buffers())
        saved = [b.detach().clone() for b in buffers]
        method = self.method
        if not isinstance(method, HypergradMethod):  # guarded at construction
            raise ConfigError(self.name, "config.type", method, "an implicit method")
        try:
            return method(self.objective(upper, key), v)
        finally:
            with torch.no_grad():
                for b, s in zip(buffers, saved):
                    b.copy_(s)

    def before_optimizer_step(self, params: list[Tensor]) -> None:
        method = self.method
        if isinstance(method, HypergradMethod) and self._graph is not None and (
            self._graph.parents[self.name]
        ):
            method.before_optimizer_step(self.optimizer, params, self.method_state)
