"""The pre-flight memory check: before a model is built, refuse a run whose planned peak cannot fit.

Why: a run that cannot fit otherwise starts, allocates for minutes (CPU) or dies at the first step (GPU) with an
out-of-memory that names nothing. The planner (planner.py) predicts one rank's peak on the meta device in about
a second; it is compared with what this rank can have: the GPU's total memory, or on CPU the memory the kernel
reports available shared by this node's ranks. The limit is the smallest over ranks, so every rank decides the
same. `train.allow_oversubscribe=true` starts anyway (the planner is an estimate).
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from trainer.config import ConfigError
from trainer.distributed import DistInfo
from trainer.memory.planner import GiB, MemoryPlan, plan_run
from trainer.memory.tracker import proc_bytes
from trainer.resolve import Run


def available_cpu_bytes() -> int:
    """MemAvailable of /proc/meminfo (what can be allocated without swapping), else total RAM."""
    available = proc_bytes("/proc/meminfo", "MemAvailable")
    return available if available is not None else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def device_limit(device: torch.device, world_size: int) -> int:
    """Bytes one rank may use: the GPU's memory, or on CPU the available RAM / ranks on this node."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    return available_cpu_bytes() // max(local_ranks, 1)


def largest_term(plan: MemoryPlan, run: Run) -> tuple[str, int]:
    """The plan's biggest component that applies to this run (one of the two activation rows)."""
    skipped = {
        "forward/backward peak of activations, grads, temps",
        "activations without checkpointing" if run.checkpointing else "activations with checkpointing",
    }
    return max(((n, b) for n, b in plan.rows if n not in skipped), key=lambda row: row[1])


def check_memory_fits(run: Run, dist_info: DistInfo) -> None:
    """ConfigError (one line: the peak, the limit, the largest term) when the plan exceeds the device."""
    if run.cfg.train.allow_oversubscribe:
        return
    plan = plan_run(run)
    limit = torch.tensor([float(device_limit(dist_info.device, run.world))], device=dist_info.device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(limit, op=dist.ReduceOp.MIN)
    needed = plan.total if run.device == "cuda" else plan.peak  # on CPU the runtime is already resident
    if needed <= limit.item():
        return
    name, size = largest_term(plan, run)
    t = run.cfg.train
    where = "of GPU memory" if run.device == "cuda" else "of available RAM per rank"
    raise ConfigError(
        f"memory: the plan needs {needed / GiB:.1f} GiB per rank ({plan.peak_phase}), more than the "
        f"{limit.item() / GiB:.1f} GiB {where}; largest term: {name} {size / GiB:.1f} GiB at train.seq_len "
        f"{t.seq_len}, micro batch {run.batches.micro}; shrink the run (seq_len, micro_batch_size, "
        f"parallel.activation_checkpointing) or set train.allow_oversubscribe=true to start anyway"
    )
