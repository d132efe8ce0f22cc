"""benchmarks/gpu_acceptance.py in its CPU smoke mode: the GPU acceptance run's every section, end to end on tiny
models, so that the command a GPU window depends on cannot rot between the rare windows."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from optim import OPTIMIZER_NAMES
from tests.processes import run_command

pytestmark = pytest.mark.slow


def test_the_smoke_mode_runs_every_section_and_passes(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "benchmarks.gpu_acceptance", "--smoke", "--out", str(tmp_path)]
    result = run_command([*cmd, "--runs-dir", str(tmp_path / "runs")], timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (report,) = tmp_path.glob("acceptance-*-cpu.md")
    text = report.read_text()
    for section in "abcdef":
        assert f"| {section}. " in text and "done in" in text.split(f"| {section}. ")[1].splitlines()[0], (
            section
        )
    headline = text.split("## a.")[1].split("## b.")[0]
    for name in OPTIMIZER_NAMES:  # trained, evaluated, resumed to the same losses, exported
        row = next(line for line in headline.splitlines() if line.startswith(f"| {name} |"))
        assert row.endswith("| pass |") and "0 (bitwise)" in row, row
    assert "transformers logits max diff" in headline
    throughput = text.split("## b.")[1].split("## c.")[0]
    assert throughput.count("ms |") >= len(OPTIMIZER_NAMES) + 2 and "failed" not in throughput
    assert "| swan, update_in_backward" in throughput and "| swan, activation checkpointing" in throughput
    # section d: the shares by kind of work of AdamW's and SWAN's profiled steps
    assert len(re.findall(r"^\| matrix products \| [\d.]+ \| [\d.]+% \|$", text, re.M)) == 2
    assert text.count("| muon | bfloat16 |") == 2  # section c: fp32 and TF32 tables
    several = text.split("## f.")[1]
    assert several.count("| pass |") == 2  # SWAN and NorMuon at 2 processes equal 1 process
    runs = tmp_path / "runs"
    assert any(runs.glob("a_*/checkpoints/step_*")) and not any(runs.glob("b_*/checkpoints"))  # b: no saves
