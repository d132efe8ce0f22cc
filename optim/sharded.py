"""The distribution layer of the optimizers: shard bookkeeping, reductions and whole-matrix operations.

Under FSDP2 a parameter, its gradient and its optimizer state are DTensors sharded by rows (Shard(0) on one
mesh dim; with HSDP other mesh dims are Replicate). Plain tensors (one process, DDP, ZeRO-0) go through the
same functions with `group=None`, where every collective is the identity. The optimizer math only ever sees
local row blocks (`local`), plus:
- `all_reduce_sum` / `all_reduce_sums` for the small reductions (column sums of squares, scalar norms);
- `apply_to_whole_matrices` for the operations that need a whole matrix (Newton-Schulz, SWAN whitening).

`apply_to_whole_matrices` is implemented here by all-gathering the row blocks (every rank computes every
matrix). Its interface is what an owner-computes version (one all-to-all of row shards to each matrix's owner,
compute once, a second all-to-all back) needs, so that version can replace its inside without touching the
optimizers.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's row block sits in the global matrix (FSDP2 uses torch.chunk semantics by rows)."""

    shape: torch.Size  # global shape
    group: dist.ProcessGroup | None  # the group of the mesh dim that carries Shard(0); None: nothing sharded
    rank: int  # this rank's index in `group` (0 when None)
    world: int  # size of `group` (1 when None)

    @property
    def chunk(self) -> int:
        """Rows held by each of the first ranks: ceil(m / world)."""
        return -(-self.shape[0] // self.world)

    def rows_of(self, rank: int) -> int:
        """Rows held by `rank` (the last ranks may hold fewer, or none)."""
        return max(0, min(self.chunk, self.shape[0] - rank * self.chunk))

    @property
    def row_offset(self) -> int:
        return min(self.rank * self.chunk, self.shape[0])

    @property
    def local_rows(self) -> int:
        return self.rows_of(self.rank)


def local(t: Tensor) -> Tensor:
    """The local block of a DTensor (a view: in-place ops on it update the DTensor), or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_info(t: Tensor) -> ShardInfo:
    """Shard bookkeeping of a parameter (or of its gradient / state: they share placements)."""
    if not isinstance(t, DTensor):
        return ShardInfo(t.shape, None, 0, 1)
    sharded = [i for i, placement in enumerate(t.placements) if not placement.is_replicate()]
    if not sharded:
        return ShardInfo(t.shape, None, 0, 1)
    if len(sharded) > 1 or not t.placements[sharded[0]].is_shard(dim=0):
        raise NotImplementedError(
            f"the optimizers support row sharding only (Shard(0) on one mesh dim, Replicate elsewhere); "
            f"got placements {t.placements}"
        )
    mesh_dim = sharded[0]
    group = t.device_mesh.get_group(mesh_dim)
    info = ShardInfo(t.shape, group, t.device_mesh.get_local_rank(mesh_dim), t.device_mesh.size(mesh_dim))
    if dist.get_rank(group) != info.rank or t.to_local().shape[0] != info.local_rows:
        raise NotImplementedError(
            f"unexpected row sharding: local rows {t.to_local().shape[0]} at mesh coordinate {info.rank}, "
            f"expected {info.local_rows} (torch.chunk semantics, group ranks in mesh order)"
        )
    return info


def zeros_rows_like(p: Tensor) -> Tensor:
    """fp32 zeros of length m (one per row of p), sharded like p's rows: a per-row optimizer state."""
    info = shard_info(p)
    block = torch.zeros(local(p).shape[0], dtype=torch.float32, device=local(p).device)
    if not isinstance(p, DTensor):
        return block
    return DTensor.from_local(
        block, p.device_mesh, p.placements, run_check=False, shape=torch.Size([info.shape[0]]), stride=(1,)
    )


def all_reduce_sum(t: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Sum `t` over `group` in place (identity when group is None); returns t."""
    if group is not None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return t


def _by_group(infos: Sequence[ShardInfo]) -> list[tuple[dist.ProcessGroup | None, list[int]]]:
    """Indices of `infos` bucketed by process group (by identity), in first-seen order."""
    buckets: list[tuple[dist.ProcessGroup | None, list[int]]] = []
    for i, info in enumerate(infos):
        for group, idx in buckets:
            if group is info.group:
                idx.append(i)
                break
        else:
            buckets.append((info.group, [i]))
    return buckets


def all_reduce_sums(tensors: Sequence[Tensor], infos: Sequence[ShardInfo]) -> None:
    """Sum each tensor in place over its matrix's shard group, with one collective per distinct group."""
    for group, idx in _by_group(infos):
        if group is None:
            continue
        flat = all_reduce_sum(torch.cat([tensors[i].reshape(-1) for i in idx]), group)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            tensors[i].copy_(piece.view_as(tensors[i]))


def _gather_rows(blocks: Sequence[Tensor], infos: Sequence[ShardInfo], idx: list[int], group, dtype) -> None:
    """Replace blocks[i] (i in idx) by the whole matrix: one all-gather of all of them, padded to `chunk` rows."""
    world = infos[idx[0]].world
    padded = []
    for i in idx:
        info, block = infos[i], blocks[i]
        buf = torch.zeros(info.chunk, info.shape[1], dtype=dtype, device=block.device)
        buf[: block.shape[0]] = block
        padded.append(buf.reshape(-1))
    send = torch.cat(padded)
    received = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(received, send, group=group)
    offset = 0
    for i in idx:
        info = infos[i]
        size = info.chunk * info.shape[1]
        pieces = [
            received[r][offset : offset + size].view(info.chunk, -1)[: info.rows_of(r)] for r in range(world)
        ]
        blocks[i] = torch.cat(pieces)
        offset += size


def apply_to_whole_matrices(
    fn: Callable[[Tensor], Tensor],
    blocks: Sequence[Tensor],
    infos: Sequence[ShardInfo],
    *,
    comm_dtype: torch.dtype | None = None,
    probe: Callable[[Tensor], None] | None = None,
) -> list[Tensor]:
    """Apply a whole-matrix function to sharded matrices and return this rank's rows of each result.

    fn: maps a batch (B, m, n) of whole matrices to results of the same shape (batched over same shapes).
    blocks: this rank's row blocks (not modified); infos: their `shard_info`.
    comm_dtype: dtype of row blocks on the wire (None: the blocks' own dtype).
    probe: called with the first matrix's whole result on exactly one rank of its shard group (the one that
        computed it), e.g. to measure its orthogonality; other ranks must contribute zero to any sum of it.
    Results come back in the dtype of the corresponding block.
    """
    wholes = list(blocks)
    for group, idx in _by_group(infos):
        if group is not None:
            _gather_rows(wholes, infos, idx, group, comm_dtype or blocks[idx[0]].dtype)
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, whole in enumerate(wholes):
        by_shape.setdefault(tuple(whole.shape), []).append(i)
    results: list[Tensor] = list(wholes)
    for idx in by_shape.values():
        out = fn(torch.stack([wholes[i] for i in idx]))
        for k, i in enumerate(idx):
            results[i] = out[k]
    if probe is not None and results and infos[0].rank == 0:
        probe(results[0])
    return [
        results[i][info.row_offset : info.row_offset + info.local_rows].to(blocks[i].dtype)
        for i, info in enumerate(infos)
    ]
