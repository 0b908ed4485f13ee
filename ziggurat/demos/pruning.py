"""Data pruning by meta-learned sample importance (SAMA's use): noisy digits, keep 50 % / 70 %.

Training set: ``--train`` digits images of which a fraction ``--noise`` (default 30 %) get
a uniformly random wrong label; a small clean validation set; the rest is the test set.
Lower level: an MLP 64-128-10 trained with Adam on the weighted loss mean_i σ(s_i) ℓ_i of
each mini-batch. Upper level: one score s_i per training sample (a parameter vector indexed
by sample id), trained with Adam on the clean validation loss, hypergradients by SAMA (or
``zg.Darts``). Then the training set is pruned to the top 50 % and 70 % of samples by
learned score, a fresh MLP is trained on each subset with the same budget (steps), and the
test accuracy is compared with random pruning and with EL2N scores (‖softmax(f(x)) −
onehot(y)‖ after a few epochs, averaged over seeds), keeping the hardest samples as Paul et
al. do, or the easiest (the small-loss rule).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ziggurat as zg

NAME = "pruning"

CLASSES = 10
METHODS = ("sama", "darts")


@dataclass
class Split:
    """The training set (noisy labels, true labels kept to score the result), the clean
    validation set the scores are learned on, and the test set."""

    x_train: Tensor
    y_train: Tensor
    y_true: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor

    @property
    def corrupted(self) -> Tensor:
        """Boolean mask of the training samples whose label was changed."""
        return self.y_train != self.y_true


def load_data(seed: int, train: int = 1000, val: int = 200, noise: float = 0.3) -> Split:
    """scikit-learn's digits (pixels / 16): ``train`` / ``val`` / rest for test, in random
    order; a fraction ``noise`` of the training labels replaced by a different class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "this demo needs scikit-learn: pip install 'ziggurat[demo]' (or ./dev demo)"
        ) from err
    digits = load_digits()
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(digits.target), generator=g)
    x = torch.tensor(digits.data, dtype=torch.float32)[perm] / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)[perm]
    y_true = y[:train]
    y_train = y_true.clone()
    n_noisy = round(noise * train)
    chosen = torch.randperm(train, generator=g)[:n_noisy]
    shift = torch.randint(1, CLASSES, (n_noisy,), generator=g)
    y_train[chosen] = (y_true[chosen] + shift) % CLASSES  # never the true class
    cut = train + val
    return Split(x[:train], y_train, y_true, x[train:cut], y[train:cut], x[cut:], y[cut:])


class IndexedBatches:
    """Shuffled mini-batches (x, y, sample ids), reshuffled each pass by its own generator."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int,
                 ids: Tensor | None = None) -> None:
        self.x, self.y = x, y
        self.ids = torch.arange(x.shape[0]) if ids is None else ids
        self.batch_size = min(batch_size, x.shape[0])
        self.generator = torch.Generator().manual_seed(seed)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        perm = torch.randperm(self.x.shape[0], generator=self.generator)
        for start in range(0, perm.numel() - self.batch_size + 1, self.batch_size):
            idx = perm[start:start + self.batch_size]
            yield self.x[idx], self.y[idx], self.ids[idx]

    def forever(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        while True:
            yield from self


def classifier(seed: int, hidden: int = 128) -> nn.Module:
    """The MLP 64-hidden-10 used at both stages, initialised from ``seed``."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, CLASSES))


class SampleScores(nn.Module):
    """One score s_i per training sample; calling it with sample ids gives σ(s_i)."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.zeros(n))

    def forward(self, ids: Tensor) -> Tensor:
        return torch.sigmoid(self.s[ids])


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item()


def learn_scores(split: Split, *, method: str, steps: int, batch_size: int = 100,
                 lr: float = 1e-3, score_lr: float = 0.1, seed: int = 0,
                 quiet: bool = True) -> dict[str, Any]:
    """Bilevel: scores (upper, clean validation loss) over the classifier (lower, weighted
    training loss), one upper step per lower step. Returns the scores and timings."""
    if method == "sama":
        config = zg.Config(type=zg.SAMA())
    elif method == "darts":
        config = zg.Config(type=zg.Darts())
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    net = classifier(seed)
    scores = SampleScores(split.x_train.shape[0])

    def weighted_loss(p: zg.Problem, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        x, y, ids = batch
        losses = F.cross_entropy(p.module(x), y, reduction="none")
        return (p.scores(ids) * losses).mean()

    def val_loss(p: zg.Problem, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(p.classifier(x), y)

    lower = zg.ImplicitProblem(
        name="classifier", module=net, optimizer=torch.optim.Adam(net.parameters(), lr=lr),
        train_data_loader=IndexedBatches(split.x_train, split.y_train, batch_size, seed),
        training_step=weighted_loss, config=config)
    upper = zg.ImplicitProblem(
        name="scores", module=scores,
        optimizer=torch.optim.Adam(scores.parameters(), lr=score_lr),
        train_data_loader=[(split.x_val, split.y_val)], training_step=val_loss)
    engine = zg.Engine(problems=[upper, lower], dependencies=zg.chain(upper, lower),
                       config=zg.EngineConfig(train_iters=steps, summary=not quiet,
                                              progress="off" if quiet else "auto"))
    start = time.perf_counter()
    engine.run()
    return {"scores": scores.s.detach().clone(), "seconds": time.perf_counter() - start,
            "val_acc": accuracy(net, split.x_val, split.y_val),
            "test_acc": accuracy(net, split.x_test, split.y_test)}


def train_plain(split: Split, keep: Tensor | None, *, steps: int, batch_size: int = 64,
                lr: float = 1e-3, seed: int = 0) -> nn.Module:
    """A fresh classifier trained on the kept training samples (all when None)."""
    ids = torch.arange(split.x_train.shape[0]) if keep is None else keep
    net = classifier(seed)
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    batches = IndexedBatches(split.x_train[ids], split.y_train[ids], batch_size, seed).forever()
    for _ in range(steps):
        x, y, _ = next(batches)
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net


def el2n_scores(split: Split, *, steps: int, seeds: int, batch_size: int = 64,
                lr: float = 1e-3) -> Tensor:
    """EL2N (Paul et al., 2021): ‖softmax(f(x)) − onehot(y)‖₂ after ``steps`` training steps
    on the whole (noisy) training set, averaged over ``seeds`` networks."""
    total = torch.zeros(split.x_train.shape[0])
    for s in range(seeds):
        net = train_plain(split, None, steps=steps, batch_size=batch_size, lr=lr,
                          seed=1000 + s)
        with torch.no_grad():
            prob = net(split.x_train).softmax(-1)
            total += (prob - F.one_hot(split.y_train, CLASSES).float()).norm(dim=-1)
    return total / seeds


def quotas(labels: Tensor, fraction: float) -> list[int]:
    """Samples to keep per class: ``fraction`` of each class, rounded so that the total is
    round(fraction · n) (largest remainders first)."""
    counts = torch.bincount(labels, minlength=CLASSES).double()
    exact = fraction * counts
    keep = exact.floor().long()
    short = round(fraction * labels.numel()) - int(keep.sum())
    order = torch.sort(exact - keep, descending=True, stable=True).indices
    keep[order[:short]] += 1
    return [int(k) for k in keep]


def keep_top(scores: Tensor, labels: Tensor, fraction: float) -> Tensor:
    """Ids of the samples with the largest scores, ``fraction`` of each (given) class, so
    that every pruning rule keeps the same class sizes (ties broken by id)."""
    kept = []
    for k, quota in enumerate(quotas(labels, fraction)):
        ids = torch.nonzero(labels == k).squeeze(1)
        order = torch.sort(scores[ids], descending=True, stable=True).indices
        kept.append(ids[order[:quota]])
    return torch.sort(torch.cat(kept)).values


def auc(scores: Tensor, positive: Tensor) -> float:
    """P(score of a random positive > score of a random negative), ties counting ½."""
    pos, neg = scores[positive], scores[~positive]
    greater = (pos[:, None] > neg[None, :]).float().mean()
    ties = (pos[:, None] == neg[None, :]).float().mean()
    return float(greater + 0.5 * ties)


def run(*, train: int = 1000, val: int = 200, noise: float = 0.3, methods: Sequence[str] = (
        "sama",), meta_steps: int = 500, retrain_steps: int = 600, el2n_steps: int = 60,
        el2n_seeds: int = 4, random_seeds: int = 3, retrain_seeds: int = 1,
        fractions: Sequence[float] = (0.5, 0.7), score_lr: float = 0.1, seed: int = 0,
        quiet: bool = True) -> dict[str, Any]:
    """Learn scores with each method, prune, retrain, compare. Returns ``acc`` (row label
    -> {fraction: mean test accuracy}; fraction 1.0 for the full set), ``noisy_kept`` (row
    -> {fraction: share of corrupted samples among those kept}), ``auc`` (method -> AUC of
    the learned score for telling clean from corrupted samples), ``score_clean`` /
    ``score_corrupted`` (method -> mean score) and timings."""
    split = load_data(seed, train, val, noise)
    corrupted = split.corrupted
    start = time.perf_counter()
    learned = {m: learn_scores(split, method=m, steps=meta_steps, score_lr=score_lr,
                               seed=seed, quiet=quiet) for m in methods}
    meta_seconds = time.perf_counter() - start
    el2n = el2n_scores(split, steps=el2n_steps, seeds=el2n_seeds)
    n, labels = split.x_train.shape[0], split.y_train

    def test_acc(keep: Tensor | None) -> float:
        accs = [accuracy(train_plain(split, keep, steps=retrain_steps, seed=seed + 10 + r),
                         split.x_test, split.y_test) for r in range(retrain_seeds)]
        return sum(accs) / len(accs)

    rows: dict[str, dict[float, Tensor | list[Tensor]]] = {}
    for f in fractions:
        rows.setdefault("random", {})[f] = [
            keep_top(torch.rand(n, generator=torch.Generator().manual_seed(seed + 500 + r)),
                     labels, f) for r in range(random_seeds)]
        rows.setdefault("EL2N, keep hardest", {})[f] = keep_top(el2n, labels, f)
        rows.setdefault("EL2N, keep easiest", {})[f] = keep_top(-el2n, labels, f)
        for m in methods:
            rows.setdefault(f"learned ({m})", {})[f] = keep_top(learned[m]["scores"], labels, f)
    start = time.perf_counter()
    acc: dict[str, dict[float, float]] = {"full data": {1.0: test_acc(None)}}
    noisy_kept: dict[str, dict[float, float]] = {"full data": {1.0: float(corrupted.float()
                                                                          .mean())}}
    clean_ids = torch.nonzero(~corrupted).squeeze(1)
    acc["clean samples only (oracle)"] = {
        float(clean_ids.numel() / n): test_acc(clean_ids)}
    noisy_kept["clean samples only (oracle)"] = {float(clean_ids.numel() / n): 0.0}
    for label, by_fraction in rows.items():
        for f, keep in by_fraction.items():
            keeps = keep if isinstance(keep, list) else [keep]
            acc.setdefault(label, {})[f] = sum(test_acc(k) for k in keeps) / len(keeps)
            noisy_kept.setdefault(label, {})[f] = sum(
                float(corrupted[k].float().mean()) for k in keeps) / len(keeps)
    retrain_seconds = time.perf_counter() - start
    return {
        "acc": acc, "noisy_kept": noisy_kept,
        "auc": {m: auc(learned[m]["scores"], ~corrupted) for m in methods},
        "auc_el2n": auc(-el2n, ~corrupted),
        "score_clean": {m: float(learned[m]["scores"][~corrupted].mean()) for m in methods},
        "score_corrupted": {m: float(learned[m]["scores"][corrupted].mean()) for m in methods},
        "meta_seconds": meta_seconds, "retrain_seconds": retrain_seconds,
        "meta_test_acc": {m: learned[m]["test_acc"] for m in methods},
        "scores": {m: learned[m]["scores"] for m in methods}, "corrupted": corrupted,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo pruning", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.3)
    parser.add_argument("--methods", default="sama,darts",
                        help="comma-separated hypergradient methods: sama, darts")
    parser.add_argument("--meta-steps", type=int, default=1000)
    parser.add_argument("--retrain-steps", type=int, default=1000)
    parser.add_argument("--el2n-steps", type=int, default=60,
                        help="training steps before the EL2N score is read")
    parser.add_argument("--el2n-seeds", type=int, default=4)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--retrain-seeds", type=int, default=3)
    parser.add_argument("--score-lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in METHODS:
            parser.error(f"unknown method {m!r}; choose from {METHODS}")

    fractions = (0.5, 0.7)
    out = run(train=args.train, val=args.val, noise=args.noise, methods=methods,
              meta_steps=args.meta_steps, retrain_steps=args.retrain_steps,
              el2n_steps=args.el2n_steps, el2n_seeds=args.el2n_seeds,
              random_seeds=args.random_seeds, retrain_seeds=args.retrain_seeds,
              fractions=fractions, score_lr=args.score_lr, seed=args.seed, quiet=False)
    print(__doc__.splitlines()[0])
    print(f"{args.train} training samples ({args.noise:.0%} mislabelled), {args.val} clean "
          f"validation samples; scores: {args.meta_steps} steps per method in "
          f"{out['meta_seconds']:.1f} s; retraining ({args.retrain_steps} steps, "
          f"{args.retrain_seeds} seeds each) in {out['retrain_seconds']:.1f} s\n")
    for m in methods:
        print(f"learned scores ({m}): mean clean {out['score_clean'][m]:+.3f}, mean "
              f"mislabelled {out['score_corrupted'][m]:+.3f}, AUC clean-vs-mislabelled "
              f"{out['auc'][m]:.3f}; the bilevel classifier itself: test acc "
              f"{out['meta_test_acc'][m]:.3f}")
    print(f"EL2N (low = clean): AUC clean-vs-mislabelled {out['auc_el2n']:.3f}\n")
    header = "".join(f"{f'keep {f:.0%}':>16s}" for f in fractions)
    print(f"{'test accuracy (mislabelled kept)':36s}{header}")
    for label, by_fraction in out["acc"].items():
        cells = []
        for f in fractions:
            if f in by_fraction:
                cells.append(f"{by_fraction[f]:.3f} ({out['noisy_kept'][label][f]:4.0%})")
            else:
                cells.append("")
        extra = [f"{by_fraction[f]:.3f} ({out['noisy_kept'][label][f]:.0%} mislabelled) "
                 f"at {f:.0%}" for f in by_fraction if f not in fractions]
        print(f"{label:36s}" + "".join(f"{c:>16s}" for c in cells)
              + (("   " + "; ".join(extra)) if extra else ""))
    return 0
