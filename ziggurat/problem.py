"""One level of a multilevel program: a module, its optimizer, its data and its loss.

A problem's step: draw a batch, compute the loss with ``training_step``, take the gradient
with respect to its own parameters plus, for every hypergradient path, the vector carried
back through the lower problems, then let its own optimizer step. The engine decides when
each problem steps; a problem never steps another.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, nullcontext
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from .backward import grad as autograd_grad
from .config import Config
from .data import BatchStream, to_device
from .errors import ConfigError, HypergradientError, ZigguratError
from .hypergrad import Darts, HypergradMethod, InnerObjective, linalg
from .hypergrad.factored import LinearCapture, factored_entry, global_factors
from .registry import Family, Method
from .snapshot import Snapshot
from .systems import DynamicLossScaler, autocast_for, clip_by_total_norm, full_precision
from .systems.distributed import Communicator
from .torch_compat import autocast_enabled
from .trainable import TrainableParameters
from .unrolled.reparam import use_parameters

if TYPE_CHECKING:
    from .graph import ProgramGraph

TrainingStepFn = Callable[["Problem", Any], Any]


class MicroBatches(list[Any]):
    """The micro-batches of one accumulated step (``cur_batch`` under accumulation)."""


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
        #: the method of ``config`` (resolved again when ``config`` is replaced)
        self.method: Method = self._resolve_method()
        self._method_config = self.config  # the config ``method`` was resolved from
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
        self._reached: dict[str, Problem] = {}  # the others set as attributes (see attach)
        self._graph: ProgramGraph | None = None
        self._stream: BatchStream | None = None
        self._snapshot: Snapshot | None = None
        self._initialized = False
        self._scaler: DynamicLossScaler | None = None
        self._unroll_batches: list[list[Any]] = []
        self._trainable = TrainableParameters()  # the list of trainable_parameters()
        # what the step path needs, fixed when the problem joins a program (see attach)
        self._reads: list[tuple[str, Problem]] = []
        self._viewers: list[Problem] = []
        self._hooks: frozenset[str] = frozenset()
        self._prepares = False
        self._plain_loss = False
        self._lean = False
        self._captured = False  # the last step captured linear layers' factors of v
        self._direct = False
        self._planned_config: Config | None = None
        #: set by a data-parallel Engine (EngineConfig.strategy): averages over the ranks
        self.comm: Communicator | None = None

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

    if TYPE_CHECKING:  # other problems are instance attributes (``attach``); at run time
        # the class has no __getattr__, which would keep CPython from specialising reads
        def __getattr__(self, item: str) -> Any: ...

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def _attribute_names(self) -> set[str]:
        """``dir(self)`` without the other problems of its program (which ``attach`` sets
        as attributes): the names another problem may not take."""
        reached = self.__dict__.get("_reached", {})
        return {a for a in dir(self)
                if not (a in reached and self.__dict__.get(a) is reached[a])}

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
        """The parameters this problem optimizes: its module's, with requires_grad, in
        ``module.parameters()`` order (a new list at each call). The list is remembered and
        checked by identity before each use: parameters or submodules added, deleted or
        replaced (also temporarily, as ``torch.func.functional_call`` does) and toggled
        ``requires_grad`` flags are seen at the next call (see ``ziggurat.trainable``)."""
        return self._trainable.current(self.module)

    def parameters(self) -> list[Tensor]:
        """All of the module's parameters."""
        return list(self.module.parameters())

    def as_read(self, clone: bool = False) -> AbstractContextManager[Any]:
        """How this problem's module looks to another problem evaluating its loss: itself,
        or (``clone``) with its parameters replaced by differentiable copies, so a graph
        that outlives the evaluation survives in-place updates of the originals."""
        if not clone:
            return nullcontext()
        params = self.trainable_parameters()
        return use_parameters(self.module, params, [p.clone() for p in params])

    def _others_view(self, clone: bool = False) -> AbstractContextManager[Any]:
        """Every other problem as seen from this one's loss (``as_read`` of each; without
        ``clone`` only those whose ``as_read`` is overridden: the base one does nothing)."""
        others = self._others.values() if clone or self._graph is None else self._viewers
        if not others:
            return nullcontext()
        stack = ExitStack()
        for other in others:
            stack.enter_context(other.as_read(clone))
        return stack

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
        """The next batch; override for custom sampling (``batch_to_device`` then moves it)."""
        if self._stream is None:
            raise ZigguratError(f"problem '{self.name}' has not been initialized by an Engine.")
        return self._stream.next()

    def batch_to_device(self, batch: Any, device: torch.device) -> Any:
        """The batch ``training_step`` receives, from ``get_batch``'s. ``device`` is that of
        the problem's first trainable parameter; when it is an accelerator, the batch's
        tensors (in tuples, named tuples, lists and dicts, at any depth) go there
        (``ziggurat.data.to_device``; the batch itself when they are there already). On the
        CPU nothing moves: a batch a loader put on a GPU stays there. Override to keep a
        batch, or part of it, where the loader left it, or to move objects of your own;
        the hook is applied again to the batches a checkpoint restores (they load on the
        CPU), so it must give back a batch it returned before unchanged."""
        if device.type == "cpu":
            return batch
        return to_device(batch, device, non_blocking=device.type == "cuda")

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
        if self.config.precision == "fp16":
            if self.device.type != "cuda":
                raise ConfigError(
                    self.name, "config.precision", "fp16",
                    f"'bf16' or 'fp32' for parameters on {self.device.type}: fp16 with loss "
                    f"scaling is for CUDA; bf16 needs no scaling and works on CPU and CUDA",
                )
            self._scaler = DynamicLossScaler()
        self._initialized = True

    def _end_epoch(self) -> None:
        self.epoch += 1
        self.epoch_callback()

    def attach(self, graph: ProgramGraph, problems: Mapping[str, Problem]) -> None:
        """Join a program: know the graph and reach the other problems by name.

        Also fixes, once, what every step would otherwise look up again: the problems this
        one reads, the other problems whose view (``as_read``) does something, and which of
        the step's hooks are overridden (on the class or the instance; a hook assigned
        after the problem joined an Engine is seen at the next ``set_dependency``, or when
        ``config`` is replaced).

        The other problems become instance attributes (``self.<name>``), reached by a plain
        lookup (the class has no ``__getattr__``, so CPython specialises every attribute
        read of a problem); ``_attribute_names`` leaves them out."""
        for n, other in self._reached.items():  # set by an earlier attach
            if self.__dict__.get(n) is other:
                del self.__dict__[n]
        self._graph = graph
        self._others = {n: p for n, p in problems.items() if n != self.name}
        self._reached = {n: p for n, p in self._others.items() if n not in self.__dict__}
        self.__dict__.update(self._reached)
        self._reads = [(n, self._others[n]) for n in graph.reads[self.name]]
        self._viewers = [o for o in self._others.values() if _overrides(o, "as_read")]
        self._fix_config_plan()

    def _fix_config_plan(self) -> None:
        """The parts of the step's plan that follow from the config and the hooks (taken
        again when ``config`` is replaced by a new one)."""
        self._planned_config = self.config
        self._refresh_method()
        self._hooks = frozenset(h for h in _STEP_HOOKS if _overrides(self, h))
        self._prepares = self._method_prepares()
        # fp32 and no view to enter: the loss is training_step's value, no context around it
        self._plain_loss = self.config.precision == "fp32" and not self._viewers
        # ... and nothing else between the gradient and the optimizer: ``_step_on``'s lean path
        self._lean = (self._plain_loss and self._scaler is None and not self._hooks
                      and not self._prepares and self.config.gradient_clipping is None
                      and self._graph is not None)  # (outside a program: the error)
        # ... one batch a step, nothing read, no roll-back, and none of the steps that
        # ``step`` then skips replaced by a subclass: ``step`` goes to ``_plain_step``
        self._direct = (self._lean and not self._reads and not self.config.roll_back
                        and self.config.gradient_accumulation == 1
                        and not any(_overrides(self, h) for h in _DIRECT_SKIPS))

    def _refresh_method(self) -> None:
        """``method`` from the config in force, once ``config`` has been replaced."""
        if self._method_config is not self.config:
            self.method = self._resolve_method()
            self._method_config = self.config

    def _method_prepares(self) -> bool:
        """Whether ``before_optimizer_step`` has work to do at each step (set at attach)."""
        return _overrides(self, "before_optimizer_step")

    def start_unroll(self) -> None:
        """Begin an unroll: the hook, and a snapshot when roll_back is on."""
        self.on_inner_loop_start()
        if self.config.roll_back:
            self._snapshot = Snapshot(self.module, self.optimizer, self.scheduler)
            self._unroll_batches = []

    def sync(self) -> None:
        """Bring the module and optimizer up to date with any state held elsewhere (called
        by the engine when a run ends; nothing to do for an ordinary problem)."""

    # ----------------------------------------------------------------- checkpointing
    @property
    def checkpointable(self) -> bool:
        """Whether the problem's whole state can be saved now: not while a roll-back unroll
        holds batches that cannot be saved (they will have to be retaken)."""
        from .checkpoint import is_plain

        return self._snapshot is None or is_plain(self._unroll_batches)

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue this problem exactly: module, optimizer,
        scheduler, loss scale, counters, data position, method state, roll-back snapshot
        and the latest batch (when it is made of tensors and plain values)."""
        from .checkpoint import is_plain

        batch = list(self.cur_batch) if isinstance(self.cur_batch, MicroBatches) else (
            self.cur_batch)
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "scaler": None if self._scaler is None else self._scaler.state_dict(),
            "count": self.count,
            "epoch": self.epoch,
            "stream": None if self._stream is None else self._stream.state_dict(),
            "method_state": self.method_state,
            "snapshot": None if self._snapshot is None else self._snapshot.state_dict(),
            "unroll_batches": self._unroll_batches,
            "cur_batch": batch if is_plain(batch) else None,
            "cur_batch_micro": isinstance(self.cur_batch, MicroBatches),
            "last_loss": self.last_loss,
            "hypergrad_norm": self._hypergrad_norm,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what ``state_dict`` returned (tensors go to the parameters' device)."""
        device = self.device
        self.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self._scaler is not None and state["scaler"] is not None:
            self._scaler.load_state_dict(state["scaler"])
        self.count = int(state["count"])
        self.epoch = int(state["epoch"])
        if self._stream is not None and state["stream"] is not None:
            self._stream.load_state_dict(state["stream"])
        self.method_state = to_device(dict(state["method_state"]), device)
        self._snapshot = None if state["snapshot"] is None else Snapshot.from_state_dict(
            self.module, self.optimizer, self.scheduler, to_device(state["snapshot"], device))
        # the batches of the step and of a roll-back unroll were saved as training_step got
        # them, and are loaded on the CPU: on the device again, as ``batch_to_device`` puts
        # them (the unroll's are replayed as they are)
        moved = ((lambda b: self.batch_to_device(b, device)) if self.trainable_parameters()
                 else (lambda b: b))
        self._unroll_batches = [[moved(b) for b in step]
                                for step in state["unroll_batches"] or []]
        batch = state["cur_batch"]
        self.cur_batch = (MicroBatches([moved(b) for b in batch])
                          if state["cur_batch_micro"] and batch is not None else moved(batch))
        self.last_loss = state["last_loss"]
        self._hypergrad_norm = state.get("hypergrad_norm")

    def end_unroll(self) -> None:
        """Called once the upper problems have stepped: the unroll is over (roll back)."""
        self.roll_back()

    def roll_back(self) -> None:
        """roll_back=True: the unroll's steps were look-ahead. Return to the snapshot taken
        at its start and take the same steps again, on the same batches, with the upper
        problems' updated parameters (Betty's warm start, generalised to K steps)."""
        if self._snapshot is None:
            return
        self._snapshot.restore()
        batches, self._unroll_batches = self._unroll_batches, []
        self._snapshot = None
        count = self.count
        for step_batches in batches:
            self.cur_batch = (step_batches[0] if len(step_batches) == 1
                              else MicroBatches(step_batches))
            self._retake_step(list(step_batches))
        self.count = count

    def _retake_step(self, batches: list[Any]) -> None:
        """One of ``roll_back``'s steps taken again (an ordinary step on its batches)."""
        self._step_on(batches)

    def step(self) -> None:
        """One step: batch(es), loss, gradient (with hypergradients), optimizer, scheduler.

        With ``gradient_accumulation`` = n the step draws n micro-batches and uses the mean
        of their gradients (each micro-batch is differentiated on its own), the
        hypergradient once on the mean vectors, then clipping and one optimizer step.
        """
        if self._direct and self.comm is None and self._snapshot is None:
            # the common case, written out (it runs at every step): see ``_plain_step``
            params = self.trainable_parameters()
            batch = self.get_batch()
            if params:
                batch = self.batch_to_device(batch, params[0].device)
            self.cur_batch = batch
            if self.config is self._planned_config:  # (also after an epoch_callback)
                self._plain_step(batch, params)
            else:
                self._step_on([batch])
            return
        self._step_on(self._draw_batches())

    def _step_on(self, batches: list[Any]) -> None:
        """The step after its batches are drawn (also what re-runs of a step execute)."""
        if self.config is not self._planned_config:  # a config replaced after attach
            self._fix_config_plan()
        params = self.trainable_parameters()
        if self.comm is not None and self.module is not None:
            # as torch's DDP (broadcast_buffers): every rank's step starts from rank 0's
            # buffers (BatchNorm's running statistics), so replicas stay equal and a
            # checkpoint of rank 0's module resumes every rank exactly
            buffers = list(self.module.buffers())
            if buffers:
                self.comm.broadcast_tensors_(buffers)
        if self._lean and self.comm is None and len(batches) == 1:
            # fp32, one micro-batch, no view of another problem, no hook, clipping or loss
            # scaling (a problem that reads others may capture their linear layers:
            # ``_single_batch_gradients``)
            if not self._reads:
                self._plain_step(batches[0], params)
                return
            own, vectors = self._single_batch_gradients(batches[0], params)
            if vectors:
                torch._foreach_add_(own, self._hypergradient(vectors, params))
            for p, g in zip(params, own):
                p.grad = g
            self._lean_update(params)
            return
        if self._plain_loss and self._scaler is None and len(batches) == 1:
            own, vectors = self._single_batch_gradients(batches[0], params)
        else:
            own, vectors = self._accumulated_gradients(batches, params)
        if self._scaler is not None:
            finite = linalg.all_finite(own) and all(
                linalg.all_finite(v) for v in vectors.values())
            self._scaler.update(finite)
            if not finite:  # fp16 overflow: skip this step, the scale has been lowered
                self.count += 1
                return
        grads = own
        if self.comm is not None:  # data parallel: see docs/distributed.md
            grads = self._global_gradients(own, vectors, params)
        elif vectors:
            torch._foreach_add_(grads, self._hypergradient(vectors, params))
        hooks = self._hooks
        if "grad_callback" in hooks:
            grads = self._final_gradients(grads, params)
        clipping = self.config.gradient_clipping
        if clipping is not None:
            grads = clip_by_total_norm(grads, clipping)
        for p, g in zip(params, grads):
            p.grad = g
        if self._prepares:
            self.before_optimizer_step(params)
        self.custom_optimizer_step()
        if self.scheduler is not None:
            self._step_scheduler()
        if "param_callback" in hooks:
            self.param_callback(params)
        for p in params:
            p.grad = None
        self.count += 1

    def _plain_step(self, batch: Any, params: list[Tensor]) -> None:
        """The lean step of a problem that reads no other (fp32, one batch, no view, hook,
        clipping, loss scaling or data parallelism): loss, ∂L/∂θ (zeros for an unused
        parameter), optimizer and scheduler step. Written out, without the general path's
        helpers: on small models its bookkeeping is a measurable part of the step."""
        loss = self.training_step(batch)
        if type(loss) is Tensor and loss.dim() == 0 and loss.dtype not in _HALF:
            # ``_loss_of``'s common case written out; ``.data`` is the detached alias made
            # without a dispatched op (``detach()`` is one: about 1 % of a small model's step)
            self.last_metrics = {}
            self.last_loss = loss.data
        else:
            loss = self._loss_of(loss, record=True)
        if params:
            for p, g in zip(params, autograd_grad(loss, params, allow_unused=True)):
                p.grad = (g if g is not None and g.is_contiguous()
                          else torch.zeros_like(p) if g is None else g.contiguous())
        self._lean_update(params)

    def _lean_update(self, params: list[Tensor]) -> None:
        """The lean paths' end, gradients in ``p.grad``: optimizer and scheduler step, the
        gradients dropped, the step counted (no hook in between: see ``_step_on``)."""
        self.custom_optimizer_step()
        if self.scheduler is not None:
            self._step_scheduler()
        for p in params:
            p.grad = None
        self.count += 1

    def _global_gradients(self, own: list[Tensor], vectors: dict[str, list[Tensor]],
                          params: list[Tensor]) -> list[Tensor]:
        """Data parallel (docs/distributed.md): the global mean of every vector v = ∂L/∂θ_read
        (one async all-reduce, finished by the first lower method once it has built its
        gradient graph), the local hypergradient contributions on the global v, then this
        problem's gradient (own + hypergradient) averaged once (one all-reduce)."""
        comm = self.comm
        assert comm is not None
        if not vectors:
            comm.mean_(own)
            return own
        lists = list(vectors.values())
        # (linear layers' factors, when captured, are gathered rather than all-reduced)
        comm.start_mean(global_factors(comm, lists) if self._captured
                        else [t for vec in lists for t in vec])
        hyper = self._hypergradient(vectors, params)
        comm.wait()
        torch._foreach_add_(own, hyper)
        if not self.config.check_finite or self._hypergrad_norm is None:
            comm.mean_(own)
            return own
        # every rank stops together: a flag (1 where this rank's norm is not finite)
        # travels in the gradient's all-reduce, in its dtype (0 and 1 are exact in any);
        # the mean is 0 only if every rank's flag is
        flag = (~torch.isfinite(self._hypergrad_norm)).reshape(1).to(own[0].dtype)
        comm.mean_([*own, flag])
        self._stop_if_not_finite(hyper, float(flag) == 0.0)
        return own

    # ----------------------------------------------------------------- step internals
    @property
    def device(self) -> torch.device:
        """Device of the first trainable parameter (CPU when there is none)."""
        return _device_of(self.trainable_parameters())

    def _draw_batches(self) -> list[Any]:
        """The step's micro-batches; ``cur_batch`` is the batch, or all of them."""
        n = self.config.gradient_accumulation
        batches = [self.get_batch()] if n == 1 else [self.get_batch() for _ in range(n)]
        params = self.trainable_parameters()
        if params:
            device = params[0].device
            batches = [self.batch_to_device(b, device) for b in batches]
        self.cur_batch = batches[0] if n == 1 else MicroBatches(batches)
        if self._snapshot is not None:  # roll_back: the unroll will be taken again
            self._unroll_batches.append(batches)
        return batches

    def _batch_losses(
        self, batches: Sequence[Any], record: bool, clone_others: bool = False,
        mean: bool = True,
    ) -> list[Tensor]:
        """training_step on each micro-batch under this problem's autocast, with the other
        problems as they are read (``as_read``); with ``record`` (and ``mean``) the mean
        loss becomes ``last_loss``."""
        losses = []
        precision = self.config.precision
        autocast = None if precision == "fp32" else autocast_for(precision, self.device)
        if autocast is None and not clone_others and not self._viewers:
            # nothing to enter: no autocast and every other problem reads as itself
            for b in batches:
                losses.append(self._loss_of(self.training_step(b), record=record))
        else:
            with autocast or nullcontext(), self._others_view(clone_others):
                for b in batches:
                    losses.append(self._loss_of(self.training_step(b), record=record))
        if record and mean:
            self.last_loss = _mean_loss(losses)
        return losses

    def _accumulated_gradients(
        self, batches: Sequence[Any], params: list[Tensor]
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """Mean over micro-batches of ∂L/∂θ_self and of ∂L/∂θ_read for each read problem,
        each micro-batch differentiated separately (unscaled if fp16 loss scaling is on)."""
        if self._scaler is None and len(batches) == 1:
            return self._single_batch_gradients(batches[0], params)
        self._captured = False  # (dense vectors: no capture on this path)
        scale = 1.0 if self._scaler is None else self._scaler.scale
        weight = scale / len(batches)
        own: list[Tensor] = []
        vectors: dict[str, list[Tensor]] = {}
        losses: list[Tensor] = []
        metrics: list[dict[str, Any]] = []
        for b in batches:
            (loss,) = self._batch_losses([b], record=True, mean=False)
            losses.append(loss)
            metrics.append(self.last_metrics)
            # (no multiply by a weight of 1: one kernel saved per step on small models)
            part_own, part_vectors = self._raw_gradients(
                loss if weight == 1.0 else loss * weight, params)
            if not own:
                own, vectors = part_own, part_vectors
            else:
                torch._foreach_add_(own, part_own)
                for name, vec in part_vectors.items():
                    torch._foreach_add_(vectors[name], vec)
        self.last_loss = _mean_loss(losses)
        if len(metrics) > 1:  # numeric metrics are averaged over the micro-batches
            self.last_metrics = {
                k: (sum(m[k] for m in metrics) / len(metrics)
                    if all(isinstance(m.get(k), int | float | Tensor)
                           and not isinstance(m.get(k), bool) for m in metrics) else v)
                for k, v in metrics[-1].items()
            }
        if scale != 1.0:
            torch._foreach_div_(own, scale)
            for vec in vectors.values():
                torch._foreach_div_(vec, scale)
        return own, vectors

    def _single_batch_gradients(
        self, batch: Any, params: list[Tensor]
    ) -> tuple[list[Tensor], dict[str, list[Tensor]]]:
        """``_accumulated_gradients`` for one micro-batch and no loss scaling (the common
        case): the same arithmetic, without the lists and the averaging of one value."""
        capture = self._linear_capture(params)
        self._captured = capture is not None  # (the same on every rank: see _global_gradients)
        with capture or nullcontext():
            if self._plain_loss:
                loss = self._loss_of(self.training_step(batch), record=True)
            else:
                (loss,) = self._batch_losses([batch], record=True, mean=False)
        # (``last_loss`` is the detached loss, widened to float32 from half precision)
        return self._raw_gradients(loss, params, capture=capture)

    def _linear_capture(self, params: list[Tensor]) -> LinearCapture | None:
        """A capture of the linear layers of every read problem whose method takes v in
        factors (``HypergradMethod.accepts_factors``: Darts, SAMA with SGD, forward mode), or
        None. fp32 only; weights this problem also trains are left alone. Under data
        parallelism the decision must be the same on every rank (``_global_gradients``
        gathers the factors): not under ZeRO, where a method's records (SAMA's) hold only
        the rank's shard of the parameters."""
        if not self._reads or self.config.precision != "fp32" or (
                self.comm is not None and self.comm.shards_optimizer_state):
            return None
        own = {id(p) for p in params}
        weights: dict[Hashable, Tensor] = {}
        for name, other in self._reads:
            if other.accepts_factored_vectors(self):
                for index, w in enumerate(other.read_parameters()):
                    if id(w) not in own:  # (LinearCapture keeps the matrices)
                        weights[(name, index)] = w
        return LinearCapture(weights) if weights else None

    def accepts_factored_vectors(self, upper: Problem) -> bool:
        """Whether this problem's best-response product for ``upper`` takes ``LinearFactors``
        in v (base problem: no)."""
        return False

    def _step_scheduler(self) -> None:
        if self.scheduler is None:
            return
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(self._scheduler_metric())
        else:
            self.scheduler.step()

    def _scheduler_metric(self) -> float:
        """The value a ReduceLROnPlateau scheduler steps with; under data parallelism its
        mean over the ranks (one all-reduce), so that every replica takes the same
        decision."""
        key = self.config.scheduler_metric
        if key == "loss":
            if self.last_loss is None:
                raise ZigguratError(f"problem '{self.name}' has no loss to feed its scheduler.")
            value = float(self.last_loss)
        elif key not in self.last_metrics:
            raise ConfigError(
                self.name, "config.scheduler_metric", key,
                f"'loss' or a metric returned by training_step ({sorted(self.last_metrics)})",
            )
        else:
            value = float(self.last_metrics[key])
        if self.comm is None:
            return value
        box = torch.tensor([value], dtype=torch.float64, device=self.comm.device)
        self.comm.mean_([box])
        return float(box)

    def _final_gradients(self, grads: list[Tensor], params: list[Tensor]) -> list[Tensor]:
        """Apply ``grad_callback`` (checking what it returns)."""
        replaced = self.grad_callback(grads)
        if replaced is not None:
            grads = list(replaced)
            if not linalg.same_shapes(grads, params):
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
        if isinstance(out, Tensor) and out.dim() == 0:  # the common case: a scalar loss
            if record:
                self.last_metrics = {}
                # (``_widened``, written out: it runs at every step; for a plain tensor
                # ``.data``, the detached alias without a dispatched op, as in ``_plain_step``)
                loss = out.data if type(out) is Tensor else out.detach()
                self.last_loss = loss.float() if loss.dtype in _HALF else loss
            return out
        if isinstance(out, Mapping):
            if "loss" not in out:
                raise ZigguratError(
                    f"training_step of problem '{self.name}' returned a dict without a 'loss' "
                    f"key (keys: {sorted(out)}); return the loss or {{'loss': loss, ...}}."
                )
            loss = out["loss"]
            if record:
                self.last_metrics = {k: v.detach() if isinstance(v, Tensor) else v
                                     for k, v in out.items() if k != "loss"}
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
        if loss.dim() != 0:
            loss = loss.reshape(())
        if record:
            self.last_loss = _widened(loss.detach())
        return loss

    def _raw_gradients(
        self, loss: Tensor, params: list[Tensor], create_graph: bool = False,
        capture: LinearCapture | None = None,
    ) -> tuple[list[Tensor], dict[str, list[Any]]]:
        """∂L/∂θ_self (with its graph when ``create_graph``) and, for each problem this one
        reads, the vector ∂L/∂θ_read (always a constant), in one backward pass. With a
        ``capture`` the same pass records the captured linear layers' factors, and those
        weights' entries of v come as ``LinearFactors``."""
        if self._graph is None:
            self._graph_or_error()
        if not self._reads:  # nothing read: the gradients of the own parameters only
            if not params:
                return [], {}
            raw = autograd_grad(loss, params, allow_unused=True, create_graph=create_graph)
            return _dense(raw, params), {}
        read = [name for name, _ in self._reads]
        read_params = [other.read_parameters() for _, other in self._reads]
        inputs = params + [p for ps in read_params for p in ps]
        if not inputs:
            return [], {}
        with capture.collect() if capture is not None else nullcontext():
            raw = autograd_grad(loss, inputs, allow_unused=True, create_graph=create_graph)
        factors = capture.factors() if capture is not None else {}
        grads = _dense(raw[:len(params)], params)
        vectors: dict[str, list[Any]] = {}
        offset = len(params)
        for name, ps in zip(read, read_params):
            chunk = raw[offset:offset + len(ps)]
            offset += len(ps)
            if all(g is None for g in chunk) and not any(
                    (name, i) in factors for i in range(len(ps))):
                raise HypergradientError(
                    f"the loss of problem '{self.name}' does not depend on the parameters of "
                    f"'{name}', although l2u says it reads them; use self.{name}(...) in "
                    f"training_step without detaching, or remove the l2u edge."
                )
            # (without create_graph autograd's results carry no graph: no detach needed;
            # a captured linear layer's entry is its factors and the rest R)
            vectors[name] = [factored_entry(g, p, factors[(name, i)]) if (name, i) in factors
                             else torch.zeros_like(p) if g is None
                             else (g.detach() if create_graph else g).contiguous()
                             for i, (p, g) in enumerate(zip(ps, chunk))]
        return grads, vectors

    def _hypergradient(
        self, vectors: Mapping[str, list[Tensor]], params: list[Tensor]
    ) -> list[Tensor]:
        """Σ over hypergradient paths of the vectors carried back to this problem."""
        paths = self._graph_or_error().paths[self.name]
        if len(paths) == 1:  # its vector is the sum (in the parameters' dtypes; no zeros)
            hyper = [h if h.dtype is p.dtype else h.to(p.dtype)
                     for h, p in zip(self._carried_back(paths[0], vectors), params)]
        else:
            hyper = [torch.zeros_like(p) for p in params]
            for path in paths:
                torch._foreach_add_(hyper, self._carried_back(path, vectors))
        norm = self._hypergrad_norm = linalg.norm(hyper)  # a tensor: no host sync here
        if self.config.check_finite and self.comm is None:  # (data parallel: below)
            self._stop_if_not_finite(hyper, math.isfinite(norm))
        return hyper

    def _step_number(self) -> int:
        """The number of the step being taken (1 for the first), for messages."""
        return self.count + 1

    def _stop_if_not_finite(self, hyper: list[Tensor], finite_norm: bool) -> None:
        """``check_finite``: stop with an error naming the problem, the step and the likely
        cause unless ``finite_norm`` (the hypergradient's norm is finite; under data
        parallelism, every rank's is)."""
        # a finite norm means every entry is finite (a NaN or Inf entry makes it NaN or
        # Inf); only a non-finite norm, or one that overflowed, needs the entrywise check
        if finite_norm or (self.comm is None and linalg.all_finite(hyper)):
            return
        bad = [i for i, h in enumerate(hyper) if not bool(torch.isfinite(h).all())]
        where = (f"NaN or Inf in parameters {bad}" if bad or self.comm is None
                 else "NaN or Inf on another rank")
        broken = [n for n, p in [(self.name, self), *self._others.items()]
                  if not linalg.all_finite(p.trainable_parameters())]
        cause = (f"The parameters of {broken} are not finite already: an earlier step "
                 f"made them so (check_finite checks the hypergradients received, not a "
                 f"problem's own gradient); look at that step's loss and learning rate."
                 if broken else
                 "Lower the learning rates, add CG damping, or check the Neumann alpha "
                 "of the problems below it.")
        raise HypergradientError(
            f"the hypergradient of problem '{self.name}' at its step {self._step_number()} is "
            f"not finite ({where}); the run is stopped. {cause}"
        )

    def _carried_back(self, path: tuple[str, ...], vectors: Mapping[str, list[Tensor]]
                      ) -> list[Tensor]:
        """The vector of ``path``'s last problem carried up the path to this problem, one
        best-response product per edge."""
        vec = vectors[path[-1]]
        for i in range(len(path) - 1, 0, -1):
            upper = self if i == 1 else self._others[path[i - 1]]
            vec = self._others[path[i]].best_response_vjp(vec, upper, key=path)
            if i > 1 and self.comm is not None:
                # data parallel: a product is this rank's part of the global one; the next
                # edge's method must see the global vector (it multiplies it by products
                # of its own rank's data), so it is averaged here, once per inner edge
                self.comm.mean_(vec)
        return vec

    def _gradients(
        self, loss: Tensor, params: list[Tensor], create_graph: bool = False
    ) -> list[Tensor]:
        """∂L/∂θ_self plus, for each hypergradient path, the carried-back vector (a
        constant; the direct part keeps its graph when ``create_graph``)."""
        grads, vectors = self._raw_gradients(loss, params, create_graph)
        if vectors:
            hyper = self._hypergradient(vectors, params)
            grads = [g + h for g, h in zip(grads, hyper)]
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
        params = self.trainable_parameters()
        device = _device_of(params)  # (``self.device``, without a second parameter check)
        return InnerObjective(
            params=params,
            upper_params=upper.read_parameters(),
            loss=lambda: self._recomputed_loss(batch, device),
            optimizer=self.optimizer,
            state=self.method_state,
            name=self.name,
            upper_name=upper.name,
            key=key,
            reduce=self.comm,
            module=self.module,
        )

    def accepts_factored_vectors(self, upper: Problem) -> bool:
        """Whether this problem's method takes v with ``LinearFactors`` for ``upper`` now
        (after a first step, no fp16 loss scaling)."""
        self._refresh_method()
        method = self.method
        return (self.count > 0 and self._scaler is None
                and isinstance(method, HypergradMethod)
                and method.accepts_factors(self.objective(upper)))

    def _recomputed_loss(self, batch: Any, device: torch.device) -> Tensor:
        """L_in on the step's batch (the mean over its micro-batches), autocast off on
        ``device`` (the parameters'): the hypergradient arithmetic runs in their dtype."""
        batches = list(batch) if isinstance(batch, MicroBatches) else [batch]
        # (autocast already off on the device: nothing to turn off, no context entered)
        precision = (full_precision(device) if autocast_enabled(device.type)
                     else nullcontext())
        with precision, self._others_view():
            losses = [self._loss_of(self.training_step(b)) for b in batches]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()

    def best_response_vjp(
        self, v: list[Tensor], upper: Problem, key: Hashable = None
    ) -> list[Tensor]:
        # the method re-evaluates training_step: keep buffers (BatchNorm statistics) as they were
        buffers = list(self.module.buffers())
        saved = [b.detach().clone() for b in buffers]
        self._refresh_method()
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

    def _method_prepares(self) -> bool:
        """True when the method records something before each optimizer step (SAMA) for an
        upper problem, or ``before_optimizer_step`` is overridden below this class."""
        method = self.method
        if _overrides(self, "before_optimizer_step", ImplicitProblem):
            return True
        return (isinstance(method, HypergradMethod) and self._graph is not None
                and bool(self._graph.parents[self.name])
                and type(method).before_optimizer_step is not HypergradMethod.before_optimizer_step)


#: hooks of the step that the step calls only when a problem overrides them
_STEP_HOOKS = ("grad_callback", "param_callback")
#: the methods ``step``'s direct path (``_plain_step``) goes around: a subclass replacing one
#: takes the general path
_DIRECT_SKIPS = ("_draw_batches", "_step_on")


def _overrides(problem: Problem, hook: str, base: type[Problem] = Problem) -> bool:
    """Whether ``problem`` replaces ``base``'s ``hook``, on its class or on itself."""
    return hook in problem.__dict__ or getattr(type(problem), hook) is not getattr(base, hook)


def _dense(raw: Sequence[Tensor | None], params: Sequence[Tensor]) -> list[Tensor]:
    """Gradients as contiguous tensors, zeros for unused parameters (autograd may hand back
    expanded, stride-0, views, which in-place sums cannot take)."""
    return [torch.zeros_like(p) if g is None else g if g.is_contiguous() else g.contiguous()
            for p, g in zip(params, raw)]


def _mean_loss(losses: Sequence[Tensor]) -> Tensor:
    """Detached mean of a step's micro-batch losses (half precision widened to float32)."""
    if len(losses) == 1:
        return _widened(losses[0].detach())
    return torch.stack([_widened(x.detach()) for x in losses]).mean()


_HALF = (torch.float16, torch.bfloat16)


def _widened(loss: Tensor) -> Tensor:
    """``loss`` in float32 when it is half precision, else itself."""
    return loss.float() if loss.dtype in _HALF else loss


def explain_missing_attribute(err: AttributeError) -> None:
    """Name the problem and the other problems of its program in an AttributeError that a
    problem raised for a missing attribute (``self.<typo>`` in a training step); in place,
    so the traceback stays. Other errors are left as they are."""
    problem = getattr(err, "obj", None)
    if (not isinstance(problem, Problem) or not isinstance(err.name, str)
            or getattr(err, "_ziggurat_explained", False)):
        return
    others = sorted(problem._others)
    err.args = (f"'{type(problem).__name__}' object (problem '{problem.name}') has no "
                f"attribute '{err.name}'"
                + (f"; problems in the program: {others}" if others else ""),)
    err._ziggurat_explained = True  # type: ignore[attr-defined]


def _device_of(params: Sequence[Tensor]) -> torch.device:
    """Device of the first parameter (CPU when there is none)."""
    return params[0].device if params else torch.device("cpu")
