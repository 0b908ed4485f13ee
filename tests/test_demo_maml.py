"""The maml demo at small sizes: meta-learning must show its effect, not merely run."""

from __future__ import annotations

import itertools
from typing import Any

import pytest
import torch

pytest.importorskip("sklearn")

import ziggurat as zg
from ziggurat.demos import maml


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Any:
    """Small matrices: one thread is much faster than several on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _accuracy(res: dict[str, Any], name: str) -> float:
    return float(res["scores"][name][res["steps"]][0])


def test_maml_beats_scratch_on_held_out_classes() -> None:
    """3-way 5-shot, 5 SGD steps at lr 0.1 on classes 6-9 never seen in meta-training."""
    res = maml.run_fewshot(methods=("maml",), meta_steps=300, episodes=200, scratch_lrs=())
    scratch, meta = _accuracy(res, "scratch"), _accuracy(res, "maml")
    half_widths = res["scores"]["scratch"][5][1] + res["scores"]["maml"][5][1]
    assert meta > scratch + 0.08 and meta - scratch > half_widths
    # before adaptation both are at chance: the labels are shuffled in every episode
    for name in ("scratch", "maml"):
        assert abs(res["scores"][name][0][0] - 1 / 3) < 0.05


def test_first_order_maml_beats_scratch_on_held_out_classes() -> None:
    res = maml.run_fewshot(methods=("fomaml",), meta_steps=1000, episodes=200, scratch_lrs=())
    assert _accuracy(res, "fomaml") > _accuracy(res, "scratch") + 0.08


def test_imaml_beats_scratch_early_and_with_a_one_iteration_solve() -> None:
    """What holds for iMAML here (docs/results_meta.md): with 5 CG iterations it beats scratch
    after a short meta-training (it later collapses, once the lower problem is no longer
    solved by its 5 steps); with a 1-iteration solve it beats scratch after 300 meta-steps."""
    early = maml.run_fewshot(methods=("imaml",), meta_steps=30, episodes=100, scratch_lrs=())
    assert _accuracy(early, "imaml") > _accuracy(early, "scratch") + 0.06
    one = maml.run_fewshot(methods=("imaml",), meta_steps=300, episodes=100, scratch_lrs=(),
                           cg_iterations=1)
    assert _accuracy(one, "imaml") > _accuracy(one, "scratch") + 0.1


def test_meta_training_is_deterministic() -> None:
    x, y = maml.digits(range(6), dihedral=True)
    classes = [c + 10 * t for t in range(8) for c in range(6)]
    runs = []
    for _ in range(2):
        sampler = maml.FewShot(x, y, classes, 3, 5, 15, 4, seed=3)
        phi, _ = maml.meta_train("maml", sampler, [64, 16, 3], "ce", 3, 0.1, 5, 1e-3, seed=3)
        runs.append(phi)
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_support_and_query_come_from_the_same_tasks_and_change_every_unroll() -> None:
    """The shared sampler: the lower level adapts on the support sets of the very tasks
    whose query sets the upper level scores, and every unroll draws new tasks."""
    x, y = maml.digits(range(6))
    sampler = maml.FewShot(x, y, range(6), 3, 5, 15, 2, seed=0)
    seen: list[tuple[Any, Any, Any]] = []

    class Recording(maml.Meta):
        def training_step(self, batch: maml.Batch) -> torch.Tensor:
            seen.append((self.adapt.cur_batch, batch, sampler.current))
            return super().training_step(batch)

    sizes = [64, 8, 3]
    phi, theta = maml.TaskMLP(sizes, 1, 0), maml.TaskMLP(sizes, 2, 0)
    adapt = maml.Adapt("adapt", theta, torch.optim.SGD(theta.parameters(), lr=0.1),
                       train_data_loader=sampler.support_loader(), sampler=sampler, kind="ce",
                       config=zg.Config(unroll_steps=3))
    meta = Recording("meta", phi, torch.optim.Adam(phi.parameters(), lr=1e-3),
                     train_data_loader=sampler.query_loader(), kind="ce", tasks=2)
    zg.Engine([meta, adapt], zg.chain(meta, adapt),
              zg.EngineConfig(train_iters=12, summary=False, progress="off")).run()
    assert len(seen) == 4
    for support, query, current in seen:
        assert current is not None
        assert support is current[0] and query is current[1]
    supports = [s[0][0] for s in seen]
    assert all(not torch.equal(a, b) for a, b in itertools.pairwise(supports))


def test_imaml_hypergradient_is_the_implicit_function_formula() -> None:
    """iMAML's hypergradient through the demo's proximal lower level equals
    λ (∇²L_support + λI)⁻¹ ∇L_query, summed over the tasks, with the Hessian formed densely."""
    sizes, tasks, prox = [6, 4, 3], 2, 0.7
    g = torch.Generator().manual_seed(0)

    class Random(maml.TaskSampler):
        def sample(self, n: int) -> maml.Episode:
            def part(m: int) -> maml.Batch:
                return (torch.randn(n, m, 6, generator=g), torch.randint(0, 3, (n, m),
                                                                          generator=g))
            return part(5), part(7)

    sampler = Random(tasks, 0)
    phi, theta = maml.TaskMLP(sizes, 1, 0), maml.TaskMLP(sizes, tasks, 1)
    got: list[tuple[list[torch.Tensor], list[torch.Tensor], Any, Any]] = []

    class Meta(maml.Meta):
        def grad_callback(self, grads: list[torch.Tensor]) -> None:
            got.append(([t.clone() for t in grads],
                        [p.detach().clone() for p in self.adapt.module.parameters()],
                        self.adapt.cur_batch, self.cur_batch))

    adapt = maml.ProximalAdapt(
        "adapt", theta, torch.optim.SGD(theta.parameters(), lr=0.3),
        train_data_loader=sampler.support_loader(), sampler=sampler, kind="ce", prox=prox,
        config=zg.Config(type=zg.CG(iterations=100), unroll_steps=4))
    meta = Meta("meta", phi, torch.optim.SGD(phi.parameters(), lr=0.0),
                train_data_loader=sampler.query_loader(), kind="ce", tasks=tasks)
    zg.Engine([meta, adapt], zg.chain(meta, adapt),
              zg.EngineConfig(train_iters=4, summary=False, progress="off")).run()
    (grads, adapted, support, query), = got
    anchor = [p.detach().double() for p in phi.parameters()]
    shapes = [t.shape for t in adapted]

    def unflatten(flat: torch.Tensor) -> list[torch.Tensor]:
        out, offset = [], 0
        for shape in shapes:
            n = shape.numel()
            out.append(flat[offset:offset + n].view(shape))
            offset += n
        return out

    def lower(flat: torch.Tensor) -> torch.Tensor:
        params = unflatten(flat)
        distance = sum(((p - a) ** 2).sum() for p, a in zip(params, anchor))
        return (maml.task_loss("ce", maml.mlp_forward(params, support[0].double()), support[1])
                + 0.5 * prox * distance)

    def upper(flat: torch.Tensor) -> torch.Tensor:
        out = maml.mlp_forward(unflatten(flat), query[0].double())
        return maml.task_loss("ce", out, query[1]) / tasks

    point = torch.cat([t.reshape(-1) for t in adapted]).double()
    hessian = torch.autograd.functional.hessian(lower, point)
    assert float(torch.linalg.eigvalsh(hessian).min()) > 0  # a well-posed implicit problem
    v = torch.autograd.functional.jacobian(upper, point)
    expected = [t.sum(0, keepdim=True)
                for t in unflatten(prox * torch.linalg.solve(hessian, v))]
    for a, b in zip(grads, expected):
        assert torch.allclose(a.double(), b, rtol=1e-4, atol=1e-6)


def test_maml_beats_scratch_on_sinusoids() -> None:
    res = maml.run_sinusoid(meta_steps=300, episodes=200)
    scratch, meta = res["scores"]["scratch"], res["scores"]["maml"]
    assert meta[1][0] < 0.6 * scratch[1][0]
    assert meta[10][0] < 0.5 * scratch[10][0]
    assert meta[10][0] < meta[1][0]  # adaptation keeps improving the meta-learned start


def test_run_returns_both_experiments() -> None:
    res = maml.run(fewshot={"meta_steps": 2, "episodes": 10, "scratch_lrs": (0.1, 0.3)},
                   sinusoid={"meta_steps": 2, "episodes": 10})
    assert set(res["fewshot"]["scores"]) == {"scratch", "maml", "fomaml", "imaml",
                                             "scratch_best"}
    assert set(res["sinusoid"]["scores"]) == {"scratch", "maml"}
    assert "iMAML" in maml.report_fewshot(res["fewshot"])
    assert "MAML" in maml.report_sinusoid(res["sinusoid"])


def test_demo_command_line_runs_small() -> None:
    assert maml.main(["--methods", "maml,imaml", "--meta-steps", "3", "--episodes", "20",
                      "--sine-meta-steps", "3"]) == 0
