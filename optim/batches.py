"""Same-shape batches of a step's matrices: the unit of the rules' elementwise work.

Why: a rule written per matrix launches every elementwise kernel once per matrix (llama_350m: 168 hidden
matrices, a few dozen kernels each), which leaves a GPU idle between tiny launches. A step's matrices come in a
few shapes, so the rules run each operation once per batch of equal shapes, on a stacked [k, rows, cols] tensor,
and write the results back with one foreach call per batch (`benchmarks/optimizer_step.py --count` counts them).
Every matrix's numbers are computed by the same formulas as one at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from optim.sharded import MatrixSlot, ShardInfo


@dataclass
class Batch:
    """Matrices of one param group with the same global and local shapes (so the same shape-derived scales)
    and dtypes; `index`: their positions in the step's list of slots."""

    slots: list[MatrixSlot]
    index: list[int]

    @property
    def group(self) -> dict:
        return self.slots[0].group

    @property
    def info(self) -> ShardInfo:
        """The shard info of the first matrix: every matrix of a batch has the same shard group."""
        return self.slots[0].info

    @property
    def rows(self) -> int:
        return self.slots[0].rows

    @property
    def cols(self) -> int:
        return self.slots[0].cols

    def pick(self, per_slot: Sequence[Tensor]) -> list[Tensor]:
        """This batch's entries of a list over the step's slots."""
        return [per_slot[i] for i in self.index]

    def stack(self, per_slot: Sequence[Tensor], dtype: torch.dtype | None = None) -> Tensor:
        """This batch's entries of a list over the step's slots, stacked [k, ...] (a copy), in `dtype`."""
        stacked = torch.stack(self.pick(per_slot))
        return stacked if dtype is None else stacked.to(dtype)


def same_shape_batches(slots: Sequence[MatrixSlot]) -> list[Batch]:
    """The slots in batches (see Batch), in first-seen order."""
    by_key: dict[tuple, Batch] = {}
    for i, slot in enumerate(slots):
        key = (
            id(slot.group),
            tuple(slot.info.shape),
            tuple(slot.weight.shape),
            slot.weight.dtype,
            slot.grad.dtype,
            slot.info.group,
            slot.info.replicate_group,
        )
        if key not in by_key:
            by_key[key] = Batch([], [])
        by_key[key].slots.append(slot)
        by_key[key].index.append(i)
    return list(by_key.values())


def scatter(batches: Sequence[Batch], stacks: Sequence[Tensor], count: int) -> list[Tensor]:
    """A list over the step's `count` slots from one stacked tensor per batch (views, no copy)."""
    out: list[Tensor | None] = [None] * count
    for batch, stacked in zip(batches, stacks, strict=True):
        for i, row in zip(batch.index, stacked.unbind(0), strict=True):
            out[i] = row
    return out  # type: ignore[return-value]
