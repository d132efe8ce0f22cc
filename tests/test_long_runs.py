"""Long runs survive the cluster (docs/long-runs.md): the divergence guard's verdicts, a stop signal that saves and
resumes exactly, the lr-1000 run that stops without checkpointing its dead model, an injected spike rolled back to
the run that never saw its batches, a stalled rank named by the watchdog, a damaged newest checkpoint refused or
passed over.

What each multi-process test injects: SIGTERM to torchrun (which forwards it to its two workers) once step 8 is
logged; lr 1000 (a real divergence, nothing faked); the loss and gradients of step 7 multiplied by 1e3 (a poisoned
batch: the loss is a spike, and the update it would make a blow-up); rank 1 sleeping in its third forward/backward;
a newest checkpoint with a shard file cut short.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from pathlib import Path

import pytest
from torch.multiprocessing import ProcessExitedException

from tests.distributed import run_distributed
from tests.processes import pretrain, pretrain_command, start_command
from tests.run_helpers import FAST, train_in_process
from trainer.checkpoint import list_checkpoints
from trainer.guard import CALM_STEPS, DivergenceGuard
from trainer.preemption import EXIT_UNSAVED, StopSignals

# --------------------------------------------------------------------------------------------- the guard


def _guard(**overrides) -> DivergenceGuard:
    settings = {
        "spike_sigma": 6.0,
        "spike_window": 10,
        "spike_warmup": 5,
        "spike_ceiling": 2.0,
        "dead_steps": 3,
    }
    return DivergenceGuard(512, **{**settings, **overrides})  # ln 512 = 6.24: the ceiling is 12.48


def test_the_guard_names_non_finite_steps_ceiling_and_running_spikes_and_a_dead_model() -> None:
    guard = _guard()
    assert guard.judge(1, float("nan"), 1.0).kind == "nonfinite"
    assert guard.judge(2, 1.0, float("inf")).kind == "nonfinite"
    ceiling = guard.judge(3, 13.0, 1.0)  # before any warm-up: a confidently wrong model
    assert ceiling.kind == "spike" and "above 12.48" in ceiling.message
    for step, loss in enumerate([6.0, 5.9, 5.8, 5.9, 5.8], start=4):  # the running statistic's warm-up
        assert guard.judge(step, loss, 1.0).ok
    assert guard.judge(9, 6.2, 1.0).ok  # mean 5.91, std 0.085: the limit is 6.43
    spike = guard.judge(10, 7.5, 1.0)  # mean 5.97, std 0.135 after step 9: the limit is 6.77
    assert spike.message == "loss spike 7.5 (running mean 5.966, limit 6.774)"
    assert guard.judge(11, 5.8, 0.0).ok and guard.judge(12, 5.8, 0.0).ok  # zero norms: two of three
    dead = guard.judge(13, 5.8, 0.0)
    assert dead.kind == "dead" and dead.message == "the model is dead: zero gradient norm since step 11"


def test_no_checkpoint_is_calm_while_the_guard_has_seen_trouble_lately() -> None:
    guard = _guard(spike_warmup=0)
    assert guard.calm(1)
    guard.judge(1, 20.0, 1.0)  # a spike at step 1
    assert not guard.calm(1 + CALM_STEPS - 1) and guard.calm(1 + CALM_STEPS)
    guard.judge(12, 6.0, 0.0)  # a zero-norm streak under way
    assert not guard.calm(40)
    guard.judge(13, 6.0, 1.0)
    assert guard.calm(40)


def test_the_guard_resumes_with_its_running_statistic() -> None:
    guard, resumed = _guard(), _guard()
    for step, loss in enumerate([6.0, 5.9, 5.8, 5.9, 5.8, 5.7], start=1):
        guard.judge(step, loss, 1.0)
    resumed.load_state_dict(json.loads(json.dumps(guard.state_dict())))
    assert resumed.judge(7, 6.4, 1.0) == guard.judge(7, 6.4, 1.0)


def test_a_stop_signal_is_a_request_not_a_death_and_the_handlers_come_back() -> None:
    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals("SIGTERM,SIGUSR1", grace_s=600) as signals:
        assert signals.requested is None
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert signals.requested == "SIGUSR1"
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_second_signal_or_the_end_of_the_grace_period_exits_at_once_unsaved(monkeypatch, capsys) -> None:
    exits: list[int] = []
    monkeypatch.setattr(os, "_exit", exits.append)  # what would end the process, recorded instead
    with StopSignals("SIGUSR1", grace_s=600):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert exits == []  # the first signal only asks
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
    assert exits == [EXIT_UNSAVED]
    assert "SIGUSR1 again while stopping: exiting without a new checkpoint" in capsys.readouterr().err
    with StopSignals("SIGUSR1", grace_s=0.05):
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.5)  # a save still running when the grace period ends
    assert exits == [EXIT_UNSAVED, EXIT_UNSAVED]
    assert (
        "error: grace period of 0.05 s over; the last committed checkpoint is intact (exit 76)"
        in capsys.readouterr().err
    )


# ---------------------------------------------------------------------------------- multi-process faults


def _losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    """The last logged value of `key` per step (a re-run step's record replaces the first)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


@pytest.mark.slow
def test_sigterm_saves_after_the_current_step_and_the_rerun_resumes_exactly(tmp_path: Path) -> None:
    common = ["--config", "tiny_adamw.yaml", *FAST, "--train.steps=30", "--checkpoint.every=0"]
    whole = pretrain(*common, f"--train.runs_dir={tmp_path}", "--train.run_name=whole", nproc=2)
    assert whole.returncode == 0, whole.stderr[-2000:]
    cmd = pretrain_command(*common, f"--train.runs_dir={tmp_path}", "--train.run_name=stopped", nproc=2)
    run_dir = tmp_path / "stopped"
    with (tmp_path / "log.txt").open("w") as log:
        job = start_command(cmd, output=log)
        try:
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and job.poll() is None:
                if (run_dir / "metrics.jsonl").is_file() and max(_losses(run_dir), default=0) >= 8:
                    break
                time.sleep(0.05)
            job.send_signal(signal.SIGTERM)  # to torchrun, which forwards it to both workers
            job.wait(timeout=120)
        finally:
            if job.poll() is None:
                job.kill()
    output = (tmp_path / "log.txt").read_text()
    assert "SIGTERM received: saving a checkpoint, then stopping" in output, output[-3000:]
    # torchrun re-raises the signal it forwarded (its own exit is 1); each worker printed why it stopped
    assert "on SIGTERM; checkpoint" in output and "rerun to resume" in output, output[-3000:]
    (saved,) = list_checkpoints(run_dir / "checkpoints")
    stopped_at = int(saved.name.split("_")[1])
    assert 8 <= stopped_at < 30 and not list((run_dir / "checkpoints").glob("*.partial"))
    rerun = pretrain(*common, f"--train.runs_dir={tmp_path}", "--train.run_name=stopped", nproc=2)
    assert rerun.returncode == 0 and f"resumed from {saved} at step {stopped_at}" in rerun.stdout
    assert _losses(run_dir) == _losses(tmp_path / "whole")  # every step, bit for bit


@pytest.mark.slow
def test_lr_1000_stops_at_the_dead_model_with_no_checkpoint_of_it(tmp_path: Path) -> None:
    result = pretrain(
        "--config", "tiny_adamw.yaml", "--optim.lr=1000", "--optim.adamw_lr=1000", "--train.steps=40",
        "--checkpoint.every=10",
        "--metrics.log_every=1", "--train.eval_every=0", f"--train.runs_dir={tmp_path}", nproc=2,
    )  # fmt: skip
    assert "exitcode  : 3" in result.stderr, result.stderr[-2000:]  # each worker's; torchrun's own is 1
    (error,) = {line for line in result.stderr.splitlines() if line.startswith("error: ")}  # both ranks agree
    dead = re.fullmatch(
        r"error: step (\d+): the model is dead: zero gradient norm since step (\d+); stopping without saving "
        r"\(no checkpoint was written\)",
        error,
    )
    assert dead and int(dead[1]) - int(dead[2]) + 1 == 10, error  # resilience.dead_steps: 10 in a row
    assert "step 2: loss spike" in result.stdout and "checkpoint postponed" in result.stdout
    run_dir = tmp_path / "tiny_adamw"
    assert (
        list_checkpoints(run_dir / "checkpoints") == []
    )  # step 10's save waited for a sound model: none came
    assert 2 in _losses(run_dir, "guard/spike") and int(dead[1]) in _losses(run_dir, "guard/dead")


def _poisoned_and_clean(root: Path) -> None:
    """Entry point for run_distributed: the run whose step-7 batch is poisoned, with rollback; then a clean run
    told to skip the batches the rollback skips."""
    import torch

    from trainer.engines.fsdp2 import FSDP2Engine

    real, calls = FSDP2Engine.forward_backward, []

    def poisoned(self, micro_batches):
        loss = real(self, micro_batches)
        calls.append(1)
        if len(calls) == 7:  # step 7's batch: its loss and gradients 1000 times too large
            for p in self.model.parameters():
                p.grad.mul_(1e3)
            loss = loss * torch.tensor(1e3)
        return loss

    common = [*FAST, "--train.steps=12", "--checkpoint.every=5", "--checkpoint.keep_last=0",
              f"--train.runs_dir={root}"]  # fmt: skip
    FSDP2Engine.forward_backward = poisoned
    try:
        train_in_process(
            "tiny_adamw.yaml", [*common, "--train.run_name=rolled", "--resilience.rollback=true"]
        )
    finally:
        FSDP2Engine.forward_backward = real
    train_in_process("tiny_adamw.yaml", [*common, "--train.run_name=clean", "--data.skip_batches=6-7"])


@pytest.mark.slow
def test_an_injected_spike_is_rolled_back_to_the_run_that_never_saw_its_batches(
    tmp_path: Path, capfd
) -> None:
    run_distributed(_poisoned_and_clean, 2, tmp_path)
    output = capfd.readouterr().out
    assert (
        "step 7: loss spike" in output
        and "rolled back to step_000005, skipping the batches of steps 6-7" in output
    )
    rolled, clean = _losses(tmp_path / "rolled"), _losses(tmp_path / "clean")
    assert rolled == clean  # every step, bit for bit: steps 1-5 as trained, 6-12 on the batches after 7
    assert _losses(tmp_path / "rolled", "guard/rolled_back_to") == {7: 5}
    assert _losses(tmp_path / "rolled", "eval/loss") == _losses(tmp_path / "clean", "eval/loss")


def _stall_rank_1(root: Path) -> None:
    """Entry point for run_distributed: rank 1 sleeps in its third forward/backward."""
    import torch.distributed as dist

    from trainer.engines.fsdp2 import FSDP2Engine

    if dist.get_rank() == 1:
        real, calls = FSDP2Engine.forward_backward, []

        def stall(self, micro_batches):
            calls.append(1)
            if len(calls) == 3:
                time.sleep(120)
            return real(self, micro_batches)

        FSDP2Engine.forward_backward = stall
    train_in_process("tiny_adamw.yaml", [*FAST, "--train.steps=6", "--resilience.watchdog_s=3",
                                         f"--train.runs_dir={root}"])  # fmt: skip


@pytest.mark.slow
def test_a_stalled_rank_is_named_within_the_watchdog_timeout(tmp_path: Path, capfd) -> None:
    start = time.monotonic()
    with pytest.raises(ProcessExitedException) as err:
        run_distributed(_stall_rank_1, 2, tmp_path)
    assert err.value.exit_code == 124 and time.monotonic() - start < 60
    errors = [line for line in capfd.readouterr().err.splitlines() if line.startswith("error: watchdog")]
    assert len(errors) == 1, errors
    assert errors[0].startswith(
        "error: watchdog: rank 1 made no progress for 3 s at step 3 (forward/backward"
    )
    assert errors[0].endswith("not in a collective (exit 124)")


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_refused_or_passed_over(tmp_path: Path) -> None:
    common = ["--config", "tiny_adamw.yaml", *FAST, "--checkpoint.every=2", "--checkpoint.keep_last=0"]
    first = pretrain(*common, "--train.steps=4", f"--train.runs_dir={tmp_path}")
    assert first.returncode == 0, first.stderr[-2000:]
    checkpoints = tmp_path / "tiny_adamw" / "checkpoints"
    shard = checkpoints / "step_000004" / "__0_0.distcp"
    committed = shard.stat().st_size
    os.truncate(shard, committed // 2)
    refused = pretrain(*common, "--train.steps=6", f"--train.runs_dir={tmp_path}")
    assert refused.returncode == 2
    assert refused.stderr.strip() == (
        f"error: {checkpoints / 'step_000004'}: damaged (__0_0.distcp is {committed // 2} bytes, "
        f"{committed} when committed); the newest intact one is {checkpoints / 'step_000002'}: "
        f"rerun with --checkpoint.resume_from={checkpoints / 'step_000002'}, or set checkpoint.fall_back=true "
        "to take it"
    )
    taken = pretrain(
        *common, "--train.steps=6", "--checkpoint.fall_back=true", f"--train.runs_dir={tmp_path}"
    )
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert "step_000004 is damaged (__0_0.distcp is" in taken.stdout
    assert f"resumed from {checkpoints / 'step_000002'} at step 2" in taken.stdout
