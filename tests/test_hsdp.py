"""HSDP end to end: the trainer with parallel.dp_replicate=2 at 4 processes (2 replicas x 2 shards, the
multi-node shape) gives the losses of one process, with NorMuon's sharded Newton-Schulz in fp32."""

import pytest

from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged, train_in_process

NORMUON_FP32 = ["--optim.ns_dtype=float32"]


def _losses(tmp_path, world_size: int, extra: list[str]) -> list[float]:
    name = f"ws{world_size}"
    overrides = [*FAST, *NORMUON_FP32, f"--train.runs_dir={tmp_path}", f"--train.run_name={name}", *extra]
    run_distributed(train_in_process, world_size, "tiny_normuon.yaml", overrides)
    return logged(tmp_path / name)


@pytest.mark.slow
def test_hsdp_2x2_normuon_equals_one_process(tmp_path) -> None:
    reference = _losses(tmp_path, 1, [])
    assert len(reference) == 5 and reference[-1] < reference[0]
    hsdp = _losses(tmp_path, 4, ["--parallel.dp_replicate=2"])
    assert hsdp == pytest.approx(reference, rel=1e-5, abs=1e-5)
