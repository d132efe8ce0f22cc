"""SWAN (SGD with Whitening And Normalization, Ma et al. 2024): stateless GradNorm + GradWhitening."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from optim.base import MatrixOptimizer
from optim.batches import same_shape_batches, scatter
from optim.newton_schulz import (
    coupled_adaptive,
    coupled_flops,
    coupled_inverse_sqrt_polar,
    newton_schulz5,
    ns5_flops,
)
from optim.options import NEWTON_SCHULZ, Option
from optim.sharded import MatrixSlot, math_dtype

# whitening -> (the whole-matrix function, its FLOPs per matrix, default steps, default dtype)
WHITENING = {
    "coupled": (coupled_inverse_sqrt_polar, coupled_flops, 10, torch.float32),
    "coupled_adaptive": (coupled_adaptive, coupled_flops, 10, torch.float32),
    "ns5": (newton_schulz5, ns5_flops, 5, torch.bfloat16),
}
WHITENINGS = tuple(WHITENING)


class SWAN(MatrixOptimizer):
    """1. GradNorm (row-local): G~ = (G - mean_row G) / (std_row G + eps), population std over the n columns.
    2. GradWhitening (whole matrix): D = (G~ G~^T)^{-1/2} G~ by the coupled Newton-Schulz inverse-sqrt
       iteration (whitening="coupled"), the same iteration with an eigenvalue-scaled start and a stop at
       convergence (whitening="coupled_adaptive", optim.newton_schulz.coupled_adaptive), or D = NS5(G~)
       (whitening="ns5").
    3. W <- W (1 - lr wd) - lr sqrt(max(m, n)) D  (per-element update RMS 1). No state at all.

    Args: params (2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW), lr, eps
    (GradNorm's), weight_decay (decoupled), whitening, ns_steps (coupled_adaptive: at most), ns_dtype, comm_dtype
    (row shards on the wire under FSDP2). whitening, ns_steps, ns_dtype and comm_dtype are optimizer-wide.
    Defaults and their provenance: optim.reference.options_table(SWAN), docs/optimizers.md.
    """

    algorithm = "swan"
    reports_orthogonality = True
    options = (Option("whitening", "whitening", choices=WHITENINGS), *NEWTON_SCHULZ)
    dependent_defaults = {
        "ns_steps": ("whitening", {name: steps for name, (_, _, steps, _) in WHITENING.items()}),
        "ns_dtype": ("whitening", {name: dtype for name, (_, _, _, dtype) in WHITENING.items()}),
    }
    provenance = {
        "lr": "third-party convention for the GaLore setting (0.02 x alpha 0.05), not a paper value",
        "weight_decay": "project addition (the paper has none)",
        "whitening": "coupled: the paper's GradWhitening by the coupled iteration; the others: project",
    }

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        whitening: str = "coupled",
        ns_steps: int | None = None,
        ns_dtype: str | torch.dtype | None = None,
        comm_dtype: str | torch.dtype | None = None,
    ) -> None:
        self.check_arguments(whitening=whitening, ns_steps=ns_steps, ns_dtype=ns_dtype, comm_dtype=comm_dtype)
        self.whitening = whitening
        _, _, steps, dtype = WHITENING[whitening]
        self._configure_newton_schulz(
            ns_steps if ns_steps is not None else steps,
            ns_dtype if ns_dtype is not None else dtype,
            comm_dtype,
        )
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def owner_cost(self, m: int, n: int) -> float:
        return WHITENING[self.whitening][1](m, n, self.ns_steps)

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        batches = same_shape_batches(slots)
        normalized = []
        for batch in batches:
            grads = batch.stack([s.grad for s in slots], math_dtype(batch.slots[0].grad))
            centered = grads - grads.mean(dim=-1, keepdim=True)
            # population std, written out: torch.std warns on a rank's empty (0-row) block
            std = centered.square().mean(dim=-1, keepdim=True).sqrt()
            normalized.append(centered / (std + batch.group["eps"]))
        whiten, cost, _, _ = WHITENING[self.whitening]
        whitened = self._on_whole_matrices(slots, scatter(batches, normalized, len(slots)), whiten, cost)
        for batch in batches:
            self._apply_batch(batch, batch.pick(whitened), math.sqrt(max(batch.rows, batch.cols)))
