"""Meta-learning: MAML, first-order MAML and iMAML on few-shot digits; MAML on sinusoids.

Few-shot digits: N-way K-shot episodes (support and query sets of N classes, labels shuffled
per episode) from scikit-learn's digits. Meta-training uses classes 0-5, each also rotated by
multiples of 90° and mirrored (48 classes; without them MAML over-fits the 6 classes), and
meta-testing the held-out classes 6-9. The meta-parameters φ are an MLP's initial weights:

* MAML: the lower level (an ``IterativeProblem``) takes k SGD steps on the support set from
  θ₀ = φ (``initial_parameters()``); the upper level's loss is the query loss at θ_k, its
  hypergradient is backpropagated through the k steps (``zg.Reverse()``).
* first-order MAML: the same with ``zg.Reverse(first_order=True)`` (the inner gradients are
  constants, so the meta-gradient is the query gradient at θ_k).
* iMAML: the lower level (an ``ImplicitProblem``) minimises support loss + λ/2 ‖θ − φ‖²,
  starting each task from φ; the hypergradient λ(∇²L + λI)⁻¹ ∇L_query comes from the
  implicit function theorem, solved by conjugate gradient (``zg.CG``).

Every meta-step adapts a batch of tasks at once: the lower module holds one copy of the
weights per task (a leading task dimension), started from φ broadcast over the tasks. One
shared task sampler feeds both levels: the lower problem's ``on_inner_loop_start`` draws
the next batch of tasks, its loader yields their support sets and the upper problem's
loader their query sets. Reported: query accuracy on held-out-class episodes after the same
k adaptation steps (same optimizer and learning rate; plain, also for iMAML's φ) from φ and
from a random initialisation (scratch), and scratch at the best rate of a small grid.
Results and their caveats (iMAML does not beat scratch here): docs/results_meta.md.

Sinusoids: tasks y = A sin(x − p), A ∈ [0.1, 5], p ∈ [0, π], x ∈ [−5, 5]; K support
points; MAML against scratch, query MSE after 1 and 10 adaptation steps.
"""

from __future__ import annotations

import argparse
import itertools
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

import ziggurat as zg

NAME = "maml"

Batch = tuple[Tensor, Tensor]
Episode = tuple[Batch, Batch]  # (support, query), each (x: (tasks, n, d), y: (tasks, n, ...))
DTYPE = torch.float32


# --------------------------------------------------------------------------- a task-batched MLP
def mlp_forward(params: Sequence[Tensor], x: Tensor) -> Tensor:
    """A ReLU MLP per task: params are (tasks, d_in, d_out) weights and (tasks, d_out)
    biases, alternating; x is (tasks, n, d_in)."""
    layers = len(params) // 2
    for i in range(layers):
        x = torch.baddbmm(params[2 * i + 1].unsqueeze(1), x, params[2 * i])
        if i < layers - 1:
            x = torch.relu(x)
    return x


def init_params(sizes: Sequence[int], tasks: int, generator: torch.Generator) -> list[Tensor]:
    """torch.nn.Linear's default initialisation, drawn independently for each task."""
    out: list[Tensor] = []
    for d_in, d_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(d_in)
        for shape in ((tasks, d_in, d_out), (tasks, d_out)):
            out.append((torch.rand(shape, generator=generator, dtype=DTYPE) * 2 - 1) * bound)
    return out


class TaskMLP(torch.nn.Module):
    """One MLP per task, evaluated at once (``tasks`` = 1 for the meta-parameters φ)."""

    def __init__(self, sizes: Sequence[int], tasks: int, seed: int) -> None:
        super().__init__()
        values = init_params(sizes, tasks, torch.Generator().manual_seed(seed))
        self.weights = torch.nn.ParameterList(torch.nn.Parameter(v) for v in values)

    def forward(self, x: Tensor) -> Tensor:
        return mlp_forward(list(self.weights), x)


def task_loss(kind: str, out: Tensor, y: Tensor) -> Tensor:
    """Σ over tasks of each task's mean loss (so each task's gradient is its own)."""
    if kind == "ce":
        per_example = F.cross_entropy(out.flatten(0, 1), y.flatten(), reduction="none")
        return per_example.view(y.shape).mean(1).sum()
    return ((out.squeeze(-1) - y) ** 2).mean(1).sum()


# --------------------------------------------------------------------------- tasks
class TaskSampler:
    """Draws batches of tasks; ``advance()`` moves both levels to the next batch.

    ``support_loader()`` / ``query_loader()`` are endless loaders over the current batch's
    support and query sets, for the lower and the upper problem.
    """

    def __init__(self, meta_batch: int, seed: int) -> None:
        self.meta_batch = meta_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.current: Episode | None = None

    def sample(self, tasks: int) -> Episode:
        raise NotImplementedError

    def advance(self) -> None:
        self.current = self.sample(self.meta_batch)

    def _part(self, index: int) -> Iterator[Batch]:
        while True:
            if self.current is None:
                self.advance()
            assert self.current is not None
            yield self.current[index]

    def support_loader(self) -> _Endless:
        return _Endless(self, 0)

    def query_loader(self) -> _Endless:
        return _Endless(self, 1)


class _Endless:
    """An iterable whose every iterator yields the sampler's current support (0) or query
    (1) set forever."""

    def __init__(self, sampler: TaskSampler, index: int) -> None:
        self.sampler, self.index = sampler, index

    def __iter__(self) -> Iterator[Batch]:
        return self.sampler._part(self.index)


class FewShot(TaskSampler):
    """N-way K-shot episodes over ``classes``: each task picks ``ways`` classes in random
    order (class j of the task gets label j) and ``shots`` + ``queries`` images of each."""

    def __init__(self, x: Tensor, y: Tensor, classes: Sequence[int], ways: int, shots: int,
                 queries: int, meta_batch: int, seed: int) -> None:
        super().__init__(meta_batch, seed)
        self.by_class = [x[y == c] for c in classes]
        self.ways, self.shots, self.queries = ways, shots, queries

    def sample(self, tasks: int) -> Episode:
        g, n = self.generator, self.shots + self.queries
        xs, xq = [], []
        for _ in range(tasks):
            chosen = torch.randperm(len(self.by_class), generator=g)[: self.ways]
            images = []
            for c in chosen.tolist():
                pool = self.by_class[c]
                images.append(pool[torch.randperm(pool.shape[0], generator=g)[:n]])
            xs.append(torch.stack([im[: self.shots] for im in images]).flatten(0, 1))
            xq.append(torch.stack([im[self.shots:] for im in images]).flatten(0, 1))
        labels = torch.arange(self.ways)
        ys = labels.repeat_interleave(self.shots).expand(tasks, -1)
        yq = labels.repeat_interleave(self.queries).expand(tasks, -1)
        return (torch.stack(xs), ys), (torch.stack(xq), yq)


class Sinusoids(TaskSampler):
    """y = A sin(x − p), A ~ U[0.1, 5], p ~ U[0, π], x ~ U[−5, 5]."""

    def __init__(self, shots: int, queries: int, meta_batch: int, seed: int) -> None:
        super().__init__(meta_batch, seed)
        self.shots, self.queries = shots, queries

    def sample(self, tasks: int) -> Episode:
        g = self.generator
        amp = torch.rand(tasks, 1, generator=g, dtype=DTYPE) * 4.9 + 0.1
        phase = torch.rand(tasks, 1, generator=g, dtype=DTYPE) * math.pi
        x = torch.rand(tasks, self.shots + self.queries, 1, generator=g, dtype=DTYPE) * 10 - 5
        y = amp * torch.sin(x.squeeze(-1) - phase)
        s = self.shots
        return (x[:, :s], y[:, :s]), (x[:, s:], y[:, s:])


def digits(train_classes: Sequence[int], dihedral: bool = False) -> tuple[Tensor, Tensor]:
    """scikit-learn's 8×8 digits, standardised with the meta-training classes' statistics
    (one mean and deviation for all pixels). With ``dihedral`` the meta-training classes are
    multiplied by 8: each rotation by a multiple of 90° of each (mirrored or not) digit is a
    class of its own, labelled ``10 · transform + digit`` (transform 0 is the identity)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise SystemExit(
            "this demo needs scikit-learn: pip install 'ziggurat[demo]' (or ./dev demo)"
        ) from err
    data = load_digits()
    x = torch.tensor(data.data, dtype=DTYPE)
    y = torch.tensor(data.target, dtype=torch.long)
    seen = torch.isin(y, torch.tensor(list(train_classes)))
    x = (x - x[seen].mean()) / x[seen].std()
    if not dihedral:
        return x, y
    images = x[seen].view(-1, 8, 8)
    xs, ys = [x], [y]
    for t in range(1, 8):
        turned = torch.rot90(images.flip(-1) if t >= 4 else images, t % 4, (-2, -1))
        xs.append(turned.reshape(-1, 64))
        ys.append(y[seen] + 10 * t)
    return torch.cat(xs), torch.cat(ys)


# --------------------------------------------------------------------------- the programs
def make_optimizer(name: str, params: Sequence[Tensor], lr: float) -> torch.optim.Optimizer:
    """The adaptation optimizer: "sgd" or "adam" (torch's defaults otherwise)."""
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: 'sgd' or 'adam'")


class Adapt(zg.IterativeProblem):
    """MAML's lower level: k SGD steps per task from θ₀ = φ."""

    def __init__(self, *args: Any, sampler: TaskSampler, kind: str, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler, self.kind = sampler, kind

    def on_inner_loop_start(self) -> None:
        self.sampler.advance()  # a new batch of tasks for this unroll (and the query)
        self.optimizer.state.clear()  # each task's optimizer (e.g. Adam) starts afresh

    def initial_parameters(self) -> list[Tensor]:
        tasks = self.sampler.meta_batch
        return [p.expand(tasks, *p.shape[1:]) for p in self.meta.module.parameters()]

    def training_step(self, batch: Batch) -> Tensor:
        x, y = batch
        return task_loss(self.kind, self.module(x), y)


class ProximalAdapt(zg.ImplicitProblem):
    """iMAML's lower level: support loss + λ/2 ‖θ − φ‖², each task started from φ."""

    def __init__(self, *args: Any, sampler: TaskSampler, kind: str, prox: float,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sampler, self.kind, self.prox = sampler, kind, prox

    def on_inner_loop_start(self) -> None:
        self.sampler.advance()
        with torch.no_grad():
            for p, phi in zip(self.module.parameters(), self.meta.module.parameters()):
                p.copy_(phi.expand_as(p))
        self.optimizer.state.clear()

    def training_step(self, batch: Batch) -> Tensor:
        x, y = batch
        distance = sum(((p - phi) ** 2).sum() for p, phi in
                       zip(self.module.parameters(), self.meta.module.parameters()))
        return task_loss(self.kind, self.module(x), y) + 0.5 * self.prox * distance


class Meta(zg.ImplicitProblem):
    """The upper level: mean query loss of the adapted weights over the batch of tasks."""

    def __init__(self, *args: Any, kind: str, tasks: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kind, self.tasks = kind, tasks

    def training_step(self, batch: Batch) -> Tensor:
        x, y = batch
        return task_loss(self.kind, self.adapt(x), y) / self.tasks


def meta_train(
    method: str, sampler: TaskSampler, sizes: Sequence[int], kind: str, steps: int,
    inner_lr: float, meta_steps: int, meta_lr: float, prox: float = 1.0,
    cg_iterations: int = 5, inner_optimizer: str = "sgd", seed: int = 0,
    progress: str = "off",
) -> tuple[list[Tensor], float]:
    """Meta-train φ with "maml", "fomaml" or "imaml"; return φ (one tensor per parameter,
    leading task dimension 1) and the seconds taken."""
    tasks = sampler.meta_batch
    phi = TaskMLP(sizes, 1, seed)
    theta = TaskMLP(sizes, tasks, seed)
    optimizer = make_optimizer(inner_optimizer, list(theta.parameters()), inner_lr)
    adapt: zg.Problem
    if method == "imaml":
        adapt = ProximalAdapt(
            "adapt", theta, optimizer, train_data_loader=sampler.support_loader(),
            sampler=sampler, kind=kind, prox=prox,
            config=zg.Config(type=zg.CG(iterations=cg_iterations), unroll_steps=steps))
    elif method in ("maml", "fomaml"):
        adapt = Adapt(
            "adapt", theta, optimizer, train_data_loader=sampler.support_loader(),
            sampler=sampler, kind=kind,
            config=zg.Config(type=zg.Reverse(first_order=method == "fomaml"),
                             unroll_steps=steps))
    else:
        raise ValueError(f"unknown method {method!r}: 'maml', 'fomaml' or 'imaml'")
    meta = Meta("meta", phi, torch.optim.Adam(phi.parameters(), lr=meta_lr),
                train_data_loader=sampler.query_loader(), kind=kind, tasks=tasks)
    engine = zg.Engine([meta, adapt], zg.chain(meta, adapt),
                       zg.EngineConfig(train_iters=meta_steps * steps, summary=False,
                                       progress=progress))
    start = time.perf_counter()
    engine.run()
    return [p.detach().clone() for p in phi.parameters()], time.perf_counter() - start


# --------------------------------------------------------------------------- evaluation
def adapt_and_score(
    params: Sequence[Tensor], episode: Episode, kind: str, steps: Sequence[int], lr: float,
    optimizer: str = "sgd", prox: float = 0.0,
) -> dict[int, Tensor]:
    """Per-task query score after each number of adaptation steps in ``steps`` (accuracy
    for "ce", MSE for "mse"), from ``params`` (leading dimension: tasks, or 1 to broadcast);
    with ``prox`` the support loss gets iMAML's λ/2 ‖θ − params‖²."""
    (xs, ys), (xq, yq) = episode
    tasks = xs.shape[0]
    anchor = [p.expand(tasks, *p.shape[1:]).detach() for p in params]
    theta = [a.clone().requires_grad_() for a in anchor]
    opt = make_optimizer(optimizer, theta, lr)
    scores: dict[int, Tensor] = {}
    for k in range(max(steps) + 1):
        if k in steps:
            with torch.no_grad():
                out = mlp_forward(theta, xq)
                scores[k] = ((out.argmax(-1) == yq).float().mean(1) if kind == "ce"
                             else ((out.squeeze(-1) - yq) ** 2).mean(1))
        if k == max(steps):
            break
        loss = task_loss(kind, mlp_forward(theta, xs), ys)
        if prox:
            loss = loss + 0.5 * prox * sum(((t - a) ** 2).sum() for t, a in zip(theta, anchor))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return scores


def evaluate(
    inits: dict[str, Sequence[Tensor] | None], sampler: TaskSampler, sizes: Sequence[int],
    kind: str, episodes: int, steps: Sequence[int], lr: float, seed: int,
    optimizer: str = "sgd", prox: dict[str, float] | None = None, chunk: int = 100,
) -> dict[str, dict[int, tuple[float, float]]]:
    """Mean and 95% half-width of the query score over the same ``episodes`` test tasks for
    every initialisation (None: a fresh random initialisation per task, i.e. scratch)."""
    sampler.generator.manual_seed(seed)
    chunks = [sampler.sample(min(chunk, episodes - i)) for i in range(0, episodes, chunk)]
    g = torch.Generator().manual_seed(seed + 1)
    out: dict[str, dict[int, tuple[float, float]]] = {}
    for name, params in inits.items():
        per_step: dict[int, list[Tensor]] = {k: [] for k in steps}
        for episode in chunks:
            start = params if params is not None else init_params(
                sizes, episode[0][0].shape[0], g)
            for k, v in adapt_and_score(start, episode, kind, steps, lr, optimizer,
                                        (prox or {}).get(name, 0.0)).items():
                per_step[k].append(v)
        out[name] = {}
        for k, values in per_step.items():
            v = torch.cat(values).double()
            out[name][k] = (float(v.mean()), float(1.96 * v.std() / math.sqrt(v.numel())))
    return out


# --------------------------------------------------------------------------- experiments
def run_fewshot(
    methods: Sequence[str] = ("maml", "fomaml", "imaml"),
    ways: int = 3,
    shots: int = 5,
    queries: int = 15,
    hidden: Sequence[int] = (64, 64),
    steps: int = 5,
    inner_lr: float = 0.1,
    inner_optimizer: str = "sgd",
    meta_batch: int = 8,
    meta_steps: int = 1000,
    meta_lr: float = 1e-3,
    prox: float = 2.0,
    cg_iterations: int = 5,
    dihedral: bool = True,
    train_classes: Sequence[int] = (0, 1, 2, 3, 4, 5),
    test_classes: Sequence[int] = (6, 7, 8, 9),
    episodes: int = 600,
    scratch_lrs: Sequence[float] = (0.03, 0.1, 0.3, 0.5, 1.0),
    seed: int = 0,
    progress: str = "off",
) -> dict[str, Any]:
    """Meta-train each method on ``train_classes`` (times 8 with ``dihedral``); query
    accuracy on ``episodes`` held-out tasks from ``test_classes`` after 0, 1 and ``steps``
    adaptation steps with ``inner_optimizer`` at ``inner_lr``, against scratch at the same
    rate and (``scratch_lrs``) scratch at the best rate of a grid."""
    x, y = digits(train_classes, dihedral)
    meta_classes = [c + 10 * t for t in range(8 if dihedral else 1) for c in train_classes]
    sizes = [x.shape[1], *hidden, ways]
    inits: dict[str, Sequence[Tensor] | None] = {"scratch": None}
    seconds: dict[str, float] = {}
    for method in methods:
        sampler = FewShot(x, y, meta_classes, ways, shots, queries, meta_batch, seed)
        inits[method], seconds[method] = meta_train(
            method, sampler, sizes, "ce", steps, inner_lr, meta_steps, meta_lr, prox,
            cg_iterations, inner_optimizer, seed, progress)
    test = FewShot(x, y, test_classes, ways, shots, queries, meta_batch, seed)
    evaluated = sorted({0, 1, steps})
    scores = evaluate(inits, test, sizes, "ce", episodes, evaluated, inner_lr, seed + 1000,
                      inner_optimizer)
    out: dict[str, Any] = {
        "scores": scores, "seconds": seconds, "steps": steps, "ways": ways, "shots": shots,
        "meta_steps": meta_steps, "meta_batch": meta_batch, "episodes": episodes,
        "inner_lr": inner_lr, "inner_optimizer": inner_optimizer, "prox": prox,
        "cg_iterations": cg_iterations,
        "dihedral": dihedral, "hidden": list(hidden),
    }
    if scratch_lrs:  # the same episodes and random initialisations, other rates
        grid = {lr: evaluate({"scratch": None}, test, sizes, "ce", episodes, evaluated, lr,
                             seed + 1000, inner_optimizer)["scratch"]
                for lr in sorted({*scratch_lrs} - {inner_lr})}
        grid[inner_lr] = scores["scratch"]
        best = max(grid, key=lambda lr: grid[lr][steps][0])
        out["scratch_best_lr"] = best
        scores["scratch_best"] = grid[best]
    return out


def run_sinusoid(
    shots: int = 10,
    queries: int = 50,
    hidden: Sequence[int] = (40, 40),
    steps: int = 1,
    inner_lr: float = 0.01,
    meta_batch: int = 25,
    meta_steps: int = 3000,
    meta_lr: float = 1e-3,
    eval_steps: Sequence[int] = (0, 1, 10),
    episodes: int = 600,
    seed: int = 0,
    progress: str = "off",
) -> dict[str, Any]:
    """MAML on sinusoid regression against scratch: query MSE after ``eval_steps``."""
    sizes = [1, *hidden, 1]
    sampler = Sinusoids(shots, queries, meta_batch, seed)
    phi, seconds = meta_train("maml", sampler, sizes, "mse", steps, inner_lr, meta_steps,
                              meta_lr, seed=seed, progress=progress)
    test = Sinusoids(shots, queries, meta_batch, seed)
    scores = evaluate({"scratch": None, "maml": phi}, test, sizes, "mse", episodes,
                      tuple(eval_steps), inner_lr, seed + 1000)
    return {"scores": scores, "seconds": {"maml": seconds}, "steps": steps, "shots": shots,
            "meta_steps": meta_steps, "meta_batch": meta_batch, "episodes": episodes,
            "inner_lr": inner_lr, "eval_steps": list(eval_steps)}


def run(fewshot: dict[str, Any] | None = None, sinusoid: dict[str, Any] | None = None
        ) -> dict[str, Any]:
    """Both experiments, with keyword arguments for ``run_fewshot`` / ``run_sinusoid``."""
    return {"fewshot": run_fewshot(**(fewshot or {})),
            "sinusoid": run_sinusoid(**(sinusoid or {}))}


# --------------------------------------------------------------------------- command line
LABELS = {"scratch": "scratch (random init)", "maml": "MAML", "fomaml": "first-order MAML",
          "imaml": "iMAML (CG)"}


def report_fewshot(res: dict[str, Any]) -> str:
    k = res["steps"]
    evaluated = sorted({0, 1, k})
    lines = [f"Few-shot digits: {res['ways']}-way {res['shots']}-shot, meta-train classes 0-5"
             + (" (x8 rotations/mirrorings)" if res["dihedral"] else "")
             + f", meta-test classes 6-9 ({res['episodes']} episodes); MLP "
             f"{res['hidden']}; {res['meta_steps']} meta-steps of {res['meta_batch']} tasks; "
             f"adaptation: {k} {res['inner_optimizer']} steps, lr {res['inner_lr']}; iMAML "
             f"λ = {res['prox']}, {res['cg_iterations']} CG iterations",
             f"{'query accuracy after':34s}" + "".join(f"{f'{s} steps':>15s}" for s in evaluated)
             + f"{'meta-train':>12s}"]
    labels = dict(LABELS)
    if "scratch_best_lr" in res:
        labels["scratch_best"] = f"scratch, best lr {res['scratch_best_lr']:g} (grid)"
    for name, s in res["scores"].items():
        secs = res["seconds"].get(name)
        lines.append(f"{labels.get(name, name):34s}"
                     + "".join(f"{s[j][0]:8.3f} ±{s[j][1]:.3f}" for j in evaluated)
                     + (f"{secs:11.1f}s" if secs is not None else f"{'-':>12s}"))
    return "\n".join(lines)


def report_sinusoid(res: dict[str, Any]) -> str:
    steps = res["eval_steps"]
    lines = [f"Sinusoid regression: {res['shots']}-shot, {res['meta_steps']} meta-steps of "
             f"{res['meta_batch']} tasks, {res['steps']} inner step(s) in training (lr "
             f"{res['inner_lr']}), MAML meta-training {res['seconds']['maml']:.1f} s",
             f"{'':26s}" + "".join(f"{f'MSE, {k} steps':>18s}" for k in steps)]
    for name, s in res["scores"].items():
        lines.append(f"{LABELS.get(name, name):26s}"
                     + "".join(f"{s[k][0]:10.3f} ±{s[k][1]:.3f}" for k in steps))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="ziggurat demo maml", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=("all", "fewshot", "sinusoid"), default="all")
    parser.add_argument("--methods", default="maml,fomaml,imaml")
    parser.add_argument("--ways", type=int, default=3)
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--steps", type=int, default=5, help="adaptation steps (few-shot)")
    parser.add_argument("--inner-lr", type=float, default=0.1, help="adaptation lr (few-shot)")
    parser.add_argument("--inner-optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--meta-steps", type=int, default=1000, help="few-shot meta-steps")
    parser.add_argument("--prox", type=float, default=2.0, help="iMAML's λ")
    parser.add_argument("--cg-iterations", type=int, default=5, help="iMAML's CG iterations")
    parser.add_argument("--no-dihedral", action="store_true",
                        help="meta-train on the 6 digits only (no rotated/mirrored classes)")
    parser.add_argument("--sine-meta-steps", type=int, default=3000)
    parser.add_argument("--episodes", type=int, default=600)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave as is)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    print(__doc__.splitlines()[0] + "\n")
    if args.part in ("all", "fewshot"):
        res = run_fewshot(methods=tuple(args.methods.split(",")), ways=args.ways,
                          shots=args.shots, steps=args.steps, inner_lr=args.inner_lr,
                          inner_optimizer=args.inner_optimizer, meta_steps=args.meta_steps,
                          prox=args.prox, cg_iterations=args.cg_iterations,
                          dihedral=not args.no_dihedral,
                          episodes=args.episodes, seed=args.seed)
        print(report_fewshot(res) + "\n", flush=True)
    if args.part in ("all", "sinusoid"):
        res = run_sinusoid(meta_steps=args.sine_meta_steps, episodes=args.episodes,
                           seed=args.seed)
        print(report_sinusoid(res), flush=True)
    return 0
