"""The FSDP2 engine's step: clipping acts on raw gradients, by the global norm, before the optimizer."""

import pytest
import torch
from torch import nn

from models import causal_lm_loss
from tests.distributed import run_distributed
from trainer.engines.fsdp2 import FSDP2Engine


def _clipped_sgd_update(max_norm: float) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from models import Llama, model_config
    from trainer.engines.fsdp2 import apply_fsdp

    torch.manual_seed(0)
    model = Llama(model_config("llama_tiny", vocab_size=64, max_seq_len=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_fsdp(model, init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    engine = FSDP2Engine(model, torch.optim.SGD(model.parameters(), lr=1.0), max_norm=max_norm)
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = batch.chunk(world)[rank]
    loss = engine.forward_backward(list(local.split(1)))
    norm = engine.grad_norm()
    engine.step()
    after = {k: v.full_tensor() for k, v in model.state_dict().items()}
    update = torch.cat([(before[k] - after[k]).flatten() for k in before])
    return {"norm": norm, "update_norm": update.norm(), "loss": loss}


@pytest.mark.slow
def test_clipping_scales_the_raw_gradient_to_max_norm() -> None:
    unclipped = run_distributed(_clipped_sgd_update, 1, 0.0)
    assert torch.allclose(unclipped["update_norm"], unclipped["norm"], rtol=1e-5)  # max_norm 0: no clipping
    max_norm = 0.25 * unclipped["norm"].item()
    clipped = run_distributed(_clipped_sgd_update, 2, max_norm)
    assert torch.allclose(clipped["norm"], unclipped["norm"], rtol=1e-5)  # the norm is of the raw gradients
    assert torch.allclose(
        clipped["update_norm"], torch.tensor(max_norm), rtol=1e-4
    )  # SGD lr 1: update = grad


def test_loss_is_mean_next_token_cross_entropy() -> None:
    class Constant(nn.Module):
        def forward(self, tokens):
            logits = torch.zeros(*tokens.shape, 4)
            logits[..., 2] = 1.0
            return logits

    batch = torch.tensor([[2, 2, 3]])
    p2 = torch.softmax(torch.tensor([0.0, 0, 1, 0]), 0)
    expected = -(torch.log(p2[2]) + torch.log(p2[3])) / 2
    assert torch.allclose(causal_lm_loss(Constant(), batch), expected)
