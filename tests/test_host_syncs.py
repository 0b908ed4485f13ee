"""Host syncs per meta-iteration: what a GPU run waits for, pinned per method.

A read of a device tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``,
``.tolist()``, ``.numpy()``, a copy to the CPU) makes the host wait for the device's queued
work. The library's steps read as few values as they can; these tests pin how many, so
that a new read in a solver loop fails here, on the CPU, before it costs a GPU run.

Counted by a ``TorchFunctionMode`` (every Python-level tensor call passes through it):

* on a device other than the CPU (``pytest --device cuda``): every read of a tensor that is
  not on the CPU, and every copy from the device to the CPU; on CUDA, every synchronizing
  call besides (``torch.cuda.set_sync_debug_mode("warn")``: a blocking copy to the GPU, an
  op whose output size depends on values) must be one of those reads, so the count is
  exact;
* on the CPU (the proxy CI runs): every scalar read (``item`` ... ``numpy``), except of the
  step counters of torch.optim (on the CPU on every device, except a fused or capturable
  optimizer's on an accelerator) and of the functional optimizers' counters (on the CPU by
  construction; the device run checks that). Copies to the CPU are invisible on the CPU.

The expected counts: one read per hypergradient for ``Config.check_finite`` (the norm of
the hypergradient; none with ``check_finite=False``), one more for a finite-difference
mixed product (its radius ε = fd_eps/‖v‖ is a host number), one per CG iteration with a
``tol``; nothing else, in the lower steps or the solvers.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import ziggurat as zg
from ziggurat.hypergrad import sama
from ziggurat.optim import functional

from helpers import DTYPE

QUIET: dict[str, Any] = {"summary": False, "progress": "off"}

_T = torch.Tensor
#: Tensor methods that hand a value to the host
_READS = frozenset({_T.item, _T.tolist, _T.numpy, _T.__bool__, _T.__float__, _T.__int__,
                    _T.__index__, _T.__complex__})
_COPIES = frozenset({_T.to, _T.cpu, _T.copy_})
_ADVANCE = functional.FunctionalOptimizer._advance.__code__


class HostReads(TorchFunctionMode):
    """Counts host reads of device values (see the module docstring)."""

    def __init__(self, device: torch.device, cpu_counters: Callable[[], list[_T]]) -> None:
        super().__init__()
        self.device = device
        self.cpu_counters = cpu_counters
        self.reads: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        source = args[0] if args and isinstance(args[0], _T) else None
        if source is None:
            return out
        if self.device.type != "cpu":
            if func in _READS and source.device.type != "cpu":
                self._record(func)
            elif func in _COPIES:  # (copy_: the destination is args[0], the source args[1])
                src = args[1] if func is _T.copy_ else source
                dst = source if func is _T.copy_ else out
                if (isinstance(src, _T) and isinstance(dst, _T)
                        and src.device.type != "cpu" and dst.device.type == "cpu"):
                    self._record(func)
        elif func in _READS and not self._cpu_resident(source):
            self._record(func)
        return out

    def _cpu_resident(self, t: _T) -> bool:
        frame = sys._getframe(2)  # (the read's caller, or torch's dispatch just above it)
        for _ in range(3):
            if frame is None or frame.f_code is _ADVANCE:
                break
            frame = frame.f_back  # type: ignore[assignment]
        return ((frame is not None and frame.f_code is _ADVANCE)
                or any(t is c for c in self.cpu_counters()))

    def _record(self, func: Any) -> None:
        self.reads.append(f"{getattr(func, '__name__', func)} at {_library_line()}")


def _library_line() -> str:
    """The innermost line of the library's own code on the stack ("?" when none)."""
    frame: Any = sys._getframe(2)
    while frame is not None and "ziggurat" not in frame.f_code.co_filename.replace(
            "tests", ""):
        frame = frame.f_back
    return ("?" if frame is None
            else f"{frame.f_code.co_filename.split('ziggurat/')[-1]}:{frame.f_lineno}")


class CudaSyncs:
    """Every synchronizing CUDA call made inside, with the Python line that made it (on a
    CUDA device; elsewhere it records nothing)."""

    def __init__(self, device: torch.device) -> None:
        self.active = device.type == "cuda"
        self.syncs: list[str] = []
        self._caught = warnings.catch_warnings()
        self._before: int | str = 0
        self._previous: Callable[..., None] = warnings.showwarning

    def __enter__(self) -> CudaSyncs:
        if self.active:
            self._caught.__enter__()
            self._previous = warnings.showwarning
            warnings.simplefilter("always")
            warnings.showwarning = self._show
            self._before = torch.cuda.get_sync_debug_mode()
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: object) -> None:
        if self.active:
            torch.cuda.set_sync_debug_mode(self._before)
            self._caught.__exit__(None, None, None)

    def _show(self, message: Warning | str, category: type[Warning], filename: str,
              lineno: int, file: Any = None, line: str | None = None) -> None:
        if "synchroniz" in str(message):  # ("called a synchronizing CUDA operation")
            self.syncs.append(f"sync at {_library_line()}")
        else:
            self._previous(message, category, filename, lineno, file, line)


def _cpu_counters(optimizers: list[torch.optim.Optimizer]) -> Callable[[], list[_T]]:
    """The step counters of torch.optim that are on the CPU, at call time (all of them but
    those of fused or capturable optimizers on an accelerator)."""
    def counters() -> list[_T]:
        return [s["step"] for o in optimizers for g in o.param_groups
                for p in g["params"] if "step" in o.state.get(p, {})
                for s in [o.state[p]] if s["step"].device.type == "cpu"]
    return counters


class Program:
    """Meta-Weight-Net's structure, small, float64, on ``device`` (CPU loaders): a
    classifier 8-16-4 trained on V(ℓ_i.detach())·ℓ_i, the meta net V judged on a clean
    batch; the lower problem is implicit (``method``) or iterative (unrolled)."""

    def __init__(self, device: torch.device, method: Any, optimizer: str = "sgd",
                 check_finite: bool = True, iterative: bool = False,
                 **config: Any) -> None:
        torch.manual_seed(0)
        g = torch.Generator().manual_seed(0)
        self.classifier = torch.nn.Sequential(
            torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double().to(device)
        self.meta = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(),
                                        torch.nn.Linear(8, 1), torch.nn.Sigmoid()
                                        ).double().to(device)
        batches = [(torch.randn(32, 8, generator=g, dtype=DTYPE),
                    torch.randint(0, 4, (32,), generator=g)) for _ in range(3)]
        params = self.classifier.parameters()
        opt = {"sgd": lambda: torch.optim.SGD(params, lr=0.1, momentum=0.9),
               "adam": lambda: torch.optim.Adam(params, lr=1e-3),
               "adam-fused": lambda: torch.optim.Adam(params, lr=1e-3, fused=True),
               "adam-capturable": lambda: torch.optim.Adam(params, lr=1e-3, capturable=True)
               }[optimizer]()

        def weighted(p: zg.Problem, b: Any) -> _T:
            losses = F.cross_entropy(p(b[0]), b[1], reduction="none")
            return (p.meta(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

        cls = zg.IterativeProblem if iterative else zg.ImplicitProblem
        self.lower = cls("lower", self.classifier, opt, train_data_loader=batches,
                         training_step=weighted,
                         config=zg.Config(type=method, check_finite=check_finite, **config))
        self.upper = zg.ImplicitProblem(
            "meta", self.meta, torch.optim.Adam(self.meta.parameters(), lr=1e-3),
            train_data_loader=batches[::-1],
            config=zg.Config(check_finite=check_finite),
            training_step=lambda p, b: F.cross_entropy(p.lower(b[0]), b[1]))
        self.engine = zg.Engine([self.upper, self.lower], zg.chain(self.upper, self.lower),
                                zg.EngineConfig(train_iters=100, **QUIET))
        self.device = device

    @contextmanager
    def counting(self) -> Iterator[HostReads]:
        mode = HostReads(self.device, _cpu_counters([self.lower.optimizer,
                                                     self.upper.optimizer]))
        syncs = CudaSyncs(self.device)
        with syncs, mode:
            yield mode
        # every CUDA sync is a read the mode saw, at the same line (so the mode's count and
        # places are the syncs')
        assert not syncs.active or (sorted(s.split(" at ")[-1] for s in syncs.syncs)
                                    == sorted(r.split(" at ")[-1] for r in mode.reads)), (
            syncs.syncs, mode.reads)

    def hypergradients(self) -> int:
        return self.upper.count


def _reads_per_hypergradient(program: Program, steps: int, warmup: int = 4) -> list[str]:
    """The reads of ``steps`` engine steps after ``warmup`` (first steps build state),
    which must hold a whole number of hypergradients; returns the reads of one."""
    for _ in range(warmup):
        program.engine.train_step()
    before = program.hypergradients()
    with program.counting() as mode:
        for _ in range(steps):
            program.engine.train_step()
    n = program.hypergradients() - before
    assert n > 0, "the counted steps held a hypergradient"
    assert len(mode.reads) % n == 0, mode.reads
    return mode.reads[: len(mode.reads) // n]


#: (name, method factory, Program settings, reads per hypergradient beyond check_finite's)
CASES: list[tuple[str, Callable[[], Any], dict[str, Any], int]] = [
    ("darts-exact", lambda: zg.Darts(mixed="exact"), {}, 0),
    ("darts-forward", lambda: zg.Darts(mixed="forward"), {}, 0),
    ("darts-fd", lambda: zg.Darts(mixed="fd"), {}, 1),
    ("sama-sgd", lambda: zg.SAMA(), {}, 0),
    ("sama-adam", lambda: zg.SAMA(), {"optimizer": "adam"}, 0),
    ("neumann-3", lambda: zg.Neumann(iterations=3, alpha=0.1), {}, 0),
    ("cg-3", lambda: zg.CG(iterations=3), {}, 0),
    ("cg-3-tol", lambda: zg.CG(iterations=3, tol=1e-30), {}, 3),
    ("fixed-point-3", lambda: zg.FixedPoint(iterations=3, alpha=0.1), {}, 0),
    ("cg-roll-back", lambda: zg.CG(iterations=3), {"unroll_steps": 2, "roll_back": True}, 0),
    ("cg-accumulation-clipping", lambda: zg.CG(iterations=3),
     {"gradient_accumulation": 2, "gradient_clipping": 1.0}, 0),
    ("reverse-sgd", lambda: zg.Reverse(), {"iterative": True, "unroll_steps": 3}, 0),
    ("reverse-adam", lambda: zg.Reverse(),
     {"iterative": True, "unroll_steps": 3, "optimizer": "adam"}, 0),
    ("forward-adam", lambda: zg.Forward(),
     {"iterative": True, "unroll_steps": 3, "optimizer": "adam"}, 0),
    ("evolution-strategies", lambda: zg.EvolutionStrategies(samples=2, sigma=0.1),
     {"iterative": True, "unroll_steps": 2}, 0),
]


@pytest.mark.parametrize("check_finite", [True, False], ids=["check_finite", "unchecked"])
@pytest.mark.parametrize("name,method,settings,extra", CASES, ids=[c[0] for c in CASES])
def test_host_reads_per_hypergradient(device: torch.device, name: str,
                                      method: Callable[[], Any], settings: dict[str, Any],
                                      extra: int, check_finite: bool) -> None:
    program = Program(device, method(), check_finite=check_finite, **settings)
    unroll = settings.get("unroll_steps", 1)
    reads = _reads_per_hypergradient(program, steps=2 * unroll)
    assert len(reads) == extra + int(check_finite), reads


def test_lower_steps_read_nothing(device: torch.device) -> None:
    """The steps of an unroll (no hypergradient yet) read no device value."""
    program = Program(device, zg.CG(iterations=3), unroll_steps=5)
    program.engine.train_step()  # (the first step builds the optimizer state)
    with program.counting() as mode:
        for _ in range(3):
            program.engine.train_step()
    assert program.upper.count == 0
    assert mode.reads == []


@pytest.mark.parametrize("optimizer", ["adam-fused", "adam-capturable"])
@pytest.mark.parametrize("iterative", [False, True], ids=["sama-adam", "reverse-adam"])
def test_fused_adams_counters_are_read_once_not_per_parameter(device: torch.device,
                                                              iterative: bool,
                                                              optimizer: str) -> None:
    """Fused Adam keeps its step counters on the parameters' device: SAMA reads all of them
    in one transfer, and an unrolled problem moves them to the CPU once per unroll (where
    the functional step reads them without a sync), not one read per parameter and step.
    (With CPU parameters the counters are on the CPU: only check_finite's read.)"""
    if optimizer == "adam-capturable" and device.type == "cpu":
        pytest.skip("capturable Adam needs an accelerator: run with --device cuda")
    settings: dict[str, Any] = ({"iterative": True, "unroll_steps": 3} if iterative else {})
    program = Program(device, zg.Reverse() if iterative else zg.SAMA(),
                      optimizer=optimizer, **settings)
    reads = _reads_per_hypergradient(program, steps=2 * settings.get("unroll_steps", 1))
    counters = 0 if device.type == "cpu" else 1  # (the counters' one transfer)
    assert len(reads) == 1 + counters, reads  # check_finite's, and the counters''


def test_step_counts_reads_counters_on_any_device(device: torch.device) -> None:
    """``sama.step_counts``: the values, from CPU counters, device counters (stacked: one
    transfer) and plain numbers, in order."""
    counters: list[Any] = [torch.tensor(3.0), torch.tensor(5.0, device=device), 7.0,
                           torch.tensor(2.0, dtype=torch.float64, device=device)]
    assert sama.step_counts(counters) == [3.0, 5.0, 7.0, 2.0]
    assert sama.step_counts([]) == []


def test_from_torch_keeps_step_counters_on_the_cpu(device: torch.device) -> None:
    """A fused Adam's counters (on the parameters' device) come out of ``from_torch`` on
    the CPU in the functional optimizers' dtype, with their values; ``write_back`` returns
    them to the device as fused Adam needs them, and torch continues from there."""
    w = torch.nn.Parameter(torch.randn(3, device=device))
    b = torch.nn.Parameter(torch.randn(2, device=device))
    opt = torch.optim.Adam([w, b], lr=0.1, fused=True)
    for _ in range(3):
        (w.square().sum() + b.square().sum()).backward()
        opt.step()
        opt.zero_grad()
    _, state, _ = zg.optim.from_torch(opt, [w, b])
    for s in state:
        assert s["step"].device.type == "cpu" and s["step"].dtype == functional.zero_step().dtype
        assert float(s["step"]) == 3.0
    zg.optim.write_back(opt, [w, b], state)
    for p in (w, b):
        assert opt.state[p]["step"].device == p.device and float(opt.state[p]["step"]) == 3.0
    (w.square().sum() + b.square().sum()).backward()
    opt.step()
    assert float(opt.state[w]["step"]) == 4.0
