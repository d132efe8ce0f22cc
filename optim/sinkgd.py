"""SinkGD (gradient multi-normalization, Scetbon et al. 2025): stateless alternating row/column scaling."""

from __future__ import annotations

import math
from collections.abc import Iterable

from optim.base import MatrixOptimizer
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
        xs = [s.grad.to(math_dtype(s.grad), copy=True) for s in slots]
        infos = [s.info for s in slots]
        for _ in range(self.iters):
            for slot, x in zip(slots, xs, strict=True):
                x.mul_(math.sqrt(slot.cols) / x.norm(dim=1, keepdim=True).clamp_min(NORM_EPS))
            col_sq = [x.square().sum(dim=0) for x in xs]
            all_reduce_sums(col_sq, infos)
            for slot, x, sq in zip(slots, xs, col_sq, strict=True):
                x.mul_(math.sqrt(slot.rows) / sq.sqrt().clamp_min(NORM_EPS))
        for slot, x in zip(slots, xs, strict=True):
            self._apply_update(slot, x, 1.0)
