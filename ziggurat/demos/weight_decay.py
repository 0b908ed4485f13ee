"""Per-feature weight-decay tuning of logistic regression on breast cancer (bilevel, CG).

Lower level: logistic regression trained on 60 samples of scikit-learn's breast-cancer data
with 100 extra pure-noise features and a penalty ½ Σ_i exp(λ_i) w_i². Upper level: λ (one
per feature) minimising the validation loss, with hypergradients by conjugate gradient.
Prints validation and test loss/accuracy before (a single shared decay) and after tuning.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

import ziggurat as zg

NAME = "weight-decay"


def load_data(seed: int, noise_features: int = 100) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Standardised breast-cancer features plus noise features, split 60 / 250 / rest."""
    try:
        from sklearn.datasets import load_breast_cancer
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "this demo needs scikit-learn: pip install 'ziggurat[demo]' (or ./dev demo)"
        ) from err
    data = load_breast_cancer()
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor(data.data, dtype=torch.float64)
    y = torch.tensor(data.target, dtype=torch.float64)
    x = torch.cat([x, torch.randn(x.shape[0], noise_features, generator=g, dtype=torch.float64)], 1)
    perm = torch.randperm(x.shape[0], generator=g)
    x, y = x[perm], y[perm]
    train, val = slice(0, 60), slice(60, 310)
    mean, std = x[train].mean(0), x[train].std(0) + 1e-8
    x = (x - mean) / std
    return {"train": (x[train], y[train]), "val": (x[val], y[val]), "test": (x[310:], y[310:])}


class LogDecay(torch.nn.Module):
    """λ, one log-decay per feature: the penalty is ½ Σ exp(λ_i) w_i²."""

    def __init__(self, features: int, init: float) -> None:
        super().__init__()
        self.log_decay = torch.nn.Parameter(torch.full((features,), init, dtype=torch.float64))

    def forward(self) -> torch.Tensor:
        return self.log_decay.exp()


def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(x).squeeze(-1)
        loss = F.binary_cross_entropy_with_logits(logits, y).item()
        acc = ((logits > 0).double() == y).double().mean().item()
    return loss, acc


def fit(x: torch.Tensor, y: torch.Tensor, decay: torch.Tensor, steps: int) -> torch.nn.Module:
    """Plain training with a fixed per-feature decay (the 'before' baseline and the retrain)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(x.shape[1], 1).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for _ in range(steps):
        loss = F.binary_cross_entropy_with_logits(model(x).squeeze(-1), y)
        loss = loss + 0.5 * (decay * model.weight.squeeze(0) ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo weight-decay", description=__doc__)
    parser.add_argument("--outer-steps", type=int, default=60)
    parser.add_argument("--unroll", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    data = load_data(args.seed)
    x_tr, y_tr = data["train"]
    features = x_tr.shape[1]
    init = float(torch.log(torch.tensor(1e-3)))
    inner_steps = args.outer_steps * args.unroll

    before = fit(x_tr, y_tr, torch.full((features,), 1e-3, dtype=torch.float64), inner_steps)

    torch.manual_seed(0)
    net = torch.nn.Linear(features, 1).double()
    hp = LogDecay(features, init)

    def inner_loss(p: zg.Problem, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        fit_loss = F.binary_cross_entropy_with_logits(p.module(x).squeeze(-1), y)
        weight = net.weight.squeeze(0)
        return fit_loss + 0.5 * (p.outer() * weight**2).sum()

    def outer_loss(p: zg.Problem, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(p.inner(x).squeeze(-1), y)

    inner = zg.ImplicitProblem(
        name="inner", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.5),
        train_data_loader=[data["train"]], training_step=inner_loss,
        config=zg.Config(type=zg.CG(iterations=20, damping=1e-4), unroll_steps=args.unroll),
    )
    outer = zg.ImplicitProblem(
        name="outer", module=hp, optimizer=torch.optim.Adam(hp.parameters(), lr=0.1),
        train_data_loader=[data["val"]], training_step=outer_loss,
    )
    engine = zg.Engine(problems=[outer, inner], dependencies=zg.chain(outer, inner),
                       config=zg.EngineConfig(train_iters=inner_steps))
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start

    learned = hp().detach()
    after = fit(x_tr, y_tr, learned, inner_steps)
    print(__doc__.splitlines()[0])
    print(f"{inner_steps} inner steps, {outer.count} hypergradient steps (CG) in {seconds:.1f} s\n")
    print(f"{'':28s}{'val loss':>10s}{'val acc':>10s}{'test loss':>11s}{'test acc':>10s}")
    for label, model in (("before: shared decay 1e-3", before), ("after: learned decay", after)):
        vl, va = evaluate(model, *data["val"])
        tl, ta = evaluate(model, *data["test"])
        print(f"{label:28s}{vl:10.4f}{va:10.3f}{tl:11.4f}{ta:10.3f}")
    real, noise = learned[:30], learned[30:]
    print(f"\nmean learned decay: real features {real.mean():.3g}, "
          f"noise features {noise.mean():.3g}")
    return 0
