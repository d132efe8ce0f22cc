"""Faults: a rank SIGKILLed during a save, damaged or incompatible checkpoints at the command line, non-finite
losses (stop / skip), and a rank killed mid-run under `torchrun --max-restarts=1`."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import time
from collections import defaultdict
from pathlib import Path

import pytest
import torch.distributed as dist
from torch.multiprocessing import ProcessExitedException, ProcessRaisedException

from tests.distributed import run_distributed
from tests.processes import pretrain, pretrain_command, start_command, torchrun
from tests.run_helpers import FAST, train_in_process, trained_tiny_run
from trainer.checkpoint import is_complete, latest_checkpoint


def _records(run_dir: Path) -> dict[int, list[float]]:
    """Every logged loss per step, in logging order."""
    by_step = defaultdict(list)
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            by_step[record["step"]].append(record["loss"])
    return dict(by_step)


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


# ------------------------------------------------------------------------------------ SIGKILL during a save


def _rank1_dies_in_its_nth_write(overrides: list[str], nth: int) -> None:
    """Rank 1 SIGKILLs itself when DCP asks it to write its shards for the nth time (inside the save, after
    step_N.partial exists and the ranks have agreed on the plan); rank 0 is in the same save."""
    if dist.get_rank() == 1:
        from torch.distributed.checkpoint import FileSystemWriter

        real, writes = FileSystemWriter.write_data, []

        def write_data(self, plan, planner):
            writes.append(1)
            if len(writes) == nth:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(self, plan, planner)

        FileSystemWriter.write_data = write_data
    train_in_process("tiny_adamw.yaml", overrides)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rank_killed_during_a_save_leaves_the_previous_checkpoint_and_the_rerun_continues(tmp_path, mode):
    run_dir = tmp_path / "run"
    overrides = [
        *FAST,
        "--train.steps=8",
        "--checkpoint.every=4",
        f"--checkpoint.async_save={mode == 'async'}",
        f"--train.runs_dir={tmp_path}",
        "--train.run_name=run",
    ]
    # The job fails: rank 1 by SIGKILL, or rank 0 first noticed (its gloo peer vanished) and raised.
    with pytest.raises((ProcessExitedException, ProcessRaisedException)):
        run_distributed(_rank1_dies_in_its_nth_write, 2, overrides, 2)  # the save at step 8
    ckpts = run_dir / "checkpoints"
    assert _names(ckpts) == ["step_000004", "step_000008.partial"]
    assert not (ckpts / "step_000008.partial" / "trainer_state.json").exists()
    assert latest_checkpoint(ckpts) == ckpts / "step_000004"
    first = _records(run_dir)
    assert sorted(first) == list(range(1, 9))  # every step ran; only the last save was cut

    run_distributed(train_in_process, 2, "tiny_adamw.yaml", overrides)  # the same command again
    assert _names(ckpts) == ["step_000004", "step_000008"] and is_complete(ckpts / "step_000008")
    again = _records(run_dir)
    assert sorted(again) == list(range(1, 9)) and all(
        len(again[s]) == 1 for s in again
    )  # re-run steps replace
    assert again == first  # resumed exactly: steps 5-8 got the first attempt's losses bit for bit


# ------------------------------------------------------------------------ damaged / incompatible, CLI exit 2


@pytest.fixture(scope="module")
def ws2_run(tmp_path_factory) -> Path:
    """A 2-step world-size-2 run with its final checkpoint (shards __0_0 and __1_0)."""
    return trained_tiny_run(tmp_path_factory.mktemp("ws2"), world_size=2, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize(
    "damage, args, message",
    [
        (
            lambda c: (c / "__1_0.distcp").unlink(),
            [],
            "step_000002: damaged (__1_0.distcp is missing); no intact checkpoint is left",
        ),
        (
            lambda c: None,
            ["--model.vocab_size=1024"],
            "step_000002: size mismatch for model.tok_embeddings.weight: saved [512, 64] vs this run's [1024, 64]",
        ),
        (
            lambda c: None,
            ["--optim.name=normuon"],
            "step_000002: saved with optim 'adamw', this run has 'normuon'",
        ),
    ],
    ids=["missing-shard", "other-shape", "other-optimizer"],
)
def test_a_damaged_or_incompatible_checkpoint_exits_2_with_one_line_and_deletes_nothing(
    ws2_run, tmp_path, damage, args, message
):
    run_dir = tmp_path / "run"
    shutil.copytree(ws2_run, run_dir)
    damage(run_dir / "checkpoints" / "step_000002")
    before = _snapshot(run_dir)
    result = pretrain(
        "--config", "tiny_adamw.yaml", *FAST, "--train.steps=4", f"--train.runs_dir={tmp_path}",
        "--train.run_name=run", *args, cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and lines[0].endswith(message), lines
    assert _snapshot(run_dir) == before  # nothing deleted, nothing rewritten (not even config.yaml)


# ------------------------------------------------------------------------------------------- non-finite


def _nonfinite_runs(root: Path) -> dict[str, str]:
    """Three runs whose gradients and loss turn NaN at chosen steps; returns each run's error ('' if none)."""
    import torch

    from trainer.engines.fsdp2 import FSDP2Engine
    from trainer.loop import NonFiniteError

    real = FSDP2Engine.forward_backward
    errors = {}
    for name, bad_steps, policy in [
        ("stop", {3}, ["--train.on_nonfinite=stop"]),
        ("skip", {3, 4}, ["--train.on_nonfinite=skip", "--train.max_skips=2"]),
        ("too_many", {3, 4, 5}, ["--train.on_nonfinite=skip", "--train.max_skips=2"]),
    ]:
        calls = []

        def poisoned(self, micro_batches, bad_steps=bad_steps, calls=calls):
            loss = real(self, micro_batches)
            calls.append(1)
            if len(calls) in bad_steps:
                for p in self.model.parameters():
                    p.grad.mul_(float("nan"))
                loss = loss * torch.tensor(float("nan"))
            return loss

        FSDP2Engine.forward_backward = poisoned
        overrides = [
            *FAST, "--train.steps=6", "--checkpoint.every=1", "--checkpoint.keep_last=0",
            f"--train.runs_dir={root}", f"--train.run_name={name}", *policy,
        ]  # fmt: skip
        try:
            train_in_process("tiny_adamw.yaml", overrides)
            errors[name] = ""
        except NonFiniteError as err:
            errors[name] = str(err)
    return errors


@pytest.mark.slow
def test_a_non_finite_step_stops_without_saving_or_is_skipped_up_to_the_limit(tmp_path):
    errors = run_distributed(_nonfinite_runs, 2, tmp_path)

    assert errors["stop"] == (
        "non-finite loss nan or grad norm nan at step 3; stopping without saving (step_000002 is intact)"
    )
    assert _names(tmp_path / "stop" / "checkpoints") == ["step_000001", "step_000002"]
    assert sorted(_records(tmp_path / "stop")) == [1, 2]

    assert errors["skip"] == ""  # steps 3 and 4 skipped (their NaN gradients dropped), then training went on
    skipped = _records(tmp_path / "skip")
    assert sorted(skipped) == [1, 2, 5, 6]
    assert all(v[0] == v[0] and v[0] < 7 for v in skipped.values())  # finite and sane (log 512 = 6.24)
    assert _names(tmp_path / "skip" / "checkpoints") == [f"step_00000{s}" for s in (1, 2, 5, 6)]
    assert skipped[1] == _records(tmp_path / "stop")[1]

    assert errors["too_many"].startswith("non-finite loss nan or grad norm nan at step 5")
    assert _names(tmp_path / "too_many" / "checkpoints") == ["step_000001", "step_000002"]


# ------------------------------------------------------------------------- torchrun --max-restarts=1


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    ranks = [int(item[5:]) for item in env if item.startswith(b"RANK=")]
    return ranks[0] if ranks else None


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the worker processes through /proc")
def test_torchrun_restarts_a_job_whose_rank_was_killed_and_it_finishes_from_the_latest_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    log = (tmp_path / "log.txt").open("w")
    cmd = pretrain_command(
        "--config", "tiny_adamw.yaml", *FAST, "--train.steps=40", "--checkpoint.every=10",
        f"--train.runs_dir={tmp_path}", "--train.run_name=run", launcher=torchrun(2, "--max-restarts=1"),
    )  # fmt: skip
    # No TORCH_DISABLE_SHARE_RDZV_TCP_STORE needed: trainer.distributed namespaces the store per restart.
    job = start_command(cmd, output=log, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 240
        victim = None
        while victim is None and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.02)
            metrics = run_dir / "metrics.jsonl"
            steps = _records(run_dir) if metrics.exists() else {}
            if max(steps, default=0) >= 13 and is_complete(run_dir / "checkpoints" / "step_000010"):
                workers = [p for p in _children(job.pid) if _rank_of(p) == 1]
                victim = workers[0] if workers else None
        assert victim is not None, "the job ended or stalled before a rank could be killed"
        first_attempt = _records(run_dir)
        os.kill(victim, signal.SIGKILL)
        assert job.wait(timeout=300) == 0, (tmp_path / "log.txt").read_text()[-3000:]
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    output = (tmp_path / "log.txt").read_text()
    pattern = rf"resumed from {re.escape(str(run_dir / 'checkpoints'))}/step_(\d+) at step (\d+)"
    resumed = [(int(a), int(b)) for a, b in re.findall(pattern, output)]
    assert len(resumed) == 1 and resumed[0][0] == resumed[0][1], output[-3000:]
    restart_step = int(resumed[0][1])
    assert restart_step >= 10 and "done: 40 steps" in output
    records = _records(run_dir)
    assert sorted(records) == list(range(1, 41))
    assert all(
        len(losses) == 1 for losses in records.values()
    )  # re-run steps replace the first attempt's records
    rerun = [s for s in first_attempt if s > restart_step]
    assert rerun  # the restart repeated the steps logged after the checkpoint, with bit-identical losses
    assert all(records[s] == first_attempt[s] for s in rerun)
    assert is_complete(run_dir / "checkpoints" / "step_000040")
