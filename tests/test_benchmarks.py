"""The convergence benchmark: its grid extension (no processes), and end to end in --quick mode as a user runs
it: real trainer runs, the markdown table and PNG plot, and a second invocation that skips a finished run and
resumes an unfinished one. The update-alignment diagnostic: its noise-free cosine, and end to end on a short run."""

from __future__ import annotations

import math
import sys
from json import loads
from pathlib import Path
from statistics import fmean

import pytest
import torch

from benchmarks.convergence import PLUS, extension, plus, square
from benchmarks.plateau import THRESHOLD
from benchmarks.update_alignment import BEST_LRS, cosine_to_mean
from tests.processes import run_command
from tests.run_helpers import logged
from trainer.config import load_config
from trainer.schedule import lr_multiplier


def test_the_2d_search_extends_around_the_best_pair_until_interior_or_the_limit() -> None:
    start = square(3)  # offsets -1..1 on both axes
    bowl = {k: (k[0] - 0.2) ** 2 + (k[1] + 0.1) ** 2 for k in start}  # best at (0, 0)
    assert extension(bowl, start, 4) == []  # interior in both lrs: stop
    corner = {k: -k[0] - k[1] for k in start}  # best at (1, 1): everything beyond it is asked for
    assert extension(corner, start, 4) == [(0, 2), (1, 2), (2, 0), (2, 1), (2, 2)]
    assert extension(corner, start, 0) == []  # max_extend reached
    assert extension(corner, start, 4, PLUS) == [(2, 1), (1, 2)]  # validate_defaults: axis neighbours only
    edge = {**bowl, (0, 0): 9.0, (-1, 0): 0.0}  # best on the low matrix-lr edge
    assert extension(edge, start, 4) == [(-2, -1), (-2, 0), (-2, 1)]
    # A diverged run (None) is worse than any finished one.
    assert extension({**bowl, (1, 1): None}, start, 4) == []
    # Every point diverged: the smallest corner's neighbours towards smaller lrs.
    assert extension(dict.fromkeys(start), start, 4) == [(-2, -2), (-2, -1), (-1, -2)]
    assert extension(dict.fromkeys(plus()), plus(), 4, PLUS) == [(-1, -1), (-2, -1), (-1, -2)]
    assert extension({}, start, 4) == []


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
    # The grids start at the base configs' pairs (configs/tiny_<optimizer>.yaml: optim.lr, optim.adamw_lr), named
    # as the sweep names them.
    (A, AR), (S, SR) = (
        (f"{o.lr:.3g}", f"{o.lr if o.adamw_lr is None else o.adamw_lr:.3g}")
        for o in (load_config(f"tiny_{name}").optim for name in ("adamw", "sinkgd"))
    )
    first = run_command(cmd, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]

    text = (out / "convergence_generated.md").read_text()
    png = (out / "convergence_generated.png").read_bytes()
    assert png.startswith(b"\x89PNG") and 10_000 < len(png) < 200_000
    assert "entropy floor 1.8343" in text  # the generated corpus's closed-form floor (vocab 64, order 2)
    sweep = runs / "generated_llama_tiny_3072tok_b8x32"  # 3072 tokens: 12 steps x 8 x 32
    assert sorted(d.name for d in sweep.iterdir() if d.is_dir()) == [
        f"adamw_lr{A}_rest{AR}",
        f"adamw_lr{A}_rest{AR}_seed1",
        f"sinkgd_lr{S}_rest{SR}",
        f"sinkgd_lr{S}_rest{SR}_seed1",
    ]
    assert f"adamw_lr: {SR}" in (sweep / f"sinkgd_lr{S}_rest{SR}" / "config.yaml").read_text()
    assert "seed: 1" in (sweep / f"sinkgd_lr{S}_rest{SR}_seed1" / "config.yaml").read_text()
    losses = {d.name: logged(d, "eval/loss") for d in sweep.iterdir() if d.is_dir()}
    assert {len(v) for v in losses.values()} == {3}  # 12 steps, an eval every 4: the same eval points for all
    adamw, sinkgd = (
        [losses[f"{name}{seed}"][-1] for seed in ("", "_seed1")]
        for name in (f"adamw_lr{A}_rest{AR}", f"sinkgd_lr{S}_rest{SR}")
    )
    assert adamw[0] != adamw[1]  # seed 1 is another init and data order
    # The table reports what the trainer logged: seed 0 on the grid, mean [min, max] over the seeds; a 1 x 1
    # grid that may not extend has its best on every edge.
    rows = {
        line.split(" | ")[1]: line for line in text.splitlines() if line.startswith("| ") and " | " in line
    }
    for name, pair, finals in (("adamw", (A, AR), adamw), ("sinkgd", (S, SR), sinkgd)):
        edge = f"| {pair[0]}, {pair[1]} † edge (lr-, lr+, rest-, rest+) |"
        assert f"{edge} {fmean(finals):.4f} [{min(finals):.4f}, {max(finals):.4f}] (2 seeds) |" in rows[name]
        assert f"| {pair[0]} | **{finals[0]:.4f}** |" in text  # its 1 x 1 grid
    assert "| 1.00x |" in rows["adamw"] and "8.00 B/param, 8.00 B/matrix element" in rows["adamw"]
    assert "0.00 B/matrix element" in rows["sinkgd"]  # SinkGD is stateless on the hidden matrices
    ranked = [line.split(" | ")[1] for line in text.splitlines() if line[:4] in ("| 1 ", "| 2 ")]
    assert ranked == sorted(["adamw", "sinkgd"], key=lambda n: fmean({"adamw": adamw, "sinkgd": sinkgd}[n]))

    # Second invocation: adamw finished (skipped); sinkgd looks interrupted (no result.json), so the trainer
    # resumes it from its latest checkpoint (the last step): nothing is trained again, the table is identical.
    metrics = {d: (d / "metrics.jsonl").read_text() for d in sweep.iterdir() if d.is_dir()}
    (sweep / f"sinkgd_lr{S}_rest{SR}" / "result.json").unlink()
    second = run_command(cmd, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert f"skip adamw_lr{A}_rest{AR}: finished earlier" in second.stdout
    assert f"sinkgd_lr{S}_rest{SR}: done (exit 0)" in second.stdout
    log = (sweep / f"sinkgd_lr{S}_rest{SR}" / "train.log").read_text()
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


@pytest.mark.slow
def test_validate_defaults_compares_the_shipped_pair_with_the_best_around_it(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    cmd = [
        sys.executable, "-m", "benchmarks.validate_defaults", "--data=generated", "--quick", "--optimizers=sinkgd",
        "--batch-sizes=8", "--max-extend=0", f"--runs-dir={runs}", f"--out={out}",
    ]  # fmt: skip
    result = run_command(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    optim = load_config("tiny_sinkgd").optim
    lr, rest = optim.lr, optim.lr if optim.adamw_lr is None else optim.adamw_lr
    sweep = runs / "generated_llama_tiny_3072tok_b8x32"
    finals = {d.name: logged(d, "eval/loss")[-1] for d in sweep.iterdir() if d.is_dir()}
    # The shipped pair and its 4 axis neighbours at least (more where the best of them asks for its own).
    plus = {(lr, rest), (lr * 2, rest), (lr / 2, rest), (lr, rest * 2), (lr, rest / 2)}
    assert {f"sinkgd_lr{a:.3g}_rest{b:.3g}" for a, b in plus} <= set(finals)
    best_name = min(finals, key=finals.__getitem__)
    (row,) = [
        line
        for line in (out / "validation_generated.md").read_text().splitlines()
        if line.startswith("| sinkgd")
    ]
    shipped = finals[f"sinkgd_lr{lr:.3g}_rest{rest:.3g}"]
    gap = shipped - finals[best_name]
    assert (
        f"| {lr:.3g}, {rest:.3g} | {shipped:.4f} |" in row
        and f"| {finals[best_name]:.4f} | {gap:+.4f} |" in row
    )
    assert ("| yes |" if gap <= 0.1 else "| no |") in row
    data = loads((out / "validation_generated.json").read_text())
    assert [r["gap_nats"] for r in data["rows"]] == pytest.approx([gap])


@pytest.mark.slow
def test_plateau_reports_the_first_eval_step_below_the_threshold(tmp_path: Path) -> None:
    runs, out = tmp_path / "runs", tmp_path / "out"
    cmd = [sys.executable, "-m", "benchmarks.plateau", "--quick", "--optimizers=swan",
           f"--runs-dir={runs}", f"--out={out}"]  # fmt: skip
    result = run_command(cmd, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    curve = logged(runs / "swan_seed0", "eval/loss")
    assert len(curve) == 4  # 40 steps, an eval every 10
    leave = next((10 * (i + 1) for i, loss in enumerate(curve) if loss < THRESHOLD), None)
    (row,) = [
        line for line in (out / "plateau_quick.md").read_text().splitlines() if line.startswith("| swan")
    ]
    optim = load_config("tiny_swan").optim
    assert row.startswith(f"| swan | {optim.lr:g} ({optim.adamw_lr:g}) | {curve[0]:.2f} | {curve[1]:.2f} |")
    assert row.endswith(f"| {curve[3]:.2f} | {'never' if leave is None else leave} |")
    assert loads((out / "plateau_quick.json").read_text())["swan"]["steps_to_leave"] == leave
