"""Hypergradient accuracy per method beside its cost, on ridge regression (exact answer).

L_in(θ, λ) = ‖Xθ − y‖²/(2n) + ½ Σ_i exp(λ_i) θ_i²,  L_out(θ) = ‖X_v θ − y_v‖²/(2m), at
θ = θ*(λ) solved exactly, float64. The exact hypergradient is −diag(e^λ ⊙ θ*) H⁻¹ v with
H = XᵀX/n + diag(e^λ). Each method's answer is compared with it (relative error ‖ĝ − g‖/‖g‖
and cosine), and its call is timed as a multiple of one gradient evaluation of L_in
(forward + backward), median of --repeats.

    python benchmarks/accuracy.py                    # dim 500, condition number 100
    python benchmarks/accuracy.py --condition 1000 --quick
    python benchmarks/accuracy.py --device cuda      # the same data, moved to the GPU

Darts / SAMA use H⁻¹ ≈ scale·I: their error is large by design (their direction is what
they are used for, hence the cosine column).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from workloads import interleaved_medians

import ziggurat as zg


def ridge(dim: int, n: int, condition: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Data whose Hessian at λ has eigenvalues spread log-uniformly over ``condition``."""
    g = torch.Generator().manual_seed(seed)
    dt = torch.float64
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=dt))
    lam = torch.full((dim,), -1.0, dtype=dt)
    base = float(lam.exp()[0])
    h_eigs = torch.logspace(0, float(torch.log10(torch.tensor(condition))), dim, dtype=dt)
    data_eigs = h_eigs * base * 1.5 - base
    u, _ = torch.linalg.qr(torch.randn(n, dim, generator=g, dtype=dt))
    x = (n**0.5) * u @ torch.diag(data_eigs.sqrt()) @ q.T
    truth = torch.randn(dim, generator=g, dtype=dt)
    xv = torch.randn(n // 2, dim, generator=g, dtype=dt)
    return {"x": x, "y": x @ truth + 0.1 * torch.randn(n, generator=g, dtype=dt), "xv": xv,
            "yv": xv @ truth + 0.1 * torch.randn(n // 2, generator=g, dtype=dt), "lam": lam}


def methods(lam_max: float) -> list[tuple[str, zg.HypergradMethod]]:
    alpha = 1.0 / lam_max
    out: list[tuple[str, zg.HypergradMethod]] = [("darts", zg.Darts()),
                                                 ("darts, scale 1/λmax", zg.Darts(scale=alpha))]
    for k in (1, 3, 10, 30, 100):
        out.append((f"neumann-{k} (α = 1/λmax)", zg.Neumann(iterations=k, alpha=alpha)))
    for k in (1, 3, 10, 30, 100):
        out.append((f"cg-{k}", zg.CG(iterations=k)))
    out.append(("fixed_point-30 (α = 1/λmax, first call)",
                zg.FixedPoint(iterations=30, alpha=alpha)))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dim", type=int, default=500)
    parser.add_argument("--condition", type=float, default=100.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="smoke check: dim 50, 1 repeat")
    args = parser.parse_args(argv)
    if args.quick:
        args.dim, args.repeats = 50, 1
    # built on the CPU from one generator, then moved: the same problem on every device
    data = {k: t.to(args.device) for k, t in
            ridge(args.dim, 2 * args.dim, args.condition).items()}
    x, y, xv, yv = data["x"], data["y"], data["xv"], data["yv"]
    lam = data["lam"].clone().requires_grad_(True)
    n = x.shape[0]
    hess = x.T @ x / n + torch.diag(lam.detach().exp())
    theta = torch.linalg.solve(hess, x.T @ y / n).requires_grad_(True)
    v = xv.T @ (xv @ theta.detach() - yv) / xv.shape[0]
    exact = -(lam.detach().exp() * theta.detach()) * torch.linalg.solve(hess, v)
    lam_max = float(torch.linalg.eigvalsh(hess).max())

    def inner() -> torch.Tensor:
        r = x @ theta - y
        return 0.5 * (r @ r) / n + 0.5 * (lam.exp() * theta**2).sum()

    def gradient() -> None:
        torch.autograd.grad(inner(), [theta])

    rows = []
    for label, method in methods(lam_max):
        # the answer of a first call (fresh state: no warm start), then the timing
        got = method(zg.InnerObjective([theta], [lam], inner), [v])[0]
        objective = zg.InnerObjective([theta], [lam], inner)

        def call(method: zg.HypergradMethod = method,
                 objective: zg.InnerObjective = objective) -> None:
            method(objective, [v])

        fns: list[Callable[[], None]] = [gradient, call]
        base, t = interleaved_medians(fns, args.repeats, args.device)
        rel = float((got - exact).norm() / exact.norm())
        cos = float(torch.nn.functional.cosine_similarity(got, exact, dim=0))
        rows.append((label, rel, cos, t / base))
    print(f"ridge, dim {args.dim}, condition number {args.condition:g}, float64 on "
          f"{args.device}; cost in gradient evaluations of L_in")
    print("| method | relative error | cosine | cost |")
    print("|---|---|---|---|")
    for label, rel, cos, cost in rows:
        print(f"| {label} | {rel:.2e} | {cos:.4f} | {cost:.1f} |")


if __name__ == "__main__":
    main()
