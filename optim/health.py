"""Cheap per-step health numbers the trainer logs: update RMS, update/weight ratio, orthogonality error.

Local sums are accumulated during a step (only when the optimizer's `track_health` is set) and reduced over
the shard group when asked, so the numbers are global and exact under FSDP2. `health_of` also covers plain
`torch.optim.AdamW`, which knows nothing of this.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from optim.sharded import all_reduce_sum, local, shard_info


@dataclass
class StepHealth:
    """Local sums of one step: [|update|^2, |W|^2, orth_error] (orth_error set on one rank of the job: the
    owner of the probed matrix, see optim.sharded.apply_to_whole_matrices)."""

    sums: Tensor
    numel: int  # global element count of the matrices summed
    group: dist.ProcessGroup | None  # their shard group
    replicate_group: dist.ProcessGroup | None  # HSDP: their replicas (the orth_error may sit in another one)

    def record_orthogonality(self, value: Tensor) -> None:
        self.sums[2] = value


def summarize(health: StepHealth, orthogonality: bool) -> dict[str, float]:
    """Reduce the local sums over the shard group (a collective) and turn them into the reported numbers."""
    sums = all_reduce_sum(health.sums.clone(), health.group)
    if orthogonality:  # recorded by one rank of the job: also sum over the replicas
        sums[2:] = all_reduce_sum(sums[2:].clone(), health.replicate_group)
    update_sq, weight_sq, orth = sums.tolist()
    out = {
        "update_rms": math.sqrt(update_sq / max(health.numel, 1)),
        "update_weight_ratio": math.sqrt(update_sq / weight_sq) if weight_sq > 0 else 0.0,
    }
    if orthogonality:
        out["orth_error"] = orth
    return out


def shard_groups(tensors: list[Tensor]) -> tuple[dist.ProcessGroup | None, dist.ProcessGroup | None]:
    """The (shard group, replicate group) all `tensors` share (health sums are reduced over them), else
    ValueError."""
    groups = [(info.group, info.replicate_group) for info in map(shard_info, tensors)]
    if any(g is not groups[0][0] or r is not groups[0][1] for g, r in groups):
        raise ValueError("health needs all parameters sharded over one process group")
    return groups[0] if groups else (None, None)


def _adamw_health(opt: torch.optim.Optimizer) -> dict[str, float]:
    """The last AdamW update, recomputed from its state: lr * m_hat / (sqrt(v_hat) + eps), all params.

    Exact for the last step (weight decay excluded, as for our optimizers); the ratio uses the weights after
    that step (the ones before are gone). Costs a pass over the state, so call it on logging steps only.
    """
    params = [p for g in opt.param_groups for p in g["params"] if opt.state.get(p)]
    if not params:
        return {}
    sums = torch.zeros(3, dtype=torch.float32, device=local(params[0]).device)
    numel = 0
    for group in opt.param_groups:
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            state = opt.state.get(p)
            if not state:
                continue
            step = float(state["step"])
            m, v = local(state["exp_avg"]).float(), local(state["exp_avg_sq"]).float()
            denom = v.sqrt() / math.sqrt(1 - beta2**step) + group["eps"]
            update = m / denom * (float(group["lr"]) / (1 - beta1**step))
            sums[0] += update.square().sum()
            sums[1] += local(p).float().square().sum()
            numel += p.numel()
    return summarize(StepHealth(sums, numel, *shard_groups(params)), orthogonality=False)


def health_of(opt: torch.optim.Optimizer) -> dict[str, float]:
    """Health numbers of any optimizer the trainer builds: ours (`opt.health()`), torch's AdamW (from its
    state), {} for anything else. Collective under sharding: call it on every rank."""
    if hasattr(opt, "health"):
        return opt.health()
    if isinstance(opt, torch.optim.AdamW):
        return _adamw_health(opt)
    return {}
