"""Framework overhead on a small model: logistic-regression HPO, 100-step inner loops.

The program: per-feature L2 weights exp(λ) (upper, Adam) for a logistic regression θ
(lower, SGD) trained for --unroll steps on BCE + ½ Σ exp(λ_j) θ_j²; the upper loss is BCE
on a validation batch; the hypergradient is Darts' identity approximation with the exact
mixed product (v = ∇_θ L_val, then −∂²_{λθ} L_in · v by double backward).

One outer iteration (100 lower steps and one upper step) is timed for ziggurat, for a
hand-written PyTorch loop doing the same arithmetic (same optimizers, same autograd calls),
for Betty 0.2.1 and TorchOpt 0.7.3 when installed; median of --repeats, timed in alternation.

    python benchmarks/overhead.py
    python benchmarks/overhead.py --parts   # + where ziggurat's overhead sits
    python benchmarks/overhead.py --by-step --repeats 40  # each step timed on its own
    python benchmarks/overhead.py --copies 3  # each loop built 3 times (memory layout)
    python benchmarks/overhead.py --against HEAD~1  # + the library at a git ref, same rounds
    python benchmarks/overhead.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from workloads import (
    interleaved_times,
    median_ratios,
    optimizer_steps,
    optional,
    skip_message,
    sync,
)

from ziggurat import backward

FEATURES = 50
SAMPLES = 256


class Data:
    def __init__(self, device: str, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(FEATURES, 1, generator=g)
        self.x = torch.randn(SAMPLES, FEATURES, generator=g).to(device)
        self.y = (self.x.cpu() @ w + torch.randn(SAMPLES, 1, generator=g) > 0).float().to(device)
        self.xv = torch.randn(SAMPLES, FEATURES, generator=g).to(device)
        self.yv = (self.xv.cpu() @ w > 0).float().to(device)

    def epoch(self, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A loader of ``batches`` batches (the same training batch, as in the hand-written
        loop), so that a pass over it spans one outer iteration."""
        return [(self.x, self.y)] * batches


class Decay(torch.nn.Module):
    """λ: log of the per-feature L2 weights."""

    def __init__(self) -> None:
        super().__init__()
        self.log_decay = torch.nn.Parameter(torch.full((FEATURES,), -2.0))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return 0.5 * (self.log_decay.exp() * weight.squeeze(0) ** 2).sum()


def models(device: str) -> tuple[torch.nn.Linear, Decay]:
    torch.manual_seed(0)
    return torch.nn.Linear(FEATURES, 1).to(device), Decay().to(device)


def inner_loss(model: torch.nn.Linear, decay: Decay, x: torch.Tensor,
               y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(model(x), y) + decay(model.weight)


def hand_written_steps(d: Data, device: str, grad: Callable[..., Any] = torch.autograd.grad
                       ) -> tuple[Callable[[], None], Callable[[], None]]:
    """The hand-written lower step and upper step (on models of their own)."""
    model, decay = models(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta_opt = torch.optim.Adam(decay.parameters(), lr=0.01)
    params, lam = list(model.parameters()), list(decay.parameters())

    def lower_step() -> None:
        grads = grad(inner_loss(model, decay, d.x, d.y), params)
        for p, g in zip(params, grads):
            p.grad = g
        opt.step()

    def upper_step() -> None:
        v = grad(F.binary_cross_entropy_with_logits(model(d.xv), d.yv), params)
        g = grad(inner_loss(model, decay, d.x, d.y), params, create_graph=True)
        mixed = grad(g, lam, v)
        for p, m in zip(lam, mixed):
            p.grad = -m
        meta_opt.step()

    return lower_step, upper_step


def hand_written(d: Data, device: str, unroll: int,
                 grad: Callable[..., Any] = torch.autograd.grad) -> Callable[[], None]:
    """The loop in plain PyTorch; with ``grad=ziggurat.backward.grad`` the same loop with
    the gradient front end ziggurat's steps use (the difference between that loop and
    ziggurat's is the library's own bookkeeping alone)."""
    lower_step, upper_step = hand_written_steps(d, device, grad)

    def outer_iteration() -> None:
        for _ in range(unroll):
            lower_step()
        upper_step()

    return outer_iteration


def step_times(d: Data, device: str, unroll: int, repeats: int) -> None:
    """``--by-step``: each step of an outer iteration timed on its own, ziggurat's
    ``train_step`` calls and the hand-written steps in alternating outer iterations
    (median over ``repeats``); ziggurat's upper step is its last ``train_step`` less its
    median lower step."""
    if unroll < 3:
        raise SystemExit("--by-step separates the upper step from the lower steps around "
                         "it: use --unroll 3 or more")
    lower, upper = hand_written_steps(d, device)
    engine: Any = ziggurat_program(d, device, unroll)
    hand: list[list[float]] = [[] for _ in range(unroll + 1)]
    ours: list[list[float]] = [[] for _ in range(unroll)]

    def timed(fn: Callable[[], Any]) -> float:
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - start

    for r in range(repeats + 2):  # (two warm-up rounds)
        zig = [timed(engine.train_step) for _ in range(unroll)]
        own = [timed(lower) for _ in range(unroll)] + [timed(upper)]
        if r >= 2:
            for bucket, t in zip(ours, zig):
                bucket.append(t)
            for bucket, t in zip(hand, own):
                bucket.append(t)
    h = [statistics.median(b) * 1e6 for b in hand]
    z = [statistics.median(b) * 1e6 for b in ours]
    h_mid = statistics.median(h[1:unroll])
    z_mid = statistics.median(z[1:unroll - 1])
    print(f"each step on its own (µs, median of {repeats} outer iterations, "
          f"{unroll} lower steps each)")
    print("| step | hand-written | ziggurat |")
    print("|---|---|---|")
    print(f"| first lower step | {h[0]:.0f} | {z[0]:.0f} |")
    print(f"| other lower steps (median) | {h_mid:.0f} | {z_mid:.0f} |")
    print(f"| upper step | {h[unroll]:.0f} | {z[unroll - 1] - z_mid:.0f} |")
    print(f"| outer iteration (sum) | {sum(h):.0f} | {sum(z):.0f} |")


def ziggurat_program(d: Data, device: str, unroll: int, batches: int | None = None,
                     zg: Any = None) -> object:
    """The program as a ziggurat ``Engine`` (upper problem "decay", lower "model"; a pass
    over the lower data is ``batches`` steps, ``unroll`` by default), built with the
    package ``zg`` (``ziggurat`` by default; ``--against`` passes an older copy)."""
    if zg is None:
        import ziggurat as zg

    model, decay = models(device)
    lower = zg.ImplicitProblem(
        name="model", module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        train_data_loader=d.epoch(unroll if batches is None else batches),
        config=zg.Config(type=zg.Darts(), unroll_steps=unroll),
        training_step=lambda p, b: inner_loss(p.module, p.decay.module, b[0], b[1]))
    upper = zg.ImplicitProblem(
        name="decay", module=decay, optimizer=torch.optim.Adam(decay.parameters(), lr=0.01),
        train_data_loader=[(d.xv, d.yv)],
        training_step=lambda p, b: F.binary_cross_entropy_with_logits(p.model(b[0]), b[1]))
    return zg.Engine([upper, lower], zg.chain(upper, lower),
                     zg.EngineConfig(train_iters=1, summary=False, progress="off"))


def ziggurat_loop(d: Data, device: str, unroll: int, zg: Any = None) -> Callable[[], None]:
    engine: Any = ziggurat_program(d, device, unroll, zg=zg)

    def outer_iteration() -> None:
        for _ in range(unroll):
            engine.train_step()

    return outer_iteration


def ziggurat_parts(d: Data, device: str, unroll: int) -> list[tuple[str, Callable[[], None]]]:
    """Where ziggurat's overhead sits (``--parts``): ``unroll`` lower steps through
    ``Problem.step`` alone, and through ``Engine.train_step`` with an upper problem that
    never becomes ready (the schedule's bookkeeping without the upper step)."""
    alone: Any = ziggurat_program(d, device, unroll)
    lower = alone.model
    never: Any = ziggurat_program(d, device, 10**9, batches=unroll)

    def lower_steps() -> None:
        for _ in range(unroll):
            lower.step()

    def scheduled_steps() -> None:
        for _ in range(unroll):
            never.train_step()

    return [("ziggurat, lower steps alone", lower_steps),
            ("ziggurat, scheduled lower steps", scheduled_steps)]


def betty_loop(d: Data, device: str, unroll: int) -> Callable[[], None] | None:
    if optional("betty") is None:
        print(skip_message("betty"), file=sys.stderr)
        return None
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    class Inner(ImplicitProblem):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return (F.binary_cross_entropy_with_logits(self.module(x), y)
                    + self.decay(self.module.weight))

    class Outer(ImplicitProblem):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return F.binary_cross_entropy_with_logits(self.model(x), y)

    model, decay = models(device)
    inner = Inner(name="model", module=model, optimizer=torch.optim.SGD(model.parameters(),
                                                                        lr=0.1),
                  train_data_loader=d.epoch(unroll), config=Config(type="darts",
                                                                unroll_steps=unroll))
    outer = Outer(name="decay", module=decay,
                  optimizer=torch.optim.Adam(decay.parameters(), lr=0.01),
                  train_data_loader=[(d.xv, d.yv)], config=Config())
    engine = Engine(problems=[outer, inner],
                    dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    config=EngineConfig(train_iters=10**9, logger_type="none"))

    def outer_iteration() -> None:
        for _ in range(unroll):
            engine.global_step += 1
            engine.train_step()

    return outer_iteration


def torchopt_loop(d: Data, device: str, unroll: int) -> Callable[[], None] | None:
    """TorchOpt 0.7.3: the lower loop (the same SGD steps as the hand-written one) as the
    solver of ``torchopt.diff.implicit.custom_root`` on F(θ, λ) = ∇_θ L_in = 0, with the
    linear solve ``solve_inv(ns=True, maxiter=0)`` (the Neumann series' first term, x = v:
    Darts' identity approximation), so λ's gradient is −∂²_{λθ} L_in · v at θ after the
    loop, as in the other loops. TorchOpt also linearizes F in θ for the solve's matvec,
    which the identity solve never calls: one gradient evaluation per upper step more."""
    torchopt = optional("torchopt")
    if torchopt is None:
        print(skip_message("torchopt"), file=sys.stderr)
        return None
    import warnings

    from torch.func import functional_call, grad

    # TorchOpt 0.7.3 calls functorch.vjp, which warns on every torch >= 2.0
    warnings.filterwarnings("ignore", "We've integrated functorch", FutureWarning)
    model, decay = models(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    meta_opt = torch.optim.Adam(decay.parameters(), lr=0.01)
    params, lam = tuple(model.parameters()), tuple(decay.parameters())
    names = [n for n, _ in model.named_parameters()]

    def objective(params: tuple[torch.Tensor, ...], lam: tuple[torch.Tensor, ...],
                  x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        theta = dict(zip(names, params))
        return (F.binary_cross_entropy_with_logits(functional_call(model, theta, (x,)), y)
                + functional_call(decay, {"log_decay": lam[0]}, (theta["weight"],)))

    @torchopt.diff.implicit.custom_root(grad(objective, argnums=0), argnums=1,
                                        solve=torchopt.linear_solve.solve_inv(ns=True,
                                                                              maxiter=0))
    def lower_loop(params: tuple[torch.Tensor, ...], lam: tuple[torch.Tensor, ...],
                   x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return optimizer_steps(lambda: inner_loss(model, decay, x, y), params, opt, unroll)

    def outer_iteration() -> None:
        theta = lower_loop(params, lam, d.x, d.y)
        meta_opt.zero_grad(set_to_none=True)
        logits = functional_call(model, dict(zip(names, theta)), (d.xv,))
        F.binary_cross_entropy_with_logits(logits, d.yv).backward()
        meta_opt.step()

    return outer_iteration


def ziggurat_at(ref: str) -> tuple[str, Any]:
    """The ``ziggurat`` package as committed at git ``ref``, imported under another name
    (``git archive`` into a temporary folder; the package's own imports are relative), and
    the short commit it resolved to."""
    import importlib
    import io
    import subprocess
    import tarfile
    import tempfile
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=root, check=True,
                         capture_output=True, text=True).stdout.strip()
    archive = subprocess.run(["git", "archive", sha, "ziggurat"], cwd=root, check=True,
                             capture_output=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="ziggurat-at-"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    name = f"ziggurat_{sha}"
    (folder / "ziggurat").rename(folder / name)
    sys.path.insert(0, str(folder))
    return sha, importlib.import_module(name)


def together(loops: list[Callable[[], None]]) -> Callable[[], None]:
    """One outer iteration of each copy of a loop, as one timed call."""
    if len(loops) == 1:
        return loops[0]

    def run() -> None:
        for loop in loops:
            loop()

    return run


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--unroll", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 by default: a small model)")
    parser.add_argument("--quick", action="store_true", help="smoke check: 10 steps, 2 repeats")
    parser.add_argument("--copies", type=int, default=1,
                        help="build each loop this many times and time the copies together "
                             "(averages over where each copy's objects sit in memory: "
                             "copies of the ziggurat loop differ by up to 4 %%)")
    parser.add_argument("--against", metavar="REF",
                        help="also time the ziggurat loop built with the library as committed "
                             "at this git ref (a before/after comparison in the same rounds; "
                             "identical code differs by ~0.2 points at unroll 100, by 4-6 at "
                             "unroll 1)")
    parser.add_argument("--by-step", action="store_true",
                        help="time each step of an outer iteration on its own (first and "
                             "other lower steps, the upper step) instead of the loops")
    parser.add_argument("--parts", action="store_true",
                        help="also time ziggurat's lower steps alone and scheduled without "
                             "the upper step (where its overhead sits)")
    args = parser.parse_args(argv)
    if args.quick:
        args.unroll, args.repeats = 10, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    d = Data(args.device)
    if args.by_step:
        step_times(d, args.device, args.unroll, args.repeats)
        return
    against = None if args.against is None else ziggurat_at(args.against)
    built: dict[str, list[Callable[[], None]]] = {}
    for _ in range(max(1, args.copies)):
        loops: list[tuple[str, Callable[[], None] | None]] = [
                 ("hand-written", hand_written(d, args.device, args.unroll)),
                 ("hand-written with ziggurat.backward.grad",
                  hand_written(d, args.device, args.unroll, grad=backward.grad)),
                 ("ziggurat", ziggurat_loop(d, args.device, args.unroll))]
        if against is not None:
            loops.append((f"ziggurat at {args.against} ({against[0]})",
                          ziggurat_loop(d, args.device, args.unroll, zg=against[1])))
        if args.parts:
            loops += ziggurat_parts(d, args.device, args.unroll)
        loops += [("betty 0.2.1", betty_loop(d, args.device, args.unroll)),
                  ("torchopt 0.7.3", torchopt_loop(d, args.device, args.unroll))]
        for label, fn in loops:
            if fn is not None:  # (a peer that is not installed)
                built.setdefault(label, []).append(fn)
    labels = list(built)
    fns = [together(built[label]) for label in labels]
    rounds = interleaved_times(fns, args.repeats, args.device, warmup=2)
    times = [statistics.median(t) for t in rounds]
    ratios = median_ratios(rounds)
    print(f"logistic-regression HPO, {args.unroll} lower steps per upper step, "
          f"median of {args.repeats}"
          + (f", {args.copies} copies of each loop" if args.copies > 1 else ""))
    print("| loop | ms per outer iteration | overhead vs hand-written (median of per-round "
          "ratios) |")
    print("|---|---|---|")
    for label, t, r in zip(labels, times, ratios):
        print(f"| {label} | {t * 1e3:.1f} | {100 * (r - 1):+.1f} % |")


if __name__ == "__main__":
    main()
