"""Peak memory of unrolled hypergradients: flat over upper iterations, and reverse vs
forward mode as the unroll grows.

Part 1 runs a bilevel program (MLP 32-256-256-1 on a regression batch, learned per-layer
weight decay, unroll K = 5, reverse mode) for --iterations upper steps and prints the
process's resident memory every tenth of the run, as a ratio to the first reading.
Part 2 measures the peak rise of resident memory (sampled every 0.5 ms) during one upper
iteration for K in --ks, in reverse and in forward mode, each configuration in its own
process, on a wider MLP (--hidden).

    python benchmarks/unrolled_memory.py --iterations 2000
    python benchmarks/unrolled_memory.py --device cuda    # allocated GPU memory instead

With ``--device cuda`` memory is the CUDA allocator's: part 1 reads allocated MB, part 2 the
exact peak (``torch.cuda.max_memory_allocated``) instead of sampling resident memory.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import threading
import time

import torch
import torch.nn.functional as F
from workloads import peak, reset_peak

import ziggurat as zg


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_mb(device: str) -> float:
    """Resident MB on the CPU, allocated MB on a GPU."""
    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    return rss_mb()


def build(method: zg.registry.Method, k: int, hidden: int = 256, device: str = "cpu"
          ) -> tuple[zg.Engine, zg.Problem]:
    torch.manual_seed(0)
    x, y = torch.randn(128, 32).to(device), torch.randn(128, 1).to(device)
    xv, yv = torch.randn(128, 32).to(device), torch.randn(128, 1).to(device)
    net = torch.nn.Sequential(torch.nn.Linear(32, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, hidden), torch.nn.Tanh(),
                              torch.nn.Linear(hidden, 1)).to(device)
    decay = torch.nn.Parameter(torch.full((3,), -6.0, device=device))
    holder = torch.nn.ParameterList([decay])

    def inner_loss(p: zg.Problem, batch: object) -> torch.Tensor:
        weights = [m.weight for m in p.module.children() if isinstance(m, torch.nn.Linear)]
        penalty = sum(d.exp() * (w**2).sum() for d, w in zip(p.outer.module[0], weights))
        return F.mse_loss(p.module(x), y) + penalty

    inner = zg.IterativeProblem("inner", net, torch.optim.SGD(net.parameters(), lr=0.01),
                                config=zg.Config(type=method, unroll_steps=k),
                                training_step=inner_loss)
    outer = zg.ImplicitProblem("outer", holder, torch.optim.Adam(holder.parameters(), lr=0.01),
                               training_step=lambda p, b: F.mse_loss(p.inner(xv), yv))
    return zg.Engine([outer, inner], zg.chain(outer, inner)), outer


def flat_over_time(iterations: int, device: str) -> None:
    k = 5
    engine, outer = build(zg.Reverse(), k, device=device)
    readings = []
    start = time.perf_counter()
    for i in range(iterations * k):
        engine.train_step()
        if (i + 1) % (iterations * k // 10) == 0:
            readings.append(memory_mb(device))
    seconds = time.perf_counter() - start
    what = "allocated" if device.startswith("cuda") else "resident"
    print(f"part 1: {outer.count} upper iterations (K={k}, reverse) in {seconds:.0f} s")
    print(f"  {what} MB at each tenth:", " ".join(f"{r:.0f}" for r in readings))
    print(f"  last / first = {readings[-1] / readings[0]:.3f}")


def one_config(mode: str, k: int, hidden: int, device: str) -> None:
    method = zg.Reverse() if mode == "reverse" else zg.Forward()
    engine, _ = build(method, k, hidden, device)
    if device.startswith("cuda"):  # the allocator's exact peak, no sampling
        before = reset_peak(device)
        for _ in range(k):
            engine.train_step()
        print(f"{mode} {k} {peak(device) - before:.1f}")
        return
    # the first upper iteration, from a fresh process: freed memory would otherwise be kept
    # by the allocator and hide the next iteration's peak
    before = rss_mb()
    highest = [before]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            highest[0] = max(highest[0], rss_mb())
            time.sleep(0.0005)

    watcher = threading.Thread(target=sample)
    watcher.start()
    for _ in range(k):
        engine.train_step()
    done.set()
    watcher.join()
    print(f"{mode} {k} {highest[0] - before:.1f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=2000)
    parser.add_argument("--ks", type=int, nargs="*", default=[5, 20, 80])
    parser.add_argument("--hidden", type=int, default=1024, help="width in part 2")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: 20 iterations, K 2, width 64")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.iterations, args.ks, args.hidden = 20, [2], 64
    if args.one:
        one_config(args.one[0], int(args.one[1]), args.hidden, args.device)
        return
    flat_over_time(args.iterations, args.device)
    params = 32 * args.hidden + args.hidden * args.hidden + args.hidden * 2 + 1
    what = "allocated" if args.device.startswith("cuda") else "resident"
    print(f"part 2: peak {what}-memory rise in MB during one upper iteration "
          f"(MLP width {args.hidden}, {params / 1e6:.2f}M parameters = "
          f"{params * 4 / 2**20:.1f} MB per copy)")
    print(f"  {'K':>4s}{'reverse':>10s}{'forward':>10s}")
    for k in args.ks:
        row = []
        for mode in ("reverse", "forward"):
            out = subprocess.run([sys.executable, __file__, "--one", mode, str(k),
                                  "--hidden", str(args.hidden), "--device", args.device],
                                 capture_output=True, text=True, check=True).stdout.split()
            row.append(float(out[-1]))
        print(f"  {k:4d}{row[0]:10.1f}{row[1]:10.1f}")


if __name__ == "__main__":
    main()
