"""The darts demo finds something: a short, fixed-seed search on digits (about 20 s).

Asserted effects (seed 0, a 2-node cell of 4 channels, 200 search and 200 retraining steps):
α leaves the uniform start and puts little weight on the zero operation, the super-network
with the learned α has a lower validation loss than the same super-network trained with α
held uniform, and the derived architecture, retrained from scratch, beats the mean test
accuracy of random architectures of the same size. Over seeds 0-3 of this configuration the
derived architecture beat the random mean every time, but the validation-loss claim failed
at seed 3 (learned α's super-network ended with a higher validation loss than the uniform
one), and at full length the derived architecture beats the random mean at 2 of 3 seeds
(docs/results_search_pruning.md): the test pins seed 0 rather than claiming more.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

pytest.importorskip("sklearn")

from ziggurat.demos import darts


@pytest.fixture(scope="module")
def result() -> Iterator[dict]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield darts.run(search_steps=200, retrain_steps=200, random_archs=3, nodes=2,
                        channels=4, batch_size=32, seed=0)
    finally:
        torch.set_num_threads(threads)


def test_alpha_leaves_uniform_and_drops_zero(result: dict) -> None:
    weights = result["weights"]
    uniform = 1.0 / len(darts.OPS)
    assert weights.shape == (len(darts.edges_of(2)), len(darts.OPS))
    assert torch.allclose(weights.sum(-1), torch.ones(weights.shape[0]))
    # every edge has a clear favourite (uniform would be 1/6 ≈ 0.17)
    assert (weights.max(-1).values > 0.5).all(), weights
    # the zero operation lost weight on every edge
    assert (weights[:, darts.OPS.index("zero")] < uniform).all(), weights
    assert "zero" not in result["derived"]


def test_learned_alpha_lowers_validation_loss(result: dict) -> None:
    assert result["val_loss"] < 0.85 * result["uniform_val_loss"], (
        result["val_loss"], result["uniform_val_loss"])


def test_derived_beats_random_architectures_of_the_same_size(result: dict) -> None:
    derived_params = result["derived_params"]
    assert len(result["random"]) == 3
    for arch, _ in result["random"]:
        assert darts.parameter_count(arch, 2, 4) == derived_params
        assert arch != result["derived"]
    assert result["derived_acc"] > result["random_mean"], (
        result["derived_acc"], result["random"])


def test_random_architectures_match_the_reference() -> None:
    reference = ["conv_3x3", "skip", "conv_1x1", "max_pool", "avg_pool", "skip"]
    found = darts.random_architectures(reference, 5, seed=1)
    assert len(found) == 5 and len({tuple(a) for a in found}) == 5
    for arch in found:
        assert sorted(a for a in arch if a in darts.PARAMETRIC) == ["conv_1x1", "conv_3x3"]
        assert all(a in darts.PARAMETER_FREE for a in arch if a not in darts.PARAMETRIC)
        assert darts.parameter_count(arch, 3, 8) == darts.parameter_count(reference, 3, 8)
