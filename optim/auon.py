"""AuON (Maity 2025) and Hybrid-AuON: momentum, then a cosh-RMS normalization of the update.

Two variants (optimizer-wide): "paper", the spec's rule (a unit-Frobenius direction X, r from cosh(X), Muon's
shape factor), and "reference_code", the authors' newest code (ryyzn9/AuON @bba2e82, auon/optimizer.py): the
unnormalized direction D (AuON: the momentum input U; Hybrid: NS_5(U)) divided by
r = sqrt(mean(cosh(1.5 D / |D|_F)^2)), no shape factor.

AuON needs no whole matrix (two scalar all-reduces per matrix under FSDP2, batched over the step's matrices);
Hybrid-AuON first applies k Newton-Schulz steps to the whole matrix.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor

from optim.base import MatrixOptimizer
from optim.batches import Batch, same_shape_batches
from optim.newton_schulz import NS5_EPS
from optim.options import MOMENTUM, NESTEROV, NEWTON_SCHULZ, VARIANT
from optim.sharded import MatrixSlot, all_reduce_sums

COSH_EPS = 1e-8
COSH_GAMMA = 1.5  # reference_code: the cosh's argument is gamma X / (|X|_F + 1e-7) (the code's `gamma`)
DEFAULT_LR = {"paper": 0.24, "reference_code": 0.08}
DEFAULT_NS = {"paper": (1, "bfloat16"), "reference_code": (5, "float32")}  # HybridAuON: ns_steps, ns_dtype


class AuON(MatrixOptimizer):
    """M <- mu M + (1-mu) G; U = (1-mu) G + mu M (nesterov) or M; then, by variant:

    "paper": X = U / (|U|_F + 1e-7); r = sqrt(mean(cosh(X)^2));
        W <- W (1 - lr wd) - lr sqrt(max(1, m/n)) X / (r + 1e-8).
    "reference_code" (the authors' newest code): r = sqrt(mean(cosh(1.5 U / (|U|_F + 1e-7))^2));
        W <- W (1 - lr wd) - lr U / (r + 1e-8), no shape factor. r is about 1, so this is close to SGD with
        Nesterov momentum: the update's scale follows the gradient's.
    Means and norms are over the whole matrix (scalar all-reduces under FSDP2). An all-zero gradient gives a
    zero update (X = 0, r = 1).

    Args: params (2-D matrices, or param groups; groups with algorithm="adamw" are stepped by AdamW), lr,
    momentum (mu), nesterov, weight_decay (decoupled), variant (optimizer-wide). Defaults and their provenance:
    optim.reference.options_table(AuON), docs/optimizers.md.
    """

    algorithm = "auon"
    options = (VARIANT, MOMENTUM, NESTEROV)
    dependent_defaults = {"lr": ("variant", DEFAULT_LR)}
    provenance = {
        "lr": "paper: the authors' first script (ryyzn9/AuON @c87b862; the paper's LM run used 0.055); "
        "reference_code: the released code's config (@bba2e82)",
        "momentum": "the paper (as in Muon)",
        "nesterov": "the paper (as in Muon); the authors' code is always Nesterov",
        "variant": "project (both forms offered)",
    }

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        variant: str = "paper",
    ) -> None:
        self.check_arguments(variant=variant, momentum=momentum, nesterov=nesterov)
        self.variant = variant
        defaults = {
            "lr": DEFAULT_LR[variant] if lr is None else lr,
            "momentum": momentum,
            "nesterov": nesterov,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    def _directions(
        self, slots: list[MatrixSlot], inputs: list[Tensor], batches: list[Batch]
    ) -> list[Tensor]:
        """The direction D that the cosh-RMS scaling divides, stacked per batch: paper X = U / (|U|_F + 1e-7);
        reference U."""
        stacks = [batch.stack(inputs) for batch in batches]
        if self.variant != "paper":
            return stacks
        norms = self._frobenius_norms(batches, stacks)
        return [u / (n + NS5_EPS).view(-1, 1, 1) for u, n in zip(stacks, norms, strict=True)]

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        inputs = self._momentum_inputs(slots, [s.group["nesterov"] for s in slots])
        batches = same_shape_batches(slots)
        self._cosh_rms_update(batches, self._directions(slots, inputs, batches))

    @staticmethod
    def _frobenius_norms(batches: list[Batch], stacks: list[Tensor]) -> list[Tensor]:
        """|X|_F of each whole matrix, [k] per batch (one all-reduce of the squared sums)."""
        sq = [x.square().sum(dim=(1, 2)) for x in stacks]
        all_reduce_sums(sq, [b.info for b in batches])
        return [s.sqrt() for s in sq]

    def _cosh_rms_update(self, batches: list[Batch], directions: list[Tensor]) -> None:
        """W update along D / (r + 1e-8), r = sqrt(mean(cosh(A)^2)) with the mean over the whole matrix (one
        all-reduce). paper: A = D, times sqrt(max(1, m/n)); reference_code: A = 1.5 D / (|D|_F + 1e-7) (one
        more all-reduce, for the norms), no shape factor."""
        if self.variant == "paper":
            cosh_sq = [d.cosh().square().sum(dim=(1, 2)) for d in directions]
        else:
            norms = self._frobenius_norms(batches, directions)
            cosh_sq = [
                (d / (n + NS5_EPS).view(-1, 1, 1) * COSH_GAMMA).cosh().square().sum(dim=(1, 2))
                for d, n in zip(directions, norms, strict=True)
            ]
        all_reduce_sums(cosh_sq, [b.info for b in batches])
        for batch, d, c in zip(batches, directions, cosh_sq, strict=True):
            r = (c / (batch.rows * batch.cols)).sqrt()
            factor = math.sqrt(max(1.0, batch.rows / batch.cols)) if self.variant == "paper" else 1.0
            self._apply_batch(batch, d, factor / (r + COSH_EPS))


class HybridAuON(AuON):
    """AuON with X = NS_k(U) (k Newton-Schulz steps of NS5's polynomial, whole matrix) as the direction:

    "paper": r = sqrt(mean(cosh(X)^2)); W <- W (1 - lr wd) - lr sqrt(max(1, m/n)) X / (r + 1e-8).
    "reference_code": r = sqrt(mean(cosh(1.5 X / (|X|_F + 1e-7))^2)); W <- W (1 - lr wd) - lr X / (r + 1e-8)
        (the authors' code applies AuON's brake to the NS output, Frobenius normalization and 1.5 included).

    Args: those of AuON, plus ns_steps (k), ns_dtype, comm_dtype (wire dtype under FSDP2), all optimizer-wide.
    Defaults and their provenance: optim.reference.options_table(HybridAuON), docs/optimizers.md.
    """

    algorithm = "hybrid_auon"
    reports_orthogonality = True
    options = (*AuON.options, *NEWTON_SCHULZ)
    dependent_defaults = {
        **AuON.dependent_defaults,
        "ns_steps": ("variant", {variant: steps for variant, (steps, _) in DEFAULT_NS.items()}),
        "ns_dtype": ("variant", {variant: dtype for variant, (_, dtype) in DEFAULT_NS.items()}),
    }
    provenance = {
        **AuON.provenance,
        "ns_steps": "paper: the paper's k = 1; reference_code: the released code's 5",
        "ns_dtype": "paper: project; reference_code: the released code (NS in the parameters' fp32)",
    }

    def __init__(
        self,
        params: Iterable,
        lr: float | None = None,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        variant: str = "paper",
        ns_steps: int | None = None,
        ns_dtype: str | torch.dtype | None = None,
        comm_dtype: str | torch.dtype | None = None,
    ) -> None:
        self.check_arguments(variant=variant, ns_steps=ns_steps, ns_dtype=ns_dtype, comm_dtype=comm_dtype)
        steps, dtype = DEFAULT_NS[variant]
        self._configure_newton_schulz(
            steps if ns_steps is None else ns_steps, dtype if ns_dtype is None else ns_dtype, comm_dtype
        )
        super().__init__(
            params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay, variant=variant
        )

    def _directions(
        self, slots: list[MatrixSlot], inputs: list[Tensor], batches: list[Batch]
    ) -> list[Tensor]:
        ortho = self._on_whole_matrices(slots, inputs)
        return [batch.stack(ortho) for batch in batches]
