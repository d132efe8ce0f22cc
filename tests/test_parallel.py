"""FSDP2 over gloo: the same seed and global batch give the same losses at world sizes 1, 2 and 4."""

import pytest

from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged, train_in_process


def _losses(tmp_path, world_size: int, extra: list[str] = (), key: str = "loss") -> list[float]:
    name = f"ws{world_size}"
    overrides = [*FAST, f"--train.runs_dir={tmp_path}", f"--train.run_name={name}", *extra]
    run_distributed(train_in_process, world_size, "tiny_adamw.yaml", overrides)
    return logged(tmp_path / name, key)


@pytest.mark.slow
def test_world_sizes_1_2_4_give_the_same_adamw_losses(tmp_path) -> None:
    reference = _losses(tmp_path, 1)
    reference_norms = logged(tmp_path / "ws1", "grad_norm")
    assert len(reference) == 5 and reference[-1] < reference[0]
    for world_size in (2, 4):
        assert _losses(tmp_path, world_size) == pytest.approx(reference, rel=1e-5, abs=1e-5)
        # The global grad norm (what clipping uses) is exact under sharding too.
        norms = logged(tmp_path / f"ws{world_size}", "grad_norm")
        assert norms == pytest.approx(reference_norms, rel=1e-5)


@pytest.mark.slow
def test_accumulation_and_activation_checkpointing_do_not_change_losses(tmp_path) -> None:
    # global 8 = micro 2 x accumulation 2 x world 2, against micro 4 x accumulation 1 x world 2, with recomputation.
    plain = _losses(tmp_path, 2, ["--train.micro_batch_size=4"])
    (tmp_path / "ws2").rename(tmp_path / "plain")
    checkpointed = _losses(tmp_path, 2, ["--parallel.activation_checkpointing=true"])
    assert checkpointed == pytest.approx(plain, rel=1e-5, abs=1e-5)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path) -> None:
    # torch.compile (inductor, CPU here) fuses kernels, so the agreement is to float rounding, not bitwise.
    eager = _losses(tmp_path, 1, ["--train.steps=3"])
    (tmp_path / "ws1").rename(tmp_path / "eager")
    compiled = _losses(tmp_path, 1, ["--train.steps=3", "--parallel.compile=true"])
    assert compiled == pytest.approx(eager, rel=1e-4)
