"""Process group, device and device mesh: the one place that knows how this process was launched.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT. A plain `python launch/pretrain.py` is a
world of one: we fill those in so the exact same code path (process group, mesh, FSDP2) runs in both cases.
"""

from __future__ import annotations

import datetime
import gc
import os
import socket
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from trainer.config import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def resolve_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("parallel.device=cuda but CUDA is not available on this machine")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def torchrun_command(nproc: int) -> list[str]:
    """`torchrun --standalone --nproc_per_node=<nproc>` through this interpreter: how the tests and the benchmarks
    start a job of several processes on one machine (append the script or `-m module` and its arguments)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]


def restart_safe_store(world_size: int, timeout: datetime.timedelta) -> dist.Store | None:
    """Under `torchrun --max-restarts`, the workers share the agent's TCPStore, which keeps the keys of the
    previous attempt: restarted workers would read the dead workers' addresses and fail to connect
    (pytorch/pytorch#135712). A prefix per restart attempt gives every attempt clean keys. None: use the default.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(f"/attempt_{attempt}", store)


def init_distributed(device: str = "auto", backend: str = "auto", timeout_s: int = 1800) -> DistInfo:
    """Initialise the default process group (nccl on GPU, gloo on CPU) and pick this rank's device."""
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": dev} if dev.type == "cuda" else {}
        timeout = datetime.timedelta(seconds=timeout_s)
        store = restart_safe_store(world, timeout)
        if store is not None:
            kwargs.update(store=store, rank=rank, world_size=world)
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    return DistInfo(rank=rank, world_size=world, device=dev)


def build_mesh(info: DistInfo, dp_replicate: int = 1, dp_shard: int = -1) -> DeviceMesh:
    """1-D mesh ("dp_shard",) for FSDP, or 2-D ("dp_replicate", "dp_shard") for HSDP (sizes checked by
    trainer/resolve.py)."""
    if dp_shard == -1:
        dp_shard = info.world_size // dp_replicate
    if dp_replicate == 1:
        return init_device_mesh(info.device.type, (dp_shard,), mesh_dim_names=("dp_shard",))
    return init_device_mesh(
        info.device.type, (dp_replicate, dp_shard), mesh_dim_names=("dp_replicate", "dp_shard")
    )


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean of a small tensor over all ranks (used for logged scalars, not for gradients)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Elementwise max of a small tensor over all ranks (the slowest rank's timings)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return values


def shutdown() -> None:
    """Tear the process group down in step with the other ranks, while the interpreter is fully alive.

    gloo's worker threads can still hold finished async work (FSDP2's reduce-scatters) that references tensors;
    freeing those during interpreter finalization, or while a peer is still talking, aborts the process
    ("terminate called without an active exception"). So: drop dead objects, wait for every rank, then destroy.
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
