"""benchmarks/gpu_acceptance.py in its CPU smoke mode: the GPU acceptance run's every section, end to end on tiny
models, so that the command a GPU window depends on cannot rot between the rare windows."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu_acceptance import Measured, targets_table
from optim import OPTIMIZER_NAMES
from tests.processes import run_command


def test_targets_are_judged_on_a_gpu_only_and_unmeasured_numbers_show_as_a_dash(monkeypatch) -> None:
    measured = {
        "adamw": Measured(tokens_per_s=200_000, step_s=1.0, optimizer_step_s=0.01, mfu=0.42),
        # SWAN's share 4.8% is under its 5%; Muon's step is 1.06x AdamW's; AuON's share 4% is over 3%
        "swan": Measured(tokens_per_s=195_000, step_s=1.04, optimizer_step_s=0.05, mfu=0.41),
        "muon": Measured(tokens_per_s=190_000, step_s=1.06, optimizer_step_s=0.02, mfu=0.40),
        "auon": Measured(tokens_per_s=199_000, step_s=1.0, optimizer_step_s=0.04, mfu=0.42),
    }

    def rows() -> dict[str, list[str]]:
        cells = [[c.strip() for c in line.strip("| ").split(" | ")] for line in targets_table(measured)]
        return {row[0]: row[1:] for row in cells if row[0] in measured}

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    on_gpu = rows()
    assert [on_gpu[name][-1] for name in measured] == ["met", "met", "MISSED", "MISSED"]
    # the first H200 run did not time AuON: its "before" cells are dashes
    assert on_gpu["auon"][:6] == ["-", "199,000", "-", "42.0%", "-", "1.00x"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    measured["adamw"] = Measured(tokens_per_s=4_500, step_s=0.1, optimizer_step_s=0.03, mfu=math.nan)
    assert rows()["adamw"] == ["102,500", "4,500", "21.6%", "-", "1.00x", "1.00x", "30.0%", "n/a (no GPU)"]


@pytest.mark.slow
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
