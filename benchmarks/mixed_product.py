"""Exact (double backward), exact forward-mode (reverse over forward) and finite-difference
mixed products, per method, on the reweighting structure: which default is faster.

Classifier MLP 512-h-h-10 trained on mean(w_i · ℓ_i), w = meta-net(detached ℓ) with a
1-100-1 sigmoid MLP; batch 64. Times one hypergradient call of each method (after one lower
optimizer step) and reports it as a ratio to a plain training step of the classifier,
measured in the same process. Median of --repeats.

    python benchmarks/mixed_product.py --hidden 1024
    python benchmarks/mixed_product.py --hidden 4096 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from workloads import sync

import ziggurat as zg


def median_seconds(fn: Callable[[], object], repeats: int, device: str) -> float:
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke check: hidden 32, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.hidden, args.repeats = 32, 1
    torch.manual_seed(0)
    h, dev = args.hidden, args.device
    net = torch.nn.Sequential(torch.nn.Linear(512, h), torch.nn.ReLU(), torch.nn.Linear(h, h),
                              torch.nn.ReLU(), torch.nn.Linear(h, 10)).to(dev)
    meta = torch.nn.Sequential(torch.nn.Linear(1, 100), torch.nn.ReLU(), torch.nn.Linear(100, 1),
                               torch.nn.Sigmoid()).to(dev)
    x, y = torch.randn(64, 512).to(dev), torch.randint(0, 10, (64,)).to(dev)
    xm, ym = torch.randn(64, 512).to(dev), torch.randint(0, 10, (64,)).to(dev)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    params = list(net.parameters())
    n_params = sum(p.numel() for p in params)

    def inner_loss() -> torch.Tensor:
        losses = F.cross_entropy(net(x), y, reduction="none")
        weights = meta(losses.detach().unsqueeze(1)).squeeze(1)
        return (weights * losses).mean()

    def plain_step() -> None:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        opt.step()

    state: dict[str, object] = {}
    sama = zg.SAMA()
    for p, g in zip(params, torch.autograd.grad(inner_loss(), params)):
        p.grad = g
    sama.before_optimizer_step(opt, params, state)
    opt.step()
    v = list(torch.autograd.grad(F.cross_entropy(net(xm), ym), params))
    objective = zg.InnerObjective(params, list(meta.parameters()), inner_loss, optimizer=opt,
                                  state=state, module=net)

    base = median_seconds(plain_step, args.repeats, dev)
    print(f"classifier parameters: {n_params / 1e6:.2f}M on {dev}, plain step "
          f"{base * 1e3:.1f} ms")
    modes = ("fd", "exact", "forward")
    print(f"{'method':14s}" + "".join(f"{m:>10s}" for m in modes)
          + "   (hypergradient call / plain step)")
    for label, make in [
        ("darts", lambda m: zg.Darts(mixed=m)),
        ("sama", lambda m: zg.SAMA(mixed=m)),
        ("cg-3", lambda m: zg.CG(iterations=3, mixed=m)),
        ("neumann-3", lambda m: zg.Neumann(iterations=3, alpha=0.1, mixed=m)),
    ]:
        def call(mode: str, make: Callable[[str], zg.HypergradMethod] = make
                 ) -> Callable[[], object]:
            return lambda: make(mode)(objective, v)

        row = [median_seconds(call(m), args.repeats, dev) / base for m in modes]
        print(f"{label:14s}" + "".join(f"{r:10.2f}" for r in row))


if __name__ == "__main__":
    main()
