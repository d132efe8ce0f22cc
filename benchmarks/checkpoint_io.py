"""Checkpoint save and load times (sync and async) of a sharded model + optimizer, as the trainer does them.

Each rank builds the model, shards it with FSDP2, takes one optimizer step (so the optimizer state exists), then
times, `--repeats` times each (median): a synchronous save (until committed), an async save's blocking part (the
copy to CPU memory; training goes on after it) and its total (until committed), and a load. Launched like training:

    torchrun --standalone --nproc_per_node=2 -m benchmarks.checkpoint_io [--model llama_60m] [--optim adamw]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist

from models import Llama, model_config, num_params
from optim import build_optimizer
from trainer.checkpoint import Checkpointer
from trainer.config import OptimConfig
from trainer.distributed import build_mesh, init_distributed, shutdown
from trainer.engines.fsdp2 import FSDP2Engine, apply_fsdp


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of fn() on the slowest rank (a save or load is done when every rank is done)."""
    dist.barrier()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return elapsed.item()


class StepOnly:
    """The trainer state this benchmark saves beside the engine's: just the step."""

    def __init__(self, step: int):
        self.step = step

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_60m")
    parser.add_argument("--optim", default="adamw")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--dir", default="", help="where to write (default: a temporary directory)")
    args = parser.parse_args()

    info = init_distributed(args.device)
    torch.manual_seed(0)
    model = Llama(model_config(args.model, max_seq_len=args.seq_len)).to(info.device)
    apply_fsdp(model, build_mesh(info))
    optimizer = build_optimizer(OptimConfig(name=args.optim), model)
    engine = FSDP2Engine(model, optimizer)
    background_engine = FSDP2Engine(
        model, optimizer, async_save=True
    )  # the same state, written in the background
    tokens = torch.randint(0, model.cfg.vocab_size, (1, args.seq_len + 1), device=info.device)
    engine.forward_backward([tokens])
    engine.grad_norm()
    engine.step()

    root = Path(args.dir) if args.dir else Path(tempfile.gettempdir()) / "checkpoint_io"
    sync = Checkpointer(root / "sync", keep_last=1, is_main=info.is_main)
    background = Checkpointer(root / "async", keep_last=1, is_main=info.is_main)
    times: dict[str, list[float]] = {"sync": [], "async_blocking": [], "async_total": [], "load": []}
    for step in range(1, args.repeats + 1):
        state = StepOnly(step)
        times["sync"].append(
            timed(lambda step=step, state=state: sync.save(step, engine, state), info.device)
        )
        start = time.perf_counter()
        times["async_blocking"].append(
            timed(lambda step=step, state=state: background.save(step, background_engine, state), info.device)
        )
        background.wait()
        dist.barrier()
        times["async_total"].append(time.perf_counter() - start)
        path = root / "sync" / f"step_{step:06d}"
        times["load"].append(
            timed(lambda path=path, state=state: sync.load(path, engine, state), info.device)
        )

    if info.is_main:
        size = sum(f.stat().st_size for f in (root / "sync").rglob("*") if f.is_file())
        median = {key: statistics.median(values) for key, values in times.items()}
        print(
            f"checkpoint I/O: {args.model} ({num_params(model.cfg) / 1e6:.1f}M params), optimizer {args.optim}, "
            f"world size {info.world_size}, {info.device.type}, {args.repeats} repeats (median); "
            f"checkpoint {size / 1e6:.0f} MB on disk"
        )
        print("| operation | seconds | MB/s |")
        print("| --- | ---: | ---: |")
        for key, label in [
            ("sync", "sync save (until committed)"),
            ("async_blocking", "async save: blocking part (copy to CPU)"),
            ("async_total", "async save: until committed"),
            ("load", "load (checks + read)"),
        ]:
            print(f"| {label} | {median[key]:.3f} | {size / 1e6 / median[key]:.0f} |")
    if not args.dir and info.is_main:
        shutil.rmtree(root, ignore_errors=True)
    shutdown()


if __name__ == "__main__":
    main()
