"""Muon (Keller Jordan's reference): momentum, then Newton-Schulz orthogonalization of the update."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from optim.base import MatrixOptimizer
from optim.batches import same_shape_batches
from optim.options import MOMENTUM, NESTEROV, NEWTON_SCHULZ, NS5_POLYNOMIALS
from optim.sharded import MatrixSlot


class Muon(MatrixOptimizer):
    """M <- mu M + (1-mu) G; U = (1-mu) G + mu M (nesterov) or M; O = NS5(U);
    W <- W (1 - lr wd) - lr sqrt(max(1, m/n)) O.  Unlike the reference, p.grad is never overwritten.

    Args: params (2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW), lr,
    momentum (mu), nesterov, weight_decay (decoupled), ns_steps, ns_dtype, comm_dtype (row shards on the wire under
    FSDP2; unset, sharded equals unsharded), ns_coefficients (Keller Jordan's fixed polynomial or Polar Express's
    per-iteration ones), ns_form (NS5 on the p x p Gram matrix where that is cheaper: q >= 1.5 p at 5 steps).
    The Newton-Schulz settings are optimizer-wide. Defaults and their provenance: optim.reference.options_table(Muon).
    """

    algorithm = "muon"
    reports_orthogonality = True
    options = (MOMENTUM, NESTEROV, *NEWTON_SCHULZ, *NS5_POLYNOMIALS)
    provenance = {
        **{
            arg: "Keller Jordan's reference Muon"
            for arg in ("lr", "momentum", "nesterov", "ns_steps", "ns_dtype")
        },
        "ns_coefficients": "keller: Keller Jordan's reference Muon; polar_express: Amsel et al. 2025",
        "ns_form": "standard: Keller Jordan's reference Muon; gram: project",
    }

    def __init__(
        self,
        params: Iterable,
        lr: float = 0.02,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        ns_steps: int = 5,
        ns_dtype: str | torch.dtype = "bfloat16",
        comm_dtype: str | torch.dtype | None = None,
        ns_coefficients: str = "keller",
        ns_form: str = "standard",
    ) -> None:
        self.check_arguments(
            momentum=momentum,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            comm_dtype=comm_dtype,
            ns_coefficients=ns_coefficients,
            ns_form=ns_form,
        )
        self._configure_newton_schulz(ns_steps, ns_dtype, comm_dtype, ns_coefficients, ns_form)
        defaults = {"lr": lr, "momentum": momentum, "nesterov": nesterov, "weight_decay": weight_decay}
        super().__init__(params, defaults)

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        inputs = self._momentum_inputs(slots, [s.group["nesterov"] for s in slots])
        ortho = self._on_whole_matrices(slots, inputs)
        for batch in same_shape_batches(slots):
            self._apply_batch(batch, batch.pick(ortho), math.sqrt(max(1.0, batch.rows / batch.cols)))
