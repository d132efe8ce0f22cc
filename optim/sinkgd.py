"""SinkGD (gradient multi-normalization, Scetbon et al. 2025): stateless alternating row/column scaling."""

from __future__ import annotations

import math
from collections.abc import Iterable

from optim.base import MatrixOptimizer
from optim.batches import same_shape_batches
from optim.options import Option
from optim.sharded import MatrixSlot, all_reduce_sums, math_dtype

NORM_EPS = 1e-8


class SinkGD(MatrixOptimizer):
    """X = G; `iters` times: scale each row to l2-norm sqrt(n), then each column to l2-norm sqrt(m) (norms
    clamped at 1e-8); W <- W (1 - lr wd) - lr X. X has per-element RMS exactly 1. No state.

    Under FSDP2 rows are local and each column normalization is one all-reduce of the column sums of squares
    (all matrices of the step in one collective), so the result equals the unsharded one to float rounding.

    Args: params (2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW), lr, iters
    (L), weight_decay (decoupled). Defaults and their provenance: optim.reference.options_table(SinkGD).
    """

    algorithm = "sinkgd"
    options = (Option("sinkgd_iters", "iters", minimum=1, why="0 iterations would apply the raw gradient"),)
    provenance = {
        "lr": "SWAN's convention",
        "weight_decay": "project addition (the paper has none)",
    }

    def __init__(self, params: Iterable, lr: float = 1e-3, iters: int = 5, weight_decay: float = 0.0) -> None:
        self.check_arguments(iters=iters)
        self.iters = iters
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        batches = same_shape_batches(slots)
        # each batch stacked [k, rows, cols] (a copy: the gradients are read again by logging)
        xs = [b.stack([s.grad for s in slots], math_dtype(b.slots[0].grad)) for b in batches]
        infos = [b.info for b in batches]
        for _ in range(self.iters):
            for batch, x in zip(batches, xs, strict=True):
                x.mul_(math.sqrt(batch.cols) / x.norm(dim=-1, keepdim=True).clamp_min(NORM_EPS))
            col_sq = [x.square().sum(dim=-2) for x in xs]  # [k, cols]: one all-reduce for them all
            all_reduce_sums(col_sq, infos)
            for batch, x, sq in zip(batches, xs, col_sq, strict=True):
                x.mul_((math.sqrt(batch.rows) / sq.sqrt().clamp_min(NORM_EPS)).unsqueeze(-2))
        for batch, x in zip(batches, xs, strict=True):
            self._apply_batch(batch, x, 1.0)
