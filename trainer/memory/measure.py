"""Measure training steps of a config in this process: what the memory benchmark and the planner's test read.

Builds what the trainer builds (model, engine: trainer.engines.build_engine) but feeds random tokens and runs a
step or two, so a measurement needs no data and writes nothing. Call it on every rank of an initialised process
group.
"""

from __future__ import annotations

import gc
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from trainer.config import Config
from trainer.distributed import DistInfo
from trainer.engines import build_engine
from trainer.memory.tensors import local_bytes
from trainer.memory.tracker import MemoryBreakdown, MemoryTracker, peak_tensor_bytes
from trainer.resolve import build_model, resolve


@dataclass
class StepMeasurement:
    components: MemoryBreakdown  # the trainer's accounting of the last step (peak: resident memory on CPU)
    peak_tensor_bytes: int  # CPU: peak bytes of live tensors over all steps (allocator events), else 0
    seconds: float  # per step


def measure_steps(cfg: Config, info: DistInfo, steps: int = 1) -> StepMeasurement:
    """`steps` steps of `cfg` on one random batch, measured by the trainer's MemoryTracker and (on CPU) by
    the allocator's events; tensors alive before the first step (parameters, buffers, the batch) included.
    The second step is the steady state (optimizer state exists during forward and backward)."""
    run = resolve(cfg, info.world_size, info.device)
    batches = run.batches
    model = build_model(run, run.model.vocab_size, info.device)
    engine = build_engine(run, model, info)
    tracker = MemoryTracker(engine, info.device, cfg.run_dir, info=lambda _: None)
    generator = torch.Generator().manual_seed(cfg.train.seed)
    batch = torch.randint(
        0, model.cfg.vocab_size, (batches.local, cfg.train.seq_len + 1), generator=generator
    )
    batch = batch.to(info.device)
    before = local_bytes([*model.parameters(), *model.buffers(), batch])
    gc.collect()  # an earlier measurement's model freed inside the window would count as negative bytes
    start = time.perf_counter()
    cpu = info.device.type == "cpu"
    with peak_tensor_bytes() if cpu else nullcontext({}) as allocated:
        for step in range(1, steps + 1):
            tracker.begin(step)
            engine.forward_backward(list(batch.split(batches.micro)))
            engine.grad_norm()
            engine.step()
            tracker.end(step)
    seconds = (time.perf_counter() - start) / steps
    peak = before + allocated["peak"] if cpu else 0
    return StepMeasurement(tracker.last, peak, seconds)
