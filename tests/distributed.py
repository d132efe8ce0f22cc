"""Run a function in `world_size` real processes with gloo, the way the trainer runs under torchrun.

Why not torchrun: spawning from the test keeps the function and its arguments in Python (no CLI), and returns
rank 0's result to the test. Each process gets one torch thread: four processes share two cores here.
A test that calls run_distributed is marked `@pytest.mark.slow` (tests/conftest.py fails it otherwise).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from trainer.distributed import shutdown


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, out: str, fn: Callable, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    result = fn(*args)
    if rank == 0:
        torch.save(result, out)
    shutdown()  # on success only: after an exception the peers may be stuck in a collective


def run_distributed(fn: Callable, world_size: int, *args: Any) -> Any:
    """Run `fn(*args)` on every rank of a fresh gloo group; return what rank 0 returned.

    `fn` must be a module-level function (it is pickled to the children); its result is saved with torch.save,
    so return tensors, numbers, lists and dicts of them.
    """
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.pt")
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), out, fn, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return torch.load(out, weights_only=True)
