"""A step in chunks (optimizer.max_step_bytes) changes no formula (the numbers agree to float64 rounding) and bounds
the step's temporaries."""

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
    """`steps` steps of rule `name` in float64 (parameters, state and Newton-Schulz) over _params()."""
    params = [p.to(torch.float64) for p in _params()]
    for p, q in zip(params, _params(), strict=True):
        p.grad = q.grad.to(torch.float64)
    cls = OPTIMIZERS[name]
    opt = cls(params, **({"ns_dtype": "float64"} if any(o.key == "ns_dtype" for o in cls.options) else {}))
    opt.max_step_bytes = max_step_bytes
    for _ in range(steps):
        with track_health(opt) as health:
            opt.step()
    return params, health.report()


# Chunking changes which matrices share a stacked (batched) matrix product, never the formulas: a batched kernel
# may sum a product in another order than a one-matrix call (its work split across threads or blocked
# differently; with OMP_NUM_THREADS=2 they do), so the two agree to float64 rounding, not to the bit. Each product
# rounds at 1.1e-16 relative; two steps of at most ten Newton-Schulz-type iterations, three products each with
# coefficients below 5, amplify that by far less than 1e4, so 1e-12 (relative to the largest weight, or to each
# health number) bounds the rounding on any CPU, while a matrix taken for another or a chunk given the wrong
# scale moves the numbers by O(1).
CHUNK_REL = 1e-12


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_chunked_step_equals_whole_step(name: str) -> None:
    whole, whole_health = _run(name, 2**40)
    chunked, chunked_health = _run(name, 1)  # every matrix its own chunk
    for a, b, p0 in zip(whole, chunked, _params(), strict=True):
        assert (a - p0.to(torch.float64)).abs().max() > 1e-6  # a real step
        torch.testing.assert_close(a, b, rtol=0, atol=CHUNK_REL * a.abs().max().item())
    # each matrix adds its sums to the step's in the same order whether chunked or not; orth_error and the
    # spectrum are the same (first) matrix's
    assert chunked_health.keys() == whole_health.keys() and whole_health
    assert chunked_health == pytest.approx(whole_health, rel=CHUNK_REL, abs=0)


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
