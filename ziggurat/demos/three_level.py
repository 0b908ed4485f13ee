"""Three levels: Meta-Weight-Net whose own learning rate is tuned by a third level (digits).

Level 1 "classifier": the MLP of the reweighting demo on digits with 40 % corrupted labels,
trained on the loss weighted by the meta-weight net V (SAMA hypergradient to level 2).
Level 2 "meta": V, trained on a clean meta set (10 images per class) with Adam; it is an
IterativeProblem whose Adam learning rate is exp(λ), so level 3 differentiates through its
unrolled steps (reverse mode over ``--unroll`` steps).
Level 3 "tuner": λ, the log learning rate of level 2, trained on a second clean held-out set
(10 images per class) that no other level sees.

Each run is compared with the same program with level 3 frozen (its optimizer's learning
rate set to 0, so λ keeps its initial value), from the same initial learning rates.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

import ziggurat as zg
from ziggurat.demos.reweighting import (
    Batches,
    MetaWeightNet,
    Settings,
    Split,
    accuracy,
    classifier,
    classifier_optimizer,
    engine_config,
    load_digits_split,
    weighted_loss,
)

NAME = "three-level"


class LogRate(torch.nn.Module):
    """λ: one scalar; forward() is the learning rate exp(λ)."""

    def __init__(self, lr: float) -> None:
        super().__init__()
        self.log_lr = torch.nn.Parameter(torch.tensor(math.log(lr)))

    def forward(self) -> torch.Tensor:
        return self.log_lr.exp()


class Meta(zg.IterativeProblem):
    """Level 2: the meta-weight net, with its Adam learning rate read from level 3."""

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)

    def optimizer_hyperparameters(self) -> Mapping[str, float | torch.Tensor]:
        return {"lr": self.tuner()}


def _held_out_loss(p: zg.Problem, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(p.classifier(x), y)


def build_program(
    split: Split, s: Settings, seed: int, init_lr: float, tuner_lr: float, unroll: int,
    config: zg.EngineConfig,
) -> zg.Engine:
    """tuner (level 3) -> meta (level 2, iterative) -> classifier (level 1); the tuner's
    loss reads the classifier, through the meta level's unrolled steps."""
    model = classifier(seed)
    torch.manual_seed(seed + 1000)
    vnet = MetaWeightNet()
    rate = LogRate(init_lr)
    bottom = zg.ImplicitProblem(
        name="classifier", module=model, optimizer=classifier_optimizer(model, s),
        train_data_loader=Batches(split.x_train, split.y_train, s.batch_size, seed),
        config=zg.Config(type=zg.SAMA(mixed="exact"), unroll_steps=1),
        training_step=lambda p, batch: weighted_loss(p, batch, s.normalize),
    )
    middle = Meta(
        name="meta", module=vnet,
        optimizer=torch.optim.Adam(vnet.parameters(), lr=init_lr,
                                   weight_decay=s.meta_weight_decay),
        train_data_loader=[(split.x_meta, split.y_meta)],
        config=zg.Config(type=zg.Reverse(), unroll_steps=unroll),
    )
    top = zg.ImplicitProblem(
        name="tuner", module=rate, optimizer=torch.optim.Adam(rate.parameters(), lr=tuner_lr),
        train_data_loader=[(split.x_held, split.y_held)], training_step=_held_out_loss,
    )
    dependencies: dict[str, dict[Any, list[Any]]] = {
        "u2l": {top: [middle], middle: [bottom]},
        "l2u": {bottom: [middle, top]},
    }
    return zg.Engine(problems=[top, middle, bottom], dependencies=dependencies, config=config)


def run_one(split: Split, s: Settings, seed: int, init_lr: float, tuner_lr: float,
            unroll: int, quiet: bool = True) -> dict[str, Any]:
    """One program (level 3 tuned when tuner_lr > 0, frozen when 0) and its results."""
    engine = build_program(split, s, seed, init_lr, tuner_lr, unroll,
                           engine_config(s.steps, quiet))
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    model = engine.classifier.module
    with torch.no_grad():
        held = float(F.cross_entropy(model(split.x_held), split.y_held))
    return {
        "seed": seed, "init_lr": init_lr, "tuned": tuner_lr > 0, "seconds": seconds,
        "final_lr": float(engine.tuner.module().detach()),
        "held_loss": held,
        "held_acc": accuracy(model, split.x_held, split.y_held),
        "test_acc": accuracy(model, split.x_test, split.y_test),
        "engine": engine,
    }


def run(
    seeds: Sequence[int] = (0, 1, 2),
    init_lrs: Sequence[float] = (1e-5,),
    steps: int = 1500,
    unroll: int = 5,
    tuner_lr: float = 0.3,
    quiet: bool = True,
) -> dict[str, Any]:
    """For each seed and initial meta learning rate: the program with level 3 frozen, then
    tuned. Returns {"runs": [dicts with the results and the engine], "settings": ...}."""
    s = Settings(steps=steps)
    runs = []
    for seed in seeds:
        split = load_digits_split(seed, noise=0.4, held_per_class=10)
        for init_lr in init_lrs:
            for rate in (0.0, tuner_lr):
                runs.append(run_one(split, s, seed, init_lr, rate, unroll, quiet))
    return {"runs": runs, "settings": s}


def results_table(runs: Sequence[Mapping[str, Any]]) -> str:
    """One row per run, then the mean over seeds per initial learning rate and mode."""
    header = (f"{'seed':>6s}{'init lr':>9s}{'level 3':>9s}{'final lr':>10s}"
              f"{'held loss':>11s}{'held acc':>10s}{'test acc':>10s}{'s':>7s}")
    lines = [header, "-" * len(header)]
    for r in runs:
        lines.append(
            f"{r['seed']:6d}{r['init_lr']:9.0e}{'tuned' if r['tuned'] else 'frozen':>9s}"
            f"{r['final_lr']:10.1e}{r['held_loss']:11.3f}{r['held_acc']:10.3f}"
            f"{r['test_acc']:10.3f}{r['seconds']:7.1f}")
    lines.append("-" * len(header))
    for init in dict.fromkeys(r["init_lr"] for r in runs):
        for tuned in (False, True):
            rows = [r for r in runs if r["init_lr"] == init and r["tuned"] == tuned]
            if not rows:
                continue
            n = len(rows)
            lines.append(
                f"{'mean':>6s}{init:9.0e}{'tuned' if tuned else 'frozen':>9s}"
                f"{math.exp(sum(math.log(r['final_lr']) for r in rows) / n):10.1e}"
                f"{sum(r['held_loss'] for r in rows) / n:11.3f}"
                f"{sum(r['held_acc'] for r in rows) / n:10.3f}"
                f"{sum(r['test_acc'] for r in rows) / n:10.3f}"
                f"{sum(r['seconds'] for r in rows) / n:7.1f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo three-level", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--init-lr", type=float, nargs="+", default=[1e-5],
                        help="initial learning rate(s) of the meta-weight net (default 1e-5, "
                             "too small for V to learn in time; 1e-2 is too large)")
    parser.add_argument("--steps", type=int, default=1500, help="classifier steps per run")
    parser.add_argument("--unroll", type=int, default=5,
                        help="meta steps differentiated per level-3 step")
    parser.add_argument("--tuner-lr", type=float, default=0.3,
                        help="Adam learning rate of level 3 (on the log learning rate)")
    parser.add_argument("--dot", default=None, metavar="PATH",
                        help="write the program's graph as Graphviz DOT")
    args = parser.parse_args(argv)
    if args.tuner_lr <= 0:
        parser.error("--tuner-lr must be > 0 (the frozen runs use 0 already)")

    result = run(seeds=args.seeds, init_lrs=args.init_lr, steps=args.steps,
                 unroll=args.unroll, tuner_lr=args.tuner_lr, quiet=False)
    engine = result["runs"][-1]["engine"]
    print(__doc__.splitlines()[0] + "\n")
    print(zg.render.summary(engine.graph, engine.problems))
    print("\n```mermaid")
    print(zg.render.to_mermaid(engine.graph, engine.problems) + "```")
    if args.dot:
        with open(args.dot, "w") as f:
            f.write(zg.render.to_dot(engine.graph, engine.problems))
        print(f"Graphviz DOT written to {args.dot}")
    print(f"\n{args.steps} classifier steps per run; level 3 (Adam, lr {args.tuner_lr:g}) "
          f"steps every {args.unroll}; frozen: the same program with level 3's learning "
          f"rate 0.\nheld: the held-out set level 3 trains on; test: 50 images per class.\n")
    print(results_table(result["runs"]))
    total = sum(r["seconds"] for r in result["runs"])
    print(f"total time {total:.0f} s")
    return 0
