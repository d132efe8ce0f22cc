"""What the divergence guard and the watchdog add to a training step, on the host.

Both read what the loop already has: the guard judges the all-reduced loss and the global gradient norm that the
loop brings to the host for its own logging (one more float in that all-reduce for the guard's verdict, no
collective of its own), and the watchdog's beat is three assignments; its thread wakes every few seconds. So the
cost per step is Python on the host, timed here over many steps, beside one training step of a small model on this
machine (the smallest step, so the largest share the guard can have).

    python -m benchmarks.guard_overhead                       # llama_tiny, 16 x 128 tokens, CPU
    python -m benchmarks.guard_overhead --model llama_60m --batch 4 --seq-len 256
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch

from models import Llama, causal_lm_loss, model_config
from trainer.guard import DivergenceGuard
from trainer.watchdog import Watchdog

PHASES = ("data", "forward/backward", "optimizer step")  # the loop's beats on a step without logging


def guard_step_us(steps: int) -> float:
    """Microseconds per step of judging a calm loss curve and beating the watchdog at every phase."""
    guard = DivergenceGuard(512, spike_sigma=6.0, spike_window=100, spike_warmup=20, spike_ceiling=2.0,
                            dead_steps=10)  # fmt: skip
    watchdog = Watchdog(timeout_s=0.0, rank=0, world_size=1)  # its thread is not started: beats only
    start = time.perf_counter()
    for n in range(1, steps + 1):
        for phase in PHASES:
            watchdog.beat(n, phase)
        verdict = guard.judge(n, 5.0 + 0.01 * math.sin(n), 1.0)
        assert verdict.ok and guard.calm(n)
    return (time.perf_counter() - start) / steps * 1e6


def model_step_ms(model_name: str, batch: int, seq_len: int, repeats: int) -> float:
    """Median milliseconds of one forward, backward and AdamW step of the model on the CPU."""
    torch.manual_seed(0)
    model = Llama(model_config(model_name, vocab_size=512))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 512, (batch, seq_len + 1))
    times = []
    for _ in range(repeats + 1):  # the first one warms up
        start = time.perf_counter()
        causal_lm_loss(model, tokens).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:]) * 1e3


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="llama_tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10, help="model steps timed")
    parser.add_argument("--guard-steps", type=int, default=100_000, help="guard steps timed")
    args = parser.parse_args(argv)
    us = statistics.median(guard_step_us(args.guard_steps) for _ in range(3))
    ms = model_step_ms(args.model, args.batch, args.seq_len, args.repeats)
    print(f"| guard + watchdog per step | {args.model} step ({args.batch} x {args.seq_len}, CPU) | share |")
    print("| ---: | ---: | ---: |")
    print(f"| {us:.2f} µs | {ms:.1f} ms | {us / (ms * 1e3):.2e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
