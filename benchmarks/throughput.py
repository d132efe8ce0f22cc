"""Training throughput of one config for every optimizer against AdamW: tokens/s, step time and MFU as the trainer
itself measures and logs them (one launch/pretrain.py run per optimizer, one at a time, fresh run directories),
at each world size of --nproc. Beside them the optimizer step's share of the step and the part of it spent
waiting for the owner exchange's transfers (exposed communication), both of the slowest rank on logging steps
(optim/step_s, optim/exposed_comm_s), and the ratio to AdamW with forward/backward held equal (AdamW's step time
with this optimizer's step in place of AdamW's): on a shared machine forward/backward varies from run to run by
more than the optimizers differ, and this column isolates what the optimizer itself adds.

The first logged window of each run (start-up, allocator and kernel warm-up) is left out; the median of the rest,
over --repeats rounds, is reported.
MFU needs the device's peak FLOP/s: known GPUs are detected by the trainer, elsewhere pass
`--metrics.peak_tflops=X`; on CPU the tokens/s ratios are the useful part.

    python -m benchmarks.throughput                                  # configs/tiny_*.yaml on this machine
    python -m benchmarks.throughput --configs llama350m --steps 60 --nproc 8 --data.source=/data/c4_sample.jsonl
    python -m benchmarks.throughput --nproc 1,2,4 --threads 1 --steps 6 --log-every 2 --model.name=llama_60m \
        --train.global_batch_size=16 --train.micro_batch_size=4 --train.seq_len=256   # the issue's CPU table

Any `--section.key=value` argument is passed to every run as a trainer config override.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.harness import EXIT_OK, TrainerRun, launch, read_records, series
from trainer.config import CHOICES, ConfigError, parse_args_and_overrides
from trainer.resolve import resolve

OPTIMIZERS = CHOICES["optim.name"]  # every optimizer the trainer knows, AdamW first


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--optimizers",
        default=",".join(OPTIMIZERS),
        help="comma-separated, adamw first; NAME:section.key=value[:...] is a variant of NAME with those overrides",
    )
    parser.add_argument("--configs", default="tiny", help="configs/<CONFIGS>_<optimizer>.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10, help="steps per timing window")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all optimizers (noisy machines)")
    parser.add_argument("--nproc", default="1", help="processes per run, comma-separated (torchrun when > 1)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per process; 0 = inherit")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/throughput"))
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args, overrides = parse_args_and_overrides(parser, argv)
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two --log-every windows (the first is warm-up)")
    args.runs_dir = args.runs_dir.resolve()
    args.worlds = [int(n) for n in args.nproc.split(",")]
    return args, overrides


@dataclass
class Windows:
    """One optimizer's timing windows (after each run's warm-up window), over all rounds."""

    tokens_per_step: int = 0
    rates: list[float] = field(default_factory=list)  # tokens/s
    mfus: list[float] = field(default_factory=list)
    optimizer_s: list[float] = field(default_factory=list)  # the optimizer step (slowest rank)
    comm_s: list[float] = field(default_factory=list)  # its exposed communication (slowest rank)
    failed: bool = False

    def summary(self) -> dict[str, float] | None:
        if self.failed or not self.rates:
            return None
        tok_s = statistics.median(self.rates)
        median = lambda xs: statistics.median(xs) if xs else float("nan")  # noqa: E731
        return {
            "tokens_per_s": tok_s,
            "step_ms": 1e3 * self.tokens_per_step / tok_s,
            "mfu": median(self.mfus),
            "optimizer_ms": 1e3 * median(self.optimizer_s),
            "comm_ms": 1e3 * median(self.comm_s),
        }


def variant(name: str) -> tuple[str, list[str]]:
    """'muon:optim.overlap_buckets=1' -> ('muon', ['--optim.overlap_buckets=1'])."""
    optimizer, *extra = name.split(":")
    return optimizer, [f"--{item}" for item in extra]


def measure(name: str, world: int, args: argparse.Namespace, overrides: list[str], into: Windows) -> None:
    """One fresh run of an optimizer (or variant) at `world` processes; its windows after the warm-up one go to
    `into`."""
    optimizer, extra = variant(name)
    run = TrainerRun(
        f"{args.configs}_{optimizer}",
        (
            f"--train.steps={args.steps}",
            f"--metrics.log_every={args.log_every}",
            "--train.eval_every=0",
            "--checkpoint.enabled=false",
            "--metrics.tensorboard=false",
            f"--train.runs_dir={args.runs_dir}",
            f"--train.run_name={name.replace(':', '_').replace('=', '')}_w{world}",
            *overrides,
            *extra,
        ),
    )
    cfg = run.resolved()
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: a resumed one would time only its tail
    code = launch(run, cfg.run_dir / "train.log", nproc=world, threads=args.threads or None)
    if code != EXIT_OK:
        print(f"{name}: failed (exit {code}); see {cfg.run_dir / 'train.log'}", file=sys.stderr)
        into.failed = True
        return
    read_windows(cfg.run_dir, cfg.train.global_batch_size * cfg.train.seq_len, into)


def read_windows(run_dir: Path, tokens_per_step: int, into: Windows) -> None:
    """A finished run's timing windows after the warm-up one, added to `into`."""
    records = read_records(run_dir)
    into.tokens_per_step = tokens_per_step
    into.rates += [v for _, v in series(records, "tokens_per_s")[1:]]
    into.mfus += [v for _, v in series(records, "mfu")[1:]]
    into.optimizer_s += [v for _, v in series(records, "optim/step_s")[1:]]
    into.comm_s += [v for _, v in series(records, "optim/exposed_comm_s")[1:]]


def table(results: dict[str, dict[str, float] | None], world: int) -> str:
    base = results.get("adamw")
    lines = [
        f"world size {world}:",
        "",
        "| optimizer | tokens/s | step time | x AdamW | x AdamW, same forward/backward | optimizer step "
        "| its share | exposed comm | of the optimizer step | MFU |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        if r is None:
            lines.append(f"| {name} | failed | — | — | — | — | — | — | — | — |")
            continue
        ratio = f"{r['step_ms'] / base['step_ms']:.2f}x" if base else "—"
        # AdamW's step with this optimizer's step in place of AdamW's: the optimizer's own cost, free of the
        # run-to-run noise of forward/backward on a shared machine
        swapped = (
            f"{(base['step_ms'] - base['optimizer_ms'] + r['optimizer_ms']) / base['step_ms']:.2f}x"
            if base
            else "—"
        )
        mfu = f"{r['mfu']:.1%}" if r["mfu"] == r["mfu"] else "n/a"
        share = r["optimizer_ms"] / r["step_ms"]
        comm = r["comm_ms"] / r["optimizer_ms"] if r["optimizer_ms"] else float("nan")
        lines.append(
            f"| {name} | {r['tokens_per_s']:,.0f} | {r['step_ms']:.0f} ms | {ratio} | {swapped} | {r['optimizer_ms']:.0f} ms "
            f"| {share:.1%} | {r['comm_ms']:.0f} ms | {comm:.0%} | {mfu} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    names = args.optimizers.split(",")
    windows = {(world, name): Windows() for world in args.worlds for name in names}
    try:
        for name in names:  # every config resolves before the first run
            optimizer, extra = variant(name)
            cfg = TrainerRun(f"{args.configs}_{optimizer}", (*overrides, *extra)).resolved()
            for world in args.worlds:  # the batch must divide at every world size
                resolve(cfg, world, "cuda" if cfg.parallel.device == "cuda" else "cpu")
        for round_ in range(args.repeats):  # alternate the order so a drifting machine load hits all alike
            for world in args.worlds:
                for name in names if round_ % 2 == 0 else names[::-1]:
                    measure(name, world, args, overrides, windows[world, name])
                    print(f"round {round_ + 1}/{args.repeats}: {name} at {world} measured", flush=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = {key: w.summary() for key, w in windows.items()}
    text = "\n\n".join(table({name: results[world, name] for name in names}, world) for world in args.worlds)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all(r is not None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
