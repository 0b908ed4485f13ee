"""Metrics sinks, the metrics stream and the progress bar, on real files read back."""

from __future__ import annotations

import csv
import io
import json
import math
import sys
import time
from pathlib import Path

import pytest
import torch

from ziggurat.errors import ConfigError
from ziggurat.logging import (
    LOGGER_KINDS,
    ConsoleSink,
    CsvSink,
    JsonlSink,
    MetricRecord,
    MetricsStream,
    Progress,
    Sink,
    make_sinks,
)

INF = math.inf
NAN = math.nan


def _records() -> list[MetricRecord]:
    """Two problems over 6 iterations: a metric that appears at step 3, a metric named
    'loss', NaN / ±inf in loss, metrics, lr and hypergrad_norm, validation records."""
    out = []
    for i in range(1, 7):
        metrics = {"acc": i / 10}
        if i >= 3:
            metrics["grad_ratio"] = NAN if i == 4 else 1.0 + i
        if i == 5:
            metrics["loss"] = 9.5
        out.append(
            MetricRecord(i, "upper", i, 1.0 / i, metrics, 0.01 * i, INF if i == 6 else 2.0 * i,
                         0.125 * i)
        )
        if i % 2 == 0:
            out.append(MetricRecord(i, "lower", i // 2, -INF if i == 4 else 3.0 + i, {}, None,
                                    None, 0.125 * i + 0.01))
        if i % 3 == 0:
            out.append(MetricRecord(i, "upper", i, 0.5 * i, {"val_acc": 0.25 * i}, None, None,
                                    0.125 * i + 0.02, kind="validation"))
    return out


def _same(a: float | None, b: float | None, rel: float = 0.0) -> bool:
    if a is None or b is None:
        return a is b
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    if math.isinf(a) or math.isinf(b):
        return a == b
    return a == pytest.approx(b, rel=rel, abs=0.0)


# ----------------------------------------------------------------------------- records


def test_record_converts_tensors_and_rejects_bad_values() -> None:
    r = MetricRecord(2, "upper", 1, torch.tensor(0.25), {"acc": torch.tensor([0.5]), "n": 3},
                     torch.tensor(0.1, dtype=torch.float64), None, 1)
    assert type(r.loss) is float and r.loss == 0.25
    assert r.metrics == {"acc": 0.5, "n": 3.0} and all(type(v) is float for v in r.metrics.values())
    assert type(r.lr) is float and r.wall_time == 1.0
    with pytest.raises(TypeError, match=r"metric 'acc' of problem 'upper'.*shape \(3,\)"):
        MetricRecord(1, "upper", 1, 0.0, {"acc": torch.ones(3)}, None, None, 0.0)
    with pytest.raises(TypeError, match="metric 'acc'"):
        MetricRecord(1, "upper", 1, 0.0, {"acc": "high"}, None, None, 0.0)
    with pytest.raises(ValueError, match="kind='test'"):
        MetricRecord(1, "upper", 1, 0.0, {}, None, None, 0.0, kind="test")
    with pytest.raises(TypeError, match="global_step"):
        MetricRecord(1.5, "upper", 1, 0.0, {}, None, None, 0.0)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- console


def test_console_sink_one_line_per_record(capsys: pytest.CaptureFixture[str]) -> None:
    sink = ConsoleSink()
    sink.write(MetricRecord(7, "upper", 3, 1 / 3, {"acc": 2 / 3, "loss": 1.0}, 1e-3, 12345678.9,
                            2.0))
    sink.write(MetricRecord(7, "upper", 3, NAN, {"val_acc": INF}, None, None, 2.5,
                            kind="validation"))
    sink.close()
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "[step 7] upper: loss=0.333333 acc=0.666667 metrics.loss=1 lr=0.001 "
        "hypergrad_norm=1.23457e+07 t=2.00s",
        "[step 7] upper: validation loss=nan val_acc=inf t=2.50s",
    ]


# ----------------------------------------------------------------------------- jsonl


def _strict(token: str) -> float:
    raise AssertionError(f"non-standard JSON constant {token}")


def test_jsonl_every_line_parses_and_round_trips(tmp_path: Path) -> None:
    records = _records()
    with MetricsStream(make_sinks(["jsonl"], tmp_path, "run")) as stream:
        for i, record in enumerate(records):
            stream.write(record)
            if i == 2:  # flushed after each write: readable mid-run
                path = tmp_path / "run" / JsonlSink.filename
                assert len(path.read_text().splitlines()) == 3
    lines = (tmp_path / "run" / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(records)
    for line, record in zip(lines, records):
        row = json.loads(line, parse_constant=_strict)
        assert set(row) == {"global_step", "problem", "step", "kind", "loss", "metrics", "lr",
                            "hypergrad_norm", "wall_time"}
        assert (row["global_step"], row["problem"], row["step"], row["kind"]) == (
            record.global_step, record.problem, record.step, record.kind)
        assert set(row["metrics"]) == set(record.metrics)
        pairs = [(row[k], getattr(record, k)) for k in ("loss", "lr", "hypergrad_norm",
                                                         "wall_time")]
        pairs += [(row["metrics"][k], v) for k, v in record.metrics.items()]
        for written, value in pairs:
            if value is None:
                assert written is None
            elif math.isfinite(value):
                assert type(written) is float and written == value  # exact
            else:  # documented: the strings "nan", "inf", "-inf"
                assert written == ("nan" if math.isnan(value) else "inf" if value > 0 else "-inf")
                assert _same(float(written), value)
    assert '"loss": "-inf"' in lines[[r.loss for r in records].index(-INF)]


# ----------------------------------------------------------------------------- csv


def test_csv_widens_header_when_a_metric_first_appears(tmp_path: Path) -> None:
    records = _records()
    path = tmp_path / "run" / CsvSink.filename
    sinks = make_sinks(["csv"], tmp_path, "run")
    with MetricsStream(sinks) as stream:
        for i, record in enumerate(records):
            stream.write(record)
            # Readable with consistent columns at any moment, not only after close.
            with open(path, newline="") as f:
                rows = list(csv.DictReader(f))
            assert len(rows) == i + 1
    fixed = ["global_step", "problem", "step", "kind", "loss", "lr", "hypergrad_norm",
             "wall_time"]
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = list(reader.fieldnames or [])
    # Metric columns in order of first appearance; the metric named "loss" is renamed.
    assert header == [*fixed, "acc", "grad_ratio", "val_acc", "metrics.loss"]
    assert len(rows) == len(records)
    for row, record in zip(rows, records):
        assert None not in row and all(v is not None for v in row.values())  # no ragged rows
        assert int(row["global_step"]) == record.global_step and row["problem"] == record.problem
        assert int(row["step"]) == record.step and row["kind"] == record.kind
        for key in ("loss", "lr", "hypergrad_norm", "wall_time"):
            value = getattr(record, key)
            assert (row[key] == "") if value is None else _same(float(row[key]), value)
        columns = {"loss": "metrics.loss"}
        for name in ("acc", "grad_ratio", "val_acc", "loss"):
            cell = row[columns.get(name, name)]
            if name in record.metrics:
                assert _same(float(cell), record.metrics[name])
            else:
                assert cell == ""
    first_ratio = next(i for i, r in enumerate(records) if "grad_ratio" in r.metrics)
    assert first_ratio > 0 and all(row["grad_ratio"] == "" for row in rows[:first_ratio])
    assert not list((tmp_path / "run").glob("*.tmp"))


# ----------------------------------------------------------------------------- tensorboard


def test_tensorboard_scalars_read_back_with_event_accumulator(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing import event_accumulator

    records = _records()
    stream = MetricsStream(make_sinks(["tensorboard"], tmp_path, "run"))
    for record in records:
        stream.write(record)
    stream.close()

    expected: dict[str, list[tuple[int, float]]] = {}
    for r in records:
        points = {f"{r.problem}/{r.kind}/loss": r.loss}
        for name, value in r.metrics.items():
            tag = "metrics.loss" if name == "loss" else name
            points[f"{r.problem}/{r.kind}/{tag}"] = value
        if r.lr is not None:
            points[f"{r.problem}/lr"] = r.lr
        if r.hypergrad_norm is not None:
            points[f"{r.problem}/hypergrad_norm"] = r.hypergrad_norm
        for tag, value in points.items():
            expected.setdefault(tag, []).append((r.global_step, value))
    assert "upper/train/grad_ratio" in expected and "upper/validation/val_acc" in expected

    acc = event_accumulator.EventAccumulator(
        str(tmp_path / "run"), size_guidance={event_accumulator.SCALARS: 0}
    )
    acc.Reload()
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, series in expected.items():
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [step for step, _ in series], tag
        for event, (_, value) in zip(events, series):
            assert _same(event.value, value, rel=1e-6), (tag, event.value, value)  # float32


# ----------------------------------------------------------------------------- wandb


def test_wandb_offline_run_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = {"train_iters": 6, "method": "cg"}
    with MetricsStream(make_sinks(["wandb"], tmp_path, "my-run", config)) as stream:
        (sink,) = stream.sinks
        for record in _records():
            stream.write(record)
    runs = list((tmp_path / "my-run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and sink.run_dir == runs[0]  # type: ignore[attr-defined]
    data = list(runs[0].glob("run-*.wandb"))
    assert len(data) == 1 and data[0].stat().st_size > 0
    # The run file is a log of protobuf records; keys and config names appear verbatim.
    # wandb's service may still be flushing it just after finish() under load: poll briefly.
    keys = (b"upper/train/loss", b"upper/train/grad_ratio", b"upper/validation/val_acc",
            b"lower/train/loss", b"upper/hypergrad_norm", b"upper/lr", b"train_iters")
    deadline = time.monotonic() + 20.0
    raw = data[0].read_bytes()
    while not all(k in raw for k in keys) and time.monotonic() < deadline:
        time.sleep(0.2)
        raw = data[0].read_bytes()
    for key in (b"upper/train/loss", b"upper/train/grad_ratio", b"upper/validation/val_acc",
                b"lower/train/loss", b"upper/hypergrad_norm", b"upper/lr", b"train_iters"):
        assert key in raw, key
    assert (runs[0] / "files").is_dir() and (runs[0] / "logs").is_dir()


def test_wandb_respects_wandb_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "disabled")
    with MetricsStream(make_sinks(["wandb"], tmp_path, "off")) as stream:
        stream.write(_records()[0])
    assert not list((tmp_path / "off").glob("wandb/offline-run-*"))


# ----------------------------------------------------------------------------- make_sinks


def test_make_sinks_errors_name_the_field_and_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError) as info:
        make_sinks(["csv", "mlflow"], tmp_path, "run")
    assert (info.value.owner, info.value.field) == ("EngineConfig", "logger_type")
    assert "'mlflow'" in str(info.value) and all(repr(k) in str(info.value) for k in LOGGER_KINDS)
    assert not (tmp_path / "run").exists()  # nothing created before the check

    with pytest.raises(ConfigError) as info:
        make_sinks(["console", "jsonl"], None, "run")
    assert info.value.field == "log_dir"
    assert "jsonl" in str(info.value) and "set log_dir" in str(info.value)

    with pytest.raises(ConfigError, match="each logger kind at most once"):
        make_sinks(["csv", "csv"], tmp_path, "run")
    with pytest.raises(ConfigError, match=r"EngineConfig\.run_name"):
        make_sinks(["csv"], tmp_path, "../escape")

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"pip install 'ziggurat\[tensorboard\]'") as info:
        make_sinks(["tensorboard"], tmp_path, "run")
    assert info.value.field == "logger_type"
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(ConfigError, match=r"pip install 'ziggurat\[wandb\]'"):
        make_sinks(["wandb"], tmp_path, "run")


def test_make_sinks_console_only_needs_no_directory(tmp_path: Path) -> None:
    sinks = make_sinks("console", None, "")
    assert [type(s) for s in sinks] == [ConsoleSink]
    sinks = make_sinks(["console", "jsonl", "csv"], tmp_path / "logs", "r1")
    assert [type(s) for s in sinks] == [ConsoleSink, JsonlSink, CsvSink]
    MetricsStream(sinks).close()
    assert {p.name for p in (tmp_path / "logs" / "r1").iterdir()} == {"metrics.jsonl",
                                                                     "metrics.csv"}


# ----------------------------------------------------------------------------- stream


class _Recorder(Sink):
    def __init__(self, fail_write: bool = False, fail_close: bool = False) -> None:
        self.records: list[MetricRecord] = []
        self.closes = 0
        self.fail_write = fail_write
        self.fail_close = fail_close

    def write(self, record: MetricRecord) -> None:
        self.records.append(record)
        if self.fail_write:
            raise OSError("disk full")

    def close(self) -> None:
        self.closes += 1
        if self.fail_close:
            raise OSError(f"close failed {id(self)}")


def test_metrics_stream_closes_every_sink_and_raises_once() -> None:
    sinks = [_Recorder(), _Recorder(fail_close=True), _Recorder(fail_close=True), _Recorder()]
    stream = MetricsStream(sinks)
    record = _records()[0]
    stream.write(record)
    assert all(s.records == [record] for s in sinks)
    with pytest.warns(RuntimeWarning, match="also failed"), pytest.raises(OSError) as info:
        stream.close()
    assert str(info.value) == f"close failed {id(sinks[1])}"  # the first error
    assert [s.closes for s in sinks] == [1, 1, 1, 1]
    stream.close()  # second close: nothing, no second raise
    assert [s.closes for s in sinks] == [1, 1, 1, 1] and stream.closed
    with pytest.raises(RuntimeError, match="after close"):
        stream.write(record)


def test_metrics_stream_write_reaches_every_sink_despite_a_failure() -> None:
    sinks = [_Recorder(fail_write=True), _Recorder()]
    stream = MetricsStream(sinks)
    with pytest.raises(OSError, match="disk full"):
        stream.write(_records()[0])
    assert len(sinks[1].records) == 1
    stream.close()


def test_metrics_stream_context_keeps_the_original_error() -> None:
    sinks = [_Recorder(fail_close=True), _Recorder()]
    with pytest.warns(RuntimeWarning, match="closing the metrics sinks failed"), pytest.raises(
        KeyError, match="original"
    ):
        with MetricsStream(sinks):
            raise KeyError("original")
    assert [s.closes for s in sinks] == [1, 1]


# ----------------------------------------------------------------------------- progress


def test_progress_plain_lines_rate_and_metrics() -> None:
    out = io.StringIO()
    bar = Progress(100, "plain", out)
    assert bar.mode == "plain" and bar.plain_every == 5
    for step in range(1, 101):
        bar.update(step, {"upper/loss": 1.0 / step, "lower/acc": 0.5})
    bar.close()
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 20
    assert lines[0].startswith("[  5/100]   5%")
    assert lines[-1].startswith("[100/100] 100%")
    assert all(" it/s " in line and "lower/acc=0.5" in line for line in lines)
    assert "upper/loss=0.01" in lines[-1]


def test_progress_plain_prints_the_end_on_close() -> None:
    out = io.StringIO()
    with Progress(10, "plain", out, plain_every=4) as bar:
        for step in range(1, 8):  # stops early (e.g. early stopping) at 7
            bar.update(step, {"loss": step})
    lines = out.getvalue().splitlines()
    assert [line.split("]")[0] for line in lines] == ["[ 4/10", "[ 7/10"]


def test_progress_auto_off_and_errors() -> None:
    out = io.StringIO()
    assert Progress(10, "auto", out).mode == "plain"  # a StringIO is not a terminal
    with Progress(10, "off", out) as bar:
        for step in range(1, 11):
            bar.update(step, {"loss": 1.0})
    assert out.getvalue() == ""
    with pytest.raises(ConfigError, match=r"EngineConfig\.progress='fancy'"):
        Progress(10, "fancy", out)
    with pytest.raises(ConfigError, match=r"Progress\.total"):
        Progress(0, "plain", out)


def test_progress_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "rich", None)
    monkeypatch.setitem(sys.modules, "tqdm", None)
    with pytest.raises(ConfigError, match=r"pip install 'ziggurat\[progress\]'"):
        Progress(10, "rich", io.StringIO())
    with pytest.raises(ConfigError, match="pip install tqdm"):
        Progress(10, "tqdm", io.StringIO())
    assert Progress(10, "auto", io.StringIO(), force_terminal=True).mode == "plain"


def test_progress_rich_into_a_forced_terminal() -> None:
    pytest.importorskip("rich")
    out = io.StringIO()
    bar = Progress(50, "rich", out, force_terminal=True)
    assert bar.mode == "rich"
    with Progress(50, "auto", io.StringIO(), force_terminal=True) as other:
        assert other.mode == "rich"
    for step in range(1, 51):
        bar.update(step, {"upper/loss": 0.125, "weird[name]": 1.0})
    bar.close()
    bar.close()
    text = out.getvalue()
    assert "50/50" in text and "it/s" in text and "upper/loss=0.125" in text
    assert "weird[name]=1" in text  # metric names are not rich markup


def test_progress_tqdm() -> None:
    pytest.importorskip("tqdm")
    out = io.StringIO()
    with Progress(20, "tqdm", out) as bar:
        for step in range(1, 21):
            bar.update(step, {"loss": 0.5})
    text = out.getvalue()
    assert "20/20" in text and "loss=0.5" in text
