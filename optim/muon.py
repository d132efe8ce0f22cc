"""Muon (Keller Jordan's reference): momentum, then Newton-Schulz orthogonalization of the update."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from optim.base import MatrixOptimizer, MatrixSlot
from optim.options import MOMENTUM, NESTEROV, NEWTON_SCHULZ, NS5_POLYNOMIALS


class Muon(MatrixOptimizer):
    """M <- mu M + (1-mu) G; U = (1-mu) G + mu M (nesterov) or M; O = NS5(U);
    W <- W (1 - lr wd) - lr sqrt(max(1, m/n)) O.  Unlike the reference, p.grad is never overwritten.

    Args:
        params: 2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW.
        lr: 0.02. momentum: mu, 0.95. nesterov: True. weight_decay: 0.0 (decoupled).
        ns_steps: Newton-Schulz iterations, 5. ns_dtype: "bfloat16" ("float32" for exactness).
        comm_dtype: dtype of row shards on the wire under FSDP2; None = ns_dtype (then sharded == unsharded).
        ns_coefficients: "keller" (Keller Jordan's fixed polynomial) or "polar_express" (per-iteration ones).
        ns_form: "standard" or "gram" (NS5 on the p x p Gram matrix where that is cheaper: q >= 1.5 p at 5 steps).
    ns_steps, ns_dtype and comm_dtype are optimizer-wide (all matrices are orthogonalized in one batch).
    """

    algorithm = "muon"
    reports_orthogonality = True
    options = (MOMENTUM, NESTEROV, *NEWTON_SCHULZ, *NS5_POLYNOMIALS)

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
        for slot, o in zip(slots, ortho, strict=True):
            self._apply_update(slot, o, math.sqrt(max(1.0, slot.rows / slot.cols)))
