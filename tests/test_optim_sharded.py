"""The distribution layer in one process: owner assignment (the load balance) and the unsharded path."""

from __future__ import annotations

import pytest
import torch

from models import model_config
from optim.newton_schulz import coupled_flops, newton_schulz5, ns5_flops
from optim.sharded import ShardInfo, apply_to_whole_matrices, assign_owners


def _llama_hidden_shapes(name: str) -> list[tuple[int, int]]:
    cfg = model_config(name)
    kv = cfg.n_kv_heads * cfg.head_dim
    ffn = cfg.intermediate_size
    layer = [(cfg.dim, cfg.dim), (kv, cfg.dim), (kv, cfg.dim), (cfg.dim, cfg.dim)]
    layer += [(ffn, cfg.dim), (ffn, cfg.dim), (cfg.dim, ffn)]
    return layer * cfg.n_layers


def _loads(shapes: list[tuple[int, int]], owners: list[int], slots: int, cost=ns5_flops) -> list[float]:
    loads = [0.0] * slots
    for shape, owner in zip(shapes, owners, strict=True):
        loads[owner] += cost(*shape)
    return loads


def test_flop_formulas_are_the_specs():
    # NS5 with 5 steps: 20 p^2 q + 10 p^3; the coupled iteration: 4 p^2 q + 6 steps p^3 (p = min, q = max).
    assert ns5_flops(3, 7, steps=5) == ns5_flops(7, 3, steps=5) == 20 * 9 * 7 + 10 * 27
    assert coupled_flops(7, 3, steps=10) == 4 * 9 * 7 + 60 * 27


@pytest.mark.parametrize("slots", [1, 2, 3, 4, 6, 8])
@pytest.mark.parametrize("model", ["llama_60m", "llama_350m"])
def test_owner_flops_are_within_ten_percent_of_an_even_split(model, slots):
    shapes = _llama_hidden_shapes(model)
    for cost in (ns5_flops, coupled_flops):
        loads = _loads(shapes, assign_owners(shapes, slots, cost), slots, cost)
        even = sum(loads) / slots
        assert max(loads) <= 1.1 * even and min(loads) >= 0.9 * even, (cost.__name__, loads)


def test_llama_350m_splits_exactly_over_powers_of_two():
    shapes = _llama_hidden_shapes("llama_350m")  # 96 square and 72 rectangular matrices of equal cost
    for slots in (2, 4, 8):
        loads = _loads(shapes, assign_owners(shapes, slots), slots)
        assert max(loads) == min(loads)


def test_same_shapes_are_dealt_round_robin_most_expensive_first():
    assert assign_owners([(4, 4)] * 6, 4) == [0, 1, 2, 3, 0, 1]
    # the two big ones first; the small ones then fill the two slots left idle
    assert assign_owners([(4, 4)] * 6 + [(8, 8)] * 2, 4) == [2, 3, 2, 3, 2, 3, 0, 1]
    assert assign_owners([(2, 2), (3, 3)], 4) == [1, 0]  # fewer matrices than slots: distinct owners


# NS5 of a matrix batched with others (or assembled from row blocks) against NS5 of it alone, both float64: the
# same operations, but a batched matmul may block its sums otherwise (n u64 each, n <= 21 terms, u64 = 1.1e-16;
# entries are O(1)) and 5 iterations amplify that by at most a few hundred: 1e-12 (1e4 u64) is far above it, and
# far below any real change (a bf16 cast on the wire would be 4e-3, an fp32 one 6e-8).
F64_TOL = {"rtol": 1e-12, "atol": 1e-12}


def test_unsharded_path_is_fn_on_the_matrices_without_a_wire_cast():
    gen = torch.Generator().manual_seed(0)
    blocks = [torch.randn(shape, generator=gen, dtype=torch.float64) for shape in [(5, 3), (2, 6), (5, 3)]]
    infos = [ShardInfo(b.shape, None, 0, 1) for b in blocks]
    calls, probed = [], []

    def fn(batch: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(batch.shape))
        return newton_schulz5(batch, dtype=torch.float64)

    out = apply_to_whole_matrices(fn, blocks, infos, comm_dtype=torch.bfloat16, probe=probed.append)
    assert sorted(calls) == [(1, 2, 6), (2, 5, 3)]  # one call per shape
    for block, result in zip(blocks, out, strict=True):
        torch.testing.assert_close(result, newton_schulz5(block, dtype=torch.float64), **F64_TOL)
        assert result.dtype == torch.float64
    assert len(probed) == 1 and torch.equal(probed[0], out[0])


SHAPES = [(13, 7), (13, 7), (21, 13), (1, 5), (21, 13), (7, 21), (13, 7), (5, 5), (21, 13)]


def _exchange_paths() -> dict[str, list[torch.Tensor]]:
    """apply_to_whole_matrices on this rank's row blocks and on element-range pieces (ZeRO-style bounds), each
    with the exchange in one round and in 1..5 overlapped rounds, plus the whole matrices computed here; float64
    throughout (matrices, NS5 and the wire)."""
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    wholes = [
        torch.randn(shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        for i, shape in enumerate(SHAPES)
    ]
    fn = lambda batch: newton_schulz5(batch, dtype=torch.float64)  # noqa: E731
    rows = [ShardInfo(w.shape, group, rank, world) for w in wholes]
    row_blocks = [w[info.row_slice(rank)] for w, info in zip(wholes, rows, strict=True)]
    out = {"whole": [fn(w[None])[0] for w in wholes]}
    for buckets in (1, 2, 5):
        out[f"rows_{buckets}"] = apply_to_whole_matrices(fn, row_blocks, rows, buckets=buckets)
    # element ranges cut at offsets unrelated to rows (a ZeRO-1/2 partition boundary may fall anywhere)
    ranges = []
    for w in wholes:
        cuts = sorted(
            int(c)
            for c in torch.randint(
                0, w.numel() + 1, (world - 1,), generator=torch.Generator().manual_seed(w.numel())
            )
        )
        ranges.append(ShardInfo(w.shape, group, rank, world, bounds=(0, *cuts, w.numel())))
    pieces = [w.reshape(-1)[info.elements_of(rank)] for w, info in zip(wholes, ranges, strict=True)]
    for buckets in (1, 3):
        out[f"elements_{buckets}"] = apply_to_whole_matrices(fn, pieces, ranges, buckets=buckets)
    out["pieces"] = pieces
    return out  # run_distributed keeps rank 0's


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 3])
def test_overlapped_rounds_and_element_ranges_give_the_same_bits(world) -> None:
    from tests.distributed import run_distributed

    out = run_distributed(_exchange_paths, world)
    whole = out["whole"]
    for key in ("rows_1", "rows_2", "rows_5"):  # rank 0's row blocks, identical whatever the rounds
        for got, ref in zip(out[key], out["rows_1"], strict=True):
            assert torch.equal(got, ref), key
    for key in ("elements_1", "elements_3"):
        for got, ref in zip(out[key], out["elements_1"], strict=True):
            assert torch.equal(got, ref), key
    rows = [ShardInfo(torch.Size(s), None, 0, world) for s in SHAPES]
    for got, w, info in zip(out["rows_1"], whole, rows, strict=True):
        torch.testing.assert_close(got, w[info.row_slice(0)], **F64_TOL)  # = the whole result's rows
    for got, w, piece in zip(out["elements_1"], whole, out["pieces"], strict=True):
        assert got.shape == piece.shape and got.ndim == 1
        torch.testing.assert_close(got, w.reshape(-1)[: got.numel()], **F64_TOL)  # rank 0: from 0
