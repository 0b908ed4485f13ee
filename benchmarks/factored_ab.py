"""Linear layers in factors, on and off, in the same process.

The reweighting workload of ``meta_iteration.py`` stepped through the same ``Engine`` with
the factored paths on and with ``factored.ENABLED = False``, in alternation with a plain
training step: Darts or SAMA with SGD (forward mode from 1M lower parameters: the upper
gradient in factors, ``ziggurat.hypergrad.factored``), or Neumann / CG (factored
Hessian-vector products, ``ziggurat.hypergrad.factored_hessian``). Times are CPU time of
the process (one thread), so load from other processes hits both sides alike (with
``--device cuda``: wall-clock time between synchronizations); each line is the median over
rounds of (meta-iteration / plain step) in the same round.

    python benchmarks/factored_ab.py --size 8M --method darts --repeats 9
    python benchmarks/factored_ab.py --size 32M --method sama-sgd --repeats 5
    python benchmarks/factored_ab.py --size 8M --method cg-3 --repeats 5
    python benchmarks/factored_ab.py --size 32M --method darts --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from meta_iteration import optimizer_kind, ziggurat_iteration
from workloads import SIZES, plain_step_fn, sync, workload


def seconds(fn: Callable[[], None], device: str) -> float:
    """CPU time of the process on the CPU; wall-clock time between synchronizations on a
    GPU (whose work the process's CPU time does not see)."""
    if not device.startswith("cuda"):
        start = time.process_time()
        fn()
        return time.process_time() - start
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="8M")
    parser.add_argument("--method", default="darts",
                        choices=["darts", "sama-sgd", "neumann-1", "neumann-3", "cg-1", "cg-3"])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="a smoke check in seconds")
    args = parser.parse_args(argv)
    from ziggurat.hypergrad import factored

    torch.set_num_threads(args.threads)
    # --quick: 1.6M parameters, still above FORWARD_MODE_MIN_PARAMETERS, so "auto" takes
    # forward mode and the factored path applies
    hidden = 1024 if args.quick else SIZES[args.size]
    repeats = 1 if args.quick else args.repeats
    w = workload(hidden, args.device)
    plain = plain_step_fn(w, optimizer_kind(args.method))
    iteration = ziggurat_iteration(w, args.method)

    def factored_on() -> None:
        factored.ENABLED = True
        iteration()

    def factored_off() -> None:
        factored.ENABLED = False
        try:
            iteration()
        finally:
            factored.ENABLED = True

    sides = [plain, factored_on, factored_off]
    for fn in sides * 2:  # warm-up: optimizer state, the first hypergradient
        fn()
    times: list[list[float]] = [[] for _ in sides]
    for _ in range(repeats):
        for fn, bucket in zip(sides, times):
            bucket.append(seconds(fn, args.device))
    clock = "wall-clock time" if args.device.startswith("cuda") else "CPU time"
    print(f"{args.method}, {w.parameters / 1e6:.1f}M lower parameters on {args.device}, "
          f"{clock}, median of {repeats}")
    for name, bucket in zip(["plain step", "factored", "dense (ENABLED = False)"], times):
        ratio = statistics.median(b / p for b, p in zip(bucket, times[0]))
        print(f"  {name:24s} {statistics.median(bucket) * 1e3:8.1f} ms  {ratio:5.2f}x plain")


if __name__ == "__main__":
    main()
