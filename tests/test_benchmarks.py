"""The convergence benchmark: its grid extension (no processes), and end to end in --quick mode as a user runs
it: real trainer runs, the markdown table and PNG plot, and a second invocation that skips a finished run and
resumes an unfinished one. The update-alignment diagnostic: its noise-free cosine, and end to end on a short run."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from statistics import fmean

import pytest
import torch

from benchmarks.convergence import extension
from benchmarks.update_alignment import BEST_LRS, cosine_to_mean
from tests.processes import run_command
from tests.run_helpers import logged
from trainer.config import load_config
from trainer.schedule import lr_multiplier


def test_grid_extends_beyond_the_edge_of_the_best_until_interior_or_the_limit() -> None:
    start = (-1, 1)
    assert extension({-1: 3.0, 0: 2.5, 1: 2.7}, start, 4) == []  # interior: stop
    assert extension({-1: 3.0, 0: 2.5, 1: 2.4}, start, 4) == [2]  # best at the high edge
    assert extension({-1: 2.0, 0: 2.5, 1: 2.7}, start, 4) == [-2]  # best at the low edge
    low_best = {-3: 2.0, -2: 2.1, -1: 2.2, 0: 2.5, 1: 2.7}  # already two beyond the starting grid's low edge
    assert extension(low_best, start, 2) == []  # max_extend reached
    assert extension(low_best, start, 3) == [-4]
    assert extension({0: 2.5}, (0, 0), 1) == [-1, 1]  # one point is at both edges
    assert extension({0: 2.5}, (0, 0), 0) == []
    # A diverged run (None) is worse than any finished one: the best is the finished neighbour, interior here.
    assert extension({-1: 3.0, 0: 2.9, 1: None}, start, 4) == []
    assert extension({-1: 3.0, 0: 2.9, 1: None, 2: None}, (0, 2), 4) == []
    assert extension({-1: 2.0, 0: None, 1: None}, start, 4) == [-2]
    assert extension({-1: None, 0: None, 1: None}, start, 4) == [-2]  # all diverged: a smaller lr
    assert extension({-5: None, -1: None, 0: None, 1: None}, start, 4) == []


@pytest.mark.slow
def test_convergence_quick_writes_table_and_plot_and_resumes(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.convergence",
        "--quick",
        "--optimizers=adamw,sinkgd",
        "--grid-points=1",
        "--max-extend=0",
        "--seeds=2",
        f"--runs-dir={runs}",
        f"--out={out}",
    ]
    # The grids start at the base configs' lrs (configs/tiny_<optimizer>.yaml), named as the sweep names them.
    A, S = (f"{load_config(f'tiny_{name}').optim.lr:.3g}" for name in ("adamw", "sinkgd"))
    first = run_command(cmd, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    text = (out / "convergence_generated.md").read_text()
    png = (out / "convergence_generated.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 200_000
    assert "entropy floor 1.8343" in text  # the generated corpus's closed-form floor (vocab 64, order 2)
    sweep = runs / "generated_llama_tiny_3072tok_b8x32"  # 3072 tokens: 12 steps x 8 x 32
    # Phase 1 (AdamW, one lr) and AdamW's phase-2 point at phase 1's best lr are one config: one run directory.
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == [
        f"adamw_lr{A}_rest{A}",
        f"adamw_lr{A}_rest{A}_seed1",
        f"sinkgd_lr{S}_rest{A}",
        f"sinkgd_lr{S}_rest{A}_seed1",
    ]
    assert f"adamw_lr: {A}" in (sweep / f"sinkgd_lr{S}_rest{A}" / "config.yaml").read_text()
    assert "seed: 1" in (sweep / f"sinkgd_lr{S}_rest{A}_seed1" / "config.yaml").read_text()
    losses = {d.name: logged(d, "eval/loss") for d in sweep.iterdir() if d.is_dir()}
    assert {len(v) for v in losses.values()} == {3}  # 12 steps, an eval every 4: the same eval points for all
    adamw, sinkgd = (
        [losses[f"{name}_rest{A}{seed}"][-1] for seed in ("", "_seed1")]
        for name in (f"adamw_lr{A}", f"sinkgd_lr{S}")
    )
    assert adamw[0] != adamw[1]  # seed 1 is another init
    # The table reports what the trainer logged: seed 0 in the sweep, mean [min, max] over the seeds.
    assert f"one lr for every parameter: **{A}: {adamw[0]:.4f}**; best {A} † edge" in text
    rows = {
        line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ") and " | " in line
    }
    for name, lr, finals in (("adamw", A, adamw), ("sinkgd", S, sinkgd)):
        assert f"| **{lr}: {finals[0]:.4f}** | {lr} † edge |" in rows[name]
        assert f"| {fmean(finals):.4f} [{min(finals):.4f}, {max(finals):.4f}] (2 seeds) |" in rows[name]
    assert "| 1.00x |" in rows["adamw"] and "8.00 B/param, 8.00 B/matrix element" in rows["adamw"]
    assert "0.00 B/matrix element" in rows["sinkgd"]  # SinkGD is stateless on the hidden matrices
    ranked = [line.split(" | ")[1] for line in text.splitlines() if line[:4] in ("| 1 ", "| 2 ")]
    assert ranked == sorted(["adamw", "sinkgd"], key=lambda n: fmean({"adamw": adamw, "sinkgd": sinkgd}[n]))

    # Second invocation: adamw finished (skipped); sinkgd looks interrupted (no result.json), so the trainer
    # resumes it from its latest checkpoint (the last step): nothing is trained again, the table is identical.
    metrics = {d: (d / "metrics.jsonl").read_text() for d in sweep.iterdir() if d.is_dir()}
    (sweep / f"sinkgd_lr{S}_rest{A}" / "result.json").unlink()
    second = run_command(cmd, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"skip adamw_lr{A}_rest{A}: finished earlier" in second.stdout
    assert f"sinkgd_lr{S}_rest{A}: done (exit 0)" in second.stdout
    log = (sweep / f"sinkgd_lr{S}_rest{A}" / "train.log").read_text()
    assert "checkpoints/step_000012 at step 12" in log
    assert {d: (d / "metrics.jsonl").read_text() for d in metrics} == metrics

    def tables(md: str) -> list[str]:  # the header's wall time and date may change; the numbers may not
        return [line for line in md.splitlines() if not line.startswith(("Date:", "Command:"))]

    assert tables((out / "convergence_generated.md").read_text()) == tables(text)


def test_cosine_to_the_mean_gradient_does_not_inherit_the_estimates_noise() -> None:
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(100_000, generator=gen, dtype=torch.float64)
    g1, g2 = (mu + 3 * torch.randn(mu.shape, generator=gen, dtype=torch.float64) for _ in range(2))
    naive = torch.nn.functional.cosine_similarity(mu, (g1 + g2) / 2, dim=0).item()
    assert naive < 0.45  # 1 / sqrt(1 + 9 / 2): the half-means' noise
    assert abs(cosine_to_mean(mu, g1, g2) - 1) < 0.05
    assert abs(cosine_to_mean(-mu, g1, g2) + 1) < 0.05
    across = torch.randn(mu.shape, generator=gen, dtype=torch.float64)
    assert abs(cosine_to_mean(across, g1, g2)) < 0.05  # a direction unrelated to mu
    assert math.isnan(cosine_to_mean(torch.zeros_like(mu), g1, g2))


@pytest.mark.slow
def test_update_alignment_measures_the_applied_step(tmp_path: Path) -> None:
    out = tmp_path / "alignment.md"
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.update_alignment",
        "--optimizers=sinkgd,muon",
        "--steps=24",
        "--every=12",
        "--at=12",
        "--batches=4",
        "--probes=1",
        f"--runs-dir={tmp_path / 'runs'}",
        f"--out={out}",
        "--data.eval_sequences=8",
        "--train.seq_len=32",
    ]
    done = run_command(cmd, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [line for line in out.read_text().splitlines() if line.startswith("| ")][2:]  # below the header
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in lines}
    assert set(rows) == {"sinkgd", "muon"} and rows["sinkgd"][1] == "12"
    # SinkGD's direction has per-element RMS exactly 1: the measured step is lr x the schedule at step 12.
    t = load_config("tiny_sinkgd").train
    lr = BEST_LRS["sinkgd"] * lr_multiplier(12, 24, t.schedule, t.warmup_ratio, t.min_lr_ratio, t.decay_ratio)
    assert float(rows["sinkgd"][7]) == pytest.approx(lr, rel=1e-2)
    for cells in rows.values():
        assert all(-1 <= float(c) <= 1 for c in cells[3:7])  # cosines
