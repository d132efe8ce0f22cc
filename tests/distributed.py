"""Run a function in `world_size` real processes with gloo, the way the trainer runs under torchrun.

Why not torchrun: spawning from the test keeps the function and its arguments in Python (no CLI), and returns
rank 0's result to the test. Each process gets threads_per_process() torch threads (OMP_NUM_THREADS, 1 unless the
suite was started with another: four processes share two cores here). A test that calls run_distributed is marked
`@pytest.mark.slow` (tests/conftest.py fails it otherwise).
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.processes import threads_per_process
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
        OMP_NUM_THREADS=str(threads_per_process()),
    )
    torch.set_num_threads(threads_per_process())
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    result = fn(*args)
    if rank == 0:
        torch.save(result, out)
    shutdown()  # on success only: after an exception the peers may be stuck in a collective


@contextmanager
def _children_environment(env: dict[str, str] | None) -> Iterator[None]:
    """Within: os.environ has `env` added, so spawned children start with it (variables read once at a library's
    start, MKL_CBWR or ATEN_CPU_CAPABILITY, must be there before the child imports torch); restored after."""
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_distributed(fn: Callable, world_size: int, *args: Any, env: dict[str, str] | None = None) -> Any:
    """Run `fn(*args)` on every rank of a fresh gloo group; return what rank 0 returned.

    `fn` must be a module-level function (it is pickled to the children); its result is saved with torch.save,
    so return tensors, numbers, lists and dicts of them. `env`: environment variables the children start with
    (this process's own environment is restored once they are done).
    """
    with tempfile.TemporaryDirectory() as tmp, _children_environment(env):
        out = str(Path(tmp) / "result.pt")
        mp.start_processes(
            _worker,
            args=(world_size, free_port(), out, fn, args),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        return torch.load(out, weights_only=True)
