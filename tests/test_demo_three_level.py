"""The three-level demo: level 3 tunes the meta-weight net's learning rate, and it matters.

Asserted (seed 0, 200 classifier steps, initial meta learning rate 1e-5, about 10 s): the
tuned program's level-3 parameter (log learning rate) rises, and its objective (the
classifier's loss on the held-out set level 3 trains on) ends well below that of the same
program with level 3 frozen; the reweighting then works (corrupted samples weigh less) and
test accuracy is higher. The program's graph, as rendered, has three levels.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch

pytest.importorskip("sklearn")

import ziggurat as zg
from ziggurat.demos import reweighting as rw
from ziggurat.demos import three_level as tl

INIT_LR = 1e-5


@pytest.fixture(scope="module")
def runs() -> Iterator[dict[str, dict[str, Any]]]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        split = rw.load_digits_split(0, noise=0.4, held_per_class=10)
        s = rw.Settings(steps=200)
        frozen = tl.run_one(split, s, 0, INIT_LR, tuner_lr=0.0, unroll=5)
        tuned = tl.run_one(split, s, 0, INIT_LR, tuner_lr=0.3, unroll=5)
        for r in (frozen, tuned):
            engine = r["engine"]
            weights = rw.sample_weights(engine.classifier.module, engine.meta.module,
                                        split.x_train, split.y_train)
            r["weight_clean"] = float(weights[~split.corrupted].mean())
            r["weight_corrupted"] = float(weights[split.corrupted].mean())
        yield {"frozen": frozen, "tuned": tuned}
    finally:
        torch.set_num_threads(threads)


def test_frozen_level_three_keeps_its_value(runs: dict[str, dict[str, Any]]) -> None:
    assert runs["frozen"]["final_lr"] == pytest.approx(INIT_LR, rel=1e-5)


def test_level_three_moves_to_lower_its_objective(runs: dict[str, dict[str, Any]]) -> None:
    frozen, tuned = runs["frozen"], runs["tuned"]
    # the learning rate rose by more than an order of magnitude from a too-small start ...
    assert math.log10(tuned["final_lr"] / INIT_LR) > 1.5, tuned["final_lr"]
    # ... and level 3's objective, the held-out loss, is far lower than with it frozen
    assert tuned["held_loss"] < 0.7 * frozen["held_loss"], (
        tuned["held_loss"], frozen["held_loss"])


def test_tuned_program_reweights_and_generalises(runs: dict[str, dict[str, Any]]) -> None:
    frozen, tuned = runs["frozen"], runs["tuned"]
    assert tuned["weight_corrupted"] < 0.5 * tuned["weight_clean"]
    # with the learning rate frozen at 1e-5, V hardly learns: weights stay alike
    assert frozen["weight_corrupted"] > 0.7 * frozen["weight_clean"]
    assert tuned["test_acc"] > frozen["test_acc"] + 0.1, (tuned["test_acc"], frozen["test_acc"])


def test_graph_has_three_levels(runs: dict[str, dict[str, Any]]) -> None:
    engine = runs["tuned"]["engine"]
    dot = zg.render.to_dot(engine.graph, engine.problems)
    ranks = re.findall(r"\{ rank=same; ([^}]*)\}", dot)
    assert [r.split(";")[0].strip() for r in ranks] == ['"tuner"', '"meta"', '"classifier"']
    mermaid = zg.render.to_mermaid(engine.graph, engine.problems)
    assert mermaid.count(" --> ") == 2  # u2l: tuner → meta → classifier
    assert mermaid.count("-.->|l2u|") == 2  # classifier read by meta and by tuner
    summary = zg.render.summary(engine.graph, engine.problems)
    assert "3 problems" in summary
    assert "tuner -> meta -> classifier" in summary
