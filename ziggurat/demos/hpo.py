"""Hyperparameter optimization: per-feature weight decay (CG) and a learned learning-rate schedule.

Part 1, per-feature weight decay (implicit hypergradients): multinomial logistic regression on
a few training samples of a scikit-learn dataset with pure-noise features appended, penalty
½ Σ_i exp(λ_i) ‖W[:, i]‖² (one λ_i per input feature, shared by the classes); λ minimises the
validation loss with hypergradients by conjugate gradient. Compared with the initial shared
decay and with the best shared decay of a grid search, each retrained from scratch.

Part 2, a learned learning-rate schedule (unrolled hypergradients): an MLP on digits trained
for K SGD steps on a fixed sequence of mini-batches; the learning rate of each of P phases of
the run is exp(λ_p), an upper-level parameter read through ``optimizer_hyperparameters()``.
Every unroll restarts from the same initial weights (``initial_parameters()``), so the upper
level minimises the validation loss after exactly K steps. Trained once with reverse mode and once
with forward mode (memory constant in K), whose hypergradients must agree; compared with the
best constant learning rate of a grid search at the same budget of K steps. Results:
docs/results_meta.md.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import ziggurat as zg

NAME = "hpo"

Split = tuple[torch.Tensor, torch.Tensor]
DTYPE = torch.float64
DATASETS = ("breast-cancer", "wine", "digits")
# samples in the training and validation splits (the rest is the test split)
SPLITS = {"breast-cancer": (60, 250), "wine": (30, 70), "digits": (150, 600)}
DECAY_GRID = tuple(10.0 ** (j / 2) for j in range(-8, 3))  # shared decays 1e-4 … 10
LR_GRID = tuple(10.0 ** (j / 8) for j in range(-8, 7))  # constant learning rates 0.1 … 5.6


# --------------------------------------------------------------------------- data
def _sklearn(name: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from sklearn import datasets
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "this demo needs scikit-learn: pip install 'ziggurat[demo]' (or ./dev demo)"
        ) from err
    loaders = {"breast-cancer": datasets.load_breast_cancer, "wine": datasets.load_wine,
               "digits": datasets.load_digits}
    if name not in loaders:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    data = loaders[name]()
    return (torch.tensor(data.data, dtype=DTYPE),
            torch.tensor(data.target, dtype=torch.long))


def load_split(name: str, seed: int, noise_features: int = 0,
               sizes: tuple[int, int] | None = None) -> dict[str, Split]:
    """A dataset shuffled with ``seed``, ``noise_features`` N(0, 1) columns appended, split
    into train / val / test (``sizes`` = (train, val), default ``SPLITS[name]``) and
    standardised with the training split's statistics."""
    x, y = _sklearn(name)
    g = torch.Generator().manual_seed(seed)
    if noise_features:
        x = torch.cat([x, torch.randn(x.shape[0], noise_features, generator=g, dtype=DTYPE)], 1)
    perm = torch.randperm(x.shape[0], generator=g)
    x, y = x[perm], y[perm]
    n_train, n_val = sizes or SPLITS[name]
    mean, std = x[:n_train].mean(0), x[:n_train].std(0)
    x = (x - mean) / torch.where(std > 1e-8, std, torch.ones_like(std))
    cut = n_train + n_val
    return {"train": (x[:n_train], y[:n_train]), "val": (x[n_train:cut], y[n_train:cut]),
            "test": (x[cut:], y[cut:])}


def metrics(model: Callable[[torch.Tensor], torch.Tensor], split: Split) -> dict[str, float]:
    """Cross-entropy and accuracy of ``model`` on a split."""
    x, y = split
    with torch.no_grad():
        logits = model(x)
        return {"loss": F.cross_entropy(logits, y).item(),
                "acc": (logits.argmax(-1) == y).double().mean().item()}


# --------------------------------------------------------------------------- part 1
class FeatureDecay(torch.nn.Module):
    """λ: one log-decay per input feature; calling it returns the decays exp(λ)."""

    def __init__(self, features: int, init: float) -> None:
        super().__init__()
        self.log_decay = torch.nn.Parameter(torch.full((features,), init, dtype=DTYPE))

    def forward(self) -> torch.Tensor:
        return self.log_decay.exp()


def decay_penalty(weight: torch.Tensor, decay: torch.Tensor) -> torch.Tensor:
    """½ Σ_i decay_i ‖W[:, i]‖² for a (classes, features) weight."""
    return 0.5 * (decay * (weight**2).sum(0)).sum()


def logistic_regression(features: int, classes: int) -> torch.nn.Linear:
    """A zero-initialised (so deterministic) float64 linear classifier."""
    model = torch.nn.Linear(features, classes).to(DTYPE)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    return model


def fit_logistic(split: Split, classes: int, decay: torch.Tensor, steps: int, lr: float
                 ) -> torch.nn.Linear:
    """Plain full-batch gradient descent with a fixed per-feature decay (the baselines and the
    retrain with the learned decay)."""
    x, y = split
    model = logistic_regression(x.shape[1], classes)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y) + decay_penalty(model.weight, decay)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def run_weight_decay(
    dataset: str = "breast-cancer",
    noise_features: int = 100,
    outer_steps: int = 60,
    unroll: int = 20,
    cg_iterations: int = 20,
    inner_lr: float = 0.5,
    outer_lr: float = 0.1,
    init_decay: float = 1e-3,
    grid: Sequence[float] = DECAY_GRID,
    seed: int = 0,
    progress: str = "off",
) -> dict[str, Any]:
    """Tune one weight decay per feature; return val/test metrics of the initial shared
    decay, the best shared decay of ``grid`` and the learned decays, each retrained from
    scratch for the same number of steps (``outer_steps · unroll``)."""
    data = load_split(dataset, seed, noise_features)
    x_tr = data["train"][0]
    features = x_tr.shape[1]
    classes = int(torch.cat([s[1] for s in data.values()]).max()) + 1
    steps = outer_steps * unroll

    def shared(value: float) -> torch.Tensor:
        return torch.full((features,), value, dtype=DTYPE)

    start = time.perf_counter()
    grid_val = {d: metrics(fit_logistic(data["train"], classes, shared(d), steps, inner_lr),
                           data["val"])["loss"] for d in grid}
    best_shared = min(grid_val, key=lambda d: grid_val[d])
    grid_seconds = time.perf_counter() - start

    net = logistic_regression(features, classes)
    hp = FeatureDecay(features, math.log(init_decay))

    def inner_loss(p: zg.Problem, batch: Split) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(p.module(x), y) + decay_penalty(net.weight, p.decay())

    def outer_loss(p: zg.Problem, batch: Split) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(p.model(x), y)

    inner = zg.ImplicitProblem(
        name="model", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=inner_lr),
        train_data_loader=[data["train"]], training_step=inner_loss,
        config=zg.Config(type=zg.CG(iterations=cg_iterations, damping=1e-4),
                         unroll_steps=unroll),
    )
    outer = zg.ImplicitProblem(
        name="decay", module=hp, optimizer=torch.optim.Adam(hp.parameters(), lr=outer_lr),
        train_data_loader=[data["val"]], training_step=outer_loss,
    )
    engine = zg.Engine(problems=[outer, inner], dependencies=zg.chain(outer, inner),
                       config=zg.EngineConfig(train_iters=steps, summary=False,
                                              progress=progress))
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start

    learned = hp().detach()
    rows: dict[str, dict[str, float]] = {}
    for label, decay in (("initial", shared(init_decay)), ("grid", shared(best_shared)),
                         ("learned", learned)):
        model = fit_logistic(data["train"], classes, decay, steps, inner_lr)
        rows[label] = {f"{split}_{k}": v for split in ("val", "test")
                       for k, v in metrics(model, data[split]).items()}
    real = features - noise_features
    return {
        "dataset": dataset, "features": features, "noise_features": noise_features,
        "train_size": x_tr.shape[0], "steps": steps, "outer_steps": outer.count,
        "rows": rows, "grid_decay": best_shared, "init_decay": init_decay,
        # geometric means: the decays spread over orders of magnitude
        "decay_real_gmean": float(learned[:real].log().mean().exp()),
        "decay_noise_gmean": (float(learned[real:].log().mean().exp()) if noise_features
                              else float("nan")),
        "seconds": seconds, "grid_seconds": grid_seconds,
    }


# --------------------------------------------------------------------------- part 2
class PhaseSchedule(torch.nn.Module):
    """λ: one log learning rate per phase; calling it returns the rates exp(λ)."""

    def __init__(self, phases: int, init_lr: float) -> None:
        super().__init__()
        self.log_lr = torch.nn.Parameter(torch.full((phases,), math.log(init_lr), dtype=DTYPE))

    def forward(self) -> torch.Tensor:
        return self.log_lr.exp()


def phase_of(step: int, horizon: int, phases: int) -> int:
    """The phase (0 … phases-1) of step 0 … horizon-1: equal consecutive blocks."""
    return min(step * phases // horizon, phases - 1)


class ScheduledTraining(zg.IterativeProblem):
    """K SGD steps whose learning rate at step k is the upper level's rate of k's phase.

    Every unroll starts from the same weights ``start`` (``initial_parameters``), so the
    upper level sees the validation loss of a whole K-step training run.
    """

    def __init__(self, *args: Any, horizon: int, phases: int, start: Sequence[torch.Tensor],
                 schedule: str = "schedule", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.horizon, self.phases, self.schedule_name = horizon, phases, schedule
        self.start = [t.detach().clone() for t in start]
        self.step_in_unroll = 0

    def initial_parameters(self) -> list[torch.Tensor]:
        return self.start  # constants: the unroll copies them

    def on_inner_loop_start(self) -> None:
        self.step_in_unroll = 0

    def param_callback(self, params: list[torch.Tensor]) -> None:
        self.step_in_unroll += 1

    def optimizer_hyperparameters(self) -> dict[str, torch.Tensor]:
        rates = getattr(self, self.schedule_name)()
        return {"lr": rates[phase_of(self.step_in_unroll, self.horizon, self.phases)]}

    def training_step(self, batch: Split) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.module(x), y)


def mlp(features: int, hidden: int, classes: int, seed: int) -> torch.nn.Module:
    """A float64 tanh MLP with weights drawn from ``seed`` (the global RNG is untouched)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return torch.nn.Sequential(torch.nn.Linear(features, hidden), torch.nn.Tanh(),
                                   torch.nn.Linear(hidden, classes)).to(DTYPE)


def batch_sequence(split: Split, batch_size: int, steps: int, seed: int) -> list[Split]:
    """``steps`` mini-batches: consecutive epochs of a fixed random order per epoch."""
    x, y = split
    g = torch.Generator().manual_seed(seed)
    out: list[Split] = []
    while len(out) < steps:
        perm = torch.randperm(x.shape[0], generator=g)
        for i in range(0, x.shape[0] - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            out.append((x[idx], y[idx]))
    return out[:steps]


def train_with_rates(init: torch.nn.Module, batches: Sequence[Split], rates: Sequence[float]
                     ) -> torch.nn.Module:
    """Plain torch SGD from a copy of ``init``, step k on ``batches[k]`` with ``rates[k]``."""
    import copy

    model = copy.deepcopy(init)
    opt = torch.optim.SGD(model.parameters(), lr=float(rates[0]))
    for (x, y), lr in zip(batches, rates):
        for group in opt.param_groups:
            group["lr"] = float(lr)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def learn_schedule(
    mode: str, data: dict[str, Split], init: torch.nn.Module, batches: list[Split],
    phases: int, init_lr: float, outer_steps: int, outer_lr: float, progress: str = "off",
) -> dict[str, Any]:
    """Learn the per-phase rates with ``mode`` ("reverse" or "forward"); return the rates,
    the hypergradient of every upper step and the time taken."""
    import copy

    horizon = len(batches)
    net = copy.deepcopy(init)
    schedule = PhaseSchedule(phases, init_lr)
    hypergrads: list[torch.Tensor] = []
    losses: list[float] = []  # validation loss after the K steps, per upper step

    class Validation(zg.ImplicitProblem):
        def training_step(self, batch: Split) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.learner(x), y)

        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            hypergrads.append(grads[0].detach().clone())
            losses.append(float(self.last_loss))  # type: ignore[arg-type]

    methods: dict[str, zg.registry.Method] = {"reverse": zg.Reverse(), "forward": zg.Forward()}
    if mode not in methods:
        raise ValueError(f"unknown mode {mode!r}: 'reverse' or 'forward'")
    learner = ScheduledTraining(
        "learner", net, torch.optim.SGD(net.parameters(), lr=init_lr),
        train_data_loader=batches, horizon=horizon, phases=phases, start=list(init.parameters()),
        config=zg.Config(type=methods[mode], unroll_steps=horizon),
    )
    upper = Validation("schedule", schedule,
                       torch.optim.Adam(schedule.parameters(), lr=outer_lr),
                       train_data_loader=[data["val"]])
    engine = zg.Engine([upper, learner], zg.chain(upper, learner),
                       zg.EngineConfig(train_iters=outer_steps * horizon, summary=False,
                                       progress=progress))
    start = time.perf_counter()
    engine.run()
    return {"rates": schedule().detach().clone(), "hypergrads": hypergrads,
            "losses": losses, "seconds": time.perf_counter() - start}


def run_lr_schedule(
    train_size: int = 300,
    val_size: int = 500,
    hidden: int = 32,
    batch_size: int = 50,
    horizon: int = 60,
    phases: int = 10,
    init_lr: float = 0.1,
    outer_steps: int = 100,
    outer_lr: float = 0.1,
    grid: Sequence[float] = LR_GRID,
    modes: Sequence[str] = ("reverse", "forward"),
    seed: int = 0,
    progress: str = "off",
) -> dict[str, Any]:
    """Learn a per-phase learning-rate schedule on digits with each of ``modes``; compare
    with the initial constant rate and with the best constant rate of ``grid`` (each run for
    the same K = ``horizon`` steps on the same batches from the same initial weights)."""
    data = load_split("digits", seed, 0, sizes=(train_size, val_size))
    init = mlp(data["train"][0].shape[1], hidden, 10, seed)
    batches = batch_sequence(data["train"], batch_size, horizon, seed)

    def evaluate(rates: Sequence[float]) -> dict[str, float]:
        model = train_with_rates(init, batches, rates)
        return {f"{split}_{k}": v for split in ("val", "test")
                for k, v in metrics(model, data[split]).items()}

    start = time.perf_counter()
    grid_rows = {lr: evaluate([lr] * horizon) for lr in grid}
    best_lr = min(grid_rows, key=lambda lr: grid_rows[lr]["val_loss"])
    grid_seconds = time.perf_counter() - start

    runs = {mode: learn_schedule(mode, data, init, batches, phases, init_lr, outer_steps,
                                 outer_lr, progress) for mode in modes}
    rows = {"initial": evaluate([init_lr] * horizon), "grid": grid_rows[best_lr]}
    for mode, run in runs.items():
        per_step = [float(run["rates"][phase_of(k, horizon, phases)]) for k in range(horizon)]
        rows[mode] = evaluate(per_step)
    out: dict[str, Any] = {
        "rows": rows, "grid_lr": best_lr, "init_lr": init_lr, "horizon": horizon,
        "phases": phases, "outer_steps": outer_steps, "grid_seconds": grid_seconds,
        "grid_size": len(grid),
        "rates": {mode: run["rates"].tolist() for mode, run in runs.items()},
        "seconds": {mode: run["seconds"] for mode, run in runs.items()},
        "losses": {mode: run["losses"] for mode, run in runs.items()},
    }
    if "reverse" in runs and "forward" in runs:
        rev, fwd = runs["reverse"]["hypergrads"], runs["forward"]["hypergrads"]
        errors = [float((f - r).norm() / r.norm().clamp_min(1e-300)) for r, f in zip(rev, fwd)]
        out["agreement"] = {"first": errors[0], "max": max(errors),
                            "rates": float((runs["forward"]["rates"] - runs["reverse"]["rates"]
                                            ).abs().max()),
                            "steps": len(errors)}
    return out


# --------------------------------------------------------------------------- command line
def run(weight_decay: dict[str, Any] | None = None, lr_schedule: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Both parts, with keyword arguments for ``run_weight_decay`` / ``run_lr_schedule``."""
    return {"weight_decay": run_weight_decay(**(weight_decay or {})),
            "lr_schedule": run_lr_schedule(**(lr_schedule or {}))}


def _table(rows: dict[str, dict[str, float]], labels: dict[str, str]) -> list[str]:
    lines = [f"{'':34s}{'val loss':>10s}{'val acc':>9s}{'test loss':>11s}{'test acc':>10s}"]
    for key, label in labels.items():
        r = rows[key]
        lines.append(f"{label:34s}{r['val_loss']:10.4f}{r['val_acc']:9.3f}"
                     f"{r['test_loss']:11.4f}{r['test_acc']:10.3f}")
    return lines


def report_weight_decay(res: dict[str, Any]) -> str:
    lines = [f"Per-feature weight decay: {res['dataset']}, {res['train_size']} training samples,"
             f" {res['features'] - res['noise_features']} real + {res['noise_features']} noise "
             f"features; {res['steps']} inner steps, {res['outer_steps']} CG hypergradient "
             f"steps in {res['seconds']:.1f} s (grid: {res['grid_seconds']:.1f} s)"]
    lines += _table(res["rows"], {
        "initial": f"initial shared decay {res['init_decay']:.3g}",
        "grid": f"best shared decay (grid) {res['grid_decay']:.3g}",
        "learned": "learned per-feature decay",
    })
    if res["noise_features"]:
        lines.append(f"learned decay (geometric mean): real features "
                     f"{res['decay_real_gmean']:.3g}, "
                     f"noise features {res['decay_noise_gmean']:.3g}")
    return "\n".join(lines)


def report_lr_schedule(res: dict[str, Any]) -> str:
    modes = list(res["rates"])
    lines = [f"Learned learning-rate schedule: digits MLP, K = {res['horizon']} SGD steps, "
             f"{res['phases']} phases, {res['outer_steps']} upper steps; grid of "
             f"{res['grid_size']} constant rates in {res['grid_seconds']:.1f} s; "
             + ", ".join(f"{m} mode {res['seconds'][m]:.1f} s" for m in modes)]
    labels = {"initial": f"initial constant lr {res['init_lr']:.3g}",
              "grid": f"best constant lr (grid) {res['grid_lr']:.3g}"}
    labels.update({m: f"learned schedule ({m} mode)" for m in modes})
    lines += _table(res["rows"], labels)
    for m in modes:
        lines.append(f"{m:>8s} rates per phase: " + " ".join(f"{r:.3g}" for r in res["rates"][m]))
    if "agreement" in res:
        a = res["agreement"]
        lines.append(f"reverse vs forward hypergradients: relative difference "
                     f"{a['first']:.1e} at the first upper step, at most {a['max']:.1e} over "
                     f"{a['steps']}; learned rates differ by at most {a['rates']:.1e}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo hpo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "weight-decay", "lr-schedule"), default="all")
    parser.add_argument("--datasets", default="breast-cancer,wine,digits",
                        help="comma-separated, part 1 (default: %(default)s)")
    parser.add_argument("--noise-features", type=int, default=100)
    parser.add_argument("--wd-outer-steps", type=int, default=60)
    parser.add_argument("--wd-unroll", type=int, default=20)
    parser.add_argument("--horizon", type=int, default=60, help="K, part 2")
    parser.add_argument("--phases", type=int, default=10)
    parser.add_argument("--init-lr", type=float, default=0.1)
    parser.add_argument("--lr-outer-steps", type=int, default=100)
    parser.add_argument("--modes", default="reverse,forward")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(__doc__.splitlines()[0] + "\n")
    if args.part in ("all", "weight-decay"):
        for name in args.datasets.split(","):
            res = run_weight_decay(dataset=name, noise_features=args.noise_features,
                                   outer_steps=args.wd_outer_steps, unroll=args.wd_unroll,
                                   seed=args.seed)
            print(report_weight_decay(res) + "\n", flush=True)
    if args.part in ("all", "lr-schedule"):
        res = run_lr_schedule(horizon=args.horizon, phases=args.phases, init_lr=args.init_lr,
                              outer_steps=args.lr_outer_steps,
                              modes=tuple(args.modes.split(",")), seed=args.seed)
        print(report_lr_schedule(res), flush=True)
    return 0
