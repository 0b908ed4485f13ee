"""The second-order products a CG / Neumann call is made of, each as plain training steps.

On the reweighting structure of meta_iteration.py (classifier MLP 512-h-h-10 on
mean_i V(ℓ_i.detach()) ℓ_i, batch 64), each round times, in this order and from a fresh
``Curvature``: a plain training step of the classifier; building the graph of ∇_θ L_in;
one Hessian-vector product H v; one fused product (H v and ∂²_{λθ} L_in · v from one
backward, as CG takes them); the exact mixed product alone (a backward to λ only through the
same graph); the forward-mode mixed product (``mixed_forward``). Reported: the median over
rounds of each phase's time divided by the plain step's time in the same round.

    python benchmarks/solver_products.py --hidden 2578 --repeats 9 --threads 1
    python benchmarks/solver_products.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from workloads import SIZES, plain_step_fn, sync, weighted_loss, workload

from ziggurat.hypergrad import Curvature, InnerObjective
from ziggurat.hypergrad.base import mixed_forward

PHASES = ("graph", "hvp", "fused", "mixed exact", "mixed forward")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=SIZES["8M"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke check: tiny model")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.repeats = 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    w = workload(args.hidden, args.device)
    params, upper = list(w.classifier.parameters()), list(w.meta.parameters())
    objective = InnerObjective(params, upper,
                               lambda: weighted_loss(w.classifier, w.meta, w.x, w.y),
                               module=w.classifier)
    generator = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=generator).to(p.device) for p in params]
    plain = plain_step_fn(w, "sgd")
    plain()
    ratios: dict[str, list[float]] = {name: [] for name in PHASES}

    def timed(times: list[float], fn: Callable[..., object], *fn_args: object) -> None:
        sync(args.device)
        start = time.perf_counter()
        fn(*fn_args)
        sync(args.device)
        times.append(time.perf_counter() - start)

    for _ in range(args.repeats + 1):  # the first round warms up and is dropped
        times: list[float] = []
        timed(times, plain)
        curvature = Curvature(objective)
        timed(times, curvature.gradient)
        timed(times, curvature.hvp, v)
        timed(times, curvature.hvp_and_mixed, v)
        timed(times, curvature.mixed, v)
        timed(times, mixed_forward, objective, v)
        for name, t in zip(PHASES, times[1:]):
            ratios[name].append(t / times[0])
    print(f"hidden {args.hidden}, {sum(p.numel() for p in params):,} lower parameters, "
          f"median over {args.repeats} rounds, in plain training steps:")
    for name in PHASES:
        print(f"  {name:14s} {statistics.median(ratios[name][1:]):6.2f}")


if __name__ == "__main__":
    main()
