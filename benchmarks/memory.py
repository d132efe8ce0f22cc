"""Memory of one training step per optimizer against AdamW, measured and predicted.

Each variant (an optimizer, `+uib` for optim.update_in_backward) runs in its own process, one at a time, because
peak resident memory is per process: the trainer's model, FSDP2 (world size 1), optimizer and engine take two
steps on one random batch (trainer/memory/measure.py); the second is the steady state. Reported per variant:
the trainer's own accounting of that step (parameters, gradients, optimizer state, the rest), its peak resident
memory (VmHWM, reset before the step; glibc's mmap threshold fixed, see MMAP_THRESHOLD), the peak of live
tensors over both steps (allocator events), and the planner's predictions (trainer/memory/planner.py) for this run
and for the bf16 GPU run of the same shapes.

    python -m benchmarks.memory                                # llama_350m, fp32, batch 1 x 256, CPU
    python -m benchmarks.memory --config tiny --seq-len 32 --variants adamw,swan,swan+uib

Any `--section.key=value` argument is passed to every variant as a trainer config override.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from benchmarks.harness import run_module
from trainer.config import load_config, parse_args_and_overrides

GiB = 2**30
# glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed, after which freed mid-size
# tensors stay in its heap: resident memory then records the allocator's history (AdamW's llama_350m step read
# 9.45 GiB of RSS for 5.78 GiB of tensors). A fixed threshold returns every block of 64 KiB or more to the OS
# when freed, so peak RSS measures the step. Set MALLOC_MMAP_THRESHOLD_ yourself to measure otherwise.
MMAP_THRESHOLD = 65536
VARIANTS = "adamw,swan,sinkgd,normuon,auon,swan+uib,sinkgd+uib"


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="llama350m", help="configs/<CONFIG>_<optimizer>.yaml")
    parser.add_argument(
        "--variants", default=VARIANTS, help="comma-separated; adamw first; +uib: update in backward"
    )
    parser.add_argument("--batch", type=int, default=1, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of each measuring process")
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure this variant, print JSON
    args, overrides = parse_args_and_overrides(parser, argv)
    return args, overrides


def variant_config(variant: str, args: argparse.Namespace, overrides: list[str]):
    name, _, flag = variant.partition("+")
    return load_config(
        f"{args.config}_{name}",
        [
            f"--train.global_batch_size={args.batch}",
            f"--train.micro_batch_size={args.batch}",
            f"--train.seq_len={args.seq_len}",
            f"--optim.update_in_backward={str(flag == 'uib').lower()}",
            "--parallel.device=cpu",
            *overrides,
        ],
    )


def measure_one(args: argparse.Namespace, overrides: list[str]) -> dict:
    """In this process: two measured steps of one variant (see trainer/memory/measure.py)."""
    import torch

    from trainer.distributed import init_distributed, shutdown
    from trainer.memory.measure import measure_steps

    torch.set_num_threads(args.threads)
    cfg = variant_config(args.one, args, overrides)
    info = init_distributed("cpu", "gloo")
    try:
        m = measure_steps(cfg, info, steps=2)
    finally:
        shutdown()
    c = m.components
    return {
        "params": c.params,
        "grads": c.grads,
        "state": c.state,
        "other": c.other,
        "runtime": c.runtime,
        "peak_rss": c.peak,
        "peak_tensors": m.peak_tensor_bytes,
        "seconds": m.seconds,
    }


def run_variant(variant: str, argv: list[str]) -> dict | None:
    """Measure one variant in a fresh process; None if it failed (its stderr has gone to ours)."""
    env = {"MALLOC_MMAP_THRESHOLD_": os.environ.get("MALLOC_MMAP_THRESHOLD_", str(MMAP_THRESHOLD))}
    code, out = run_module("benchmarks.memory", [*argv, "--one", variant], parse_args(argv)[0].threads, env)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if code or not lines:
        print(f"{variant}: failed (exit {code})", file=sys.stderr)
        return None
    return json.loads(lines[-1])


def table(rows: dict[str, dict], args: argparse.Namespace) -> str:
    gib = lambda n: f"{n / GiB:.2f}"  # noqa: E731
    adamw = rows.get("adamw")
    head = (
        "| optimizer | parameters | gradients | optimizer state | other | peak RSS | RSS vs AdamW "
        "| tensor peak | planner (this run) | planner error | planner bf16 GPU | GPU vs AdamW |"
    )
    lines = [head, "|" + " --- |" * 12]
    for variant, r in rows.items():
        ratio = f"{r['peak_rss'] / adamw['peak_rss']:.2f}x" if adamw else "-"
        gpu = f"{r['gpu'] / adamw['gpu']:.2f}x" if adamw else "-"
        error = f"{r['plan_cpu'] / r['peak_tensors'] - 1:+.1%}"
        name = variant.replace("+uib", " + update_in_backward")
        lines.append(
            f"| {name} | {gib(r['params'])} | {gib(r['grads'])} | {gib(r['state'])} | {gib(r['other'])} "
            f"| {gib(r['peak_rss'])} | {ratio} | {gib(r['peak_tensors'])} | {gib(r['plan_cpu'])} | {error} "
            f"| {gib(r['gpu'])} | {gpu} |"
        )
    return (
        f"{args.config}, fp32, batch {args.batch} x {args.seq_len}, one process on CPU, GiB (peak RSS includes "
        f"{gib(rows[next(iter(rows))]['runtime'])} GiB of interpreter and libraries; tensor peak and planner "
        f"columns are tensors only; bf16 GPU: the planner's tensor peak with bf16 compute)\n\n"
        + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args, overrides = parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(args, overrides)))
        return 0
    from trainer.memory.planner import plan_memory

    rows: dict[str, dict] = {}
    for variant in args.variants.split(","):
        print(f"measuring {variant} ...", file=sys.stderr, flush=True)
        result = run_variant(variant, argv)
        if result is None:
            continue
        cfg = variant_config(variant, args, overrides)
        result["plan_cpu"] = plan_memory(cfg, 1, device="cpu").peak
        result["gpu"] = plan_memory(cfg, 1, device="cuda").peak
        rows[variant] = result
    if not rows:
        return 1
    text = table(rows, args)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0 if len(rows) == len(args.variants.split(",")) else 1


if __name__ == "__main__":
    sys.exit(main())
