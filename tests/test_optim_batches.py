"""The rules' elementwise work is batched over same-shape matrices: a step's device operations do not grow with
the number of matrices of a shape, and no step reads a device value on the host (counted on the meta device,
where a host read raises or is counted: benchmarks/optimizer_step.py --count)."""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

from benchmarks.optimizer_step import DispatchCounter
from models import Llama, model_config
from optim import build_optimizer
from trainer.config import OPTIMIZER_NAMES, load_config

FOREACH_DEVICES = "torch.optim.optimizer._get_foreach_kernels_supported_devices"


def _kernels(name: str, layers: int) -> DispatchCounter:
    cfg = load_config(f"configs/tiny_{name}.yaml")
    model_cfg = dataclasses.replace(model_config("llama_tiny", vocab_size=512), n_layers=layers)
    with torch.device("meta"):
        model = Llama(model_cfg)
    optimizer = build_optimizer(cfg.optim, model)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    with mock.patch(FOREACH_DEVICES, lambda: ["cuda", "meta"]):  # torch's AdamW takes its CUDA path
        optimizer.step()  # makes the state
        counter = DispatchCounter()
        with counter:
            optimizer.step()
    return counter


@pytest.mark.parametrize("name", OPTIMIZER_NAMES)
def test_a_step_launches_the_same_kernels_for_2_or_8_layers_and_never_syncs(name: str) -> None:
    two, eight = _kernels(name, 2), _kernels(name, 8)
    assert sum(two.kernels.values()) > 0
    assert eight.kernels == two.kernels  # 4x the matrices of each shape, not one more kernel
    assert two.syncs == eight.syncs == 0
