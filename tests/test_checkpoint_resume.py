"""Resume through the real trainer, every optimizer, at world size 2 with gradient accumulation: stopping at step
10 and resuming to 20 gives exactly the losses of an uninterrupted 20-step run; the world-size-2 checkpoint also
resumes at world sizes 1 and 4, to the losses of the world-size-2 run within test_parallel's bound: SENSITIVITY
times (what that run moves when resumed again with its weights one ulp off, once restored and after every step,
+ one ulp)."""

from __future__ import annotations

from pathlib import Path

import pytest

from optim import OPTIMIZER_NAMES
from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged, train_in_process
from tests.test_parallel import assert_within_sensitivity, one_ulp_off
from trainer.checkpoint import read_trainer_state

# global batch 8 = micro 2 x accumulation 2 x world 2 (accumulation 4 at world size 1, 1 at world size 4)
RUN = [*FAST, "--train.steps=20"]


def _overrides(root: Path, optim: str, name: str, *extra: str) -> list[str]:
    return [
        *RUN,
        f"--train.runs_dir={root}",
        f"--train.run_name={optim}_{name}",
        f"--optim.name={optim}",
        *extra,
    ]


def _step10(root: Path, optim: str) -> Path:
    return root / f"{optim}_full" / "checkpoints" / "step_000010"


def _full_then_resumed(root: Path) -> None:
    """Per optimizer: 20 uninterrupted steps saving at 10 (async for every other optimizer), then a fresh run
    (new processes' worth of state: model, optimizer, loader all rebuilt) that resumes from step 10, and another
    with the restored weights one ulp off (the sensitivity of steps 11-20 to a rounding)."""
    for index, optim in enumerate(OPTIMIZER_NAMES):
        mode = f"--checkpoint.async_save={'true' if index % 2 else 'false'}"
        train_in_process("tiny_adamw.yaml", _overrides(root, optim, "full", "--checkpoint.every=10", mode))
        resume = f"--checkpoint.resume_from={_step10(root, optim)}"
        train_in_process("tiny_adamw.yaml", _overrides(root, optim, "resumed", resume))
        with one_ulp_off():
            train_in_process("tiny_adamw.yaml", _overrides(root, optim, "one_ulp_off", resume))
    train_in_process("tiny_adamw.yaml", _overrides(root, "adamw", "nosave"))  # saving must not perturb a run


# World size 4 on two cores is slow: AdamW (moments, step counts) and NorMuon (momentum, per-row second moment,
# sharded Newton-Schulz, AdamW groups) cover every kind of state. World size 1 resumes every optimizer.
RESHARDED = {1: OPTIMIZER_NAMES, 4: ["adamw", "normuon"]}


def _resume(root: Path, world_size: int) -> None:
    for optim in RESHARDED[world_size]:
        resume = f"--checkpoint.resume_from={_step10(root, optim)}"
        train_in_process("tiny_adamw.yaml", _overrides(root, optim, f"ws{world_size}", resume))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("resume")
    run_distributed(_full_then_resumed, 2, root)
    return root


@pytest.mark.slow
@pytest.mark.parametrize("optim", OPTIMIZER_NAMES)
def test_stop_at_10_and_resume_to_20_equals_the_uninterrupted_run_exactly(runs: Path, optim: str) -> None:
    full, resumed = logged(runs / f"{optim}_full"), logged(runs / f"{optim}_resumed")
    assert len(full) == 20 and len(resumed) == 10
    assert resumed == full[10:]  # bit for bit
    saved = read_trainer_state(_step10(runs, optim))
    assert saved["step"] == 10 and saved["tokens"] == 10 * 8 * 32 and saved["world_size"] == 2
    assert saved["optim"] == optim and saved["config"]["optim"]["name"] == optim and len(saved["rng"]) == 2
    if optim == "adamw":
        assert logged(runs / "adamw_nosave") == full


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [1, 4])
def test_a_world_size_2_checkpoint_resumes_at_world_sizes_1_and_4(runs: Path, world_size: int) -> None:
    run_distributed(_resume, world_size, runs, world_size)
    for optim in RESHARDED[world_size]:
        resharded, reference = logged(runs / f"{optim}_ws{world_size}"), logged(runs / f"{optim}_full")[10:]
        assert_within_sensitivity(resharded, reference, logged(runs / f"{optim}_one_ulp_off"), optim)
