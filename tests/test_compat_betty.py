"""Betty compatibility (ziggurat.compat.betty): Betty-style programs run through the real
runner give the same numbers as the same programs written with ziggurat's native API;
what Betty gets wrong is correct here (checked against closed forms)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import ziggurat as zg
import ziggurat.compat.betty as betty
from ziggurat.compat.betty.__main__ import main as runner_main
from ziggurat.compat.betty.configs import Config, EngineConfig
from ziggurat.compat.betty.engine import Engine, translate_dependencies
from ziggurat.compat.betty.hypergradient import NeumannDivergenceWarning
from ziggurat.compat.betty.problems import ImplicitProblem
from ziggurat.errors import ConfigError

from ridge import make_ridge

PROGRAMS = Path(__file__).parent / "programs" / "betty"


def _load_data_module() -> Any:
    """tests/programs/betty/_data.py, loaded without putting its folder on sys.path."""
    spec = importlib.util.spec_from_file_location("betty_programs_data", PROGRAMS / "_data.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


data = _load_data_module()

DTYPE = torch.float64
QUIET = dict(progress="off", summary=False)


# ----------------------------------------------------------------------------- the runner
@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """Every Betty-style program run through ``python -m ziggurat.compat.betty`` (in
    parallel): name -> (returncode, stdout, stderr, parameters or None)."""
    tmp = tmp_path_factory.mktemp("betty_runs")
    # the repository first (ziggurat may be on PYTHONPATH rather than installed, as on the
    # GPU machine of benchmarks/device_suite.sh), then an entry of "the user's"
    root = str(Path(__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, "/user/entry"]),
               CUDA_VISIBLE_DEVICES="")
    procs = {}
    for name in ("hpo", "reweight", "three_level", "iterative", "spawn"):
        out = tmp / f"{name}.json"
        args = [str(out)] if name != "spawn" else ["--flag", "x"]
        procs[name] = (out, subprocess.Popen(
            [sys.executable, "-m", "ziggurat.compat.betty", str(PROGRAMS / f"{name}.py"), *args],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    # the data-parallel program: 2 ranks under torchrun (Betty's strategy="distributed")
    # and its one-process reference, whose batches are the two ranks' shards together
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    runner = ["-m", "ziggurat.compat.betty", str(PROGRAMS / "data_parallel.py")]
    for name, launcher in (
            ("dp1", []),
            ("dp2", ["-m", "torch.distributed.run", "--nproc-per-node", "2",
                     "--master-addr", "127.0.0.1", "--master-port", port])):
        out = tmp / f"{name}.json"
        procs[name] = (out, subprocess.Popen(
            [sys.executable, *launcher, *runner, str(out)],
            cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = {}
    for name, (out, proc) in procs.items():
        if name.startswith("dp"):
            stdout, stderr = proc.communicate(timeout=300)
            ranks = sorted(tmp.glob(f"{name}.json.rank*"))
            results[name] = (proc.returncode, stdout, stderr,
                             [json.loads(f.read_text()) for f in ranks])
            continue
        stdout, stderr = proc.communicate(timeout=300)
        params = json.loads(out.read_text()) if out.exists() else None
        results[name] = (proc.returncode, stdout, stderr, params)
    yield results


def _params(modules: dict[str, torch.nn.Module]) -> dict[str, list[float]]:
    return {n: [float(x) for p in m.parameters() for x in p.detach().reshape(-1)]
            for n, m in modules.items()}


def _assert_same(got: dict[str, list[float]], want: dict[str, list[float]],
                 rtol: float = 1e-12) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert len(got[name]) == len(want[name])
        for a, b in zip(got[name], want[name]):
            assert abs(a - b) <= rtol * max(1.0, abs(b)), (name, got[name], want[name])


# ----------------------------------------------------------------------------- native twins
def native_hpo() -> dict[str, list[float]]:
    D = data.regression()

    def inner_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        residual = p.module(x).squeeze(-1) - y
        decay = (p.outer.module.weight.exp().squeeze(0) * p.module.weight[0] ** 2).sum()
        return {"loss": 0.5 * (residual**2).mean() + 0.5 * decay,
                "extra": residual.abs().max()}

    def outer_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        return 0.5 * ((p.inner(x).squeeze(-1) - y) ** 2).mean()

    im, om = data.linear(4, seed=1), data.linear(4, 1, seed=2)
    torch.nn.init.constant_(om.weight, -1.0)
    inner = zg.ImplicitProblem(
        "inner", im, torch.optim.SGD(im.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=data.batches(D["X"], D["y"], size=8), training_step=inner_step,
        config=zg.Config(type=zg.CG(iterations=3), unroll_steps=3, warmup_steps=3))
    outer = zg.ImplicitProblem(
        "outer", om, torch.optim.Adam(om.parameters(), lr=0.05),
        train_data_loader=data.batches(D["Xv"], D["yv"], size=12), training_step=outer_step)

    class HPO(zg.Engine):
        def validation(self) -> dict[str, Any]:
            with torch.no_grad():
                return {"loss": 0.5 * ((self.inner(D["Xv"]).squeeze(-1) - D["yv"]) ** 2).mean()}

    HPO([outer, inner], zg.chain(outer, inner),
        zg.EngineConfig(train_iters=16, valid_step=4, **QUIET)).run()  # type: ignore[arg-type]
    return _params({"inner": im, "outer": om})


class _MetaNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor([0.5], dtype=DTYPE))
        self.shift = torch.nn.Parameter(torch.tensor([0.0], dtype=DTYPE))

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.scale * losses + self.shift)


def native_reweight() -> dict[str, list[float]]:
    import torch.nn.functional as F

    D = data.noisy_labels()

    def clf_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        losses = F.binary_cross_entropy_with_logits(p.module(x).squeeze(-1), y,
                                                    reduction="none")
        return (p.meta(losses.detach()) * losses).mean()

    def meta_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        return F.binary_cross_entropy_with_logits(p.classifier(x).squeeze(-1), y)

    cm, mm = data.linear(3, seed=3, bias=True), _MetaNet()
    clf = zg.ImplicitProblem("classifier", cm, torch.optim.SGD(cm.parameters(), lr=0.3),
                             train_data_loader=data.batches(D["X"], D["y"], size=8),
                             training_step=clf_step,
                             config=zg.Config(type=zg.Darts(), roll_back=True))
    meta = zg.ImplicitProblem("meta", mm, torch.optim.SGD(mm.parameters(), lr=1.0),
                              train_data_loader=data.batches(D["Xv"], D["yv"], size=16),
                              training_step=meta_step)
    zg.Engine([clf, meta], zg.chain(meta, clf),
              zg.EngineConfig(train_iters=10, **QUIET)).run()  # type: ignore[arg-type]
    return _params({"classifier": cm, "meta": mm})


def native_three_level() -> dict[str, list[float]]:
    D = data.regression(seed=5, n=16, dim=3)

    def bottom_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        shift = p.middle.module(x).squeeze(-1)
        return 0.5 * ((p.module(x).squeeze(-1) - y - 0.1 * shift) ** 2).mean() + 0.05 * (
            p.module.weight**2).sum()

    def middle_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        fit = 0.5 * ((p.bottom(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * p.top.module.weight.exp().squeeze() * (p.module.weight**2).sum()

    def top_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        return 0.5 * ((p.bottom(x).squeeze(-1) + 0.1 * p.middle(x).squeeze(-1) - y) ** 2
                      ).mean()

    b, m, t = data.linear(3, seed=6), data.linear(3, seed=7), data.linear(1, 1, seed=8)
    bottom = zg.ImplicitProblem(
        "bottom", b, torch.optim.SGD(b.parameters(), lr=0.2),
        train_data_loader=data.batches(D["X"], D["y"], size=8), training_step=bottom_step,
        config=zg.Config(type=zg.Neumann(iterations=4, alpha=0.3)))
    middle = zg.ImplicitProblem(
        "middle", m, torch.optim.Adam(m.parameters(), lr=0.02),
        train_data_loader=data.batches(D["X"], D["y"], size=16), training_step=middle_step,
        config=zg.Config(type=zg.SAMA(), unroll_steps=2))
    top = zg.ImplicitProblem("top", t, torch.optim.SGD(t.parameters(), lr=0.5),
                             train_data_loader=data.batches(D["Xv"], D["yv"], size=16),
                             training_step=top_step)
    zg.Engine([top, middle, bottom], zg.chain(top, middle, bottom),
              zg.EngineConfig(train_iters=8, **QUIET)).run()  # type: ignore[arg-type]
    return _params({"top": t, "middle": m, "bottom": b})


def native_iterative() -> dict[str, list[float]]:
    D = data.regression(seed=9, n=16, dim=3)

    def inner_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        fit = 0.5 * ((p.module(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * p.outer.module.weight.exp().squeeze() * (p.module.weight**2).sum()

    def outer_step(p: zg.Problem, batch: Any) -> Any:
        x, y = batch
        return 0.5 * ((p.inner(x).squeeze(-1) - y) ** 2).mean()

    im, om = data.linear(3, seed=10), data.linear(1, 1, seed=11)
    inner = zg.IterativeProblem("inner", im, torch.optim.SGD(im.parameters(), lr=0.1),
                                train_data_loader=data.batches(D["X"], D["y"], size=8),
                                training_step=inner_step, config=zg.Config(unroll_steps=4))
    outer = zg.ImplicitProblem("outer", om, torch.optim.SGD(om.parameters(), lr=0.5),
                               train_data_loader=data.batches(D["Xv"], D["yv"], size=16),
                               training_step=outer_step)
    zg.Engine([outer, inner], zg.chain(outer, inner),
              zg.EngineConfig(train_iters=12, **QUIET)).run()  # type: ignore[arg-type]
    return _params({"inner": im, "outer": om})


NATIVE = {"hpo": native_hpo, "reweight": native_reweight, "three_level": native_three_level,
          "iterative": native_iterative}


@pytest.mark.parametrize("name", sorted(NATIVE))
def test_betty_program_through_runner_matches_native(runs: dict[str, Any], name: str) -> None:
    rc, _, stderr, params = runs[name]
    assert rc == 0, stderr[-3000:]
    assert params is not None
    want = NATIVE[name]()
    _assert_same(params, want)
    # the run moved every parameter (the comparison is not between two untouched inits)
    assert all(any(abs(x) > 0 for x in v) for v in want.values())


def test_betty_distributed_strategy_under_torchrun(runs: dict[str, Any]) -> None:
    # Betty's strategy="distributed" is ziggurat's "ddp": 2 ranks with half batches each end
    # where one process with the whole batches does (CG: H v products averaged over ranks)
    for name, ranks in (("dp1", 1), ("dp2", 2)):
        code, _, err, params = runs[name]
        assert code == 0, err
        assert len(params) == ranks
    one, (rank0, rank1) = runs["dp1"][3][0], runs["dp2"][3]
    assert rank0 == rank1  # the replicas stay bit-equal
    _assert_same(rank0, one, rtol=1e-10)
    assert max(abs(a + 1.0) for a in one["outer"]) > 1e-2  # λ moved from −1
    assert len(set(one["outer"])) == 4  # per-feature decays moved apart


def test_subprocess_resolves_betty_and_status_passes_on(runs: dict[str, Any]) -> None:
    rc, stdout, stderr, _ = runs["spawn"]
    assert rc == 7, stderr[-3000:]
    assert "parent: ziggurat.compat.betty.problems" in stdout
    assert "child: ziggurat.compat.betty ziggurat.compat.betty.engine" in stdout
    assert "argv: ['--flag', 'x']" in stdout
    path = re.search(r"pythonpath: (.*)", stdout)
    assert path is not None
    entries = path.group(1).split(os.pathsep)
    assert entries[0] == str(betty.shim_dir())
    assert "/user/entry" in entries  # the user's PYTHONPATH is kept, after the shim


def test_runner_help_and_bad_program(capsys: pytest.CaptureFixture[str],
                                     tmp_path: Path) -> None:
    assert runner_main(["--help"]) == 0
    assert "python -m ziggurat.compat.betty PROGRAM" in capsys.readouterr().out
    assert runner_main([]) == 2
    assert runner_main([str(tmp_path / "missing.py")]) == 2
    assert "missing.py' does not exist" in capsys.readouterr().err
    assert runner_main([str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_import_redirection() -> None:
    import betty as b  # type: ignore[import-not-found]
    import betty.hypergradient  # type: ignore[import-not-found]
    from betty.configs import Config as C  # type: ignore[import-not-found]
    from betty.utils import log_from_loss_dict  # type: ignore[import-not-found]

    assert b is betty and C is Config and b.__version__ == "0.2.1"
    assert log_from_loss_dict({"loss": torch.tensor(1.5), "acc": [1, 2]}) == (
        "loss: 1.5 || acc_0: 1 || acc_1: 2")
    with pytest.raises(ImportError, match=r"betty\.optim is not provided"):
        import betty.optim  # type: ignore[import-not-found]


# ----------------------------------------------------------------------------- semantics
def _ridge_program(kind: str, **cfg: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """Betty-style bilevel on tests/ridge.py with the lower level at θ* (lr 0) and an upper
    loss L_out(θ) + ½‖λ‖² that reads its own parameters directly (Betty's retain_graph
    crash). Returns (engine, λ before, expected total gradient of the upper)."""
    r = make_ridge(condition=20.0, dim=6)
    theta = torch.nn.Parameter(r.theta_star().clone())
    lam = torch.nn.Parameter(r.lam.clone())

    class Inner(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return r.inner_loss(self.module.theta, self.outer.module.lam)

    class Outer(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return r.outer_loss(self.inner.module.theta) + 0.5 * (self.module.lam**2).sum()

    im, om = torch.nn.Module(), torch.nn.Module()
    im.theta, om.lam = theta, lam
    inner = Inner("inner", Config(type=kind, **cfg), im, torch.optim.SGD([theta], lr=0.0),
                  None, [None])
    outer = Outer("outer", Config(), om, torch.optim.SGD([lam], lr=1.0), None, [None])
    engine = Engine([outer, inner], EngineConfig(train_iters=1, strategy="cpu"),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    expected = lam.detach() + r.implicit_hypergrad(theta.detach())
    return engine, lam.detach().clone(), expected


def test_cg_several_iterations_and_cg_alpha_match_closed_form() -> None:
    # Betty's cg is right for one iteration only and its cg_alpha mixes αH with H; here
    # dim(θ) = 6 iterations solve H x = v exactly whatever cg_alpha is.
    r = make_ridge(condition=20.0, dim=6)
    for alpha in (1.0, 0.37):
        engine, before, expected = _ridge_program("cg", cg_iterations=6, cg_alpha=alpha)
        engine.run()
        step = before - engine.outer.module.lam.detach()
        torch.testing.assert_close(step, expected, rtol=1e-9, atol=1e-12)
    # Betty's functional entry points: cg(vector, curr, prev, sync) and get_grads
    inner, outer = engine.inner, engine.outer
    theta = inner.module.theta.detach()
    r = dataclasses.replace(r, lam=outer.module.lam.detach().clone())  # λ after the step
    want = r.implicit_hypergrad(theta)
    (got,) = betty.hypergradient.cg([r.v(theta)], inner, outer)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    outer.module.lam.grad = None
    assert betty.hypergradient.cg([r.v(theta)], inner, outer, True) is None
    torch.testing.assert_close(outer.module.lam.grad, want, rtol=1e-9, atol=1e-12)
    outer.module.lam.grad = None
    (path,) = outer.paths
    (via_path,) = betty.hypergradient.get_grads(r.outer_loss(inner.module.theta), path)
    torch.testing.assert_close(via_path, want, rtol=1e-9, atol=1e-12)


def test_neumann_divergence_warns_with_safe_range() -> None:
    r = make_ridge(condition=20.0, dim=6)
    lam_max = float(torch.linalg.eigvalsh(r.hessian()).max())
    engine, _, _ = _ridge_program("neumann", neumann_iterations=3, neumann_alpha=3.0 / lam_max)
    with pytest.warns(NeumannDivergenceWarning) as record:
        engine.run()
    message = str(record[0].message)
    bound = float(re.search(r"0 < neumann_alpha < 2/λ_max ≈ ([0-9.e+-]+)", message).group(1))
    assert bound == pytest.approx(2.0 / lam_max, rel=1e-3)
    # a safe alpha converges to the closed form with no warning
    import warnings

    engine, before, expected = _ridge_program("neumann", neumann_iterations=400,
                                              neumann_alpha=1.0 / lam_max)
    with warnings.catch_warnings():
        warnings.simplefilter("error", NeumannDivergenceWarning)
        engine.run()
    torch.testing.assert_close(before - engine.outer.module.lam.detach(), expected,
                               rtol=1e-8, atol=1e-10)


def test_darts_and_sama_sgd_keep_betty_convention() -> None:
    # Betty's darts (and sama with SGD): x = v, no learning-rate factor: −∂²_{λθ}L_in · v
    r = make_ridge(condition=20.0, dim=6)
    for kind, cfg in (("darts", {}), ("darts", {"mixed": "fd"}), ("sama", {})):
        engine, before, _ = _ridge_program(kind, **cfg)
        theta = engine.inner.module.theta.detach()
        expected = before - r.mixed(theta, r.v(theta))
        engine.run()
        tol = 1e-12 if cfg.get("mixed") != "fd" else 1e-9
        torch.testing.assert_close(before - engine.outer.module.lam.detach(), expected,
                                   rtol=tol, atol=tol)


def test_early_stopping_and_wandb_logger_run(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    seen: list[int] = []

    class Lower(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return ((self.module.weight - self.upper.module.weight) ** 2).sum()

    class Upper(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return (self.lower.module.weight ** 2).sum()

    class Stopping(Engine):
        def validation(self) -> dict[str, float]:
            seen.append(self.global_step)
            assert not self.lower.module.training  # Betty validates in eval mode
            return {"loss": float(len(seen) != 2)}  # best at the 2nd validation

    lo, up = data.linear(2, seed=0), data.linear(2, seed=1)
    lower = Lower("lower", Config(log_step=1), lo, torch.optim.SGD(lo.parameters(), lr=0.1),
                  None, [None])
    upper = Upper("upper", Config(), up, torch.optim.SGD(up.parameters(), lr=0.1), None, [None])
    engine = Stopping(
        [upper, lower],
        EngineConfig(train_iters=100, valid_step=2, early_stopping=True,
                     early_stopping_tolerance=3, logger_type="wandb", strategy="cpu"),
        {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}},
    )
    engine.run()
    assert seen == [2, 4, 6, 8, 10] and engine.global_step == 10 and engine.stopped_early
    assert lower.module.training
    assert list((tmp_path / "runs" / "run" / "wandb").glob("offline-run-*"))


# ----------------------------------------------------------------------------- the API
def test_problem_and_engine_attributes() -> None:
    counts: list[int] = []
    called: list[str] = []

    class Bottom(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            counts.append(self.count)
            return ((self.module.weight - self.middle.module.weight) ** 2).sum()

        def param_callback(self) -> None:  # Betty's hook takes no arguments
            called.append("param")
            with torch.no_grad():
                self.module.weight.clamp_(-0.2, 0.2)

    class Middle(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return ((self.module.weight - self.top.module.weight) ** 2).sum() + (
                self.bottom.module.weight ** 2).sum()

        def grad_callback(self) -> None:
            called.append("grad")
            for p in self.trainable_parameters():
                p.grad = torch.zeros_like(p)

        def on_inner_loop_start(self) -> None:
            called.append("start")

    class Top(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return (self.bottom.module.weight ** 2).sum() + (self.middle.module.weight ** 2).sum()

    mods = [data.linear(2, seed=s) for s in range(3)]
    top, middle, bottom = (
        cls(name, Config(unroll_steps=2 if name == "bottom" else 1), m,
            torch.optim.SGD(m.parameters(), lr=0.1), None, [None], extra_config={"k": name})
        for cls, name, m in zip((Top, Middle, Bottom), ("top", "middle", "bottom"), mods))
    # Betty's meaning: u2l[U] = problems whose parameters U's loss reads;
    # l2u[C] = C's upper problems. Top reads bottom directly (a 3-problem path).
    deps = {"u2l": {top: [bottom, middle], middle: [bottom]},
            "l2u": {bottom: [middle], middle: [top]}}
    assert translate_dependencies(deps) == {
        "u2l": {middle: [bottom], top: [middle]},
        "l2u": {bottom: [top, middle], middle: [top]}}
    engine = Engine([top, middle, bottom], EngineConfig(train_iters=4, strategy="cpu"), deps)
    assert engine.top is top and bottom.middle is middle and engine.leaves == [bottom]
    assert [p.leaf for p in (top, middle, bottom)] == [False, False, True]
    assert bottom.parents == [middle] and middle.children == [bottom] and top.parents == []
    assert sorted([p.name for p in path] for path in top.paths) == [
        ["top", "bottom", "middle", "top"], ["top", "middle", "top"]]
    assert middle.cfg == {"k": "middle"} and bottom.config.unroll_steps == 2
    assert bottom.config.first_order is True  # Betty-only fields read through
    assert isinstance(middle.config.betty, Config)
    engine.run()
    assert engine.global_step == 4 and bottom.count == 4 and middle.count == 2
    assert counts[:2] == [1, 2]  # inside its own step, count includes that step (Betty)
    assert "param" in called and "grad" in called and "start" in called
    assert float(bottom.module.weight.detach().abs().max()) <= 0.2
    # grad_callback zeroed middle's gradients: it never moved
    torch.testing.assert_close(middle.module.weight, data.linear(2, seed=1).weight)
    # state_dict round trip, and Betty's own (module + optimizer) form
    state = bottom.state_dict()
    with torch.no_grad():
        bottom.module.weight.add_(1.0)
    bottom.load_state_dict({"module": state["module"], "optimizer": state["optimizer"]})
    torch.testing.assert_close(bottom.module.weight, state["module"]["weight"])
    bottom.set_train_data_loader([None, None])
    bottom.set_optimizer(torch.optim.SGD(bottom.module.parameters(), lr=0.0))
    engine.set_dependency(deps)  # rewiring with Betty's form keeps the program
    assert engine.leaves == [bottom] and len(top.paths) == 2
    engine.eval()
    assert not bottom.module.training
    engine.train()
    assert bottom.module.training


def test_config_translation_and_strategies() -> None:
    z = Config(type="neumann", unroll_steps=3, warmup_steps=7, gradient_clipping=0.0
               ).to_ziggurat(zg.Neumann(iterations=1, alpha=1.0))
    assert z.warmup_steps == 6 and z.gradient_clipping is None and z.unroll_steps == 3
    assert Config(gradient_clipping=2.5).to_ziggurat(zg.Darts()).gradient_clipping == 2.5
    for field in ("darts_multitask", "sama_multitask"):
        with pytest.raises(ConfigError, match=field):
            Config(**{field: True}).to_ziggurat(zg.Darts())
    assert EngineConfig(strategy="cpu").to_ziggurat().train_iters == 50000
    assert [EngineConfig(strategy=s).to_ziggurat().strategy
            for s in ("default", "cpu", "gpu", "distributed", "zero", "fsdp")] == [
        "none", "none", "none", "ddp", "zero", "fsdp"]
    with pytest.raises(ConfigError, match="Accelerate is not supported"):
        EngineConfig(strategy="accelerate").to_ziggurat()
    with pytest.raises(ConfigError, match="reinforce"):
        ImplicitProblem("p", Config(type="reinforce"), data.linear(2),
                        None, None, None)


def test_math_isfinite_helper() -> None:
    assert math.isfinite(betty.utils.get_weight_norm(data.linear(2).parameters()))


def test_counters_inside_a_step_and_in_messages_are_bettys() -> None:
    """Betty increments ``global_step`` before an iteration's steps and counts the step
    being taken in ``count``: both read so inside a step; outside it they count what was
    taken; an error names the step as native problems do (it said one too many)."""
    seen: list[tuple[int, int]] = []
    theta, lam = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))

    class Inner(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            return ((self.module.theta - self.outer.module.lam) ** 2).sum()

        def param_callback(self, params: Any) -> None:
            seen.append((engine.global_step, self.count))

    class Outer(ImplicitProblem):
        def training_step(self, batch: Any) -> torch.Tensor:
            bad = float("nan") if self.count == 3 else 1.0
            return bad * (self.inner.module.theta ** 2).sum()

    im, om = torch.nn.Module(), torch.nn.Module()
    im.theta, om.lam = theta, lam
    inner = Inner("inner", Config(type="darts"), im, torch.optim.SGD([theta], lr=0.1), None,
                  [None])
    outer = Outer("outer", Config(), om, torch.optim.SGD([lam], lr=0.1), None, [None])
    engine = Engine([outer, inner], EngineConfig(train_iters=4, strategy="cpu"),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    with pytest.raises(zg.HypergradientError, match=r"problem 'outer' at its step 3 is not"):
        engine.run()
    assert seen[:3] == [(1, 1), (2, 2), (3, 3)]  # (global_step, count) in inner's step 1..3
    assert engine.global_step == 2 and outer.count == 2


def test_gradient_accumulation_warns_that_the_schedule_counts_accumulated_steps() -> None:
    with pytest.warns(UserWarning, match=r"gradient_accumulation=2.*divide them by 2"):
        Config(gradient_accumulation=2).to_ziggurat(zg.Darts())
    with pytest.raises(ConfigError, match=r"betty Config\.gradient_accumulation=0"):
        Config(gradient_accumulation=0).to_ziggurat(zg.Darts())
