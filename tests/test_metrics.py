"""What a user reads: metrics.jsonl and TensorBoard, each step once even after a resume; the progress line."""

import io
import json
import time

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from trainer.metrics import MetricsLogger, format_duration


def _log_steps(run_dir, steps, resumed_step=0, scale=1.0):
    log = MetricsLogger(run_dir, True, True, total_steps=10, resumed_step=resumed_step, stream=io.StringIO())
    for step in steps:
        log.log(step, {"loss": scale * step})
    log.close()


def test_resume_replaces_the_records_of_repeated_steps(tmp_path) -> None:
    _log_steps(tmp_path, range(1, 7))  # the first attempt got to step 6, its last checkpoint was step 4
    _log_steps(tmp_path, range(5, 9), resumed_step=4, scale=10.0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 4), (5, 50), (6, 60), (7, 70),
                                                          (8, 80)]  # fmt: skip
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == list(range(1, 9))
    assert [e.value for e in scalars] == pytest.approx([1, 2, 3, 4, 50, 60, 70, 80])


def test_progress_line_and_rank_nonzero_is_silent(tmp_path, monkeypatch) -> None:
    out = io.StringIO()
    clock = iter([100.0, 110.0, 0.0])  # the logger starts at 100 s; 50 steps later it is 110 s
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    log = MetricsLogger(tmp_path, True, False, total_steps=200, stream=out)
    log.progress(step=50, loss=2.5, tokens_per_s=41_200)
    assert out.getvalue() == "step 50/200 | loss 2.5000 | 41.2k tok/s | ETA 0m30s\n"
    silent = io.StringIO()
    other = MetricsLogger(tmp_path / "other", False, True, total_steps=10, stream=silent)
    other.progress(1, 1.0, 1.0)
    other.log(1, {"loss": 1.0})
    assert silent.getvalue() == "" and not (tmp_path / "other").exists()


def test_format_duration() -> None:
    assert [format_duration(s) for s in (5, 75, 3725)] == ["0m05s", "1m15s", "1h02m"]


def test_cadence_and_throughput_window(tmp_path, monkeypatch) -> None:
    clock = iter([0.0, 2.0, 3.0])
    monkeypatch.setattr(time, "perf_counter", lambda: next(clock))
    log = MetricsLogger(tmp_path, False, False, total_steps=25, log_every=10)
    assert [s for s in range(1, 26) if log.is_log_step(s)] == [10, 20, 25]  # every 10th and the last
    log.count(1000)
    log.count(1000)
    assert log.throughput(torch.device("cpu")) == 1000.0  # 2000 tokens in 2 s
    log.count(500)
    assert log.throughput(torch.device("cpu")) == 500.0  # a new window: 500 tokens in 1 s
