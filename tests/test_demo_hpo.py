"""The hpo demo at small sizes: each part must show its effect, not merely run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

pytest.importorskip("sklearn")

from ziggurat.demos import hpo


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Small matrices: one thread is much faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("dataset", ["breast-cancer", "wine"])
def test_tuned_per_feature_decay_lowers_the_validation_loss(dataset: str) -> None:
    res = hpo.run_weight_decay(dataset=dataset, noise_features=50, outer_steps=20, unroll=10,
                               grid=(1e-3,), init_decay=1e-3)
    initial, learned = res["rows"]["initial"], res["rows"]["learned"]
    assert res["outer_steps"] == 20
    assert learned["val_loss"] < 0.8 * initial["val_loss"]
    assert learned["test_loss"] < initial["test_loss"]  # and it carries over to held-out data


@pytest.fixture(scope="module")
def schedule() -> dict[str, Any]:
    return hpo.run_lr_schedule(train_size=100, val_size=200, hidden=16, batch_size=25,
                               horizon=12, phases=3, init_lr=0.1, outer_steps=12,
                               outer_lr=0.2, grid=(0.1,))


def test_learned_schedule_beats_its_initial_constant_rate(schedule: dict[str, Any]) -> None:
    rows = schedule["rows"]
    for mode in ("reverse", "forward"):
        assert rows[mode]["val_loss"] < 0.9 * rows["initial"]["val_loss"]
    # the unrolled objective (validation loss after the K steps) fell during training
    losses = schedule["losses"]["reverse"]
    assert losses[-1] < 0.9 * losses[0]


def test_reverse_and_forward_hypergradients_agree(schedule: dict[str, Any]) -> None:
    agreement = schedule["agreement"]
    assert agreement["steps"] == 12
    assert agreement["max"] <= 1e-9
    assert agreement["rates"] <= 1e-9


def test_schedule_hypergradient_is_the_derivative_of_the_retrained_validation_loss() -> None:
    """The first hypergradient (both modes) equals a central difference of the validation
    loss of plain torch training (``train_with_rates``) in each phase's log-rate."""
    data = hpo.load_split("digits", 0, 0, sizes=(80, 150))
    init = hpo.mlp(64, 8, 10, 0)
    batches = hpo.batch_sequence(data["train"], 20, 8, 0)
    phases, log_lr = 2, torch.log(torch.tensor(0.3, dtype=torch.float64))

    def val_loss(log_rates: torch.Tensor) -> float:
        rates = [float(log_rates[hpo.phase_of(k, len(batches), phases)].exp())
                 for k in range(len(batches))]
        return hpo.metrics(hpo.train_with_rates(init, batches, rates), data["val"])["loss"]

    h = 1e-5
    fd = torch.zeros(phases, dtype=torch.float64)
    for p in range(phases):
        e = torch.zeros(phases, dtype=torch.float64)
        e[p] = h
        base = torch.full((phases,), float(log_lr), dtype=torch.float64)
        fd[p] = (val_loss(base + e) - val_loss(base - e)) / (2 * h)
    for mode in ("reverse", "forward"):
        run = hpo.learn_schedule(mode, data, init, batches, phases, 0.3, 1, 0.1)
        (grad,) = run["hypergrads"]
        assert torch.allclose(grad, fd, rtol=1e-6, atol=1e-9), (mode, grad, fd)


def test_run_returns_both_parts() -> None:
    res = hpo.run(
        weight_decay={"dataset": "wine", "noise_features": 10, "outer_steps": 2, "unroll": 5,
                      "grid": (1e-3,)},
        lr_schedule={"train_size": 50, "val_size": 50, "hidden": 4, "batch_size": 25,
                     "horizon": 4, "phases": 2, "outer_steps": 2, "grid": (0.1,)})
    assert set(res["weight_decay"]["rows"]) == {"initial", "grid", "learned"}
    assert set(res["lr_schedule"]["rows"]) == {"initial", "grid", "reverse", "forward"}
    assert "agreement" in res["lr_schedule"]
    assert hpo.report_weight_decay(res["weight_decay"]).count("\n") == 5
    assert "reverse vs forward" in hpo.report_lr_schedule(res["lr_schedule"])


def test_demo_command_line_runs_small() -> None:
    assert hpo.main(["--part", "lr-schedule", "--horizon", "6", "--phases", "2",
                     "--lr-outer-steps", "2", "--modes", "reverse"]) == 0
