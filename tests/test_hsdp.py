"""HSDP end to end: the trainer with parallel.dp_replicate=2 at 4 processes (2 replicas x 2 shards, the
multi-node shape) gives the losses of one process, with NorMuon's sharded Newton-Schulz in fp32, within
test_parallel's bound: SENSITIVITY times (what the one-process run moves with its weights one ulp off at every
step + one ulp)."""

import pytest

from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged
from tests.test_parallel import assert_within_sensitivity, train_runs

NORMUON_FP32 = ["--optim.ns_dtype=float32"]


def _run(tmp_path, name: str, *extra: str) -> tuple[str, list[str]]:
    overrides = [*FAST, *NORMUON_FP32, f"--train.runs_dir={tmp_path}", f"--train.run_name={name}", *extra]
    return "tiny_normuon.yaml", overrides


@pytest.mark.slow
def test_hsdp_2x2_normuon_equals_one_process(tmp_path) -> None:
    run_distributed(train_runs, 1, [(*_run(tmp_path, "ws1"), False), (*_run(tmp_path, "ws1_off"), True)])
    run_distributed(train_runs, 4, [(*_run(tmp_path, "hsdp", "--parallel.dp_replicate=2"), False)])
    reference = logged(tmp_path / "ws1")
    assert len(reference) == 5 and reference[-1] < reference[0]
    assert_within_sensitivity(logged(tmp_path / "hsdp"), reference, logged(tmp_path / "ws1_off"), "hsdp 2x2")
