"""Memory per ZeRO stage and the owner exchange's traffic: every engine for AdamW and the matrix optimizers.

Each (optimizer, engine) pair trains two steps with the real trainer under torchrun (gloo, CPU, fp32) at
--world-size ranks, and rank 0's own accounting of the last step is read back from metrics.jsonl: parameters,
gradients, the optimizer state by part (the matrix rule's, AdamW's, DeepSpeed's fp32 master partitions). Beside
it the planner's optimizer state for the same run (trainer/memory/planner.py) and its per-rank optimizer state
and peak for the bf16 GPU run of the same model at --gpu-world ranks. Then, per optimizer step and rank, the
bytes the owner exchange sends (each rank's fp32 pieces of the matrices it does not own, out as gradient and back
as update; computed from DeepSpeed's ZeRO-2 layout and the owner plan, both deterministic) beside ZeRO's own
gradient reduce-scatter and weight all-gather (ring algorithms: (world - 1) / world of the model per rank each).

    python -m benchmarks.zero_memory                                 # llama_60m, 2 ranks (~15 min on 2 cores)
    python -m benchmarks.zero_memory --model llama_tiny --optimizers adamw,normuon

Any `--section.key=value` argument is passed to every run as a trainer config override.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from benchmarks.harness import EXIT_OK, TrainerRun, launch, read_records
from trainer.config import load_config, parse_args_and_overrides

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
ENGINES = ("fsdp2", "zero0", "zero1", "zero2", "zero3")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama_60m", help="a size in models/registry.py")
    parser.add_argument("--optimizers", default="adamw,swan,normuon,muon", help="comma-separated")
    parser.add_argument("--world-size", type=int, default=2, help="CPU ranks of the measured runs")
    parser.add_argument("--gpu-world", type=int, default=8, help="ranks of the planned bf16 GPU run")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--out", type=Path, help="also write the markdown tables here")
    args, overrides = parse_args_and_overrides(parser, argv)
    args.optimizers = args.optimizers.split(",")
    return args, overrides


def run_overrides(
    args: argparse.Namespace, engine: str, overrides: list[str], world: int | None = None
) -> list[str]:
    """The trainer overrides of one run at `world` ranks (default --world-size): two steps of one sequence per
    micro-batch, accumulation 2."""
    world = world or args.world_size
    stage = (
        [] if engine == "fsdp2" else ["--parallel.engine=deepspeed", f"--parallel.zero_stage={engine[-1]}"]
    )
    return [
        f"--model.name={args.model}",
        "--train.steps=2",
        f"--train.global_batch_size={2 * world}",
        "--train.micro_batch_size=1",
        f"--train.seq_len={args.seq_len}",
        "--train.eval_every=0",
        f"--data.eval_sequences={world}",
        "--metrics.log_every=1",
        "--metrics.tensorboard=false",
        "--parallel.device=cpu",
        *stage,
        *overrides,
    ]


def measure(args: argparse.Namespace, optimizer: str, engine: str, overrides: list[str]) -> dict[str, float]:
    """Rank 0's memory/* numbers (MiB) at the last step of one run under torchrun; {} if it failed."""
    with tempfile.TemporaryDirectory() as tmp:
        extra = (f"--train.runs_dir={tmp}", "--train.run_name=run", "--checkpoint.enabled=false")
        run = TrainerRun(f"tiny_{optimizer}", (*run_overrides(args, engine, overrides), *extra))
        log = Path(tmp) / "train.log"
        code = launch(run, log, nproc=args.world_size)
        records = read_records(Path(tmp) / "run")
        if code != EXIT_OK or not records:
            print(f"{optimizer} {engine}: failed (exit {code})\n{log.read_text()[-2000:]}", file=sys.stderr)
            return {}
    last = [r for r in records if "memory/params_mib" in r][-1]
    return {
        k.removeprefix("memory/").removesuffix("_mib"): v for k, v in last.items() if k.startswith("memory/")
    }


def planned(args: argparse.Namespace, optimizer: str, engine: str, overrides: list[str], gpu: bool) -> dict:
    """The planner's optimizer state and peak (MiB) of the run, or of its bf16 GPU counterpart."""
    from trainer.memory.planner import plan_memory

    extra = ["--parallel.device=cuda", "--parallel.mixed_precision=auto"] if gpu else []
    world = args.gpu_world if gpu else args.world_size
    cfg = load_config(f"tiny_{optimizer}", [*run_overrides(args, engine, overrides, world), *extra])
    plan = plan_memory(cfg, world_size=world, device="cuda" if gpu else "cpu")
    state = sum(n for name, n in plan.rows if name.startswith("optimizer state"))  # FSDP2: one row per group
    return {"state": state / MiB, "peak": plan.peak / MiB}


def exchange_bytes(args: argparse.Namespace, optimizer: str, overrides: list[str]) -> dict[str, float] | None:
    """Bytes per optimizer step sent by the busiest rank: the owner exchange under ZeRO-2's layout, and ZeRO's
    gradient reduce-scatter and weight all-gather (fp32 here; bf16 halves ZeRO's, the exchange stays fp32)."""
    import torch

    from models import Llama
    from optim import MatrixOptimizer, build_optimizer, route_parameters
    from optim.sharded import assign_owners
    from trainer.engines.zero import ZeroStage
    from trainer.resolve import resolve

    cfg = load_config(f"tiny_{optimizer}", run_overrides(args, "zero2", overrides))
    with torch.device("meta"):
        model = Llama(resolve(cfg, args.world_size, "cpu").model)
    opt = build_optimizer(cfg.optim, model)
    if not isinstance(opt, MatrixOptimizer):
        return None
    matrices, _ = route_parameters(model)
    world = args.world_size
    owners = assign_owners([tuple(p.shape) for p in matrices], world, opt.owner_cost)
    sent = [0] * world
    layout = ZeroStage(2).concatenated_bounds([p.numel() for p in matrices], world)
    for bounds, owner in zip(layout, owners, strict=True):
        for rank in range(world):
            if rank != owner:  # its gradient piece out, its update piece back (fp32)
                sent[rank] += 2 * 4 * (bounds[rank + 1] - bounds[rank])
    n_params = sum(p.numel() for p in model.parameters())
    ring = 4 * n_params * (world - 1) / world
    return {"exchange": max(sent) / MiB, "reduce_scatter": ring / MiB, "all_gather": ring / MiB}


def tables(args: argparse.Namespace, overrides: list[str]) -> str:
    lines = [
        f"Rank 0 of {args.world_size} (CPU, gloo, fp32), {args.model}, MiB; planner: its optimizer state for "
        f"this run, and for the bf16 GPU run at {args.gpu_world} ranks its optimizer state and tensor peak.",
        "",
        "| optimizer | engine | parameters | gradients | matrix-rule state | AdamW state | fp32 masters "
        "| optimizer state | planner | planner bf16 GPU state | planner bf16 GPU peak |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for optimizer in args.optimizers:
        for engine in ENGINES:
            m = measure(args, optimizer, engine, overrides)
            if not m:
                continue
            rule = sum(v for k, v in m.items() if k.startswith("optimizer_state/group") and "adamw" not in k)
            adamw = sum(v for k, v in m.items() if k.startswith("optimizer_state/") and "adamw" in k)
            plan, gpu = (
                planned(args, optimizer, engine, overrides, False),
                planned(args, optimizer, engine, overrides, True),
            )
            cells = [m["params"], m["grads"], rule, adamw, m.get("optimizer_state/master_weights", 0.0),
                     m["optimizer_state"], plan["state"], gpu["state"], gpu["peak"]]  # fmt: skip
            lines.append(f"| {optimizer} | {engine} | " + " | ".join(f"{c:.1f}" for c in cells) + " |")
            print(lines[-1], flush=True)
    lines += [
        "",
        f"Bytes sent per optimizer step by the busiest rank of {args.world_size} (MiB, fp32): the owner exchange "
        "of the matrix rules under ZeRO-2's layout, against ZeRO's own gradient reduce-scatter and weight all-gather.",
        "",
        "| optimizer | owner exchange | ZeRO reduce-scatter | ZeRO all-gather | exchange / ZeRO's |",
        "|---|---|---|---|---|",
    ]
    for optimizer in args.optimizers:
        b = exchange_bytes(args, optimizer, overrides)
        if b:
            ratio = b["exchange"] / (b["reduce_scatter"] + b["all_gather"])
            lines.append(
                f"| {optimizer} | {b['exchange']:.1f} | {b['reduce_scatter']:.1f} | {b['all_gather']:.1f} | {ratio:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    text = tables(args, overrides)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
