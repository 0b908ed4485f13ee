"""Meta-Weight-Net: learn per-sample loss weights from a small clean set (bilevel, digits).

Lower level: an MLP 64-256-256-10 trained on scikit-learn's digits, whose training labels
are corrupted (``--noise``, default 40 %: each chosen label is replaced by a uniformly random
*different* class), on the weighted loss mean_i w_i · ℓ_i. The weight of each sample is
w_i = V(ℓ_i), the output of a small "meta-weight net" V (1-100-1, sigmoid output) applied
to the sample's detached loss. Upper level: V, trained so that the classifier does well on
a clean meta set of 10 images per class; the hypergradient through the classifier's step is
SAMA's (the one-step unrolled hypergradient through the real optimizer update).

Prints test accuracy per seed for plain training on the noisy labels, for training on the
clean meta set alone, and for Meta-Weight-Net with the same number of classifier steps, and
the mean learned weight of clean and of corrupted training samples. ``--imbalance RATIO``
runs the long-tailed variant instead (class k keeps n·RATIO^(-k/9) of its training
samples, no label noise) and compares balanced test accuracy.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

import ziggurat as zg

NAME = "reweighting"

CLASSES = 10
METHODS = ("sama", "sama-fd", "darts", "darts-lr", "darts-fd", "reverse")


# --------------------------------------------------------------------------- data
@dataclass
class Split:
    """One seed's data: the (noisy or long-tailed) training set, a clean meta set, an extra
    clean held-out set (used by the three-level demo; may be empty) and a test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor  # the labels the classifier is trained on (possibly corrupted)
    y_true: torch.Tensor  # the real labels of the training images
    x_meta: torch.Tensor
    y_meta: torch.Tensor
    x_held: torch.Tensor
    y_held: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    @property
    def corrupted(self) -> torch.Tensor:
        """Boolean mask of training samples whose label was changed."""
        return self.y_train != self.y_true


def load_digits_split(
    seed: int,
    noise: float = 0.4,
    imbalance: float | None = None,
    meta_per_class: int = 10,
    held_per_class: int = 0,
    test_per_class: int = 50,
) -> Split:
    """Per class: ``test_per_class`` test images, ``meta_per_class`` clean meta images,
    ``held_per_class`` clean held-out images, the rest for training. With ``imbalance`` = r
    class k keeps round(n_k · r^(-k/9)) of its n_k training images (at least 1). Then a
    fraction ``noise`` of the training samples, chosen uniformly, get a uniformly random
    label different from their own. Features are scaled by the training mean and std."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "this demo needs scikit-learn: pip install 'ziggurat[demo]' (or ./dev demo)"
        ) from err
    data = load_digits()
    x_all = torch.tensor(data.data, dtype=torch.float32)
    y_all = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    parts: dict[str, list[torch.Tensor]] = {"train": [], "meta": [], "held": [], "test": []}
    for k in range(CLASSES):
        idx = torch.nonzero(y_all == k).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        a, b = test_per_class, test_per_class + meta_per_class
        c = b + held_per_class
        parts["test"].append(idx[:a])
        parts["meta"].append(idx[a:b])
        parts["held"].append(idx[b:c])
        train = idx[c:]
        if imbalance is not None:
            keep = max(1, round(train.numel() * imbalance ** (-k / (CLASSES - 1))))
            train = train[:keep]
        parts["train"].append(train)
    index = {name: torch.cat(p) for name, p in parts.items()}
    train = index["train"][torch.randperm(index["train"].numel(), generator=g)]
    y_true = y_all[train]
    y_train = y_true.clone()
    n_noisy = round(noise * train.numel())
    if n_noisy:
        chosen = torch.randperm(train.numel(), generator=g)[:n_noisy]
        shift = torch.randint(1, CLASSES, (n_noisy,), generator=g)
        y_train[chosen] = (y_true[chosen] + shift) % CLASSES  # never the true class
    mean = x_all[train].mean(0)
    std = x_all[train].std(0) + 1.0  # pixels are 0..16; +1 keeps rare pixels bounded

    def x(name: str) -> torch.Tensor:
        return (x_all[index[name]] - mean) / std

    return Split(
        x_train=(x_all[train] - mean) / std, y_train=y_train, y_true=y_true,
        x_meta=x("meta"), y_meta=y_all[index["meta"]],
        x_held=x("held"), y_held=y_all[index["held"]],
        x_test=x("test"), y_test=y_all[index["test"]],
    )


class Batches:
    """Shuffled mini-batches of (x, y), one pass per iteration, from a seeded generator
    (drops the last incomplete batch). Also used for the plain baselines, so every model
    sees the same batches."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y = x, y
        self.batch_size = min(batch_size, x.shape[0])
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        perm = torch.randperm(self.x.shape[0], generator=self.generator)
        for i in range(0, perm.numel() - self.batch_size + 1, self.batch_size):
            idx = perm[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]

    def forever(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield from self


# --------------------------------------------------------------------------- models
def classifier(seed: int) -> torch.nn.Module:
    """The MLP 64-256-256-10, initialised from ``seed``."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(64, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, 256), torch.nn.ReLU(),
        torch.nn.Linear(256, CLASSES),
    )


class MetaWeightNet(torch.nn.Module):
    """V: a sample's (detached) loss -> its weight in (0, 1); an MLP 1-hidden-1 with a
    sigmoid output."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.net(losses.unsqueeze(-1))).squeeze(-1)


@dataclass(frozen=True)
class Settings:
    """Hyperparameters shared by the baselines and Meta-Weight-Net."""

    steps: int = 1500
    batch_size: int = 100
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    meta_lr: float = 1e-3
    meta_weight_decay: float = 1e-4
    method: str = "sama"
    normalize: bool = True


def classifier_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                           weight_decay=s.weight_decay)


# --------------------------------------------------------------------------- training
def train_plain(x: torch.Tensor, y: torch.Tensor, s: Settings, seed: int) -> torch.nn.Module:
    """Ordinary training (every sample weighted 1) with the same model, optimizer, batches
    and number of steps as Meta-Weight-Net's classifier."""
    model = classifier(seed)
    opt = classifier_optimizer(model, s)
    batches = Batches(x, y, s.batch_size, seed).forever()
    for _ in range(s.steps):
        xb, yb = next(batches)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def weighted_loss(
    p: zg.Problem, batch: tuple[torch.Tensor, torch.Tensor], normalize: bool = True
) -> torch.Tensor:
    """mean_i w_i · ℓ_i with w_i = V(ℓ_i) read from the problem named 'meta' (divided by
    the batch mean of V when ``normalize``)."""
    x, y = batch
    losses = F.cross_entropy(p.module(x), y, reduction="none")
    weights = p.meta(losses.detach())  # V reads the loss value only: no gradient into θ
    if normalize:
        weights = weights / weights.mean()
    return (weights * losses).mean()


def _meta_loss(p: zg.Problem, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(p.classifier(x), y)


def hypergradient_config(s: Settings) -> tuple[type[zg.Problem], zg.Config]:
    """The classifier's problem class and config for ``s.method``."""
    method: Any
    if s.method == "reverse":
        return zg.IterativeProblem, zg.Config(type=zg.Reverse(), unroll_steps=1)
    if s.method == "sama":
        method = zg.SAMA(mixed="exact")
    elif s.method == "sama-fd":
        method = zg.SAMA(mixed="fd")
    elif s.method == "darts":
        method = zg.Darts(mixed="exact")
    elif s.method == "darts-lr":
        method = zg.Darts(scale=s.lr, mixed="exact")
    elif s.method == "darts-fd":
        method = zg.Darts(mixed="fd")
    else:
        raise ValueError(f"unknown method {s.method!r}; one of {METHODS}")
    return zg.ImplicitProblem, zg.Config(type=method, unroll_steps=1)


def build_program(
    split: Split, s: Settings, seed: int, engine_config: zg.EngineConfig
) -> zg.Engine:
    """The bilevel program: 'meta' (V, on the meta set) above 'classifier' (weighted loss)."""
    model = classifier(seed)
    torch.manual_seed(seed + 1000)
    vnet = MetaWeightNet()
    cls, config = hypergradient_config(s)
    lower = cls(
        name="classifier", module=model, optimizer=classifier_optimizer(model, s),
        train_data_loader=Batches(split.x_train, split.y_train, s.batch_size, seed),
        config=config,
        training_step=lambda p, batch: weighted_loss(p, batch, s.normalize),
    )
    upper = zg.ImplicitProblem(
        name="meta", module=vnet,
        optimizer=torch.optim.Adam(vnet.parameters(), lr=s.meta_lr,
                                   weight_decay=s.meta_weight_decay),
        train_data_loader=[(split.x_meta, split.y_meta)], training_step=_meta_loss,
    )
    return zg.Engine(problems=[upper, lower], dependencies=zg.chain(upper, lower),
                     config=engine_config)


# --------------------------------------------------------------------------- evaluation
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def balanced_accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over classes of the per-class recall."""
    with torch.no_grad():
        hit = (model(x).argmax(1) == y).float()
    return float(torch.stack([hit[y == k].mean() for k in range(CLASSES)]).mean())


def sample_weights(model: torch.nn.Module, vnet: torch.nn.Module, x: torch.Tensor,
                   y: torch.Tensor) -> torch.Tensor:
    """V(ℓ_i) for every training sample under the final classifier."""
    with torch.no_grad():
        return vnet(F.cross_entropy(model(x), y, reduction="none"))


def run_seed(split: Split, s: Settings, seed: int, quiet: bool = True) -> dict[str, Any]:
    """Plain training, meta-set-only training and Meta-Weight-Net on one split."""
    config = (zg.EngineConfig(train_iters=s.steps, summary=False, progress="off") if quiet
              else zg.EngineConfig(train_iters=s.steps, summary=False))
    start = time.perf_counter()
    plain = train_plain(split.x_train, split.y_train, s, seed)
    meta_only = train_plain(split.x_meta, split.y_meta, s, seed)
    baseline_s = time.perf_counter() - start
    engine = build_program(split, s, seed, config)
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    model, vnet = engine.classifier.module, engine.meta.module
    weights = sample_weights(model, vnet, split.x_train, split.y_train)
    bad = split.corrupted
    per_class = torch.stack([weights[split.y_true == k].mean() for k in range(CLASSES)])
    out: dict[str, Any] = {
        "seed": seed,
        "seconds": seconds,
        "baseline_seconds": baseline_s,
        "weights": weights,
        "corrupted": bad,
        "class_weight": per_class.tolist(),
        "class_count": [int((split.y_true == k).sum()) for k in range(CLASSES)],
        "weight_clean": float(weights[~bad].mean()),
        "weight_corrupted": float(weights[bad].mean()) if bool(bad.any()) else math.nan,
    }
    for label, m in (("plain", plain), ("meta_only", meta_only), ("mwn", model)):
        out[f"{label}_acc"] = accuracy(m, split.x_test, split.y_test)
        out[f"{label}_bacc"] = balanced_accuracy(m, split.x_test, split.y_test)
    return out


def run(
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 1500,
    noise: float = 0.4,
    imbalance: float | None = None,
    method: str = "sama",
    quiet: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Run the comparison for each seed; returns {"runs": [per-seed dicts], "mean": {...}}.

    ``quiet`` turns off the engine's progress bar (tests); ``settings`` override fields of
    ``Settings`` (lr, meta_lr, batch_size, ...).
    """
    s = Settings(steps=steps, method=method, **settings)
    runs = []
    for seed in seeds:
        split = load_digits_split(seed, noise=0.0 if imbalance is not None else noise,
                                  imbalance=imbalance)
        runs.append(run_seed(split, s, seed, quiet=quiet))
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    return {"runs": runs, "mean": mean, "settings": s}


# --------------------------------------------------------------------------- output
def save_histogram(runs: list[dict[str, Any]], path: str) -> str:
    """Histogram of the learned weights of clean and corrupted training samples (all seeds)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    weights = torch.cat([r["weights"] for r in runs])
    bad = torch.cat([r["corrupted"] for r in runs])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = torch.linspace(0, 1, 41).tolist()
    ax.hist(weights[~bad].tolist(), bins=bins, alpha=0.6, label="clean labels", density=True)
    ax.hist(weights[bad].tolist(), bins=bins, alpha=0.6, label="corrupted labels", density=True)
    ax.set_xlabel("learned weight V(loss)")
    ax.set_ylabel("density")
    ax.set_title("Meta-Weight-Net on digits: weights of the training samples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"weight histogram written to {path}"


def _table(result: dict[str, Any], long_tailed: bool) -> list[str]:
    metric = "bacc" if long_tailed else "acc"
    head = "balanced test accuracy" if long_tailed else "test accuracy"
    lines = [f"{'seed':>6s}{'plain':>10s}{'meta set':>10s}{'MWN':>10s}"
             + ("" if long_tailed else f"{'w clean':>10s}{'w corrupt':>11s}")
             + f"{'MWN s':>8s}", ""]
    for r in [*result["runs"], {"seed": "mean", **result["mean"]}]:
        row = f"{r['seed']!s:>6s}"
        row += "".join(f"{r[f'{k}_{metric}']:10.3f}" for k in ("plain", "meta_only", "mwn"))
        if not long_tailed:
            row += f"{r['weight_clean']:10.3f}{r['weight_corrupted']:11.3f}"
        row += f"{r['seconds']:8.1f}"
        lines.append(row)
    lines[1] = "-" * len(lines[0])
    return [head + ":", *lines]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo reweighting", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="classifier steps")
    parser.add_argument("--noise", type=float, default=0.4,
                        help="fraction of training labels corrupted")
    parser.add_argument("--imbalance", type=float, default=None, metavar="RATIO",
                        help="long-tailed variant (no label noise): class k keeps "
                             "n·RATIO^(-k/9) training samples")
    parser.add_argument("--method", choices=METHODS, default="sama",
                        help="hypergradient through the classifier's step")
    parser.add_argument("--meta-lr", type=float, default=Settings.meta_lr)
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="save a histogram of clean / corrupted sample weights (png)")
    args = parser.parse_args(argv)
    if args.imbalance is not None and args.imbalance < 1:
        parser.error("--imbalance must be >= 1")

    long_tailed = args.imbalance is not None
    print(__doc__.splitlines()[0])
    what = (f"long-tailed digits, imbalance ratio {args.imbalance:g}" if long_tailed
            else f"digits with {args.noise:.0%} of the training labels corrupted")
    print(f"{what}; {args.steps} classifier steps per model; hypergradient: {args.method}\n")
    result = run(seeds=args.seeds, steps=args.steps, noise=args.noise,
                 imbalance=args.imbalance, method=args.method, quiet=False,
                 meta_lr=args.meta_lr)
    print("\n".join(_table(result, long_tailed)))
    print("\nplain: every training sample weighted 1; meta set: the 100 clean meta images "
          "alone; MWN: Meta-Weight-Net (same classifier, optimizer, batches and steps).")
    mean = result["mean"]
    if long_tailed:
        counts = result["runs"][0]["class_count"]
        weights = [sum(r["class_weight"][k] for r in result["runs"]) / len(result["runs"])
                   for k in range(CLASSES)]
        print("\nclass               " + "".join(f"{k:7d}" for k in range(CLASSES)))
        print("training samples    " + "".join(f"{c:7d}" for c in counts))
        print("mean learned weight " + "".join(f"{w:7.3f}" for w in weights))
    else:
        print(f"\nmean learned weight on the training set: clean {mean['weight_clean']:.3f}, "
              f"corrupted {mean['weight_corrupted']:.3f}")
    if args.plot:
        print(save_histogram(result["runs"], args.plot))
    return 0
