"""AuON (Maity 2025) and Hybrid-AuON: momentum, then a cosh-RMS normalization of the update.

AuON needs no whole matrix (two scalar all-reduces per matrix under FSDP2, batched over the step's matrices);
Hybrid-AuON first applies k Newton-Schulz steps to the whole matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from optim.base import MatrixOptimizer, MatrixSlot
from optim.newton_schulz import NS5_EPS
from optim.sharded import all_reduce_sums

COSH_EPS = 1e-8


class AuON(MatrixOptimizer):
    """M <- mu M + (1-mu) G; U = (1-mu) G + mu M (nesterov) or M; X = U / (|U|_F + 1e-7);
    r = sqrt(mean(cosh(X)^2)); D = X / (r + 1e-8); W <- W (1 - lr wd) - lr sqrt(max(1, m/n)) D.

    Args:
        params: 2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW.
        lr: 0.24 (the authors' config). momentum: mu, 0.95. nesterov: True ("as in Muon").
        weight_decay: 0.0 (decoupled).
    """

    algorithm = "auon"

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.24,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
    ) -> None:
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _directions(self, slots: list[MatrixSlot], inputs: list[Tensor]) -> list[Tensor]:
        """X = U / (|U|_F + 1e-7), the Frobenius norm over the whole matrix (one all-reduce)."""
        sq = [u.square().sum() for u in inputs]
        all_reduce_sums(sq, [s.info for s in slots])
        return [u / (s.sqrt() + NS5_EPS) for u, s in zip(inputs, sq, strict=True)]

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        inputs = self._momentum_inputs(slots, [s.group["nesterov"] for s in slots])
        self._cosh_rms_update(slots, self._directions(slots, inputs))

    def _cosh_rms_update(self, slots: list[MatrixSlot], xs: list[Tensor]) -> None:
        """D = X / (sqrt(mean(cosh(X)^2)) + 1e-8) with the mean over the whole matrix (one all-reduce)."""
        cosh_sq = [x.cosh().square().sum() for x in xs]
        all_reduce_sums(cosh_sq, [s.info for s in slots])
        for slot, x, c in zip(slots, xs, cosh_sq, strict=True):
            r = (c / (slot.rows * slot.cols)).sqrt()
            self._apply_update(slot, x, math.sqrt(max(1.0, slot.rows / slot.cols)) / (r + COSH_EPS))


class HybridAuON(AuON):
    """AuON with X = NS_k(U) (k Newton-Schulz steps of NS5's polynomial, whole matrix) instead of U / |U|_F,
    then the same cosh-RMS scaling and update.

    Args: those of AuON, plus ns_steps: k, 1 (the paper; the released code uses 5);
        ns_dtype: "bfloat16"; comm_dtype: wire dtype under FSDP2, None = ns_dtype (optimizer-wide).
    """

    algorithm = "hybrid_auon"
    reports_orthogonality = True

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.24,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 1,
        ns_dtype: str | torch.dtype = "bfloat16",
        comm_dtype: str | torch.dtype | None = None,
    ) -> None:
        self._configure_newton_schulz(ns_steps, ns_dtype, comm_dtype)
        super().__init__(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)

    def _directions(self, slots: list[MatrixSlot], inputs: list[Tensor]) -> list[Tensor]:
        return self._on_whole_matrices(slots, inputs)
