"""Meta-iteration cost on the reweighting structure, ziggurat against peer libraries.

One meta-iteration = one lower step of the classifier on mean_i V(ℓ_i.detach()) ℓ_i plus
one upper step of the meta net V through the chosen hypergradient method (unroll 1).
Reported per configuration (each in its own process, so peak memory is its own):

* seconds per meta-iteration (median of --repeats),
* its ratio to a plain training step of the same classifier (same optimizer kind), timed
  in alternation with it in the same process,
* the peak-memory rise over the footprint before the first meta-iteration (resident MB on
  CPU, allocated MB on CUDA), over the first two meta-iterations.

    python benchmarks/meta_iteration.py                      # 2M and 8M, every method
    python benchmarks/meta_iteration.py --sizes 32M --methods darts cg-3
    python benchmarks/meta_iteration.py --quick              # smoke check, seconds
    python benchmarks/meta_iteration.py --device cuda --in-process

Peers (Betty 0.2.1; higher 0.2.1 for the one-step unrolled program, its "darts" row;
TorchOpt 0.7.3: implicit differentiation with its CG / Neumann linear solvers for the cg-k /
neumann-k rows, one unrolled `MetaSGD` step for darts) are run when importable and skipped
with a message otherwise.

    python benchmarks/meta_iteration.py --check   # TorchOpt's hypergradients = ziggurat's
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import subprocess
import sys
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from workloads import (
    SIZES,
    Workload,
    interleaved_medians,
    lower_optimizer,
    optimizer_steps,
    optional,
    peak,
    plain_step_fn,
    reset_peak,
    skip_message,
    weighted_loss,
    workload,
)

METHODS = ("darts", "sama-sgd", "sama-adam", "neumann-1", "neumann-3", "cg-1", "cg-3")
LIBRARIES = ("ziggurat", "betty", "higher", "torchopt")
NEUMANN_ALPHA = 0.1
META_LR = 1e-3


def optimizer_kind(method: str) -> str:
    return "adam" if method == "sama-adam" else "sgd"


# --------------------------------------------------------------------------- ziggurat
def meta_adam(params: object) -> torch.optim.Optimizer:
    """The upper optimizer of every library's program: Adam, lr 1e-3."""
    return torch.optim.Adam(params, lr=META_LR)  # type: ignore[arg-type]


MetaOptimizer = Callable[[object], torch.optim.Optimizer]


def ziggurat_iteration(w: Workload, method: str, mixed: str = "auto",
                       meta_optimizer: MetaOptimizer = meta_adam,
                       cg_damping: float = 0.0) -> Callable[[], None]:
    import ziggurat as zg

    name, _, k = method.partition("-")
    hyper: zg.HypergradMethod
    if name == "darts":
        hyper = zg.Darts(mixed=mixed)  # type: ignore[arg-type]
    elif name == "sama":
        hyper = zg.SAMA(mixed=mixed)  # type: ignore[arg-type]
    elif name == "neumann":
        hyper = zg.Neumann(iterations=int(k), alpha=NEUMANN_ALPHA,
                           mixed=mixed)  # type: ignore[arg-type]
    else:
        hyper = zg.CG(iterations=int(k), damping=cg_damping,
                      mixed=mixed)  # type: ignore[arg-type]
    lower = zg.ImplicitProblem(
        name="classifier", module=w.classifier,
        optimizer=lower_optimizer(optimizer_kind(method), w.classifier.parameters()),
        train_data_loader=[(w.x, w.y)], config=zg.Config(type=hyper),
        training_step=lambda p, b: weighted_loss(p.module, p.meta.module, b[0], b[1]))
    upper = zg.ImplicitProblem(
        name="meta", module=w.meta, optimizer=meta_optimizer(w.meta.parameters()),
        train_data_loader=[(w.xm, w.ym)],
        training_step=lambda p, b: F.cross_entropy(p.classifier(b[0]), b[1]))
    engine = zg.Engine([upper, lower], zg.chain(upper, lower),
                       zg.EngineConfig(train_iters=1, summary=False, progress="off"))

    def iteration() -> None:
        stepped = engine.train_step()
        assert stepped == ["classifier", "meta"], stepped

    return iteration


# --------------------------------------------------------------------------- Betty 0.2.1
def betty_iteration(w: Workload, method: str) -> Callable[[], None] | None:
    betty = optional("betty")
    if betty is None:
        print(skip_message("betty"), file=sys.stderr)
        return None
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    class Inner(ImplicitProblem):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            losses = F.cross_entropy(self.module(x), y, reduction="none")
            weights = self.meta(losses.detach().unsqueeze(1)).squeeze(1)
            return (weights * losses).mean()

    class Outer(ImplicitProblem):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.classifier(x), y)

    name, _, k = method.partition("-")
    settings: dict[str, object] = {"type": name, "unroll_steps": 1}
    if name == "neumann":
        settings.update(neumann_iterations=int(k), neumann_alpha=NEUMANN_ALPHA)
    elif name == "cg":
        settings.update(cg_iterations=int(k))
    inner = Inner(name="classifier", module=w.classifier,
                  optimizer=lower_optimizer(optimizer_kind(method), w.classifier.parameters()),
                  train_data_loader=[(w.x, w.y)], config=Config(**settings))
    outer = Outer(name="meta", module=w.meta,
                  optimizer=torch.optim.Adam(w.meta.parameters(), lr=META_LR),
                  train_data_loader=[(w.xm, w.ym)], config=Config())
    engine = Engine(problems=[outer, inner],
                    dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                    config=EngineConfig(train_iters=10**9, logger_type="none"))

    def iteration() -> None:
        engine.global_step += 1
        engine.train_step()

    return iteration


# --------------------------------------------------------------------------- higher
def higher_iteration(w: Workload, method: str) -> Callable[[], None] | None:
    """The one-step unrolled program (exact reverse mode through one SGD step with
    momentum): what higher expresses of this workload; compared with ziggurat's darts."""
    higher = optional("higher")
    if higher is None:
        print(skip_message("higher"), file=sys.stderr)
        return None
    if method != "darts":
        return None
    opt = lower_optimizer("sgd", w.classifier.parameters())
    meta_opt = torch.optim.Adam(w.meta.parameters(), lr=META_LR)

    def iteration() -> None:
        # lower step on a differentiable copy, upper step through it, then the real step
        meta_opt.zero_grad(set_to_none=True)
        with higher.innerloop_ctx(w.classifier, opt, copy_initial_weights=True) as (fm, dopt):
            dopt.step(weighted_loss(fm, w.meta, w.x, w.y))
            F.cross_entropy(fm(w.xm), w.ym).backward()
        meta_opt.step()
        opt.zero_grad(set_to_none=True)
        loss = weighted_loss(w.classifier, w.meta, w.x, w.y)
        loss.backward()
        opt.step()

    return iteration


# --------------------------------------------------------------------------- TorchOpt 0.7.3
def torchopt_iteration(w: Workload, method: str, meta_optimizer: MetaOptimizer = meta_adam,
                       cg_damping: float = 0.0,
                       darts: str = "metasgd") -> Callable[[], None] | None:
    """TorchOpt's programs for the rows it can express (None for sama-*, which it has no
    method for).

    cg-k / neumann-k: implicit differentiation (``torchopt.diff.implicit.custom_root``) of
    the optimality condition F(θ, λ) = ∇_θ L_in(θ, λ) = 0 at θ after the lower step, with
    ``linear_solve.solve_cg(maxiter=k)`` (from x₀ = 0; rtol 0 so all k iterations run) or
    ``linear_solve.solve_inv(ns=True, maxiter=k, alpha=0.1)`` (x = α Σ_{j=0}^{k} (I − αH)^j v):
    the same quantity as ziggurat's CG(k) / Neumann(k, α = 0.1), except that ziggurat's CG
    stops moving at the first search direction of non-positive curvature (its breakdown
    guard) and TorchOpt's takes the step: on this workload H is indefinite and the second
    direction has pᵀHp < 0, so cg-k for k ≥ 2 differs in value (ziggurat still takes its k
    products; TorchOpt takes k + 1, one for the first residual at x₀ = 0). ``cg_damping`` δ
    solves with H + δI on both sides. The decorated "solver" is
    the real lower step (SGD with momentum) and returns θ after it.

    darts="metasgd" (the default): one unrolled ``torchopt.MetaSGD`` step (lr 0.1, momentum
    0.9) on a copy of the classifier, the upper loss's gradient through it to λ
    (−lr · ∂²_{λθ} L_in(θ) · v with v at θ after the step), then the step kept with
    ``torchopt.stop_gradient``: the program higher's darts row runs, not ziggurat's identity
    approximation at θ after the step. darts="implicit": ``custom_root`` with
    ``solve_inv(ns=True, maxiter=0)`` (x = v), which is ziggurat's Darts exactly.
    """
    torchopt = optional("torchopt")
    if torchopt is None:
        print(skip_message("torchopt"), file=sys.stderr)
        return None
    # TorchOpt 0.7.3 calls functorch.vjp, which warns on every torch >= 2.0
    warnings.filterwarnings("ignore", "We've integrated functorch", FutureWarning)
    name, _, k = method.partition("-")
    if name == "darts" and darts == "metasgd":
        return _torchopt_unrolled(torchopt, w, meta_optimizer)
    if name == "darts":
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=0)
    elif name == "cg":
        solve = torchopt.linear_solve.solve_cg(maxiter=int(k), rtol=0.0, atol=0.0,
                                               ridge=cg_damping or None)
    elif name == "neumann":
        solve = torchopt.linear_solve.solve_inv(ns=True, maxiter=int(k), alpha=NEUMANN_ALPHA)
    else:
        return None
    return _torchopt_implicit(torchopt, w, solve, optimizer_kind(method), meta_optimizer)


def _functional_weighted_loss(w: Workload) -> Callable[..., torch.Tensor]:
    """L_in(θ, λ; x, y) = mean_i V_λ(ℓ_i(θ).detach()) ℓ_i(θ) with θ and λ as tuples, for
    TorchOpt's functorch-based implicit differentiation."""
    from torch.func import functional_call

    names = [n for n, _ in w.classifier.named_parameters()]
    meta_names = [n for n, _ in w.meta.named_parameters()]

    def loss(params: tuple[torch.Tensor, ...], meta_params: tuple[torch.Tensor, ...],
             x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = functional_call(w.classifier, dict(zip(names, params)), (x,))
        losses = F.cross_entropy(logits, y, reduction="none")
        weights = functional_call(w.meta, dict(zip(meta_names, meta_params)),
                                  (losses.detach().unsqueeze(1),)).squeeze(1)
        return (weights * losses).mean()

    return loss


def _torchopt_implicit(torchopt: ModuleType, w: Workload, solve: Callable[..., object],
                       kind: str, meta_optimizer: MetaOptimizer) -> Callable[[], None]:
    from torch.func import functional_call, grad

    objective = _functional_weighted_loss(w)
    params = tuple(w.classifier.parameters())
    meta_params = tuple(w.meta.parameters())
    names = [n for n, _ in w.classifier.named_parameters()]
    opt = lower_optimizer(kind, params)
    meta_opt = meta_optimizer(meta_params)

    @torchopt.diff.implicit.custom_root(grad(objective, argnums=0), argnums=1, solve=solve)
    def lower_step(params: tuple[torch.Tensor, ...], meta_params: tuple[torch.Tensor, ...],
                   x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return optimizer_steps(lambda: objective(params, meta_params, x, y), params, opt)

    def iteration() -> None:
        theta = lower_step(params, meta_params, w.x, w.y)
        meta_opt.zero_grad(set_to_none=True)
        logits = functional_call(w.classifier, dict(zip(names, theta)), (w.xm,))
        F.cross_entropy(logits, w.ym).backward()
        meta_opt.step()

    return iteration


def _torchopt_unrolled(torchopt: ModuleType, w: Workload,
                       meta_optimizer: MetaOptimizer) -> Callable[[], None]:
    # MetaSGD replaces the module's parameters by the stepped tensors, so it steps a copy
    # (the plain step's optimizer keeps the classifier's own parameters)
    net = copy.deepcopy(w.classifier)
    inner = torchopt.MetaSGD(net, lr=0.1, momentum=0.9)
    meta_params = list(w.meta.parameters())
    meta_opt = meta_optimizer(meta_params)

    def iteration() -> None:
        inner.step(weighted_loss(net, w.meta, w.x, w.y))  # differentiable in λ
        meta_opt.zero_grad(set_to_none=True)
        # inputs=λ: no gradient to the pre-step θ, which nothing uses
        F.cross_entropy(net(w.xm), w.ym).backward(inputs=meta_params)
        meta_opt.step()
        torchopt.stop_gradient(net)
        torchopt.stop_gradient(inner)

    return iteration


# --------------------------------------------------------------------------- correctness
def _unit_sgd(params: object) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=1.0)  # type: ignore[arg-type]


def _double(w: Workload) -> Workload:
    return Workload(w.classifier.double(), w.meta.double(), w.x.double(), w.y,
                    w.xm.double(), w.ym)


def check_torchopt(method: str, hidden: int = 16, seed: int = 0,
                   cg_damping: float = 0.0, darts: str = "metasgd") -> float:
    """‖g_TorchOpt − g_ziggurat‖ / ‖g_ziggurat‖ for the meta net's hypergradient g after one
    meta-iteration from the same float64 initial state (the upper optimizer is SGD with lr 1,
    so g is read from the change of λ).

    cg-k / neumann-k: ziggurat's program of the same row (Engine, CG(k) / Neumann(k, 0.1),
    exact mixed product) against ``torchopt_iteration``; cg-k with k ≥ 2 needs
    ``cg_damping`` large enough that H + δI is positive definite on the Krylov directions
    (ziggurat's breakdown guard otherwise stops where TorchOpt's CG goes on). darts:
    TorchOpt's one unrolled MetaSGD step against ziggurat's ``Darts(scale=lr)`` evaluated
    at θ before the step with v = ∇_θ L_out at θ after it (the one-step unrolled
    hypergradient; ziggurat's darts row evaluates at θ after the step with scale 1). With
    darts="implicit" (TorchOpt's identity solve), against ziggurat's darts row itself."""
    import ziggurat as zg

    def change(run: Callable[[Workload], Callable[[], None] | None]) -> list[torch.Tensor]:
        w = _double(workload(hidden, "cpu", seed))
        before = [p.detach().clone() for p in w.meta.parameters()]
        iteration = run(w)
        assert iteration is not None
        iteration()
        return [b - p.detach() for b, p in zip(before, w.meta.parameters())]

    got = change(lambda w: torchopt_iteration(w, method, _unit_sgd, cg_damping, darts))
    if method == "darts" and darts == "metasgd":
        w = _double(workload(hidden, "cpu", seed))
        net = copy.deepcopy(w.classifier)
        opt = lower_optimizer("sgd", net.parameters())
        weighted_loss(net, w.meta, w.x, w.y).backward(inputs=list(net.parameters()))
        opt.step()
        v = torch.autograd.grad(F.cross_entropy(net(w.xm), w.ym), list(net.parameters()))
        objective = zg.InnerObjective(list(w.classifier.parameters()), list(w.meta.parameters()),
                                      lambda: weighted_loss(w.classifier, w.meta, w.x, w.y))
        want = zg.Darts(scale=0.1, mixed="exact")(objective, v)
    else:
        want = change(lambda w: ziggurat_iteration(w, method, "exact", _unit_sgd, cg_damping))
    diff = sum(float((a - b).pow(2).sum()) for a, b in zip(got, want)) ** 0.5
    return diff / sum(float(b.pow(2).sum()) for b in want) ** 0.5


RUNNERS = {"ziggurat": ziggurat_iteration, "betty": betty_iteration,
           "higher": higher_iteration, "torchopt": torchopt_iteration}


def measure(args: argparse.Namespace, library: str, method: str, size: str
            ) -> dict[str, object] | None:
    """One configuration's row (None when the library cannot express it)."""
    w = workload(SIZES[size] if args.hidden is None else args.hidden, args.device)
    plain = plain_step_fn(w, optimizer_kind(method))
    plain()  # the plain step's own optimizer state exists before the memory window
    iteration: Callable[[], None] | None
    if library == "ziggurat":
        iteration = ziggurat_iteration(w, method, args.mixed)
    elif library == "torchopt":
        iteration = torchopt_iteration(w, method, darts=args.torchopt_darts)
    else:
        iteration = RUNNERS[library](w, method)
    if iteration is None:
        return None
    before = reset_peak(args.device)
    iteration()
    iteration()
    rise = peak(args.device) - before
    plain_s, iter_s = interleaved_medians([plain, iteration], args.repeats, args.device)
    return {"library": library, "method": method, "size": size, "parameters": w.parameters,
            "plain_s": plain_s, "iteration_s": iter_s, "ratio": iter_s / plain_s,
            "memory_mb": rise}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    row = measure(args, args.library, args.method, args.size)
    print(json.dumps({"skipped": True} if row is None else row))


def in_process(args: argparse.Namespace, library: str, method: str, size: str
               ) -> dict[str, object]:
    """``measure`` in this process (``--in-process``, CUDA only: the allocator's peak of one
    configuration is its own once the last one's tensors are freed); a failure is a row."""
    try:
        row = measure(args, library, method, size)
    except Exception:  # reported like a failed worker process
        print(f"{library} {method} {size}: failed\n{traceback.format_exc()[-2000:]}",
              file=sys.stderr)
        row = {"library": library, "method": method, "size": size, "failed": True}
    gc.collect()
    torch.cuda.empty_cache()
    return {"skipped": True} if row is None else row


def driver(args: argparse.Namespace) -> None:
    rows = []
    for size in args.sizes:
        for method in args.methods:
            for library in args.libraries:
                if args.in_process:
                    row = in_process(args, library, method, size)
                    if not row.get("skipped"):
                        rows.append(row)
                        print_row(row) if not row.get("failed") else None
                    continue
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
                       "--library", library, "--method", method, "--size", size,
                       "--repeats", str(args.repeats), "--device", args.device,
                       "--mixed", args.mixed, "--torchopt-darts", args.torchopt_darts]
                if args.hidden is not None:
                    cmd += ["--hidden", str(args.hidden)]
                if args.threads:
                    cmd += ["--threads", str(args.threads)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    print(f"{library} {method} {size}: failed\n{proc.stderr[-2000:]}",
                          file=sys.stderr)
                    rows.append({"library": library, "method": method, "size": size,
                                 "failed": True})
                    continue
                for line in proc.stderr.splitlines():
                    if line.startswith("skipped"):
                        print(line, file=sys.stderr)
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                if row.get("skipped"):
                    continue
                rows.append(row)
                print_row(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_table(rows, args.sizes, args.methods)
    failed = [f"{r['library']} {r['method']} {r['size']}" for r in rows if r.get("failed")]
    if failed:  # (the table holds the others)
        raise SystemExit(f"failed configurations: {', '.join(failed)}")


def print_row(row: dict[str, object]) -> None:
    print(f"{row['size']:>4s} {row['method']:10s} {row['library']:9s} "
          f"{row['iteration_s']:8.4f} s {row['ratio']:6.2f}x plain  "
          f"+{row['memory_mb']:7.1f} MB", flush=True)


def print_table(rows: list[dict[str, object]], sizes: list[str], methods: list[str]) -> None:
    by = {(r["size"], r["method"], r["library"]): r for r in rows if not r.get("failed")}
    print("\n| size | method | ziggurat s | ziggurat / plain | Betty / plain | higher / plain "
          "| TorchOpt / plain | ziggurat MB | Betty MB | TorchOpt MB | MB ratio (z / Betty) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for method in methods:
            z, b, h, t = (by.get((size, method, lib)) for lib in LIBRARIES)
            if z is None:
                continue

            def fmt(r: dict[str, object] | None, key: str, spec: str) -> str:
                return "—" if r is None else format(r[key], spec)

            mem_ratio = ("—" if b is None or not b["memory_mb"]
                         else f"{z['memory_mb'] / b['memory_mb']:.2f}")  # type: ignore[operator]
            print(f"| {size} | {method} | {fmt(z, 'iteration_s', '.3f')} | "
                  f"{fmt(z, 'ratio', '.2f')} | {fmt(b, 'ratio', '.2f')} | "
                  f"{fmt(h, 'ratio', '.2f')} | {fmt(t, 'ratio', '.2f')} | "
                  f"{fmt(z, 'memory_mb', '.0f')} | {fmt(b, 'memory_mb', '.0f')} | "
                  f"{fmt(t, 'memory_mb', '.0f')} | {mem_ratio} |")


def check(methods: list[str]) -> None:
    """Print TorchOpt's hypergradient error against ziggurat's (see ``check_torchopt``)."""
    if optional("torchopt") is None:
        print(skip_message("torchopt"), file=sys.stderr)
        return
    torch.set_num_threads(1)
    for method in methods:
        if method.startswith("sama"):
            continue
        damping = 1.0 if method.startswith("cg") and method != "cg-1" else 0.0
        error = check_torchopt(method, cg_damping=damping)
        note = f" (both with damping {damping})" if damping else ""
        print(f"{method:10s} relative difference TorchOpt vs ziggurat: {error:.1e}{note}")
        if method == "darts":
            error = check_torchopt(method, darts="implicit")
            print(f"{'darts':10s} relative difference TorchOpt (--torchopt-darts implicit) vs "
                  f"ziggurat: {error:.1e}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=["2M", "8M"], choices=sorted(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=LIBRARIES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--hidden", type=int, default=None, help="override the hidden width")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: a tiny classifier, 2 repeats, darts and cg-1")
    parser.add_argument("--mixed", default="auto", choices=("auto", "exact", "forward", "fd"),
                        help="ziggurat's mixed-product mode (exact: the 0.1.0 default)")
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--torchopt-darts", default="metasgd", choices=("metasgd", "implicit"),
                        help="TorchOpt's darts program: one unrolled MetaSGD step, or "
                             "custom_root with the identity solve (ziggurat's quantity)")
    parser.add_argument("--check", action="store_true",
                        help="compare TorchOpt's hypergradients with ziggurat's (float64, "
                             "hidden 16) for --methods instead of timing")
    parser.add_argument("--in-process", action="store_true",
                        help="with --device cuda: every configuration in this process (no "
                             "process start and CUDA set-up per configuration; the peak is "
                             "the allocator's, exact per configuration)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", default="ziggurat", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="darts", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="2M", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.in_process and not args.device.startswith("cuda"):
        parser.error(f"--in-process needs --device cuda (got --device {args.device}): on the "
                     "CPU a configuration's peak resident memory is its own only in a fresh "
                     "process, so leave --in-process out there")
    if args.quick:
        args.hidden, args.repeats, args.sizes = 64, 2, ["2M"]
        args.methods = ["darts", "sama-adam", "cg-1"]
    if args.check:
        check(args.methods)
    elif args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
