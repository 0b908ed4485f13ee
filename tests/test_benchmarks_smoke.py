"""The benchmark scripts run (in-process, --quick sizes; timings are never asserted), their
accuracy table holds the exact answer where the method is exact, and a missing peer
library is skipped with a message instead of failing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture(autouse=True)
def _bench_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.syspath_prepend(str(BENCH))
    threads = torch.get_num_threads()  # overhead.py sets one thread
    yield
    torch.set_num_threads(threads)


def test_meta_iteration_worker_reports_a_row(capsys: pytest.CaptureFixture[str]) -> None:
    import meta_iteration

    for method in ("sama-adam", "cg-1"):
        meta_iteration.main(["--worker", "--library", "ziggurat", "--method", method,
                             "--hidden", "16", "--repeats", "1"])
        row = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert row["method"] == method and row["parameters"] == 512 * 16 + 16 + 16 * 16 + 16 + 170
        assert row["iteration_s"] > 0 and row["plain_s"] > 0 and row["memory_mb"] >= 0


def test_a_missing_peer_is_skipped_with_the_install_command(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import meta_iteration
    import overhead

    for peer in ("betty", "torchopt"):
        monkeypatch.setitem(sys.modules, peer, None)  # import <peer> now raises ImportError
        meta_iteration.main(["--worker", "--library", peer, "--method", "darts", "--hidden",
                             "16", "--repeats", "1"])
        out = capsys.readouterr()
        assert json.loads(out.out.strip().splitlines()[-1]) == {"skipped": True}
        assert f"skipped {peer}" in out.err and "--ignore-requires-python" in out.err
        assert "torchopt==0.7.3 optree graphviz" in out.err
    overhead.main(["--quick", "--parts"])
    out = capsys.readouterr()
    assert "| ziggurat |" in out.out
    assert "| ziggurat, lower steps alone |" in out.out
    assert "| ziggurat, scheduled lower steps |" in out.out
    for peer in ("betty", "torchopt"):
        assert peer not in out.out and f"skipped {peer}" in out.err


def test_overhead_by_step_reports_each_kind_of_step(capsys: pytest.CaptureFixture[str]) -> None:
    import overhead

    overhead.main(["--quick", "--by-step"])
    out = capsys.readouterr().out
    for row in ("| first lower step |", "| other lower steps (median) |", "| upper step |",
                "| outer iteration (sum) |"):
        assert row in out


def _float64_overhead(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], Any]:
    """overhead.py in float64: the (model, decay) pairs its loops build, in order, and its
    data."""
    import overhead

    made: list[tuple[torch.nn.Linear, overhead.Decay]] = []
    models = overhead.models

    def models64(device: str) -> tuple[torch.nn.Linear, overhead.Decay]:
        model, decay = models(device)
        made.append((model.double(), decay.double()))
        return made[-1]

    monkeypatch.setattr(overhead, "models", models64)
    d = overhead.Data("cpu")
    d.x, d.y, d.xv, d.yv = d.x.double(), d.y.double(), d.xv.double(), d.yv.double()
    return made, d


def test_overhead_front_end_loop_is_the_hand_written_arithmetic_bit_for_bit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The loop "hand-written with ziggurat.backward.grad" (ziggurat's gradient front end)
    ends at the hand-written loop's parameters exactly (float64, 10 lower steps, 2 outer
    iterations)."""
    import overhead

    from ziggurat import backward

    made, d = _float64_overhead(monkeypatch)
    loops = [overhead.hand_written(d, "cpu", 10),
             overhead.hand_written(d, "cpu", 10, grad=backward.grad)]
    for _ in range(2):
        for loop in loops:
            loop()
    (model_h, decay_h), (model_b, decay_b) = made
    assert not torch.equal(decay_h.log_decay, torch.full_like(decay_h.log_decay, -2.0))
    for a, b in zip([*model_h.parameters(), *decay_h.parameters()],
                    [*model_b.parameters(), *decay_b.parameters()]):
        assert torch.equal(a, b)


def _torchopt_or_skip() -> None:
    from workloads import BENCH_INSTALL, optional

    if optional("torchopt") is None:
        pytest.skip(f"TorchOpt is not importable; install it with: {BENCH_INSTALL}")


def test_torchopt_hypergradients_equal_ziggurats() -> None:
    """TorchOpt's programs in meta_iteration.py compute ziggurat's quantity (float64, hidden
    16): the implicit cg / neumann rows against ziggurat's Engine with the same method, the
    unrolled MetaSGD darts row against ziggurat's Darts(scale=lr) at θ before the step, the
    identity-solve darts program (--torchopt-darts implicit) against ziggurat's darts row."""
    _torchopt_or_skip()
    import meta_iteration

    for method in ("cg-1", "neumann-3"):
        assert meta_iteration.check_torchopt(method) < 1e-12, method
    # beyond one iteration on this indefinite Hessian ziggurat's CG stops at the direction of
    # negative curvature and TorchOpt's does not; with H + δI positive definite they agree
    assert meta_iteration.check_torchopt("cg-3", cg_damping=1.0) < 1e-12
    assert meta_iteration.check_torchopt("cg-3") > 0.1
    assert meta_iteration.check_torchopt("darts") < 1e-10
    assert meta_iteration.check_torchopt("darts", darts="implicit") < 1e-12
    assert meta_iteration.torchopt_iteration(meta_iteration.workload(16, "cpu"),
                                             "sama-adam") is None


def test_torchopt_overhead_loop_does_the_hand_written_arithmetic(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """overhead.py's TorchOpt loop (custom_root with the identity solve) gives the
    hand-written loop's lower parameters and λ-gradient (float64, 10 lower steps)."""
    _torchopt_or_skip()
    import overhead

    made, d = _float64_overhead(monkeypatch)
    hand, loop = overhead.hand_written(d, "cpu", 10), overhead.torchopt_loop(d, "cpu", 10)
    assert loop is not None
    hand()
    loop()
    (model_h, decay_h), (model_t, decay_t) = made
    for a, b in zip(model_t.parameters(), model_h.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=0.0)
    g_h, g_t = decay_h.log_decay.grad, decay_t.log_decay.grad
    assert g_h is not None and g_t is not None and float(g_h.norm()) > 1e-6
    assert float((g_t - g_h).norm() / g_h.norm()) < 1e-12


def test_accuracy_table_is_exact_where_the_method_is(capsys: pytest.CaptureFixture[str]) -> None:
    import accuracy

    accuracy.main(["--quick"])  # dim 50: CG is exact after 50 iterations
    rows = {line.split("|")[1].strip(): line.split("|")[2:5]
            for line in capsys.readouterr().out.splitlines() if line.startswith("| ")}
    assert float(rows["cg-100"][0]) <= 1e-10
    assert float(rows["cg-10"][0]) < float(rows["cg-3"][0]) < float(rows["cg-1"][0])
    assert float(rows["neumann-100 (α = 1/λmax)"][0]) < float(rows["neumann-1 (α = 1/λmax)"][0])


def test_solver_products_reports_every_phase(capsys: pytest.CaptureFixture[str]) -> None:
    import solver_products

    solver_products.main(["--quick"])
    out = capsys.readouterr().out
    for phase in solver_products.PHASES:
        assert phase in out


def test_factored_ab_reports_both_sides(capsys: pytest.CaptureFixture[str]) -> None:
    import factored_ab

    from ziggurat.hypergrad import factored

    factored_ab.main(["--quick"])
    out = capsys.readouterr().out
    assert "factored" in out and "dense (ENABLED = False)" in out
    assert factored.ENABLED  # switched back on after the dense side


def test_meta_iteration_in_process_measures_like_the_worker() -> None:
    """``--in-process`` (CUDA only from the command line) runs ``measure`` in this process; a
    configuration that raises is a failed row, not a crash of the whole table."""
    import meta_iteration

    args = meta_iteration.argparse.Namespace(hidden=16, device="cpu", mixed="auto", repeats=1,
                                             torchopt_darts="metasgd")
    row = meta_iteration.in_process(args, "ziggurat", "cg-1", "2M")
    assert row["method"] == "cg-1" and row["parameters"] == 512 * 16 + 16 + 16 * 16 + 16 + 170
    assert row["iteration_s"] > 0 and row["plain_s"] > 0  # type: ignore[operator]
    failed = meta_iteration.in_process(args, "no-such-library", "cg-1", "2M")
    assert failed == {"library": "no-such-library", "method": "cg-1", "size": "2M",
                      "failed": True}
    with pytest.raises(SystemExit):
        meta_iteration.main(["--in-process", "--quick"])  # refused on the CPU


def _suite(tmp_path: Path, *sections: str, **env: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k != "OUT"}
    base.update({"ZIGGURAT_SUITE_DEVICE": "cpu", "ZIGGURAT_SUITE_QUICK": "1",
                 "ZIGGURAT_SUITE_PYTHON": sys.executable, "ZIGGURAT_SUITE_OUT": str(tmp_path),
                 **env})
    return subprocess.run(["bash", str(BENCH / "device_suite.sh"), *sections], env=base,
                          capture_output=True, text=True, timeout=300)


def test_device_suite_runs_its_sections_and_reports_each(tmp_path: Path) -> None:
    """A dry run of the GPU suite on the CPU (--quick sizes): one log per section, a summary
    line with each exit status, at most the 8 files the device tool brings back."""
    done = _suite(tmp_path, "env", "accuracy", "mixed")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.txt").read_text()
    for name in ("env", "accuracy", "mixed"):
        assert re.search(rf"^{name} +rc=0 ", summary, re.M), summary
    assert "torch " + torch.__version__ in summary
    assert "float64 on cpu" in (tmp_path / "accuracy.log").read_text()
    assert "on cpu, plain step" in (tmp_path / "mixed.log").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy.log", "mixed.log",
                                                         "summary.txt"]


def test_device_suite_names_a_failed_section_and_an_unknown_one(tmp_path: Path) -> None:
    failed = _suite(tmp_path / "a", "accuracy", ZIGGURAT_SUITE_PYTHON="false")
    assert failed.returncode == 1
    assert "sections that failed: accuracy" in (tmp_path / "a" / "summary.txt").read_text()
    unknown = _suite(tmp_path / "b", "tests", "gpu")
    assert unknown.returncode == 2 and "unknown section 'gpu'" in unknown.stderr
