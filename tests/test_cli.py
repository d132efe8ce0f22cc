"""End to end through the command line, as a user runs it: torchrun + launch/pretrain.py, and its error exits."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch

from tests.processes import pretrain
from tests.run_helpers import logged
from trainer.config import load_config
from trainer.memory.planner import plan_memory
from trainer.memory.preflight import available_cpu_bytes

# Every test here runs launch/pretrain.py in child processes.
pytestmark = pytest.mark.slow


def test_torchrun_two_processes_trains_logs_and_checkpoints(tmp_path: Path) -> None:
    result = pretrain(
        "--config",
        "tiny_adamw.yaml",
        f"--train.runs_dir={tmp_path}",
        "--train.steps=30",
        "--metrics.log_every=5",
        "--train.eval_every=15",
        "--checkpoint.every=15",
        nproc=2,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = tmp_path / "tiny_adamw"
    losses = logged(run_dir)
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.5  # a clearly falling loss
    assert len(logged(run_dir, "eval/loss")) == 2
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000015", "step_000030"]
    assert (run_dir / "config.yaml").is_file()
    assert f"tensorboard --logdir {run_dir / 'tb'}" in result.stdout
    assert "step 30/30" in result.stdout and "ETA" in result.stdout

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    tb_loss = [e.value for e in events.Scalars("loss")]
    assert tb_loss == pytest.approx(losses)
    assert {"lr", "grad_norm", "tokens_per_s", "eval/loss"} <= set(events.Tags()["scalars"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--config", "tiny_adamw.yaml", "--optim.lrr=1"], "error: unknown config key 'optim.lrr'"),
        (["--config", "tiny_adamw.yaml", "--train.steps=x"], "error: train.steps: expected int, got str"),
        (["--config", "nope.yaml"], "error: config file not found: nope.yaml"),
        (["--config", "tiny_adamw.yaml", "--data.source=missing.jsonl"], "error: data.source: no such file"),
        (
            ["--config", "tiny_auon.yaml", "--optim.variant=bogus"],
            "error: optim.variant: 'bogus' is not one of",
        ),
        (
            ["--config", "tiny_normuon.yaml", "--optim.ns_steps=0"],
            "error: optim.ns_steps: must be >= 1, got 0",
        ),
        pytest.param(
            ["--config", "tiny_adamw.yaml", "--parallel.device=cuda"],
            "error: parallel.device=cuda but CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, args, message) -> None:
    result = pretrain(*args, f"--train.runs_dir={tmp_path / 'runs'}", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().startswith(message)
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_global_batch_not_divisible_by_world_size_is_a_usage_error(tmp_path: Path) -> None:
    result = pretrain(
        "--config",
        "tiny_adamw.yaml",
        f"--train.runs_dir={tmp_path}",
        "--train.global_batch_size=12",
        "--train.micro_batch_size=4",
        nproc=2,
    )
    assert result.returncode != 0
    assert (
        "error: train.global_batch_size (12) must be a multiple of train.micro_batch_size (4) x world size (2)"
        in (result.stderr)
    )
    assert list(tmp_path.iterdir()) == []


def test_an_empty_data_source_exits_2_and_leaves_no_run_directory(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("")
    result = pretrain(
        "--config", "tiny_adamw.yaml", f"--train.runs_dir={tmp_path / 'runs'}",
        f"--data.source={tmp_path / 'empty.jsonl'}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        == f"error: data source {tmp_path / 'empty.jsonl'}:train has no training documents"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # no runs/<name>/, no tokenizer.json


OVERSIZED_SEQ_LEN = 250_000


def _oversized_plan_bytes() -> float:
    """Two ranks' planned peak at OVERSIZED_SEQ_LEN (about 2 x 23 GiB, mostly activations)."""
    return (
        2
        * plan_memory(load_config("tiny_swan.yaml", [f"--train.seq_len={OVERSIZED_SEQ_LEN}"]), 2, "cpu").peak
    )


@pytest.mark.skipif(
    available_cpu_bytes() > _oversized_plan_bytes(), reason="the oversized plan fits this machine's RAM"
)
def test_a_run_that_cannot_fit_is_refused_by_the_planner_in_seconds(tmp_path: Path) -> None:
    """A seq_len far past the tiny CPU config's: the planner's peak per rank times two ranks exceeds this
    machine's RAM (the skip condition asks the planner itself), so the run stops before building the model."""
    start = time.perf_counter()
    result = pretrain(
        "--config", "tiny_swan.yaml", f"--train.runs_dir={tmp_path}", f"--train.seq_len={OVERSIZED_SEQ_LEN}",
        nproc=2,
    )  # fmt: skip
    # torchrun's own start-up included (the check itself takes ~1 s; under a loaded CI machine the start-up of
    # two ranks has taken 11 s): a run that tried to build what the plan refuses would take minutes or be killed
    assert time.perf_counter() - start < 45
    assert result.returncode != 0 and "exitcode  : 2" in result.stderr
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error: memory:")]
    assert "GiB per rank (forward/backward)" in line and "of available RAM per rank" in line
    assert (
        "largest term: activations without checkpointing" in line
        and f"train.seq_len {OVERSIZED_SEQ_LEN}" in line
    )
    assert "train.allow_oversubscribe=true" in line
    assert list(tmp_path.iterdir()) == []
