"""Differentiable architecture search (DARTS) of a tiny conv cell on 8x8 digits (bilevel).

Search space: a stem convolution, then a cell of ``nodes`` nodes, where node i sums one
edge from the stem and from every earlier node; every edge is a softmax(α)-weighted mix of
the candidate operations (zero, skip, 3x3 max / average pooling, ReLU-conv 1x1, ReLU-conv
3x3); the concatenated nodes are average-pooled to 2x2 and classified linearly.
Lower level: the network weights on the training loss. Upper level: the architecture
weights α on the validation loss, with hypergradients by ``zg.Darts`` (scale = the lower
learning rate: DARTS' one-step second-order derivative; ``--method first-order`` drops it).
The discrete architecture (argmax per edge, zero excluded) is retrained from scratch and
compared on the test set with random architectures of the same size (same edges, the same
parametric operations placed at random, random parameter-free operations elsewhere),
under the same training budget.
"""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import ziggurat as zg

NAME = "darts"

#: candidate operations of every edge; "zero" is never part of a derived architecture
OPS: tuple[str, ...] = ("zero", "skip", "max_pool", "avg_pool", "conv_1x1", "conv_3x3")
PARAMETRIC: tuple[str, ...] = ("conv_1x1", "conv_3x3")
PARAMETER_FREE: tuple[str, ...] = ("skip", "max_pool", "avg_pool")
METHODS: tuple[str, ...] = ("darts", "darts-identity", "first-order")

Data = dict[str, tuple[Tensor, Tensor]]


def load_data(seed: int, train: int = 500, val: int = 500) -> Data:
    """scikit-learn's digits as 1x8x8 images in [0, 1], split train / val / test (rest)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "this demo needs scikit-learn: pip install 'ziggurat[demo]' (or ./dev demo)"
        ) from err
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    cut = train + val
    return {"train": (x[:train], y[:train]), "val": (x[train:cut], y[train:cut]),
            "test": (x[cut:], y[cut:])}


class Batches:
    """Shuffled mini-batches, reshuffled each pass by the loader's own generator."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int, seed: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self) -> int:
        return -(-self.x.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        perm = torch.randperm(self.x.shape[0], generator=self.generator)
        for start in range(0, perm.numel(), self.batch_size):
            idx = perm[start:start + self.batch_size]
            yield self.x[idx], self.y[idx]


def edges_of(nodes: int) -> list[tuple[int, int]]:
    """(source, target) of every edge: node i (1..nodes) reads nodes 0..i-1 (0 is the stem)."""
    return [(j, i) for i in range(1, nodes + 1) for j in range(i)]


def make_op(name: str, channels: int) -> nn.Module | None:
    """One candidate operation (None for "zero", which contributes nothing)."""
    if name == "zero":
        return None
    if name == "skip":
        return nn.Identity()
    if name == "max_pool":
        return nn.MaxPool2d(3, stride=1, padding=1)
    if name == "avg_pool":
        return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
    if name == "conv_1x1":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 1))
    if name == "conv_3x3":
        return nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels, 3, padding=1))
    raise ValueError(f"unknown operation {name!r}; known: {OPS}")


class CellNet(nn.Module):
    """Stem conv, one cell, 2x2 average pool and a linear classifier.

    ``candidates[e]`` lists the operations of edge e: all of ``OPS`` for the super-network
    (whose forward takes the mixing weights, one row per edge), one name for a discrete
    architecture (forward without weights).
    """

    def __init__(self, candidates: Sequence[Sequence[str]], nodes: int, channels: int) -> None:
        super().__init__()
        if len(candidates) != len(edges_of(nodes)):
            raise ValueError(f"{len(candidates)} edges given for a cell of {nodes} nodes")
        self.nodes = nodes
        self.candidates = [tuple(c) for c in candidates]
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.edge_ops = nn.ModuleList()
        for names in self.candidates:
            ops = nn.ModuleDict()
            for name in names:
                op = make_op(name, channels)
                if op is not None:
                    ops[name] = op
            self.edge_ops.append(ops)
        self.head = nn.Linear(channels * nodes * 4, 10)

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        states = [self.stem(x)]
        e = 0
        for _ in range(self.nodes):
            total: Tensor | int = 0
            for j in range(len(states)):
                ops = cast(nn.ModuleDict, self.edge_ops[e])
                for k, name in enumerate(self.candidates[e]):
                    if name not in ops:
                        continue
                    out = ops[name](states[j])
                    total = total + (out if weights is None else weights[e, k] * out)
                e += 1
            states.append(total if isinstance(total, Tensor) else torch.zeros_like(states[0]))
        feats = F.adaptive_avg_pool2d(F.relu(torch.cat(states[1:], 1)), 2)
        return self.head(feats.flatten(1))


class Architecture(nn.Module):
    """α, one row of logits per edge; calling it gives the mixing weights softmax(α)."""

    def __init__(self, edges: int, ops: int, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.alpha = nn.Parameter(1e-3 * torch.randn(edges, ops, generator=g))

    def forward(self) -> Tensor:
        return self.alpha.softmax(-1)


def derive(weights: Tensor) -> list[str]:
    """The discrete architecture: per edge, the operation of largest weight except zero."""
    names = list(OPS)
    masked = weights.detach().clone()
    masked[:, names.index("zero")] = -1.0
    return [names[int(k)] for k in masked.argmax(-1)]


def parameter_count(arch: Sequence[str], nodes: int, channels: int) -> int:
    """Parameters of the discrete network with one operation per edge."""
    net = CellNet([[a] for a in arch], nodes, channels)
    return sum(p.numel() for p in net.parameters())


def random_architectures(reference: Sequence[str], count: int, seed: int) -> list[list[str]]:
    """``count`` distinct architectures of the same size as ``reference``: its parametric
    operations placed on random edges, a random parameter-free operation on the others
    (so the same edges and the same number of parameters). Fewer when fewer exist."""
    rng = random.Random(seed)
    parametric = [a for a in reference if a in PARAMETRIC]
    edges = len(reference)
    seen = {tuple(reference)}
    found: list[list[str]] = []
    for _ in range(200 * count):
        if len(found) == count:
            break
        arch = [rng.choice(PARAMETER_FREE) for _ in range(edges)]
        for pos, op in zip(rng.sample(range(edges), len(parametric)), parametric):
            arch[pos] = op
        if tuple(arch) not in seen:
            seen.add(tuple(arch))
            found.append(arch)
    return found


def evaluate(model: nn.Module, x: Tensor, y: Tensor, weights: Tensor | None = None) -> tuple[
    float, float
]:
    """(cross-entropy, accuracy) of ``model`` on (x, y)."""
    with torch.no_grad():
        logits = model(x) if weights is None else model(x, weights)
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()


def search(data: Data, *, steps: int, method: str, nodes: int, channels: int,
           batch_size: int, lr: float, arch_lr: float, seed: int, learn_alpha: bool = True,
           quiet: bool = True) -> dict[str, Any]:
    """Train the super-network for ``steps`` lower steps with α as the upper level (one
    upper step per lower step); ``learn_alpha=False`` keeps α uniform (the control).
    Returns the mixing weights, the super-network's validation loss and the time taken."""
    torch.manual_seed(seed)
    edges = len(edges_of(nodes))
    supernet = CellNet([OPS] * edges, nodes, channels)
    arch = Architecture(edges, len(OPS), seed)
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    # darts: H⁻¹ ≈ lr·I, DARTS' one-step second-order derivative (SGD's update Jacobian is
    # lr, momentum aside); darts-identity: H⁻¹ ≈ I; first-order: no hypergradient at all
    config = zg.Config(type=zg.Darts(scale=lr) if method == "darts" else zg.Darts())

    uniform = torch.full((edges, len(OPS)), 1.0 / len(OPS))

    def net_loss(p: zg.Problem, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(p.module(x, p.arch() if learn_alpha else uniform), y)

    def arch_loss(p: zg.Problem, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(p.net(x, p.module()), y)

    net = zg.ImplicitProblem(
        name="net", module=supernet,
        optimizer=torch.optim.SGD(supernet.parameters(), lr=lr, momentum=0.9),
        train_data_loader=Batches(*data["train"], batch_size, seed),
        training_step=net_loss, config=config)
    arch_problem = zg.ImplicitProblem(
        name="arch", module=arch,
        optimizer=torch.optim.Adam(arch.parameters(), lr=arch_lr, betas=(0.5, 0.999)),
        train_data_loader=Batches(*data["val"], batch_size, seed + 1),
        training_step=arch_loss)
    problems: list[zg.Problem] = [net]
    dependencies: dict[str, dict[Any, list[Any]]] | None = None
    if learn_alpha and method != "first-order":
        problems.insert(0, arch_problem)
        dependencies = zg.chain(arch_problem, net)
    elif learn_alpha:
        # first-order DARTS: α gets its direct gradient only. The graph refuses a u2l edge
        # without its l2u edge, so the two levels are declared independent: both are leaves
        # that step every iteration, net first (the order they are listed in).
        problems.append(arch_problem)
    engine = zg.Engine(problems=problems, dependencies=dependencies,
                       config=zg.EngineConfig(train_iters=steps, summary=not quiet,
                                              progress="off" if quiet else "auto"))
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    weights = arch().detach() if learn_alpha else uniform
    val_loss, val_acc = evaluate(supernet, *data["val"], weights=weights)
    return {"weights": weights, "val_loss": val_loss, "val_acc": val_acc, "seconds": seconds,
            "hypergradient_steps": arch_problem.count}


def train_discrete(arch: Sequence[str], data: Data, *, steps: int, nodes: int, channels: int,
                   batch_size: int, lr: float, seed: int) -> float:
    """Retrain a discrete architecture from scratch on train + val; test accuracy."""
    torch.manual_seed(seed)
    model = CellNet([[a] for a in arch], nodes, channels)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    x = torch.cat([data["train"][0], data["val"][0]])
    y = torch.cat([data["train"][1], data["val"][1]])
    batches = Batches(x, y, batch_size, seed)
    it = iter(batches)
    for _ in range(steps):
        try:
            xb, yb = next(it)
        except StopIteration:
            it = iter(batches)
            xb, yb = next(it)
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return evaluate(model, *data["test"])[1]


def run(*, search_steps: int = 300, retrain_steps: int = 300, random_archs: int = 4,
        retrain_seeds: int = 1, method: str = "darts", nodes: int = 3, channels: int = 8,
        batch_size: int = 64, lr: float = 0.05, arch_lr: float = 0.03, seed: int = 0,
        control: bool = True, quiet: bool = True) -> dict[str, Any]:
    """Search, derive, retrain and compare. Returns everything the table shows:
    ``weights`` (edges x ops), ``derived``, ``derived_acc`` (mean test accuracy over the
    retraining seeds), ``random`` (list of (arch, mean acc)), ``random_mean``,
    ``val_loss`` / ``uniform_val_loss`` (super-network with learned / uniform α after the
    same lower steps; the latter only with ``control``) and timings."""
    data = load_data(seed)
    found = search(data, steps=search_steps, method=method, nodes=nodes, channels=channels,
                   batch_size=batch_size, lr=lr, arch_lr=arch_lr, seed=seed, quiet=quiet)
    uniform = (search(data, steps=search_steps, method=method, nodes=nodes, channels=channels,
                      batch_size=batch_size, lr=lr, arch_lr=arch_lr, seed=seed,
                      learn_alpha=False) if control else None)
    derived = derive(found["weights"])
    start = time.perf_counter()

    def accuracy(arch: Sequence[str]) -> float:
        accs = [train_discrete(arch, data, steps=retrain_steps, nodes=nodes, channels=channels,
                               batch_size=batch_size, lr=lr, seed=seed + 100 + s)
                for s in range(retrain_seeds)]
        return sum(accs) / len(accs)

    derived_acc = accuracy(derived)
    randoms = [(a, accuracy(a)) for a in random_architectures(derived, random_archs, seed)]
    retrain_seconds = time.perf_counter() - start
    random_accs = [a for _, a in randoms]
    return {
        "weights": found["weights"], "derived": derived, "derived_acc": derived_acc,
        "derived_params": parameter_count(derived, nodes, channels),
        "random": randoms,
        "random_mean": sum(random_accs) / len(random_accs) if random_accs else float("nan"),
        "val_loss": found["val_loss"], "val_acc": found["val_acc"],
        "uniform_val_loss": None if uniform is None else uniform["val_loss"],
        "uniform_val_acc": None if uniform is None else uniform["val_acc"],
        "search_seconds": found["seconds"], "retrain_seconds": retrain_seconds,
        "hypergradient_steps": found["hypergradient_steps"],
    }


def _describe(arch: Sequence[str], nodes: int) -> str:
    return " ".join(f"{j}>{i}:{a}" for (j, i), a in zip(edges_of(nodes), arch))


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo darts", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--search-steps", type=int, default=800)
    parser.add_argument("--retrain-steps", type=int, default=800)
    parser.add_argument("--random-archs", type=int, default=6)
    parser.add_argument("--retrain-seeds", type=int, default=2)
    parser.add_argument("--method", choices=METHODS,
                        default="darts", help="darts: zg.Darts(scale=lr) (one-step "
                        "second-order); darts-identity: zg.Darts() (H⁻¹ ≈ I); first-order: "
                        "no hypergradient")
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--arch-lr", type=float, default=0.03)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    out = run(search_steps=args.search_steps, retrain_steps=args.retrain_steps,
              random_archs=args.random_archs, retrain_seeds=args.retrain_seeds,
              method=args.method, nodes=args.nodes, channels=args.channels, lr=args.lr,
              arch_lr=args.arch_lr, seed=args.seed, quiet=False)
    print(__doc__.splitlines()[0])
    print(f"search: {args.search_steps} lower steps, {out['hypergradient_steps']} upper steps "
          f"({args.method}) in {out['search_seconds']:.1f} s; retraining: "
          f"{1 + len(out['random'])} architectures x {args.retrain_seeds} seeds x "
          f"{args.retrain_steps} steps in {out['retrain_seconds']:.1f} s\n")
    print("learned mixing weights softmax(α):")
    print(f"{'edge':8s}" + "".join(f"{o:>10s}" for o in OPS))
    for (j, i), row in zip(edges_of(args.nodes), out["weights"]):
        print(f"{f'{j}->{i}':8s}" + "".join(f"{float(w):10.3f}" for w in row))
    print(f"\nsuper-network val loss: learned α {out['val_loss']:.4f} "
          f"(acc {out['val_acc']:.3f}), uniform α {out['uniform_val_loss']:.4f} "
          f"(acc {out['uniform_val_acc']:.3f})\n")
    width = 12
    print(f"{'architecture':{width}s}{'params':>8s}{'test acc':>10s}   edges (src>dst:op)")
    params = out["derived_params"]
    print(f"{'derived':{width}s}{params:8d}{out['derived_acc']:10.3f}   "
          f"{_describe(out['derived'], args.nodes)}")
    for k, (arch, acc) in enumerate(out["random"]):
        print(f"{f'random {k + 1}':{width}s}{parameter_count(arch, args.nodes, args.channels):8d}"
              f"{acc:10.3f}   {_describe(arch, args.nodes)}")
    accs = [a for _, a in out["random"]]
    if accs:
        better = sum(out["derived_acc"] > a for a in accs)
        print(f"{'random mean':{width}s}{'':8s}{out['random_mean']:10.3f}   "
              f"(min {min(accs):.3f}, max {max(accs):.3f}; derived beats {better}/{len(accs)})")
    return 0
