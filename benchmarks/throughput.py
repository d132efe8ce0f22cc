"""Training throughput of one config for every optimizer against AdamW: tokens/s, step time and MFU as the trainer
itself measures and logs them (one launch/pretrain.py run per optimizer, one at a time, fresh run directories).

The first logged window of each run (start-up, allocator and kernel warm-up) is left out; the median of the rest,
over --repeats rounds, is reported.
MFU needs the device's peak FLOP/s: known GPUs are detected by the trainer, elsewhere pass
`--metrics.peak_tflops=X`; on CPU the tokens/s ratios are the useful part.

    python benchmarks/throughput.py                                  # configs/tiny_*.yaml on this machine
    python benchmarks/throughput.py --configs llama350m --steps 60 --nproc 8 --data.source=/data/c4_sample.jsonl

Any `--section.key=value` argument is passed to every run as a trainer config override.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.trainer_runs import EXIT_OK, TrainerRun, launch, read_records, series  # noqa: E402
from trainer.config import CHOICES, ConfigError, parse_overrides  # noqa: E402

OPTIMIZERS = CHOICES["optim.name"]  # every optimizer the trainer knows, AdamW first


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated; adamw first")
    parser.add_argument("--configs", default="tiny", help="configs/<CONFIGS>_<optimizer>.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--log-every", type=int, default=10, help="steps per timing window")
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all optimizers (noisy machines)")
    parser.add_argument("--nproc", type=int, default=1, help="processes per run (torchrun when > 1)")
    parser.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS per process; 0 = inherit")
    parser.add_argument("--runs-dir", type=Path, default=Path("runs/throughput"))
    parser.add_argument("--out", type=Path, help="also write the markdown table here")
    args, overrides = parser.parse_known_args(argv)
    try:
        parse_overrides(overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.steps < 2 * args.log_every:
        parser.error("--steps must cover at least two --log-every windows (the first is warm-up)")
    args.runs_dir = args.runs_dir.resolve()
    return args, overrides


@dataclass
class Windows:
    """One optimizer's timing windows (after each run's warm-up window), over all rounds."""

    tokens_per_step: int = 0
    rates: list[float] = field(default_factory=list)  # tokens/s
    mfus: list[float] = field(default_factory=list)
    failed: bool = False

    def summary(self) -> dict[str, float] | None:
        if self.failed or not self.rates:
            return None
        tok_s = statistics.median(self.rates)
        return {
            "tokens_per_s": tok_s,
            "step_ms": 1e3 * self.tokens_per_step / tok_s,
            "mfu": statistics.median(self.mfus) if self.mfus else float("nan"),
        }


def measure(name: str, args: argparse.Namespace, overrides: list[str], into: Windows) -> None:
    """One fresh run of an optimizer; its windows after the warm-up one are added to `into`."""
    run = TrainerRun(
        f"{args.configs}_{name}",
        (
            f"--train.steps={args.steps}",
            f"--metrics.log_every={args.log_every}",
            "--train.eval_every=0",
            "--checkpoint.every=0",
            "--metrics.tensorboard=false",
            f"--train.runs_dir={args.runs_dir}",
            f"--train.run_name={name}",
            *overrides,
        ),
    )
    cfg = run.resolved()
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # a fresh run: a resumed one would time only its tail
    code = launch(run, cfg.run_dir / "train.log", nproc=args.nproc, threads=args.threads or None)
    if code != EXIT_OK:
        print(f"{name}: failed (exit {code}); see {cfg.run_dir / 'train.log'}", file=sys.stderr)
        into.failed = True
        return
    records = read_records(cfg.run_dir)
    into.tokens_per_step = cfg.train.global_batch_size * cfg.train.seq_len
    into.rates += [v for _, v in series(records, "tokens_per_s")[1:]]
    into.mfus += [v for _, v in series(records, "mfu")[1:]]


def table(results: dict[str, dict[str, float] | None]) -> str:
    base = results.get("adamw")
    lines = ["| optimizer | tokens/s | vs AdamW | step time | MFU |", "| --- | --- | --- | --- | --- |"]
    for name, r in results.items():
        if r is None:
            lines.append(f"| {name} | failed | — | — | — |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "—"
        mfu = f"{r['mfu']:.1%}" if r["mfu"] == r["mfu"] else "n/a"
        lines.append(f"| {name} | {r['tokens_per_s']:,.0f} | {ratio} | {r['step_ms']:.1f} ms | {mfu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    names = args.optimizers.split(",")
    windows = {name: Windows() for name in names}
    try:
        for name in names:  # every config resolves before the first run
            TrainerRun(f"{args.configs}_{name}", tuple(overrides)).resolved()
        for round_ in range(args.repeats):  # alternate the order so a drifting machine load hits all alike
            for name in names if round_ % 2 == 0 else names[::-1]:
                measure(name, args, overrides, windows[name])
                print(f"round {round_ + 1}/{args.repeats}: {name} measured", flush=True)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    results = {name: w.summary() for name, w in windows.items()}
    text = table(results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    return 0 if all(r is not None for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
