"""The order-2 diagnostic of the shipped tiny configs: how many steps each needs to leave the plateau.

The generated corpus at order 2 over 64 tokens (the next token depends on the last two) has a plateau near 4.05
nats that the embedding and head (AdamW in every optimizer) reach alone; only the hidden matrices, the matrix
rule's job, take the loss below it (floor 1.83). An lr far off its rule's optimum can stay there for thousands of
steps. The shipped defaults are chosen on real text, not here: this is a diagnostic reported for every config, not
a criterion they must pass.

Each configs/tiny_<optimizer>.yaml is trained at its own settings (lrs, batch, schedule) on the order-2 task for
--steps steps with an eval every --eval-every, one run per optimizer and seed (train.seed: init and data order).
Steps to leave the plateau: the first eval step whose seed-mean eval loss is below ln 64 - PLATEAU_MARGIN
(benchmarks/convergence.py), or never. Writes <out>/plateau.md and .json.

    python -m benchmarks.plateau                          # every shipped tiny config, 1500 steps, seed 0
    python -m benchmarks.plateau --optimizers swan,auon --seeds 3
    python -m benchmarks.plateau --quick                  # smoke test: a few steps of a tiny batch
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import statistics
import sys
from pathlib import Path

from benchmarks.convergence import OPTIMIZERS, PLATEAU_MARGIN
from benchmarks.harness import (
    EXIT_OK,
    ORDER2_TASK,
    ROOT,
    TrainerRun,
    launch,
    read_records,
    run_parallel,
    series,
)
from trainer.config import ConfigError, load_config

QUIET = ("--metrics.tensorboard=false", "--checkpoint.every=0", "--metrics.memory=false")
QUICK = (
    "--train.global_batch_size=4",
    "--train.micro_batch_size=4",
    "--train.seq_len=32",
    "--data.eval_sequences=8",
)
THRESHOLD = math.log(64) - PLATEAU_MARGIN  # the order-2 task's vocabulary is 64 tokens


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated; default all")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run")
    parser.add_argument("--runs-dir", type=Path, help="default runs/plateau[_quick]")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--quick", action="store_true", help="40 steps of 4 x 32 tokens: a smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.eval_every = 40, 10
    args.runs_dir = args.runs_dir or ROOT / "runs" / ("plateau_quick" if args.quick else "plateau")
    args.optimizers = args.optimizers.split(",")
    unknown = sorted(set(args.optimizers) - set(OPTIMIZERS))
    if unknown or min(args.steps, args.eval_every, args.seeds, args.jobs) < 1:
        parser.error(
            f"unknown optimizers {unknown}" if unknown else "steps, eval-every, seeds and jobs must be >= 1"
        )
    return args


def trainer_run(args: argparse.Namespace, name: str, seed: int) -> TrainerRun:
    overrides = (
        *ORDER2_TASK,
        *QUIET,
        *(QUICK if args.quick else ()),
        f"--train.steps={args.steps}",
        f"--train.eval_every={args.eval_every}",
        f"--train.seed={seed}",
        f"--train.runs_dir={args.runs_dir}",
        f"--train.run_name={name}_seed{seed}",
    )
    return TrainerRun(f"tiny_{name}.yaml", overrides)


def train(args: argparse.Namespace, run: TrainerRun) -> list[tuple[int, float]]:
    """The run's (step, eval loss) curve; an earlier finished run of the same settings is read, not re-run."""
    records = read_records(run.run_dir)
    done = any(r.get("step") == args.steps and "eval/loss" in r for r in records)
    if not done or run.made_elsewhere():
        code = launch(run, run.run_dir.with_suffix(".log"), threads=args.threads)
        if code != EXIT_OK:
            raise SystemExit(f"{run.config} exited {code}: see {run.run_dir.with_suffix('.log')}")
        records = read_records(run.run_dir)
    return series(records, "eval/loss")


def steps_to_leave(curve: list[tuple[int, float]]) -> int | None:
    """The first eval step below THRESHOLD; None = never."""
    return next((step for step, loss in curve if loss < THRESHOLD), None)


def mean_curve(curves: list[list[tuple[int, float]]]) -> list[tuple[int, float]]:
    steps = [step for step, _ in curves[0]]
    return [(step, statistics.fmean(c[i][1] for c in curves)) for i, step in enumerate(steps)]


def loss_at(curve: list[tuple[int, float]], step: int) -> str:
    return next((f"{loss:.2f}" for s, loss in curve if s == step), "—")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        runs = {
            name: [trainer_run(args, name, seed) for seed in range(args.seeds)] for name in args.optimizers
        }
        configs = {name: load_config(f"tiny_{name}.yaml").optim for name in args.optimizers}
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flat = [run for name in args.optimizers for run in runs[name]]
    curves = dict(zip(flat, run_parallel(lambda run: train(args, run), flat, args.jobs), strict=True))
    marks = [args.steps // 3, 2 * args.steps // 3, args.steps]
    marks = [max(args.eval_every, m - m % args.eval_every) for m in marks]
    rows, data = [], {}
    for name in args.optimizers:
        curve = mean_curve([curves[run] for run in runs[name]])
        leave = steps_to_leave(curve)
        o = configs[name]
        rest = o.lr if o.adamw_lr is None else o.adamw_lr
        cells = " | ".join(loss_at(curve, m) for m in marks)
        rows.append(f"| {name} | {o.lr:g} ({rest:g}) | {cells} | {'never' if leave is None else leave} |")
        data[name] = dict(lr=o.lr, adamw_lr=rest, steps_to_leave=leave, mean_eval_curve=curve)
    lines = [
        f"Command: `python -m benchmarks.plateau {' '.join(argv if argv is not None else sys.argv[1:])}`",
        f"Date: {datetime.date.today()}; {args.seeds} seed(s) per config (init and data order)",
        "",
        f"configs/tiny_<optimizer>.yaml with `{' '.join(ORDER2_TASK)}`, {args.steps} steps at the configs' own "
        f"settings. Steps to leave the plateau: the first eval step whose seed-mean eval loss is below ln 64 - "
        f"{PLATEAU_MARGIN:g} = {THRESHOLD:.3f}. A diagnostic, not a criterion: the lrs were chosen on real text.",
        "",
        "| optimizer | lr (embedding, head, norms) | "
        + " | ".join(f"step {m}" for m in marks)
        + " | steps to leave the plateau |",
        "| --- | --- | " + "---: | " * len(marks) + "---: |",
        *rows,
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "plateau_quick" if args.quick else "plateau"
    (args.out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
