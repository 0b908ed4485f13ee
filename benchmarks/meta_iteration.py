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
    python benchmarks/meta_iteration.py --device cuda

Peers (Betty 0.2.1; higher 0.2.1 for the one-step unrolled program, its "darts" row) are
run when importable and skipped with a message otherwise.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from workloads import (
    SIZES,
    Workload,
    interleaved_medians,
    lower_optimizer,
    optional,
    peak,
    plain_step_fn,
    reset_peak,
    skip_message,
    weighted_loss,
    workload,
)

METHODS = ("darts", "sama-sgd", "sama-adam", "neumann-1", "neumann-3", "cg-1", "cg-3")
LIBRARIES = ("ziggurat", "betty", "higher")
NEUMANN_ALPHA = 0.1
META_LR = 1e-3


def optimizer_kind(method: str) -> str:
    return "adam" if method == "sama-adam" else "sgd"


# --------------------------------------------------------------------------- ziggurat
def ziggurat_iteration(w: Workload, method: str, mixed: str = "auto") -> Callable[[], None]:
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
        hyper = zg.CG(iterations=int(k), mixed=mixed)  # type: ignore[arg-type]
    lower = zg.ImplicitProblem(
        name="classifier", module=w.classifier,
        optimizer=lower_optimizer(optimizer_kind(method), w.classifier.parameters()),
        train_data_loader=[(w.x, w.y)], config=zg.Config(type=hyper),
        training_step=lambda p, b: weighted_loss(p.module, p.meta.module, b[0], b[1]))
    upper = zg.ImplicitProblem(
        name="meta", module=w.meta, optimizer=torch.optim.Adam(w.meta.parameters(), lr=META_LR),
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

    class Inner(ImplicitProblem):  # type: ignore[misc]
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            x, y = batch
            losses = F.cross_entropy(self.module(x), y, reduction="none")
            weights = self.meta(losses.detach().unsqueeze(1)).squeeze(1)
            return (weights * losses).mean()

    class Outer(ImplicitProblem):  # type: ignore[misc]
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


RUNNERS = {"ziggurat": ziggurat_iteration, "betty": betty_iteration,
           "higher": higher_iteration}


def worker(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads) if args.threads else None
    w = workload(SIZES[args.size] if args.hidden is None else args.hidden, args.device)
    plain = plain_step_fn(w, optimizer_kind(args.method))
    plain()  # the plain step's own optimizer state exists before the memory window
    iteration = (ziggurat_iteration(w, args.method, args.mixed) if args.library == "ziggurat"
                 else RUNNERS[args.library](w, args.method))  # type: ignore[operator]
    if iteration is None:
        print(json.dumps({"skipped": True}))
        return
    before = reset_peak(args.device)
    iteration()
    iteration()
    rise = peak(args.device) - before
    plain_s, iter_s = interleaved_medians([plain, iteration], args.repeats, args.device)
    print(json.dumps({"library": args.library, "method": args.method, "size": args.size,
                      "parameters": w.parameters, "plain_s": plain_s, "iteration_s": iter_s,
                      "ratio": iter_s / plain_s, "memory_mb": rise}))


def driver(args: argparse.Namespace) -> None:
    rows = []
    for size in args.sizes:
        for method in args.methods:
            for library in args.libraries:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--worker",
                       "--library", library, "--method", method, "--size", size,
                       "--repeats", str(args.repeats), "--device", args.device,
                       "--mixed", args.mixed]
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
                print(f"{size:>4s} {method:10s} {library:9s} {row['iteration_s']:8.3f} s "
                      f"{row['ratio']:6.2f}x plain  +{row['memory_mb']:7.1f} MB", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print_table(rows, args.sizes, args.methods)


def print_table(rows: list[dict[str, object]], sizes: list[str], methods: list[str]) -> None:
    by = {(r["size"], r["method"], r["library"]): r for r in rows if not r.get("failed")}
    print("\n| size | method | ziggurat s | ziggurat / plain | Betty / plain | higher / plain "
          "| ziggurat MB | Betty MB | MB ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        for method in methods:
            z, b, h = (by.get((size, method, lib)) for lib in LIBRARIES)
            if z is None:
                continue

            def fmt(r: dict[str, object] | None, key: str, spec: str) -> str:
                return "—" if r is None else format(r[key], spec)

            mem_ratio = ("—" if b is None or not b["memory_mb"]
                         else f"{z['memory_mb'] / b['memory_mb']:.2f}")  # type: ignore[operator]
            print(f"| {size} | {method} | {fmt(z, 'iteration_s', '.3f')} | "
                  f"{fmt(z, 'ratio', '.2f')} | {fmt(b, 'ratio', '.2f')} | "
                  f"{fmt(h, 'ratio', '.2f')} | {fmt(z, 'memory_mb', '.0f')} | "
                  f"{fmt(b, 'memory_mb', '.0f')} | {mem_ratio} |")


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
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--library", default="ziggurat", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="darts", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="2M", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.repeats, args.sizes = 64, 2, ["2M"]
        args.methods = ["darts", "sama-adam", "cg-1"]
    if args.worker:
        worker(args)
    else:
        driver(args)


if __name__ == "__main__":
    main()
