"""The distribution layer of the optimizers: shard bookkeeping, reductions and whole-matrix operations.

Under FSDP2 a parameter, its gradient and its optimizer state are DTensors sharded by rows (Shard(0) on one
mesh dim; with HSDP another mesh dim is Replicate). Plain tensors (one process, DDP, ZeRO-0) go through the
same functions with `group=None`, where every collective is the identity. The optimizer math only ever sees
local row blocks (`local`), plus:
- `all_reduce_sum` / `all_reduce_sums` for the small reductions (column sums of squares, scalar norms);
- `apply_to_whole_matrices` for the operations that need a whole matrix (Newton-Schulz, SWAN whitening).

`apply_to_whole_matrices` is owner-computes: every matrix is computed exactly once in the whole job.
- Owners: the job's ranks are `replicas x world` slots (HSDP: replicas x shard group; FSDP: 1 x world).
  `assign_owners` gives each whole matrix one slot, balancing the cost (Newton-Schulz FLOPs by default):
  most expensive first, same-shape matrices together, each to the least-loaded slot, which for a group of
  equal shapes is a round-robin. Every rank computes the same plan from the shapes alone (no communication).
- Within a shard group: one all-to-all brings each row shard to the owner of its matrix, the owner assembles
  and computes the whole matrix (same shapes batched), and a second all-to-all returns row shards of the
  result. Row blocks travel at their exact sizes (all_to_all_single with uneven splits), so row counts the
  world size does not divide, ranks holding no rows and matrix counts that are not a multiple of the world
  size need no padding and cost no extra bytes.
- HSDP: the replicas hold identical row shards, so each replica's shard group computes only the matrices
  owned by its slots (a disjoint 1/replicas of them), then one all-gather over the replicate group (padded to
  the largest replica's share) gives every replica the rows of the others' results. All collectives run on
  the mesh dims' own groups (no flattened group is needed); with more than one Replicate dim the work is
  split over the first and repeated over the others.
- Row shards travel as `comm_dtype` both ways (the optimizers default it to their ns_dtype, so bf16 for NS5);
  the owner's own rows take the same cast, so a result never depends on which rank owned its matrix.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed.tensor import DTensor

from optim.newton_schulz import ns5_flops


@dataclass(frozen=True)
class ShardInfo:
    """Where this rank's row block sits in the global matrix (FSDP2 uses torch.chunk semantics by rows), and
    which group of identical replicas (HSDP) shares the whole-matrix work."""

    shape: torch.Size  # global shape
    group: dist.ProcessGroup | None  # the group of the mesh dim that carries Shard(0); None: nothing sharded
    rank: int  # this rank's index in `group` (0 when None)
    world: int  # size of `group` (1 when None)
    replicate_group: dist.ProcessGroup | None = None  # a Replicate mesh dim of size > 1 (HSDP's replicas)
    replica: int = 0  # this rank's index in `replicate_group`
    replicas: int = 1  # size of `replicate_group` (1 when None)
    # Element ranges instead of row blocks (DeepSpeed ZeRO's flat partitions): rank r holds the elements
    # bounds[r] .. bounds[r + 1] of the row-major flattened matrix (world + 1 non-decreasing offsets, 0 .. m n).
    bounds: tuple[int, ...] | None = None

    @property
    def chunk(self) -> int:
        """Rows held by each of the first ranks: ceil(m / world)."""
        return -(-self.shape[0] // self.world)

    def rows_of(self, rank: int) -> int:
        """Rows held by `rank` (the last ranks may hold fewer, or none)."""
        return max(0, min(self.chunk, self.shape[0] - rank * self.chunk))

    def row_slice(self, rank: int) -> slice:
        start = min(rank * self.chunk, self.shape[0])
        return slice(start, start + self.rows_of(rank))

    @property
    def local_rows(self) -> int:
        return self.rows_of(self.rank)

    def numel_of(self, rank: int) -> int:
        """Elements of the matrix held by `rank`: its rows, or its element range."""
        if self.bounds is not None:
            return self.bounds[rank + 1] - self.bounds[rank]
        return self.rows_of(rank) * self.shape[1]

    def elements_of(self, rank: int) -> slice:
        """`rank`'s elements as a slice of the row-major flattened matrix (contiguous in both layouts)."""
        start = self.bounds[rank] if self.bounds is not None else self.row_slice(rank).start * self.shape[1]
        return slice(start, start + self.numel_of(rank))

    def local_shape(self, rank: int) -> tuple[int, ...]:
        """The shape of `rank`'s block: (rows, n), or (elements,) for an element range."""
        return (self.numel_of(rank),) if self.bounds is not None else (self.rows_of(rank), self.shape[1])

    @property
    def slots(self) -> int:
        """Ranks that share the whole-matrix work: replicas x shard group."""
        return self.replicas * self.world

    @property
    def slot(self) -> int:
        """This rank's owner slot, replica-major: slot // world is the replica, slot % world the rank."""
        return self.replica * self.world + self.rank


@dataclass
class MatrixSlot:
    """One matrix parameter in one step, as the distribution layer hands it to a rule: its group, state, shard info
    and local blocks (a row block under FSDP2, the whole matrix on one process or on its owner)."""

    param: Tensor
    group: dict
    state: dict
    info: ShardInfo
    weight: Tensor  # local block of the parameter (updated in place)
    grad: Tensor  # local block of the gradient (read only: logging reads grads after the step)

    @property
    def rows(self) -> int:
        return self.info.shape[0]

    @property
    def cols(self) -> int:
        return self.info.shape[1]


def local(t: Tensor) -> Tensor:
    """The local block of a DTensor (a view: in-place ops on it update the DTensor), or `t` itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def shard_info(t: Tensor) -> ShardInfo:
    """Shard bookkeeping of a parameter (or of its gradient / state: they share placements)."""
    if not isinstance(t, DTensor):
        return ShardInfo(t.shape, None, 0, 1)
    mesh, placements = t.device_mesh, t.placements
    sharded = [i for i, placement in enumerate(placements) if not placement.is_replicate()]
    if len(sharded) > 1 or sharded and not placements[sharded[0]].is_shard(dim=0):
        raise NotImplementedError(
            f"the optimizers support row sharding only (Shard(0) on one mesh dim, Replicate elsewhere); "
            f"got placements {placements}"
        )
    replicated = [
        i for i, placement in enumerate(placements) if placement.is_replicate() and mesh.size(i) > 1
    ]
    replicas = {}
    if replicated:
        dim = replicated[0]
        replicas = {
            "replicate_group": mesh.get_group(dim),
            "replica": mesh.get_local_rank(dim),
            "replicas": mesh.size(dim),
        }
    if not sharded:
        return ShardInfo(t.shape, None, 0, 1, **replicas)
    dim = sharded[0]
    info = ShardInfo(t.shape, mesh.get_group(dim), mesh.get_local_rank(dim), mesh.size(dim), **replicas)
    if dist.get_rank(info.group) != info.rank or t.to_local().shape[0] != info.local_rows:
        raise NotImplementedError(
            f"unexpected row sharding: local rows {t.to_local().shape[0]} at mesh coordinate {info.rank}, "
            f"expected {info.local_rows} (torch.chunk semantics, group ranks in mesh order)"
        )
    return info


def math_dtype(t: Tensor) -> torch.dtype:
    """The dtype of a rule's state and elementwise math for parameter `t`: fp32, or `t`'s own when wider (float64
    parameters keep float64 throughout, which is how a sharded run is compared with one process to float64
    rounding)."""
    return torch.promote_types(t.dtype, torch.float32)


def zeros_rows_like(p: Tensor) -> Tensor:
    """Zeros of length m (one per row of p) in p's math dtype, sharded like p's rows: a per-row optimizer state."""
    info = shard_info(p)
    block = torch.zeros(local(p).shape[0], dtype=math_dtype(p), device=local(p).device)
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


def _by_group(infos: Sequence[ShardInfo]) -> list[list[int]]:
    """Indices of `infos` bucketed by (shard group, replicate group) identity, in first-seen order."""
    buckets: list[tuple[ShardInfo, list[int]]] = []
    for i, info in enumerate(infos):
        for first, idx in buckets:
            if first.group is info.group and first.replicate_group is info.replicate_group:
                idx.append(i)
                break
        else:
            buckets.append((info, [i]))
    return [idx for _, idx in buckets]


def all_reduce_sums(tensors: Sequence[Tensor], infos: Sequence[ShardInfo]) -> None:
    """Sum each tensor in place over its matrix's shard group, with one collective per distinct group."""
    for idx in _by_group(infos):
        group = infos[idx[0]].group
        if group is None:
            continue
        flat = all_reduce_sum(torch.cat([tensors[i].reshape(-1) for i in idx]), group)
        for i, piece in zip(idx, flat.split([tensors[i].numel() for i in idx]), strict=True):
            tensors[i].copy_(piece.view_as(tensors[i]))


def assign_owners(
    shapes: Sequence[tuple[int, int]], slots: int, cost: Callable[[int, int], float] = ns5_flops
) -> list[int]:
    """The owner slot (0 .. slots-1) of each matrix, balancing the summed cost(m, n) per slot.

    Greedy longest-first: matrices by decreasing cost, same shapes together, then by index; each goes to
    the least-loaded slot (lowest index on ties). A group of equal shapes is thus dealt round-robin.
    Deterministic, so every rank computes the same plan.
    """
    loads = [0.0] * slots
    owners = [0] * len(shapes)
    for i in sorted(range(len(shapes)), key=lambda i: (-cost(*shapes[i]), tuple(shapes[i]), i)):
        slot = min(range(slots), key=lambda s: (loads[s], s))
        owners[i] = slot
        loads[slot] += cost(*shapes[i])
    return owners


def _flat(pieces: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> Tensor:
    """The pieces flattened into one `dtype` buffer (empty for no pieces)."""
    if not pieces:
        return torch.empty(0, dtype=dtype, device=device)
    return torch.cat([piece.reshape(-1).to(dtype) for piece in pieces])


def _all_to_all(chunks: list[Tensor], recv_sizes: list[int], group: dist.ProcessGroup | None) -> _Pending:
    """Start sending chunks[d] to rank d of `group` and receiving recv_sizes[r] elements from each rank r (uneven
    is fine); the transfer runs while the caller computes, and `_Pending.wait()` returns the received pieces.
    group None: a shard group of one (HSDP replicas of unsharded matrices), the chunk stays here."""
    if group is None:
        return _Pending(None, chunks, [])
    send = torch.cat(chunks)
    recv = send.new_empty(sum(recv_sizes))
    work = dist.all_to_all_single(
        recv, send, recv_sizes, [c.numel() for c in chunks], group=group, async_op=True
    )
    return _Pending(work, list(recv.split(recv_sizes)), [send])


@dataclass
class CommClock:
    """Seconds spent waiting for the owner exchange's all-to-alls (transfers not hidden behind compute), summed
    since the last `take()`. Each matrix optimizer owns one; its step's figure travels with the engine's step."""

    seconds: float = 0.0

    def take(self) -> float:
        seconds, self.seconds = self.seconds, 0.0
        return seconds


@dataclass
class _Pending:
    """An all-to-all in flight: its handle, the buffers it fills, and what it sends (kept alive until done)."""

    work: Any
    received: list[Tensor]
    sending: list[Tensor]

    def wait(self, clock: CommClock | None) -> list[Tensor]:
        """The received pieces, once the transfer is done; the time spent waiting is exposed communication."""
        if self.work is not None:
            start = time.perf_counter()
            self.work.wait()
            if clock is not None:
                clock.seconds += time.perf_counter() - start
        return self.received


def _batched(fn: Callable[[Tensor], Tensor], wholes: dict[int, Tensor]) -> dict[int, Tensor]:
    """fn applied to the whole matrices, one call per distinct shape and dtype (stacked); results in their
    matrices' dtype (one cast per stack, not one per matrix)."""
    by_shape: dict[tuple, list[int]] = {}
    for i, whole in wholes.items():
        by_shape.setdefault((tuple(whole.shape), whole.dtype), []).append(i)
    out: dict[int, Tensor] = {}
    for (_, dtype), idx in by_shape.items():
        out.update(zip(idx, fn(torch.stack([wholes[i] for i in idx])).to(dtype).unbind(), strict=True))
    return out


class _Exchange:
    """The owner-computes plan of one bucket of matrices (same shard and replicate groups) on this rank."""

    def __init__(self, infos: Sequence[ShardInfo], by_slot: list[list[list[int]]]) -> None:
        first = next(i for replica in by_slot for owned in replica for i in owned)
        self.infos, self.me = infos, infos[first]
        # by_slot[replica][rank]: the matrices that slot owns, in list order
        self.by_slot = by_slot
        self.here = self.by_slot[self.me.replica]  # this replica's matrices, by owner rank

    @classmethod
    def plan(cls, infos: Sequence[ShardInfo], idx: list[int], cost: Callable[[int, int], float]) -> _Exchange:
        """Owners for the matrices `idx` (assign_owners over their slots), from the shapes alone."""
        me = infos[idx[0]]
        owners = assign_owners([infos[i].shape for i in idx], me.slots, cost)
        by_slot: list[list[list[int]]] = [[[] for _ in range(me.world)] for _ in range(me.replicas)]
        for i, owner in zip(idx, owners, strict=True):
            by_slot[owner // me.world][owner % me.world].append(i)
        return cls(infos, by_slot)

    def buckets(self, count: int) -> list[_Exchange]:
        """The plan cut into at most `count` rounds with the same owners. A slot's matrices of one shape stay in
        one round (they are one batched call, and a batch computes each matrix to the same bits only at the same
        batch size); round b takes every slot's shape groups b, b + count, ... (most expensive first), so each
        rank computes in every round it can. Every rank cuts the same rounds."""

        def shape_groups(owned: list[int]) -> list[list[int]]:
            groups: dict[tuple[int, ...], list[int]] = {}
            for i in owned:
                groups.setdefault(tuple(self.infos[i].shape), []).append(i)
            return list(groups.values())

        grouped = [[shape_groups(owned) for owned in replica] for replica in self.by_slot]
        rounds = []
        for b in range(count):
            by_slot = [
                [[i for g in groups[b::count] for i in g] for groups in replica] for replica in grouped
            ]
            if any(owned for replica in by_slot for owned in replica):
                rounds.append(_Exchange(self.infos, by_slot))
        return rounds

    def _size(self, i: int, rank: int) -> int:
        """Elements of matrix i's block on `rank` of the shard group."""
        return self.infos[i].numel_of(rank)

    def to_owners(
        self, blocks: Sequence[Tensor], dtype: torch.dtype, device: torch.device, clock: CommClock | None
    ) -> dict[int, Tensor]:
        """All-to-all 1: the whole matrices this rank owns, assembled from every rank's block (row blocks and
        element ranges alike are contiguous pieces of the flattened matrix, in rank order)."""
        return self.assemble(self.send_to_owners(blocks, dtype, device), clock)

    def send_to_owners(self, blocks: Sequence[Tensor], dtype: torch.dtype, device: torch.device) -> _Pending:
        """Start all-to-all 1 (see to_owners); `assemble` finishes it."""
        me, mine = self.me, self.here[self.me.rank]
        chunks = [_flat([blocks[i] for i in owned], dtype, device) for owned in self.here]
        sizes = [sum(self._size(i, src) for i in mine) for src in range(me.world)]
        return _all_to_all(chunks, sizes, me.group)

    def assemble(self, pending: _Pending, clock: CommClock | None) -> dict[int, Tensor]:
        """The whole matrices of a finished all-to-all 1."""
        me, mine = self.me, self.here[self.me.rank]
        received = [
            piece.split([self._size(i, src) for i in mine]) for src, piece in enumerate(pending.wait(clock))
        ]
        return {
            i: torch.cat([received[src][k] for src in range(me.world)]).view(self.infos[i].shape)
            for k, i in enumerate(mine)
        }

    def to_rows(
        self, results: dict[int, Tensor], dtype: torch.dtype, device: torch.device, clock: CommClock | None
    ) -> dict[int, Tensor]:
        """All-to-all 2: this rank's block of the result of every matrix this replica computed."""
        return self.parse_rows(self.send_to_rows(results, dtype, device), clock)

    def send_to_rows(self, results: dict[int, Tensor], dtype: torch.dtype, device: torch.device) -> _Pending:
        """Start all-to-all 2 (see to_rows); `parse_rows` finishes it."""
        me, mine = self.me, self.here[self.me.rank]
        chunks = [
            _flat([results[i].reshape(-1)[self.infos[i].elements_of(dst)] for i in mine], dtype, device)
            for dst in range(me.world)
        ]
        sizes = [sum(self._size(i, me.rank) for i in owned) for owned in self.here]
        return _all_to_all(chunks, sizes, me.group)

    def parse_rows(self, pending: _Pending, clock: CommClock | None) -> dict[int, Tensor]:
        """This rank's blocks of the results of a finished all-to-all 2."""
        rows: dict[int, Tensor] = {}
        for owned, piece in zip(self.here, pending.wait(clock), strict=True):
            rows.update(self._parse(owned, piece))
        return rows

    def across_replicas(self, rows: dict[int, Tensor], dtype: torch.dtype, device: torch.device) -> None:
        """HSDP: one all-gather over the replicate group adds the other replicas' result rows to `rows`."""
        me = self.me
        shares = [[i for owned in replica for i in owned] for replica in self.by_slot]
        sizes = [sum(self._size(i, me.rank) for i in share) for share in shares]
        send = torch.zeros(max(sizes), dtype=dtype, device=device)
        send[: sizes[me.replica]] = _flat([rows[i] for i in shares[me.replica]], dtype, device)
        received = [torch.empty_like(send) for _ in shares]
        dist.all_gather(received, send, group=me.replicate_group)
        for replica, (share, piece) in enumerate(zip(shares, received, strict=True)):
            if replica != me.replica:
                rows.update(self._parse(share, piece[: sizes[replica]]))

    def _parse(self, matrices: list[int], buffer: Tensor) -> dict[int, Tensor]:
        """This rank's blocks of `matrices`, laid out one after the other in `buffer`."""
        rank = self.me.rank
        pieces = buffer.split([self._size(i, rank) for i in matrices])
        return {i: p.view(self.infos[i].local_shape(rank)) for i, p in zip(matrices, pieces, strict=True)}


def concatenation_bounds(numel: int, start: int, partition: int, world: int) -> tuple[int, ...]:
    """ZeRO-1/2's element bounds (ShardInfo.bounds) of a matrix of `numel` elements laid at `start` in a flat
    buffer cut into `world` equal partitions of `partition` elements, partition r on rank r."""
    return tuple(min(max(r * partition - start, 0), numel) for r in range(world + 1))


@dataclass(frozen=True)
class FlatLayout:
    """Where whole matrices sit in this rank's flat 1-D partition (DeepSpeed ZeRO hands the optimizer one per
    param group): matrix k's elements `infos[k].elements_of(rank)` are `flat[offsets[k]:][:numel_of(rank)]`.
    Every rank of the group holds a layout of the same matrices, in the same order."""

    params: tuple[Tensor, ...]  # the model's matrices (identity only: which one is the health probe)
    infos: tuple[ShardInfo, ...]  # each matrix's element bounds over the group (bounds set)
    offsets: tuple[int, ...]  # where this rank's piece of each matrix starts in the flat partition

    @classmethod
    def of_concatenation(
        cls,
        params: Sequence[Tensor],
        shapes: Sequence[torch.Size],
        starts: Sequence[int],
        partition: int,
        group: dist.ProcessGroup,
    ) -> FlatLayout:
        """ZeRO-1/2: the matrices concatenated at `starts` in one flat buffer that is cut into equal
        partitions of `partition` elements, partition r on rank r."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        infos, offsets = [], []
        for shape, start in zip(shapes, starts, strict=True):
            bounds = concatenation_bounds(shape.numel(), start, partition, world)
            infos.append(ShardInfo(shape, group, rank, world, bounds=bounds))
            offsets.append(max(start - rank * partition, 0))
        return cls(tuple(params), tuple(infos), tuple(offsets))

    @classmethod
    def of_partitioned_matrices(
        cls,
        params: Sequence[Tensor],
        shapes: Sequence[torch.Size],
        partitions: Sequence[int],
        group: dist.ProcessGroup,
    ) -> FlatLayout:
        """ZeRO-3: each matrix cut into equal partitions of `partitions[k]` elements (partition r on rank r,
        the last one padded), and this rank's partitions of all matrices concatenated."""
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        infos, offsets, offset = [], [], 0
        for shape, partition in zip(shapes, partitions, strict=True):
            bounds = tuple(min(r * partition, shape.numel()) for r in range(world + 1))
            infos.append(ShardInfo(shape, group, rank, world, bounds=bounds))
            offsets.append(offset)
            offset += partition
        return cls(tuple(params), tuple(infos), tuple(offsets))

    def pieces(self, flat: Tensor) -> list[Tensor]:
        """This rank's piece of each matrix: views into `flat` (possibly empty)."""
        return [
            flat[offset : offset + info.numel_of(info.rank)]
            for offset, info in zip(self.offsets, self.infos, strict=True)
        ]


class OwnerExchange(_Exchange):
    """The owner-computes plan of one layout's matrices (one shard group, no replicas): which rank computes which
    matrix, and the two all-to-alls that bring blocks to their owners and results back. Computed from the shapes
    alone, so every rank holds the same plan; reusable for as long as the layout holds."""

    def __init__(self, infos: Sequence[ShardInfo], cost: Callable[[int, int], float] = ns5_flops) -> None:
        if len(_by_group(infos)) != 1 or infos[0].replicas != 1:
            raise ValueError("an owner exchange needs matrices of one shard group without replicas")
        super().__init__(infos, _Exchange.plan(infos, list(range(len(infos))), cost).by_slot)


OVERLAP_BUCKETS = 4  # default rounds of the owner exchange (apply_to_whole_matrices)
_PLANS: OrderedDict[tuple, _Exchange] = OrderedDict()  # the last plans made, by matrices and cost
_PLANS_KEPT = 32


def _cost_key(cost: Callable[[int, int], float]) -> tuple:
    """A cost function by value (the optimizers pass a fresh functools.partial every step)."""
    if isinstance(cost, partial):
        return (cost.func, cost.args, tuple(sorted(cost.keywords.items())))
    return (cost,)


def _planned(infos: Sequence[ShardInfo], idx: list[int], cost: Callable[[int, int], float]) -> _Exchange:
    """The owner plan of the matrices `idx`, made once and reused while the same matrices (shapes, shard
    groups) and cost come back, i.e. every step of a run."""
    key = (tuple(idx), tuple(infos[i] for i in idx), _cost_key(cost))
    plan = _PLANS.pop(key, None) or _Exchange.plan(infos, idx, cost)
    _PLANS[key] = plan
    while len(_PLANS) > _PLANS_KEPT:
        _PLANS.popitem(last=False)
    return plan


def _pipelined(
    fn: Callable[[Tensor], Tensor],
    plan: _Exchange,
    blocks: Sequence[Tensor],
    dtype: torch.dtype,
    device: torch.device,
    buckets: int,
    computed: dict[int, Tensor],
    clock: CommClock | None,
) -> dict[int, Tensor]:
    """This rank's rows of every result of `plan`, round by round: round k+1's blocks travel to their owners while
    round k is computed, and round k's results travel back while round k+1 is computed. `computed` gets the
    whole results this rank computed."""
    rounds = plan.buckets(buckets)
    incoming = [rounds[0].send_to_owners(blocks, dtype, device)]
    outgoing = []
    for k, exchange in enumerate(rounds):
        if k + 1 < len(rounds):
            incoming.append(rounds[k + 1].send_to_owners(blocks, dtype, device))
        results = _batched(fn, exchange.assemble(incoming[k], clock))
        computed.update(results)
        outgoing.append(exchange.send_to_rows(results, dtype, device))
    rows: dict[int, Tensor] = {}
    for exchange, pending in zip(rounds, outgoing, strict=True):
        rows.update(exchange.parse_rows(pending, clock))
    return rows


def apply_to_whole_matrices(
    fn: Callable[[Tensor], Tensor],
    blocks: Sequence[Tensor],
    infos: Sequence[ShardInfo],
    *,
    comm_dtype: torch.dtype | None = None,
    probe: Callable[[Tensor], None] | None = None,
    cost: Callable[[int, int], float] = ns5_flops,
    buckets: int = OVERLAP_BUCKETS,
    clock: CommClock | None = None,
) -> list[Tensor]:
    """Apply a whole-matrix function to sharded matrices and return this rank's rows of each result.

    Each matrix is computed once in the job, by its owner (see the module docstring).
    fn: maps a batch (B, m, n) of whole matrices to results of the same shape (batched over same shapes).
    blocks: this rank's row blocks (not modified); infos: their `shard_info`.
    comm_dtype: dtype of row blocks on the wire, both ways (None: the blocks' own dtype).
    probe: called with the first matrix's whole result on exactly one rank of the job (its owner), e.g. to
        measure its orthogonality; every other rank must contribute zero to any sum of it.
    cost: the per-matrix cost (m, n) the owners are balanced on; NS5's FLOPs by default.
    buckets: rounds the exchange is cut into, so that the transfers of one round overlap the compute of the
        next (`_pipelined`); 1 = one all-to-all each way. Every number is the same whatever the count.
    clock: where the time spent waiting for transfers is added (exposed communication).
    Results come back in the dtype of the corresponding block.
    """
    rows: dict[int, Tensor] = {}
    computed: dict[int, Tensor] = {}
    for idx in _by_group(infos):
        me = infos[idx[0]]
        if me.slots == 1:  # nothing to share: compute in place, no wire and no cast
            results = _batched(fn, {i: blocks[i] for i in idx})
            rows.update(results)
            computed.update(results)
            continue
        dtype = comm_dtype or blocks[idx[0]].dtype
        device = blocks[idx[0]].device
        plan = _planned(infos, idx, cost)
        rows.update(_pipelined(fn, plan, blocks, dtype, device, buckets, computed, clock))
        if me.replicas > 1:
            plan.across_replicas(rows, dtype, device)
    if probe is not None and 0 in computed:
        probe(computed[0])
    return [rows[i].to(block.dtype) for i, block in enumerate(blocks)]


class FlatPartition:
    """One of DeepSpeed ZeRO's flat partitions (a param group's matrices cut at arbitrary element offsets) stepped
    owner-computes. `gather`: one all-to-all brings every piece of each matrix's gradient to the rank that owns it
    (owners balanced by the rule's cost, as under FSDP2), which gets the whole matrices as slots with their state
    (it lives only there). The rule then runs on them as on any whole matrix, its update landing in each slot's
    zero "weight" as -lr * scale * direction. `scatter`: a second all-to-all returns each rank's piece of those
    updates, applied to the partition with the decoupled weight decay. Row- and column-wise math and norms all run
    on whole matrices, so no other collective is needed; fp32 on the wire both ways (the gradient feeds fp32
    state, the update is what the partition receives)."""

    def __init__(self, layout: FlatLayout, cost: Callable[[int, int], float]) -> None:
        self.layout, self.plan = layout, OwnerExchange(layout.infos, cost)

    def index_of(self, param: Tensor | None) -> int | None:
        """The position of one of the model's matrices in this partition's layout, if it is there."""
        return next((k for k, p in enumerate(self.layout.params) if p is param), None)

    def gather(
        self, flat: Tensor, group: dict, owned: dict[int, dict], first: Tensor | None, clock: CommClock | None
    ) -> list[tuple[int, MatrixSlot]]:
        """(matrix index, slot) of every matrix this rank owns; `first` (a model matrix) leads when it is one."""
        wholes = self.plan.to_owners(self.layout.pieces(flat.grad.float()), torch.float32, flat.device, clock)
        lead = self.index_of(first)
        return [
            (
                k,
                MatrixSlot(
                    wholes[k],
                    group,
                    owned.setdefault(k, {}),
                    shard_info(wholes[k]),
                    torch.zeros_like(wholes[k]),
                    wholes[k],
                ),
            )  # fmt: skip
            for k in sorted(wholes, key=lambda k: k != lead)
        ]

    def scatter(
        self, flat: Tensor, group: dict, slots: list[tuple[int, MatrixSlot]], clock: CommClock | None
    ) -> None:
        """Every rank's pieces of the owners' updates, applied to `flat` with the decoupled weight decay."""
        updates = self.plan.to_rows({k: s.weight for k, s in slots}, torch.float32, flat.device, clock)
        lr, wd = group["lr"], group["weight_decay"]
        for k, piece in enumerate(self.layout.pieces(flat)):
            if wd:
                piece.mul_(1 - lr * wd)
            piece.add_(updates[k].to(piece.dtype))
