"""The benchmark scripts run (in-process, --quick sizes; timings are never asserted), their
accuracy table holds the exact answer where the method is exact, and a missing peer
library is skipped with a message instead of failing."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

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

    monkeypatch.setitem(sys.modules, "betty", None)  # import betty now raises ImportError
    meta_iteration.main(["--worker", "--library", "betty", "--method", "darts", "--hidden", "16",
                         "--repeats", "1"])
    out = capsys.readouterr()
    assert json.loads(out.out.strip().splitlines()[-1]) == {"skipped": True}
    assert "skipped betty" in out.err and "--ignore-requires-python" in out.err
    overhead.main(["--quick"])
    out = capsys.readouterr()
    assert "| ziggurat |" in out.out and "betty" not in out.out and "skipped betty" in out.err


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
