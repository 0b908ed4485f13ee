"""Data-parallel throughput: meta-iterations per second with 1 process and with 2 gloo
processes (torchrun, strategy "ddp"), for darts, sama and cg.

Workload: the reweighting structure: classifier MLP 64-h-h-10 trained on mean(w_i · ℓ_i),
w = meta-net(detached ℓ) with a 1-32-1 sigmoid MLP; unroll 1; per-rank batch --batch (so 2
processes handle twice the samples per meta-iteration: weak scaling). Every process uses one
thread. Prints meta-iterations/s (median of --repeats launches, 1 and 2 processes
alternating) and the ratio of samples/s (2 processes over 1). A control column runs one
process under torchrun with strategy "ddp" (a world of 1): ziggurat's reduction machinery
without any data to exchange, as a ratio to strategy "none".

    python benchmarks/distributed_throughput.py --hidden 1024 --iters 30 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import ziggurat as zg

METHODS = ("darts", "sama", "cg")


def worker(method: str, strategy: str, hidden: int, batch: int, iters: int, warmup: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    n = batch * world * 8
    train = TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))
    meta = TensorDataset(torch.randn(n, 64), torch.randint(0, 10, (n,)))
    net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 10))
    weigher = torch.nn.Sequential(torch.nn.Linear(1, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 1), torch.nn.Sigmoid())

    def inner_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        x, y = b
        losses = F.cross_entropy(p(x), y, reduction="none")
        return (p.outer(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean()

    def outer_loss(p: zg.Problem, b: Any) -> torch.Tensor:
        x, y = b
        return F.cross_entropy(p.inner(x), y)

    method_obj = {"darts": zg.Darts(), "sama": zg.SAMA(), "cg": zg.CG(iterations=3)}[method]
    lower_opt = (torch.optim.Adam(net.parameters(), lr=1e-3) if method == "sama"
                 else torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9))
    replicas = world if strategy != "none" else 1
    inner = zg.ImplicitProblem(
        "inner", net, lower_opt, training_step=inner_loss, config=zg.Config(type=method_obj),
        train_data_loader=zg.distributed.distributed_loader(train, batch, num_replicas=replicas,
                                                            rank=rank))
    outer = zg.Problem(
        "outer", weigher, torch.optim.Adam(weigher.parameters(), lr=1e-3),
        training_step=outer_loss,
        train_data_loader=zg.distributed.distributed_loader(meta, batch, num_replicas=replicas,
                                                            rank=rank))

    def engine(steps: int) -> zg.Engine:
        return zg.Engine([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}},
                         config=zg.EngineConfig(train_iters=steps, progress="off", summary=False,
                                                logger_type=(), strategy=strategy))

    warm = engine(warmup)
    warm.run()
    timed = engine(warmup + iters)
    timed.global_step = warmup
    start = time.perf_counter()
    timed.run()
    seconds = time.perf_counter() - start
    if rank == 0:
        print(json.dumps({"it_per_s": iters / seconds}), flush=True)
    if strategy != "none":
        torch.distributed.destroy_process_group()


def measure(method: str, procs: int, args: argparse.Namespace, strategy: str = "ddp") -> float:
    cmd = [__file__, "--worker", method, "--hidden", str(args.hidden), "--batch",
           str(args.batch), "--iters", str(args.iters), "--warmup", str(args.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if procs == 1 and strategy == "none":
        full = [sys.executable, *cmd, "--strategy", "none"]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        full = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
                "--master-addr", "127.0.0.1", "--master-port", str(port), *cmd,
                "--strategy", strategy]
    out = subprocess.run(full, env=env, capture_output=True, text=True, check=True).stdout
    line = [ln for ln in out.splitlines() if ln.startswith("{")][-1]
    return float(json.loads(line)["it_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--batch", type=int, default=64, help="per-rank batch")
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", choices=METHODS)
    parser.add_argument("--strategy", default="none")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.strategy, args.hidden, args.batch, args.iters, args.warmup)
        return
    print(f"hidden {args.hidden}, per-rank batch {args.batch}, {args.iters} meta-iterations, "
          f"1 thread per process, torch {torch.__version__}")
    print("| method | 1 process (it/s) | 2 processes, gloo (it/s) | samples/s ratio 2p/1p "
          "| control: ddp on 1 process / none |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        ones, twos, controls = [], [], []
        for _ in range(args.repeats):
            ones.append(measure(method, 1, args, "none"))
            twos.append(measure(method, 2, args))
            controls.append(measure(method, 1, args))
        one, two = statistics.median(ones), statistics.median(twos)
        control = statistics.median(controls)
        print(f"| {method} | {one:.1f} | {two:.1f} | {2 * two / one:.2f} | {control / one:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
