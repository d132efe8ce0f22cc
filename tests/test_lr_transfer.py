"""The width convention of optim/lr_transfer.py, and the llama350m configs' lrs taken from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from models import model_config
from optim.lr_transfer import WIDTH_EXPONENT, transfer_lr
from trainer.config import load_config

ROOT = Path(__file__).resolve().parents[1]

MATRIX_RULES = ("swan", "muon", "sinkgd", "hybrid_auon", "normuon", "auon")


def width(model: str) -> int:
    return model_config(model, vocab_size=64).dim


def test_one_measured_width_step_reproduces_the_width_study() -> None:
    # The study's best lrs at width 64 -> 192 (README Results, "Width transfer").
    assert transfer_lr("normuon", 0.012, 64, 192) == 0.006
    assert transfer_lr("auon", 0.03, 64, 192) == 0.015
    assert transfer_lr("adamw", 0.003, 64, 192) == 0.0015
    for name in ("swan", "muon", "sinkgd", "hybrid_auon"):
        assert transfer_lr(name, 0.005, 64, 192) == 0.005
    assert transfer_lr("normuon", 0.006, 192, 64) == 0.012  # and back


def test_an_optimizer_without_a_convention_is_refused() -> None:
    with pytest.raises(ValueError, match="no width convention for 'lion'"):
        transfer_lr("lion", 1e-3, 64, 1024)


@pytest.mark.parametrize("name", MATRIX_RULES)
def test_llama350m_lrs_are_the_tiny_lrs_carried_to_its_width(name: str) -> None:
    tiny, big = load_config(f"tiny_{name}.yaml"), load_config(f"llama350m_{name}.yaml")
    assert big.optim.lr == transfer_lr(name, tiny.optim.lr, width(tiny.model.name), width(big.model.name))
    assert big.optim.adamw_lr == load_config("llama350m_adamw.yaml").optim.lr


def test_llama350m_adamw_keeps_galores_tuned_lr_and_says_what_the_convention_would_give() -> None:
    tiny, big = load_config("tiny_adamw.yaml"), load_config("llama350m_adamw.yaml")
    assert set(WIDTH_EXPONENT) == {"adamw", *MATRIX_RULES}
    carried = transfer_lr("adamw", tiny.optim.lr, width(tiny.model.name), width(big.model.name))
    assert big.optim.lr == 1e-3 and big.optim.adamw_lr is None  # GaLore's, on every parameter
    comment = (ROOT / "configs" / "llama350m_adamw.yaml").read_text()
    assert f"matrix lr {tiny.optim.lr}" in comment and f"to {carried} at width 1024" in comment
