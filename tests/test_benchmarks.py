"""The convergence benchmark end to end in --quick mode, as a user runs it: real trainer runs, the markdown table
and PNG plot, and a second invocation that skips a finished run and resumes an unfinished one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.run_helpers import logged

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
def test_convergence_quick_writes_table_and_plot_and_resumes(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "convergence.py"),
        "--quick",
        "--optimizers=adamw,sinkgd",
        "--lr-multipliers=1",
        f"--runs-dir={runs}",
        f"--out={out}",
    ]
    first = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    table = (out / "convergence.md").read_text()
    png = (out / "convergence.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 200_000
    assert "entropy floor 1.8343" in table  # the generated corpus's closed-form floor (vocab 512, seed 1234)
    assert "use AdamW's best lr (0.003)" in table  # sinkgd ran after AdamW's grid, with its lr for embeddings
    assert "adamw_lr: 0.003" in (runs / "sinkgd_lr0.001" / "config.yaml").read_text()
    adamw, sinkgd = logged(runs / "adamw_lr0.003", "eval/loss"), logged(runs / "sinkgd_lr0.001", "eval/loss")
    assert len(adamw) == len(sinkgd) == 3  # 12 steps, an eval every 4
    rows = {line.split(" | ")[0][2:]: line for line in table.splitlines() if line.startswith("| ")}
    assert f"**0.003: {adamw[-1]:.4f}**" in rows["adamw"]  # the table reports what the trainer logged
    assert f"**0.001: {sinkgd[-1]:.4f}**" in rows["sinkgd"]
    assert "| 1.00x |" in rows["adamw"] and "8.00 B/param, 8.00 B/matrix element" in rows["adamw"]
    assert "0.00 B/matrix element" in rows["sinkgd"]  # SinkGD is stateless on the hidden matrices

    # Second invocation: adamw finished (skipped); sinkgd looks interrupted (no result.json), so the trainer
    # resumes it from its latest checkpoint (the last step): nothing is trained again, the report is identical.
    metrics = {d: (d / "metrics.jsonl").read_text() for d in runs.iterdir() if d.is_dir()}
    (runs / "sinkgd_lr0.001" / "result.json").unlink()
    second = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "skip adamw_lr0.003: finished earlier" in second.stdout
    assert "sinkgd_lr0.001: done (exit 0)" in second.stdout
    assert "checkpoints/step_000012 at step 12" in (runs / "sinkgd_lr0.001" / "train.log").read_text()
    assert {d: (d / "metrics.jsonl").read_text() for d in metrics} == metrics
    assert (out / "convergence.md").read_text() == table
