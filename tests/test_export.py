"""launch/export_hf.py: a world-size-2 checkpoint becomes a directory that transformers loads, with our logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.export_hf import load_model, main
from tests.run_helpers import logged, trained_tiny_run
from trainer.config import load_config
from trainer.data import build_data
from trainer.loop import evaluate


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return trained_tiny_run(tmp_path_factory.mktemp("export"), world_size=2, steps=3)


@pytest.mark.slow
def test_the_checkpoint_loads_into_one_process_with_the_trained_weights(run_dir: Path) -> None:
    """The resharded plain model gives the eval loss the two-process run logged at its last step."""
    model = load_model(run_dir / "checkpoints" / "step_000003")
    cfg = load_config(str(run_dir / "config.yaml"))
    data = build_data(
        cfg.data, seq_len=cfg.train.seq_len, global_batch_size=cfg.train.global_batch_size, rank=0, world_size=1,
        run_dir=run_dir,
    )  # fmt: skip
    loss = evaluate(model, data.held_out, cfg.train.micro_batch_size, torch.device("cpu"))
    # the same weights and batches (FSDP2 all-gathers them bit for bit); only the mean over the held-out set's 4
    # micro-batches is summed in another grouping (per rank, then over ranks): <= 4 u32 = 2.4e-7 relative, 1.5e-6
    # at a loss of 6.2; 1e-5 is 7 times that
    assert loss == pytest.approx(logged(run_dir, "eval/loss")[-1], abs=1e-5, rel=0)


@pytest.mark.slow
def test_transformers_loads_the_export_and_gives_our_logits(run_dir: Path, tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    checkpoint = run_dir / "checkpoints" / "step_000003"
    assert main([str(checkpoint), str(tmp_path / "hf")]) == 0
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32).eval()
    ours = load_model(checkpoint).eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = ours(tokens), hf(tokens).logits
    assert got.shape == expected.shape == (2, 24, ours.cfg.vocab_size)
    assert (
        got - expected
    ).abs().max().item() < 1e-5  # two fp32 implementations: see test_model's LOGITS_ATOL
    assert expected.std().item() > 0.1  # real logits of a trained model, not zeros


def test_exporting_a_damaged_checkpoint_is_one_line_exit_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "step_000001").mkdir()
    assert main([str(tmp_path / "step_000001"), str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {tmp_path / 'step_000001'}: not a complete checkpoint\n"
    assert not (tmp_path / "hf").exists()
