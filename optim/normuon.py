"""NorMuon (neuron-wise normalized Muon, Li et al. 2025): Muon's orthogonalized update, then a per-row
(per-neuron) second-moment normalization."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from optim.base import MatrixOptimizer, guarded_ratio
from optim.batches import same_shape_batches
from optim.options import MOMENTUM, NEWTON_SCHULZ, NS5_POLYNOMIALS, VARIANT
from optim.sharded import MatrixSlot, all_reduce_sums, local, zeros_rows_like

DEFAULT_LR = {"paper": 1e-3, "reference_code": 0.02}


class NorMuon(MatrixOptimizer):
    """State: momentum M (m x n) and per-row second moment v (m), both fp32.

    variant="paper": M <- b1 M + (1-b1) G; O = NS5(M); v <- b2 v + (1-b2) mean_row(O*O);
        O^ = O / (sqrt(v) + eps); W <- W (1 - lr wd) - lr 0.2 sqrt(m n) / |O^|_F O^   (update RMS 0.2 lr,
        the lr is AdamW's).
    variant="reference_code": Nesterov input (1-b1) G + b1 M as in Muon; after the division by sqrt(v) + eps
        the Frobenius norm of O is restored, then the update is scaled by sqrt(max(1, m/n)) like Muon.
    Every division is guarded: an all-zero gradient gives a zero update. Under FSDP2 v is exact on row shards
    and the Frobenius norms are one all-reduce for all matrices of the step.

    Args: params (2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW), lr,
    momentum (b1), beta2 (b2), eps, weight_decay (decoupled), variant, ns_steps, ns_dtype, comm_dtype (wire dtype
    under FSDP2), ns_coefficients (optim.newton_schulz), ns_form (NS5 on the Gram matrix where that is cheaper).
    variant and the Newton-Schulz settings are optimizer-wide. Defaults and their provenance:
    optim.reference.options_table(NorMuon), docs/optimizers.md.
    """

    algorithm = "normuon"
    reports_orthogonality = True
    options = (VARIANT, MOMENTUM, *NEWTON_SCHULZ, *NS5_POLYNOMIALS)
    dependent_defaults = {"lr": ("variant", DEFAULT_LR)}
    provenance = {
        "lr": "paper: project (AdamW-sized: the update RMS is 0.2 lr); reference_code: the authors' code",
        "momentum": "paper",
        "beta2": "paper",
        "eps": "paper variant; the released code uses 1e-10",
        "variant": "project (both forms offered)",
        "ns_steps": "Muon's",
        "ns_dtype": "Muon's",
        "ns_coefficients": "keller: Muon's; polar_express: Amsel et al. 2025",
    }

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        momentum: float = 0.95,
        beta2: float = 0.95,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        variant: str = "paper",
        ns_steps: int = 5,
        ns_dtype: str | torch.dtype = "bfloat16",
        comm_dtype: str | torch.dtype | None = None,
        ns_coefficients: str = "keller",
        ns_form: str = "standard",
    ) -> None:
        self.check_arguments(
            variant=variant,
            momentum=momentum,
            ns_steps=ns_steps,
            ns_dtype=ns_dtype,
            comm_dtype=comm_dtype,
            ns_coefficients=ns_coefficients,
            ns_form=ns_form,
        )
        self.variant = variant
        self._configure_newton_schulz(ns_steps, ns_dtype, comm_dtype, ns_coefficients, ns_form)
        defaults = {
            "lr": DEFAULT_LR[variant] if lr is None else lr,
            "momentum": momentum,
            "beta2": beta2,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        reference = self.variant == "reference_code"
        inputs = self._momentum_inputs(slots, [reference] * len(slots))  # b1 is the group's momentum
        ortho = self._on_whole_matrices(slots, inputs)
        batches = same_shape_batches(slots)
        normalized, norms_sq = [], []
        for batch in batches:
            o = batch.stack(ortho)
            for slot in batch.slots:
                if "second_moment" not in slot.state:
                    slot.state["second_moment"] = zeros_rows_like(slot.param)
            v = [local(slot.state["second_moment"]) for slot in batch.slots]
            torch._foreach_lerp_(v, list(o.square().mean(dim=-1).unbind(0)), 1 - batch.group["beta2"])
            o_hat = o / (torch.stack(v).sqrt() + batch.group["eps"]).unsqueeze(-1)
            normalized.append(o_hat)
            norms_sq.append(torch.stack([o_hat.square().sum(dim=(1, 2)), o.square().sum(dim=(1, 2))], dim=1))
        all_reduce_sums(norms_sq, [b.info for b in batches])  # [k, 2] per batch: one all-reduce
        for batch, o_hat, sq in zip(batches, normalized, norms_sq, strict=True):
            o_hat_norm, o_norm = sq.sqrt().unbind(1)
            if reference:
                scale = guarded_ratio(o_norm, o_hat_norm) * math.sqrt(max(1.0, batch.rows / batch.cols))
            else:
                scale = guarded_ratio(0.2 * math.sqrt(batch.rows * batch.cols), o_hat_norm)
            self._apply_batch(batch, o_hat, scale)
