"""SWAN (SGD with Whitening And Normalization, Ma et al. 2024): stateless GradNorm + GradWhitening."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from optim.base import MatrixOptimizer, MatrixSlot, check_choice
from optim.newton_schulz import coupled_flops, coupled_inverse_sqrt_polar, newton_schulz5, ns5_flops

WHITENINGS = ("coupled", "ns5")


class SWAN(MatrixOptimizer):
    """1. GradNorm (row-local): G~ = (G - mean_row G) / (std_row G + eps), population std over the n columns.
    2. GradWhitening (whole matrix): D = (G~ G~^T)^{-1/2} G~ by the coupled Newton-Schulz inverse-sqrt
       iteration (whitening="coupled") or D = NS5(G~) (whitening="ns5").
    3. W <- W (1 - lr wd) - lr sqrt(max(m, n)) D  (per-element update RMS 1). No state at all.

    Args:
        params: 2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW.
        lr: 1e-3 (the papers' 0.02 times alpha 0.05). eps: GradNorm's, 1e-8.
        weight_decay: 0.0 (decoupled; an addition to the papers, which has none).
        whitening: "coupled" (default) | "ns5".
        ns_steps: None = 10 for coupled, 5 for ns5. ns_dtype: None = "float32" for coupled, "bfloat16" for ns5.
        comm_dtype: dtype of row shards on the wire under FSDP2; None = ns_dtype.
    whitening, ns_steps, ns_dtype and comm_dtype are optimizer-wide.
    """

    algorithm = "swan"
    reports_orthogonality = True

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
        self.whitening = check_choice(whitening, WHITENINGS, "SWAN whitening")
        coupled = whitening == "coupled"
        self._configure_newton_schulz(
            ns_steps if ns_steps is not None else (10 if coupled else 5),
            ns_dtype if ns_dtype is not None else (torch.float32 if coupled else torch.bfloat16),
            comm_dtype,
        )
        super().__init__(params, {"lr": lr, "eps": eps, "weight_decay": weight_decay})

    def _owner_cost(self, m: int, n: int) -> float:
        cost = coupled_flops if self.whitening == "coupled" else ns5_flops
        return cost(m, n, self.ns_steps)

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        normalized = []
        for slot in slots:
            grad = slot.grad.float()
            centered = grad - grad.mean(dim=1, keepdim=True)
            # population std, written out: torch.std warns on a rank's empty (0-row) block
            std = centered.square().mean(dim=1, keepdim=True).sqrt()
            normalized.append(centered / (std + slot.group["eps"]))
        coupled = self.whitening == "coupled"
        whiten = coupled_inverse_sqrt_polar if coupled else newton_schulz5
        cost = coupled_flops if coupled else ns5_flops
        whitened = self._on_whole_matrices(slots, normalized, whiten, cost)
        for slot, d in zip(slots, whitened, strict=True):
            self._apply_update(slot, d, math.sqrt(max(slot.rows, slot.cols)))
