"""Predict per-rank memory of a config before launching it: `python launch/estimate_memory.py --config X.yaml
[--world-size N] [--engine fsdp2|deepspeed] [--device cuda|cpu] [--device-memory-gb G] [--section.key=value ...]`.

Prints the components (parameters, gradients, optimizer state per param group, activations with and without
activation checkpointing, engine buffers, the optimizer's temporaries), the peak and its phase, and whether it
fits G GiB per device (on CUDA G defaults to the visible GPU's memory). Exit code 0: fits (or nothing to
compare with), 1: does not fit, 2: bad input. Nothing is allocated: the model and optimizer run on the meta
device (trainer/memory/planner.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from trainer.config import ConfigError, load_config  # noqa: E402
from trainer.memory.planner import GiB, plan_memory  # noqa: E402


def device_memory(args: argparse.Namespace) -> int | None:
    """Bytes to compare with: --device-memory-gb, else the visible GPU's when planning for CUDA."""
    if args.device_memory_gb:
        return int(args.device_memory_gb * GiB)
    import torch

    if args.device == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    parser.add_argument("--config", required=True, help="a name in configs/ (e.g. llama350m_swan) or a path")
    parser.add_argument("--world-size", type=int, default=1, help="ranks the run is launched on (default 1)")
    parser.add_argument(
        "--engine", choices=("fsdp2", "deepspeed"), help="default: the config's parallel.engine"
    )
    parser.add_argument(
        "--device", choices=("cuda", "cpu"), default="cuda", help="default cuda (bf16 compute)"
    )
    parser.add_argument("--device-memory-gb", type=float, help="memory per device in GiB to check against")
    args, overrides = parser.parse_known_args(argv)
    if args.world_size < 1:
        print(f"error: --world-size must be >= 1, got {args.world_size}", file=sys.stderr)
        return 2
    try:
        engine = [f"--parallel.engine={args.engine}"] if args.engine else []
        cfg = load_config(args.config, [*overrides, *engine])
        plan = plan_memory(cfg, args.world_size, args.device)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    memory = device_memory(args)
    print(plan.table(memory))
    return 0 if memory is None or plan.fits(memory) else 1


if __name__ == "__main__":
    sys.exit(main())
