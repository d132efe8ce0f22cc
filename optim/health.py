"""Cheap per-step health numbers the trainer logs: update RMS, update/weight ratio, orthogonality error, and the
spectral norm and stable rank of one sampled matrix's update.

The caller asks for them explicitly, around the steps it wants measured:

    with track_health(optimizer) as health:
        optimizer.step()            # any number of steps (update_in_backward: one per parameter)
    numbers = health.report()       # collective under sharding: call it on every rank

Inside the block every step of a matrix optimizer records into a `StepHealth` passed into each of its updates
(outside a block the updates go to `NO_RECORD`, which does nothing). The sums are reduced over the shard group
in `report()`, so the numbers are global and exact under FSDP2. The sampled matrix's update is kept as this
rank's row block until `report()`, which runs a short Lanczos iteration on it (see `update_spectrum`: one
all-reduce of a length-n vector per iteration, over the shard group). AdamW (optim.AdamW, the baseline) records
nothing while it steps: its last update is recomputed from its state. Every report, the DeepSpeed engine's
included, is a `HealthReport`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor

from optim.newton_schulz import orthogonality_error
from optim.sharded import FlatLayout, all_reduce_sum, local, shard_info


class HealthReport(Protocol):
    """What a measured block yields, whichever optimizer and engine measured it: report() is a collective under
    sharding (call it on every rank) and returns {} when nothing was measured."""

    def report(self) -> dict[str, float]: ...


class NoRecord:
    """The record of a step nobody measures: every call does nothing (MatrixOptimizer updates through it)."""

    def add_update(
        self, param: Tensor, weight: Tensor, direction: Tensor, scale: float | Tensor, lr: float
    ) -> None:
        pass

    def settle(self, params: Sequence[Tensor]) -> None:
        pass

    def orthogonality_probe(self, lead: Tensor) -> Callable[[Tensor], None] | None:
        return None


NO_RECORD = NoRecord()


@dataclass
class StepHealth:
    """The record of one measured step, passed into every update the step applies: local sums [|update|^2, |W|^2,
    orth_error] (orth_error set on one rank of the job: the owner of the sampled matrix, see
    optim.sharded.apply_to_whole_matrices), and the sampled matrix's update."""

    sums: Tensor
    numel: int  # global element count of the matrices summed
    group: dist.ProcessGroup | None  # their shard group
    replicate_group: dist.ProcessGroup | None  # HSDP: their replicas (the orth_error may sit in another one)
    orthogonality: bool = False  # whether the rule reports orth_error
    sampled: Tensor | None = None  # the matrix whose update spectrum and orth_error are reported
    # This rank's rows (possibly none) of the sampled matrix's applied update, lr * scale * direction in the math
    # dtype (the first matrix of the first matrix group): update_spectral_norm / update_stable_rank.
    probe_update: Tensor | None = None
    # id(param) -> its [|update|^2, |W|^2], until `settle` adds them in the step's order of matrices (a batched rule
    # applies them by shape; the sums must not depend on that, nor on the chunks)
    pending: dict[int, Tensor] = field(default_factory=dict)

    @classmethod
    def of_partition(
        cls,
        layout: FlatLayout,
        flat: Tensor,
        sampled: Tensor | None,
        sampled_cols: int | None,
        orthogonality: bool,
    ) -> StepHealth:
        """A ZeRO flat partition's step: |W|^2 from this rank's pieces (each element on one rank), the update sums
        from the owners; the sampled matrix's update is whole on its owner (`sampled`: its whole gradient there)
        and zero rows elsewhere (`sampled_cols` set, `sampled` None)."""
        sums = torch.zeros(3, dtype=torch.float32, device=flat.device)
        sums[1] = sum(piece.float().square().sum() for piece in layout.pieces(flat))
        numel = sum(info.shape.numel() for info in layout.infos)
        health = cls(sums, numel, layout.infos[0].group, None, orthogonality, sampled)
        if sampled is None and sampled_cols is not None:
            health.probe_update = torch.zeros(0, sampled_cols, device=flat.device)
        return health

    def add_update(
        self, param: Tensor, weight: Tensor, direction: Tensor, scale: float | Tensor, lr: float
    ) -> None:
        """One matrix's applied update lr * scale * direction (weight decay excluded) and its weight before it."""
        scaled = direction.to(self.sums.dtype) * scale
        self.pending[id(param)] = torch.stack(
            [scaled.square().sum() * lr**2, weight.to(self.sums.dtype).square().sum()]
        )
        if param is self.sampled:  # its rows of the applied update, for the spectrum (report() time)
            self.probe_update = scaled.mul_(lr)

    def settle(self, params: Sequence[Tensor]) -> None:
        """Add the recorded updates to the sums in the order of `params` (the step's matrices)."""
        for param in params:
            if id(param) in self.pending:
                self.sums[:2] += self.pending.pop(id(param))

    def orthogonality_probe(self, lead: Tensor) -> Callable[[Tensor], None] | None:
        """The probe for apply_to_whole_matrices over a chunk led by `lead`: the sampled matrix's orth_error."""
        if not self.orthogonality or lead is not self.sampled:
            return None

        def record(whole: Tensor) -> None:
            self.sums[2] = orthogonality_error(whole)

        return record

    def merge(self, other: StepHealth) -> None:
        """Add another step's sums (update_in_backward: one step per parameter); orth_error is the probed
        matrix's, which only one of the merged steps records. The probed update kept is the latest one."""
        self.sums[:2] += other.sums[:2]
        self.sums[2] += other.sums[2]
        self.numel += other.numel
        self.orthogonality = self.orthogonality or other.orthogonality
        if other.probe_update is not None:
            self.probe_update = other.probe_update

    def report(self) -> dict[str, float]:
        """Reduce the local sums over the shard group (a collective) and turn them into the reported numbers;
        then the probed update's spectrum (collectives over the shard group only: HSDP's replicas hold the same
        rows and compute the same numbers)."""
        sums = all_reduce_sum(self.sums.clone(), self.group)
        if self.orthogonality:  # recorded by one rank of the job: also sum over the replicas
            sums[2:] = all_reduce_sum(sums[2:].clone(), self.replicate_group)
        update_sq, weight_sq, orth = sums.tolist()
        out = health_numbers(update_sq, weight_sq, self.numel, orth if self.orthogonality else None)
        if self.probe_update is not None:
            out.update(update_spectrum(self.probe_update, self.group))
        return out


def health_numbers(
    update_sq: float, weight_sq: float, numel: int, orth: float | None = None
) -> dict[str, float]:
    """The reported numbers from global sums: update RMS, |update|_F / |W|_F, and orth_error when given."""
    out = {
        "update_rms": math.sqrt(update_sq / max(numel, 1)),
        "update_weight_ratio": math.sqrt(update_sq / weight_sq) if weight_sq > 0 else 0.0,
    }
    if orth is not None:
        out["orth_error"] = orth
    return out


SPECTRUM_STEPS = 32
"""Lanczos steps of update_spectrum (fewer when the matrix has fewer columns). Measured on the rules' updates of
Gaussian and low-rank-plus-noise gradients, 64 x 64 to 2048 x 2048: relative error of the spectral norm at most
1e-3 with 32 steps (2e-3 with 24, 6e-3 with 16), where plain power iteration (the same collectives) is up to 5e-2
off after 10 iterations and 8e-3 after 40: orthogonalized updates (Muon, NorMuon, SWAN) have a flat top of
singular values, which power iteration separates slowly and a Krylov space does not need to."""


def update_spectrum(
    block: Tensor, group: dist.ProcessGroup | None, steps: int = SPECTRUM_STEPS
) -> dict[str, float]:
    """update_spectral_norm |U|_2 and update_stable_rank |U|_F^2 / |U|_2^2 of a matrix U sharded by rows.

    block: this rank's rows of U (any number, zero included); group: U's shard group (None: U is whole here).
    Collective: every rank of `group` calls it with its block of the same U, and they make the same calls.

    Lanczos with full reorthogonalization on A = U^T U (n x n), from a start vector drawn from a fixed seed, so
    every rank holds the same length-n vectors throughout: each step is A q = sum over ranks of U_r^T (U_r q),
    one all-reduce of n numbers (the first also carries |U|_F^2), and the rest (orthogonalization, the small
    projected matrix T = Q^T A Q) is identical local work. |U|_2^2 is T's largest eigenvalue, a lower bound that
    converges much faster than power iteration's (SPECTRUM_STEPS). The step count depends on n only, so all
    ranks make the same collectives; when the Krylov space closes (rank U < steps) the remaining steps add
    zeros. Cost: `steps` all-reduces of n floats, 4 * steps * rows * n FLOPs here, a steps x steps eigvalsh.
    An all-zero U gives 0 and 0.
    """
    n, dtype, device = block.shape[1], block.dtype, block.device
    k = min(steps, n)
    start = torch.randn(n, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    basis = torch.zeros(k, n, dtype=dtype, device=device)
    basis[0] = (start / start.norm()).to(device=device, dtype=dtype)
    projected = torch.zeros(k, k, dtype=torch.float64, device=device)  # T = Q^T A Q
    tolerance = math.sqrt(torch.finfo(dtype).eps)  # a residual below this fraction of |A q| closes the space
    frobenius_sq = block.square().sum()
    for j in range(k):
        w = block.T @ (block @ basis[j])
        if j == 0:
            packed = all_reduce_sum(torch.cat([w, frobenius_sq[None]]), group)
            w, frobenius_sq = packed[:n], packed[n]
        else:
            w = all_reduce_sum(w, group)
        applied = w.norm()
        q = basis[: j + 1]
        h = q @ w
        w = w - q.T @ h
        correction = q @ w  # orthogonalize twice ("twice is enough"): Q stays orthonormal in fp32
        w = w - q.T @ correction
        h = (h + correction).double()
        projected[: j + 1, j] = h
        projected[j, : j + 1] = h
        if j + 1 < k:
            beta = w.norm()
            open_ = beta > tolerance * applied
            basis[j + 1] = torch.where(open_, w / beta.clamp_min(torch.finfo(dtype).tiny), 0.0)
            projected[j + 1, j] = projected[j, j + 1] = torch.where(open_, beta.double(), 0.0)
    top = torch.linalg.eigvalsh(projected.cpu())[-1].clamp_min(0.0).item() if k else 0.0
    frobenius_sq = float(frobenius_sq)
    return {
        "update_spectral_norm": math.sqrt(top),
        "update_stable_rank": frobenius_sq / top if top > 0 else 0.0,
    }


def shard_groups(tensors: list[Tensor]) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """The (shard group, replicate group) all `tensors` share (health sums are reduced over them), else
    ValueError."""
    groups = [(info.group, info.replicate_group) for info in map(shard_info, tensors)]
    if any(g is not groups[0][0] or r is not groups[0][1] for g, r in groups):
        raise ValueError("health needs all parameters sharded over one process group")
    return groups[0] if groups else (None, None)


def adamw_update(state: dict, group: dict) -> Tensor:
    """AdamW's last update (float64, local block) recomputed from a parameter's state in `group`:
    lr * m_hat / (sqrt(v_hat) + eps), weight decay excluded (as for our optimizers), the group's current lr."""
    beta1, beta2 = group["betas"]
    step = float(state["step"])
    m, v = local(state["exp_avg"]).double(), local(state["exp_avg_sq"]).double()
    return (
        m / (v.sqrt() / math.sqrt(1 - beta2**step) + group["eps"]) * (float(group["lr"]) / (1 - beta1**step))
    )


def adamw_update_sums(
    weights_and_states: Iterable[tuple[Tensor, dict]], group: dict, device: torch.device
) -> Tensor:
    """[|last update|^2, |W|^2] (float64 on `device`, the weights' device: no host read per parameter) of AdamW's
    last step over (weight, state) pairs of one param group, the update recomputed from the state
    (adamw_update); |W| is the weight after that step (the one before is gone). Also what DeepSpeed's flat ZeRO
    partitions are measured with."""
    sums = torch.zeros(2, dtype=torch.float64, device=device)
    for weight, state in weights_and_states:
        update = adamw_update(state, group)
        sums += torch.stack([update.square().sum(), local(weight).double().square().sum()])
    return sums


class AdamWHealth:
    """AdamW's numbers (optim.AdamW), recomputed from its state on report() (every parameter counts). The update
    spectrum is that of its first 2-D parameter with state, in param-group order (build_optimizer's AdamW:
    model.parameters() order, so a Llama's token embedding; torch's AdamW keeps no names, so it cannot sample
    the matrix optimizers' matrix, layers.0.attention.wq), its update recomputed in float64 (adamw_update)."""

    def __init__(self, optimizer: torch.optim.AdamW):
        self.optimizer = optimizer

    def report(self) -> dict[str, float]:
        opt = self.optimizer
        params = [p for g in opt.param_groups for p in g["params"] if opt.state.get(p)]
        if not params:
            return {}
        device = local(params[0]).device
        sums = sum(
            adamw_update_sums(((p, opt.state[p]) for p in g["params"] if opt.state.get(p)), g, device)
            for g in opt.param_groups
        )
        total = all_reduce_sum(sums, shard_groups(params)[0])
        out = health_numbers(*total.tolist(), sum(p.numel() for p in params))
        probe = next(
            ((p, g) for g in opt.param_groups for p in g["params"] if p.ndim == 2 and opt.state.get(p)), None
        )
        if probe is not None:
            p, group = probe
            out.update(update_spectrum(adamw_update(opt.state[p], group), shard_info(p).group))
        return out


class HealthTracker:
    """A MatrixOptimizer's steps inside one `track_health` block, merged (see StepHealth.merge)."""

    def __init__(self) -> None:
        self.health: StepHealth | None = None

    def add(self, step: StepHealth) -> None:
        if self.health is None:
            self.health = step
        else:
            self.health.merge(step)

    def report(self) -> dict[str, float]:
        return self.health.report() if self.health is not None else {}


class NoHealth:
    """What an untracked step reports: nothing (and no collective)."""

    def report(self) -> dict[str, float]:
        return {}


@contextmanager
def track_health(optimizer: torch.optim.Optimizer, enabled: bool = True) -> Iterator[HealthReport]:
    """Measure the steps taken inside the block (see the module docstring); `enabled=False`: measure nothing.
    Every optimizer of this package measures itself (`tracking_health()`); another is a TypeError."""
    if not enabled:
        yield NoHealth()
        return
    try:
        tracking = optimizer.tracking_health
    except AttributeError:
        raise TypeError(
            f"{type(optimizer).__name__} reports no health numbers: build it with optim.build_optimizer "
            "(AdamW: optim.AdamW)"
        ) from None
    with tracking() as report:
        yield report
