"""A step in chunks (optimizer.max_step_bytes) changes no number and bounds the step's temporaries."""

import pytest
import torch

from optim import OPTIMIZERS, track_health
from optim.base import step_chunks
from optim.sharded import MatrixSlot, shard_info
from trainer.memory.tracker import peak_tensor_bytes


def _params(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(64, 64), (96, 64), (64, 96), (64, 64), (32, 128), (64, 64)]
    params = [torch.randn(*s, generator=g) * 0.02 for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def _run(name: str, max_step_bytes: int, steps: int = 2) -> tuple[list[torch.Tensor], dict[str, float]]:
    params = [p.clone().requires_grad_(False) for p in _params()]
    for p, q in zip(params, _params(), strict=True):
        p.grad = q.grad
    kwargs = {"ns_dtype": "float32"} if name in ("muon", "normuon", "hybrid_auon") else {}
    opt = OPTIMIZERS[name](params, **kwargs)
    opt.max_step_bytes = max_step_bytes
    for _ in range(steps):
        with track_health(opt) as health:
            opt.step()
    return params, health.report()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_chunked_step_equals_whole_step(name: str) -> None:
    whole, whole_health = _run(name, 2**40)
    chunked, chunked_health = _run(name, 1)  # every matrix its own chunk
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    # exact: each matrix adds its sums to the step's in the same order whether chunked or not, and orth_error and
    # the spectrum are the same (first) matrix's, from the same bits
    assert chunked_health == whole_health


def test_chunks_are_cut_by_bytes_in_order() -> None:
    params = _params()
    opt = OPTIMIZERS["sinkgd"](params)
    slots = [MatrixSlot(p, opt.param_groups[0], {}, shard_info(p), p, p.grad) for p in params]
    sizes = [[4 * s.rows * s.cols for s in chunk] for chunk in step_chunks(slots, 41_000)]
    assert sizes == [[16384, 24576], [24576, 16384], [16384, 16384]]
    assert [len(c) for c in step_chunks(slots, 1)] == [1] * 6


def test_chunking_bounds_swan_temporaries() -> None:
    def peak(max_step_bytes: int) -> int:
        params = _params()
        opt = OPTIMIZERS["swan"](params)
        opt.max_step_bytes = max_step_bytes
        with peak_tensor_bytes() as measured:
            opt.step()
        return measured["peak"]

    whole, chunked = peak(2**40), peak(1)
    assert chunked < 0.5 * whole, (chunked, whole)
