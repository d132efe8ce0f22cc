"""Optimizer state bytes on llama_60m (built on the meta device: shapes and dtypes, no memory), after one step,
against the spec's bytes per matrix element: AdamW 8, Muon 4, AuON 4, NorMuon 4 + 4/n, SWAN 0, SinkGD 0;
the AdamW-routed params keep AdamW's 8 inside every optimizer."""

from __future__ import annotations

import pytest
import torch

from models import Llama, model_config
from optim import OPTIMIZERS, build_optimizer, route_parameters
from trainer.config import OptimConfig

MATRIX_BYTES = {"muon": 4, "auon": 4, "hybrid_auon": 4, "normuon": 4, "swan": 0, "sinkgd": 0}


@pytest.fixture(scope="module")
def meta_model() -> Llama:
    with torch.device("meta"):
        model = Llama(model_config("llama_60m"))
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    return model


def _state_bytes(opt: torch.optim.Optimizer, p: torch.Tensor) -> int:
    """Bytes of a parameter's state tensors, leaving out AdamW's scalar step counter."""
    state = opt.state.get(p, {})
    return sum(v.numel() * v.element_size() for k, v in state.items() if torch.is_tensor(v) and k != "step")


def test_adamw_state_is_8_bytes_per_element(meta_model):
    opt = build_optimizer(OptimConfig(name="adamw"), meta_model)
    opt.step()
    params = list(meta_model.parameters())
    assert sum(_state_bytes(opt, p) for p in params) == 8 * sum(p.numel() for p in params)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_bytes_per_matrix_element(meta_model, name):
    opt = build_optimizer(OptimConfig(name=name), meta_model)
    opt.step()
    matrices, others = route_parameters(meta_model)
    assert len(matrices) == 7 * 8  # llama_60m: 8 layers of q, k, v, o, gate, up, down
    for p in matrices:
        m, n = p.shape
        extra_per_row = 4 if name == "normuon" else 0  # NorMuon's v: one fp32 per row, i.e. 4/n per element
        assert _state_bytes(opt, p) == MATRIX_BYTES[name] * m * n + extra_per_row * m
    assert sum(_state_bytes(opt, p) for p in others) == 8 * sum(p.numel() for p in others)
    if name == "normuon":
        total = sum(_state_bytes(opt, p) for p in matrices) / sum(p.numel() for p in matrices)
        dims = {p.shape[1] for p in matrices}  # n in {512, 1376}: between 4 + 4/1376 and 4 + 4/512
        assert 4 + 4 / max(dims) < total < 4 + 4 / min(dims)
