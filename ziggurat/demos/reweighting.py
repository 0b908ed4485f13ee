"""Meta-Weight-Net: learn per-sample loss weights from a small clean set (bilevel, digits).

Lower level "classifier": an MLP 64-256-256-10 trained on scikit-learn's digits, 40 % of
whose training labels are corrupted (``--noise``; each chosen label is replaced by a
uniformly random *different* class, so every corrupted label is wrong), on the weighted
loss mean_i w_i · ℓ_i with w_i = V(ℓ_i) / mean_batch V(ℓ_j). V, the "meta-weight net"
(MLP 1-100-1 with a sigmoid output), reads each sample's *detached* loss. Upper level
"meta": V, trained with Adam so that the classifier does well on a clean meta set of 10
images per class. The hypergradient through the classifier's step is SAMA with the exact
mixed product (the one-step unrolled formula through the real SGD-momentum update).

Prints, per seed, test accuracy of plain training on the noisy labels, of training on the
100 clean meta images alone, of training on the clean training samples only (an oracle
that knows which labels are corrupted) and of Meta-Weight-Net, all with the same model,
optimizer, batch size and number of classifier steps, and the mean learned weight V(ℓ) of
the clean and of the corrupted training samples at the end.

``--imbalance RATIO``: the long-tailed variant (class k keeps n·RATIO^(-k/9) of its n
training images; no label noise unless ``--noise`` is given). V then also reads the
sample's one-hot label (``--loss-only`` for the plain V), the oracle uses class weights
1/n_k, and balanced test accuracy is compared.
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
# hypergradient through the classifier's step; the "-fd" variants use the finite-difference
# mixed product, which is wrong for this program (see docs/results_reweighting.md)
METHODS = ("sama", "darts", "darts-lr", "reverse", "sama-fd", "darts-fd")


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
    sigmoid output. With ``classes`` > 0 V also reads the sample's one-hot label (a
    class-aware weight, for long-tailed data)."""

    def __init__(self, hidden: int = 100, classes: int = 0) -> None:
        super().__init__()
        self.classes = classes
        self.net = torch.nn.Sequential(
            torch.nn.Linear(1 + classes, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1))

    def logits(self, losses: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """The pre-sigmoid output z: V = sigmoid(z)."""
        inputs = losses.unsqueeze(-1)
        if self.classes:
            if labels is None:
                raise ValueError("a class-aware MetaWeightNet needs the labels")
            onehot = F.one_hot(labels, self.classes).to(losses.dtype)
            inputs = torch.cat([inputs, onehot], dim=-1)
        return self.net(inputs).squeeze(-1)

    def forward(self, losses: torch.Tensor, labels: torch.Tensor | None = None,
                normalize: bool = False) -> torch.Tensor:
        """V(ℓ_i), or with ``normalize`` V_i / mean_j V_j over the batch, computed in log
        space (a softmax of log V) so that it stays finite when every V_i underflows."""
        z = self.logits(losses, labels)
        if not normalize:
            return torch.sigmoid(z)
        return torch.softmax(F.logsigmoid(z), dim=0) * z.numel()


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
    class_aware: bool = False


def classifier_optimizer(model: torch.nn.Module, s: Settings) -> torch.optim.Optimizer:
    """SGD with momentum and weight decay: the classifier's optimizer in every model here."""
    return torch.optim.SGD(model.parameters(), lr=s.lr, momentum=s.momentum,
                           weight_decay=s.weight_decay)


# --------------------------------------------------------------------------- training
def train_plain(
    x: torch.Tensor, y: torch.Tensor, s: Settings, seed: int,
    class_weight: torch.Tensor | None = None,
) -> torch.nn.Module:
    """Ordinary training with the same model, optimizer, batch size and number of steps as
    Meta-Weight-Net's classifier; every sample weighted 1, or ``class_weight[y]``."""
    model = classifier(seed)
    opt = classifier_optimizer(model, s)
    batches = Batches(x, y, s.batch_size, seed).forever()
    for _ in range(s.steps):
        xb, yb = next(batches)
        losses = F.cross_entropy(model(xb), yb, reduction="none")
        if class_weight is not None:
            losses = class_weight[yb] * losses
        opt.zero_grad()
        losses.mean().backward()
        opt.step()
    return model


def weighted_loss(
    p: zg.Problem, batch: tuple[torch.Tensor, torch.Tensor], normalize: bool = True
) -> torch.Tensor:
    """mean_i w_i · ℓ_i with w_i = V(ℓ_i) from the problem named "meta", divided by the
    batch mean of V when ``normalize``. V reads the loss as a constant (detached): the
    weights carry no gradient into the classifier."""
    x, y = batch
    losses = F.cross_entropy(p.module(x), y, reduction="none")
    weights = p.meta(losses.detach(), y, normalize=normalize)
    return (weights * losses).mean()


def _meta_loss(p: zg.Problem, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(p.classifier(x), y)


def hypergradient_config(s: Settings) -> tuple[type[zg.Problem], zg.Config]:
    """The classifier's problem class and config for ``s.method``.

    ``"sama"`` (default) and ``"darts-lr"`` are the same here (SAMA's update Jacobian of
    SGD with momentum is the learning rate); ``"darts"`` differs from them only by the
    scale, which matters only through Adam's epsilon and L2 decay; ``"reverse"``
    differentiates the real step of an IterativeProblem (unroll 1).
    """
    method: zg.HypergradMethod
    if s.method == "reverse":
        return zg.IterativeProblem, zg.Config(type=zg.Reverse(), unroll_steps=1)
    if s.method == "sama":
        method = zg.SAMA(mixed="exact")
    elif s.method == "darts":
        method = zg.Darts(mixed="exact")
    elif s.method == "darts-lr":
        method = zg.Darts(scale=s.lr, mixed="exact")
    elif s.method == "sama-fd":
        method = zg.SAMA(mixed="fd")
    elif s.method == "darts-fd":
        method = zg.Darts(mixed="fd")
    else:
        raise ValueError(f"unknown method {s.method!r}; one of {METHODS}")
    return zg.ImplicitProblem, zg.Config(type=method, unroll_steps=1)


def build_program(
    split: Split, s: Settings, seed: int, engine_config: zg.EngineConfig
) -> zg.Engine:
    """The bilevel program: "meta" (V, loss on the meta set) above "classifier"."""
    model = classifier(seed)
    torch.manual_seed(seed + 1000)
    vnet = MetaWeightNet(classes=CLASSES if s.class_aware else 0)
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


def engine_config(steps: int, quiet: bool) -> zg.EngineConfig:
    """No summary; no progress bar when ``quiet`` (tests), the default bar otherwise."""
    if quiet:
        return zg.EngineConfig(train_iters=steps, summary=False, progress="off")
    return zg.EngineConfig(train_iters=steps, summary=False)


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
    """V(ℓ_i) (before the batch normalisation) for every sample, under ``model``."""
    with torch.no_grad():
        return vnet(F.cross_entropy(model(x), y, reduction="none"), y)


BASELINES = ("plain", "meta_only", "oracle")


def run_seed(split: Split, s: Settings, seed: int, baselines: Sequence[str] = BASELINES,
             quiet: bool = True) -> dict[str, Any]:
    """The baselines and Meta-Weight-Net on one split: accuracies, weights, timings."""
    models: dict[str, torch.nn.Module] = {}
    start = time.perf_counter()
    for name in baselines:
        if name == "plain":
            models[name] = train_plain(split.x_train, split.y_train, s, seed)
        elif name == "meta_only":
            models[name] = train_plain(split.x_meta, split.y_meta, s, seed)
        elif name == "oracle" and bool(split.corrupted.any()):
            clean = ~split.corrupted
            models[name] = train_plain(split.x_train[clean], split.y_train[clean], s, seed)
        elif name == "oracle":  # nothing corrupted: inverse class-frequency weights
            counts = torch.bincount(split.y_train, minlength=CLASSES).clamp_min(1).float()
            inverse = 1.0 / counts
            inverse = inverse / inverse[split.y_train].mean()  # mean weight 1 per sample
            models[name] = train_plain(split.x_train, split.y_train, s, seed, inverse)
        else:
            raise ValueError(f"unknown baseline {name!r}; one of {BASELINES}")
    baseline_seconds = time.perf_counter() - start
    engine = build_program(split, s, seed, engine_config(s.steps, quiet))
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    models["mwn"] = engine.classifier.module
    weights = sample_weights(models["mwn"], engine.meta.module, split.x_train, split.y_train)
    bad = split.corrupted
    out: dict[str, Any] = {
        "seed": seed,
        "seconds": seconds,
        "baseline_seconds": baseline_seconds,
        "weights": weights,
        "corrupted": bad,
        "labels": split.y_true,
        "class_weight": [float(weights[split.y_true == k].mean()) for k in range(CLASSES)],
        "class_count": [int((split.y_true == k).sum()) for k in range(CLASSES)],
        "weight_clean": float(weights[~bad].mean()),
        "weight_corrupted": float(weights[bad].mean()) if bool(bad.any()) else math.nan,
    }
    for name, model in models.items():
        out[f"{name}_acc"] = accuracy(model, split.x_test, split.y_test)
        out[f"{name}_bacc"] = balanced_accuracy(model, split.x_test, split.y_test)
    return out


def run(
    seeds: Sequence[int] = (0, 1, 2),
    steps: int = 1500,
    noise: float | None = None,
    imbalance: float | None = None,
    method: str = "sama",
    meta_lr: float | None = None,
    class_aware: bool | None = None,
    baselines: Sequence[str] = BASELINES,
    quiet: bool = True,
    **settings: Any,
) -> dict[str, Any]:
    """Meta-Weight-Net and the baselines for each seed.

    Defaults depend on the variant: label noise 0.4, meta learning rate 1e-3 and a
    loss-only V; with ``imbalance``, no noise, meta learning rate 3e-3 and a class-aware V.
    ``quiet`` turns the engine's progress bar off (tests); ``settings`` override other
    fields of ``Settings``. Returns {"runs": [one dict per seed], "mean": {metric: mean
    over seeds}, "settings": Settings}.
    """
    long_tailed = imbalance is not None
    s = Settings(
        steps=steps, method=method,
        meta_lr=meta_lr if meta_lr is not None else 3e-3 if long_tailed else 1e-3,
        class_aware=class_aware if class_aware is not None else long_tailed,
        **settings,
    )
    if noise is None:
        noise = 0.0 if long_tailed else 0.4
    runs = [run_seed(load_digits_split(seed, noise=noise, imbalance=imbalance), s, seed,
                     baselines, quiet)
            for seed in seeds]
    keys = [k for k, v in runs[0].items() if isinstance(v, float)]
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in keys}
    return {"runs": runs, "mean": mean, "settings": s}


# --------------------------------------------------------------------------- output
def save_plot(runs: list[dict[str, Any]], path: str, long_tailed: bool) -> str:
    """Histograms of the learned weights of clean and corrupted training samples (all
    seeds), or for long-tailed data the mean weight per class. Returns a message."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no plot written (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    if long_tailed:
        weights = [sum(r["class_weight"][k] for r in runs) / len(runs) for k in range(CLASSES)]
        ax.bar(range(CLASSES), weights)
        ax.set_xticks(range(CLASSES),
                      [f"{k}\nn={n}" for k, n in enumerate(runs[0]["class_count"])])
        ax.tick_params(axis="x", labelsize=8)
        ax.set_xlabel("class (training samples)")
        ax.set_ylabel("mean learned weight V")
        ax.set_title("Meta-Weight-Net on long-tailed digits: weight per class")
    else:
        weights_all = torch.cat([r["weights"] for r in runs])
        bad = torch.cat([r["corrupted"] for r in runs])
        bins = torch.linspace(0, 1, 41).tolist()
        for mask, label in ((~bad, "clean labels"), (bad, "corrupted labels")):
            ax.hist(weights_all[mask].tolist(), bins=bins, alpha=0.6, label=label)
        ax.set_xlabel("learned weight V(loss) at the end of training")
        ax.set_ylabel("training samples")
        ax.set_title("Meta-Weight-Net on digits with 40 % corrupted labels")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


def results_table(result: dict[str, Any], long_tailed: bool) -> str:
    """Accuracy per seed and the mean (balanced accuracy for long-tailed data)."""
    metric = "bacc" if long_tailed else "acc"
    names = [n for n in (*BASELINES, "mwn") if f"{n}_{metric}" in result["runs"][0]]
    titles = {"plain": "plain", "meta_only": "meta set", "oracle": "oracle", "mwn": "MWN"}
    header = f"{'seed':>6s}" + "".join(f"{titles[n]:>10s}" for n in names)
    if not long_tailed:
        header += f"{'w clean':>10s}{'w corrupt':>11s}"
    header += f"{'MWN s':>8s}"
    lines = [header, "-" * len(header)]
    for r in [*result["runs"], {"seed": "mean", **result["mean"]}]:
        row = f"{r['seed']!s:>6s}" + "".join(f"{r[f'{n}_{metric}']:10.3f}" for n in names)
        if not long_tailed:
            row += f"{r['weight_clean']:10.3f}{r['weight_corrupted']:11.3f}"
        lines.append(row + f"{r['seconds']:8.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo reweighting", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="classifier steps per model")
    parser.add_argument("--noise", type=float, default=None,
                        help="fraction of training labels corrupted (default 0.4; 0 with "
                             "--imbalance)")
    parser.add_argument("--imbalance", type=float, default=None, metavar="RATIO",
                        help="long-tailed variant: class k keeps n·RATIO^(-k/9) training "
                             "samples")
    parser.add_argument("--loss-only", action="store_true",
                        help="with --imbalance: V reads the loss only, not the label")
    parser.add_argument("--method", choices=METHODS, default="sama",
                        help="hypergradient through the classifier's step (default sama)")
    parser.add_argument("--meta-lr", type=float, default=None,
                        help="Adam learning rate of V (default 1e-3; 3e-3 with --imbalance)")
    parser.add_argument("--no-normalize", action="store_true",
                        help="use V(ℓ_i) as the weight without dividing by its batch mean")
    parser.add_argument("--plot", default=None, metavar="PATH",
                        help="save a plot of the learned weights (png; needs matplotlib)")
    args = parser.parse_args(argv)
    if args.imbalance is not None and args.imbalance < 1:
        parser.error("--imbalance must be >= 1")
    if args.noise is not None and not 0 <= args.noise < 1:
        parser.error("--noise must be in [0, 1)")

    long_tailed = args.imbalance is not None
    result = run(seeds=args.seeds, steps=args.steps, noise=args.noise,
                 imbalance=args.imbalance, method=args.method, meta_lr=args.meta_lr,
                 class_aware=None if not args.loss_only else False, quiet=False,
                 normalize=not args.no_normalize)
    s: Settings = result["settings"]
    print(__doc__.splitlines()[0])
    noise = args.noise if args.noise is not None else 0.0 if long_tailed else 0.4
    data = (f"long-tailed digits (ratio {args.imbalance:g}), {noise:.0%} label noise"
            if long_tailed else f"digits, {noise:.0%} of the training labels corrupted")
    v_kind = "loss and label" if s.class_aware else "loss"
    print(f"{data}; {s.steps} classifier steps per model; V reads the {v_kind}; "
          f"hypergradient {s.method}; meta lr {s.meta_lr:g}\n")
    print(("balanced test accuracy" if long_tailed else "test accuracy") + ":")
    print(results_table(result, long_tailed))
    oracle = ("class weights 1/n_k" if long_tailed and noise == 0
              else "the clean training samples only")
    print("\nplain: every training sample weighted 1; meta set: the 100 clean meta images "
          f"alone;\noracle: {oracle}; MWN: Meta-Weight-Net. Same model, optimizer, "
          "batch size and steps for all.")
    mean = result["mean"]
    if long_tailed:
        weights = [sum(r["class_weight"][k] for r in result["runs"]) / len(result["runs"])
                   for k in range(CLASSES)]
        print("\nclass               " + "".join(f"{k:7d}" for k in range(CLASSES)))
        print("training samples    "
              + "".join(f"{c:7d}" for c in result["runs"][0]["class_count"]))
        print("mean learned weight " + "".join(f"{w:7.3f}" for w in weights))
    if noise > 0:
        print(f"\nmean learned weight V(ℓ) of the training samples at the end: clean "
              f"{mean['weight_clean']:.3f}, corrupted {mean['weight_corrupted']:.3f}")
    total = sum(r["seconds"] + r["baseline_seconds"] for r in result["runs"])
    print(f"total time {total:.0f} s")
    if args.plot:
        print(save_plot(result["runs"], args.plot, long_tailed))
    return 0
