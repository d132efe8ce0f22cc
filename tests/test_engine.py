"""The FSDP2 engine's step: clipping acts on raw gradients, by the global norm, before the optimizer."""

import pytest
import torch

from optim.sharded import CommClock
from tests.distributed import run_distributed
from trainer.engines.fsdp2 import FSDP2Engine


class SGD(torch.optim.SGD):
    """Plain SGD, whose update is the (clipped) gradient itself, with what an engine takes of the optimizers built
    here: a clock of its exposed communication (none)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.comm_clock = CommClock()


def _clipped_sgd_update(max_norm: float) -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    from models import Llama, model_config
    from trainer.engines.fsdp2 import apply_fsdp

    torch.manual_seed(0)
    model = Llama(model_config("llama_tiny", vocab_size=64, max_seq_len=16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    apply_fsdp(model, init_device_mesh("cpu", (torch.distributed.get_world_size(),)))
    engine = FSDP2Engine(model, SGD(model.parameters(), lr=1.0), max_norm=max_norm)
    batch = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(1))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local = batch.chunk(world)[rank]
    loss = engine.forward_backward(list(local.split(1)))
    norm = engine.grad_norm()
    engine.step()
    after = {k: v.full_tensor() for k, v in model.state_dict().items()}
    # in float64: the difference of two fp32 numbers is exact there, and the norm of 1e5 of them adds no rounding of
    # its own (an fp32 norm here was 3e-6 off, ~50 u32: a vector kernel's long per-lane sums)
    update = torch.cat([(before[k].double() - after[k].double()).flatten() for k in before])
    return {"norm": norm, "update_norm": update.norm(), "loss": loss}


# The engine's grad norm is fp32: per parameter a sum of up to 32768 positive squares, which rounds by at most
# sqrt(n) u32 = 1.1e-5 relative even as a vector kernel's per-lane running sums (a random walk of n roundings;
# ~1e-6 for cascade sums), half that in the norm, so two such norms (world sizes 1 and 2) agree to 1e-5. The applied
# update (SGD, lr 1) is the gradient up to the rounding of w - g in fp32, <= u32 |W - G| / |G| = 6e-7 relative here
# (|W| = 19, |G| = 1.9).
NORM_RTOL = 1e-5
# Clipped: the update is g * max_norm / (norm + 1e-6) (torch's clip coefficient): the norm's 5e-6, the 1e-6 / 1.9 of
# the eps, and the weights' rounding relative to a 4 times smaller update (2.4e-6): <= 8e-6.
CLIPPED_RTOL = 2e-5


@pytest.mark.slow
def test_clipping_scales_the_raw_gradient_to_max_norm() -> None:
    unclipped = run_distributed(_clipped_sgd_update, 1, 0.0)
    update_norm, norm = unclipped["update_norm"].item(), unclipped["norm"].item()
    assert update_norm == pytest.approx(norm, rel=NORM_RTOL)  # max_norm 0: no clipping
    max_norm = 0.25 * norm
    clipped = run_distributed(_clipped_sgd_update, 2, max_norm)
    assert clipped["norm"].item() == pytest.approx(norm, rel=NORM_RTOL)  # the norm is of the raw gradients
    assert clipped["update_norm"].item() == pytest.approx(
        max_norm, rel=CLIPPED_RTOL
    )  # SGD lr 1: update = grad
