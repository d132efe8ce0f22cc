"""Cheap per-step health numbers the trainer logs: update RMS, update/weight ratio, orthogonality error.

The caller asks for them explicitly, around the steps it wants measured:

    with track_health(optimizer) as health:
        optimizer.step()            # any number of steps (update_in_backward: one per parameter)
    numbers = health.report()       # collective under sharding: call it on every rank

Inside the block every step adds its local sums to `health`; nothing is computed outside one. The sums are
reduced over the shard group in `report()`, so the numbers are global and exact under FSDP2. Plain
`torch.optim.AdamW` (the baseline) knows nothing of this: its last update is recomputed from its state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from optim.sharded import all_reduce_sum, local, shard_info


@dataclass
class StepHealth:
    """Local sums of the measured steps: [|update|^2, |W|^2, orth_error] (orth_error set on one rank of the job:
    the owner of the probed matrix, see optim.sharded.apply_to_whole_matrices)."""

    sums: Tensor
    numel: int  # global element count of the matrices summed
    group: dist.ProcessGroup | None  # their shard group
    replicate_group: dist.ProcessGroup | None  # HSDP: their replicas (the orth_error may sit in another one)
    orthogonality: bool = False  # whether the rule reports orth_error

    def record_orthogonality(self, value: Tensor) -> None:
        self.sums[2] = value

    def merge(self, other: StepHealth) -> None:
        """Add another step's sums (update_in_backward: one step per parameter); orth_error is the probed
        matrix's, which only one of the merged steps records."""
        self.sums[:2] += other.sums[:2]
        self.sums[2] += other.sums[2]
        self.numel += other.numel
        self.orthogonality = self.orthogonality or other.orthogonality

    def report(self) -> dict[str, float]:
        """Reduce the local sums over the shard group (a collective) and turn them into the reported numbers."""
        sums = all_reduce_sum(self.sums.clone(), self.group)
        if self.orthogonality:  # recorded by one rank of the job: also sum over the replicas
            sums[2:] = all_reduce_sum(sums[2:].clone(), self.replicate_group)
        update_sq, weight_sq, orth = sums.tolist()
        return health_numbers(update_sq, weight_sq, self.numel, orth if self.orthogonality else None)


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


def shard_groups(tensors: list[Tensor]) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """The (shard group, replicate group) all `tensors` share (health sums are reduced over them), else
    ValueError."""
    groups = [(info.group, info.replicate_group) for info in map(shard_info, tensors)]
    if any(g is not groups[0][0] or r is not groups[0][1] for g, r in groups):
        raise ValueError("health needs all parameters sharded over one process group")
    return groups[0] if groups else (None, None)


def adamw_update_sums(weights_and_states: Iterable[tuple[Tensor, dict]], group: dict) -> Tensor:
    """[|last update|^2, |W|^2] (float64, local blocks) of AdamW's last step over (weight, state) pairs of one
    param group, the update recomputed from the state: lr * m_hat / (sqrt(v_hat) + eps), weight decay excluded
    (as for our optimizers); |W| is the weight after that step (the one before is gone). Also what DeepSpeed's
    flat ZeRO partitions are measured with."""
    beta1, beta2 = group["betas"]
    sums = torch.zeros(2, dtype=torch.float64)
    for weight, state in weights_and_states:
        step = float(state["step"])
        m, v = local(state["exp_avg"]).double(), local(state["exp_avg_sq"]).double()
        update = (
            m
            / (v.sqrt() / math.sqrt(1 - beta2**step) + group["eps"])
            * (float(group["lr"]) / (1 - beta1**step))
        )
        sums += torch.stack([update.square().sum(), local(weight).double().square().sum()]).cpu()
    return sums


class AdamWHealth:
    """torch.optim.AdamW's numbers, recomputed from its state on report() (every parameter counts)."""

    def __init__(self, optimizer: torch.optim.AdamW):
        self.optimizer = optimizer

    def report(self) -> dict[str, float]:
        opt = self.optimizer
        params = [p for g in opt.param_groups for p in g["params"] if opt.state.get(p)]
        if not params:
            return {}
        sums = sum(
            adamw_update_sums(((p, opt.state[p]) for p in g["params"] if opt.state.get(p)), g)
            for g in opt.param_groups
        )
        device = local(params[0]).device
        total = all_reduce_sum(sums.to(device), shard_groups(params)[0])
        return health_numbers(*total.tolist(), sum(p.numel() for p in params))


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
    """Measure the steps taken inside the block (see the module docstring); `enabled=False`: measure nothing."""
    from optim.base import MatrixOptimizer  # (optim.base builds on this module)

    if enabled and isinstance(optimizer, MatrixOptimizer):  # its steps add their sums to its tracker
        with optimizer.tracking_health() as tracker:
            yield tracker
    elif enabled and isinstance(optimizer, torch.optim.AdamW):
        yield AdamWHealth(optimizer)
    else:  # not measured, or an optimizer that reports nothing
        yield NoHealth()


HealthReport = HealthTracker | AdamWHealth | NoHealth
