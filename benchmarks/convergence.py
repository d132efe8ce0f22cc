"""Convergence benchmark: every optimizer on the same data and token budget, each with a small lr sweep around
its spec default, run by the real trainer (one launch/pretrain.py process per run, world size 1).

AdamW's grid runs first; every matrix optimizer then runs with its AdamW-routed params (embedding, head, norms)
at AdamW's best lr, so what differs between optimizers is the matrix rule alone.
Reports per optimizer its best final eval loss, the tokens it needed to reach AdamW's best final eval loss, the
trainer-measured train time and the optimizer-state bytes; writes a markdown table and a PNG of eval loss against
tokens. Resumable: a finished run (its result.json) is skipped, an interrupted one continues from its latest
checkpoint through the trainer's own resume; a run directory made with other settings is an error, never mixed in.

    python benchmarks/convergence.py                 # CPU default: llama_tiny, generated order-2 corpus, 7 x 3 runs
    python benchmarks/convergence.py --quick         # smoke test: a few steps, seconds per run
    python benchmarks/convergence.py --data my.txt   # local text (a BPE tokenizer trained once, shared)
    python benchmarks/convergence.py --model llama_60m --model.vocab_size=512 --steps 10000 --jobs 1 \\
        --threads 0 --train.global_batch_size=256 --train.micro_batch_size=64 --parallel.device=cuda  # GPU

Any `--section.key=value` argument is passed to every run as a trainer config override.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from benchmarks.convergence_report import (  # noqa: E402
    BASELINE,
    RunResult,
    best_run,
    markdown_table,
    plot,
    summarize,
)
from benchmarks.trainer_runs import (  # noqa: E402
    EXIT_DIVERGED,
    EXIT_OK,
    RunBusy,
    StateBytes,
    TrainerRun,
    eval_curve,
    launch,
    optimizer_state_bytes,
    read_records,
    run_parallel,
    train_seconds,
)
from trainer.config import CHOICES, Config, ConfigError, parse_overrides  # noqa: E402
from trainer.data import DataError, build_tokenizer, open_source, save_tokenizer  # noqa: E402

OPTIMIZERS = CHOICES["optim.name"]  # every optimizer the trainer knows, AdamW first
# Around each optimizer's spec-default lr (the lr of its configs/<prefix>_<name>.yaml), rounded to 2 digits.
LR_MULTIPLIERS = (1 / 3, 1.0, 3.0)
# --quick: a tiny budget for smoke tests (defaults are for the full CPU run).
QUICK = dict(steps=12, eval_every=4)
QUICK_OVERRIDES = (
    "--train.global_batch_size=8",
    "--train.micro_batch_size=8",
    "--train.seq_len=32",
    "--data.eval_sequences=8",
)
RESULT = "result.json"  # written into a run directory when the run has finished (or diverged)


class SweepError(RuntimeError):
    """The sweep cannot go on as asked (one line for the user)."""


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--optimizers", default=",".join(OPTIMIZERS), help="comma-separated")
    parser.add_argument(
        "--lr-multipliers",
        default=",".join(f"{m:g}" for m in LR_MULTIPLIERS),
        help="comma-separated factors of each optimizer's spec-default lr",
    )
    parser.add_argument("--configs", default="tiny", help="base configs: configs/<CONFIGS>_<optimizer>.yaml")
    parser.add_argument("--model", default="llama_tiny", help="a size in models/registry.py")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--data", default="generated", help="'generated' or a local text file or directory")
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run; 0 = inherit")
    parser.add_argument("--runs-dir", type=Path, help="default runs/convergence (runs/convergence_quick)")
    parser.add_argument(
        "--out", type=Path, help="table + plot; default benchmarks/results (<runs-dir>/results)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps on a tiny batch: a smoke test")
    args, overrides = parser.parse_known_args(argv)
    try:
        parse_overrides(overrides)
    except ConfigError as err:
        parser.error(str(err))
    if args.quick:
        args.steps, args.eval_every = QUICK["steps"], QUICK["eval_every"]
        overrides = [*QUICK_OVERRIDES, *overrides]
    root = Path(__file__).resolve().parent.parent
    default_runs = root / "runs" / ("convergence_quick" if args.quick else "convergence")
    args.runs_dir = (args.runs_dir or default_runs).resolve()
    args.out = args.out or (args.runs_dir / "results" if args.quick else root / "benchmarks" / "results")
    return args, overrides


@dataclass
class GridPoint:
    """One (optimizer, lr) run of the sweep and its resolved config."""

    optimizer: str
    lr: float
    run: TrainerRun
    cfg: Config
    status: str = "pending"  # then done | diverged | failed

    def result(self) -> RunResult:
        records = read_records(self.cfg.run_dir)
        return RunResult(self.optimizer, self.lr, self.status, eval_curve(records), train_seconds(records))


def common_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """What every run shares: model, budget, eval points, checkpoints (for resume), where runs go."""
    return [
        f"--model.name={args.model}",
        f"--train.steps={args.steps}",
        f"--train.eval_every={args.eval_every}",
        f"--metrics.log_every={args.eval_every}",  # the eval steps also log their token count
        f"--checkpoint.every={args.eval_every * max(1, args.steps // args.eval_every // 4)}",
        "--checkpoint.keep_last=1",
        "--metrics.tensorboard=false",
        f"--train.runs_dir={args.runs_dir}",
        *overrides,
    ]


def grid_points(args: argparse.Namespace, names: list[str], overrides: list[str]) -> list[GridPoint]:
    """The lr grid of each named optimizer around the lr of its base config."""
    multipliers = [float(m) for m in args.lr_multipliers.split(",")]
    points = []
    for name in names:
        config = f"{args.configs}_{name}"
        default_lr = TrainerRun(config, ()).resolved().optim.lr
        for m in multipliers:
            lr = float(f"{default_lr * m:.2g}")
            run = TrainerRun(config, (*overrides, f"--optim.lr={lr}", f"--train.run_name={name}_lr{lr:g}"))
            points.append(GridPoint(name, lr, run, run.resolved()))
    return points


# The generated corpus at order 2 over 64 tokens: the next token depends on the last two, so a bigram model
# (embedding + head, AdamW in every optimizer) is stuck near ln 64 and only the hidden matrices (attention + MLP,
# the matrix rules' job) take the loss down toward the floor. Order 1 would not tell the matrix rules apart.
GENERATED = ["--data.vocab_size=64", "--data.generated_order=2"]


def data_overrides(args: argparse.Namespace, sweep_dir: Path) -> list[str]:
    """Generated: GENERATED. Local text: one BPE tokenizer trained here (the trainer's own training code) and
    shared by every run."""
    if args.data == "generated":
        return list(GENERATED)
    source = str(Path(args.data).expanduser().resolve())
    cfg = TrainerRun(f"{args.configs}_adamw", (f"--data.source={source}",)).resolved()
    tokenizer = sweep_dir / "tokenizer.json"
    if not tokenizer.is_file():
        save_tokenizer(build_tokenizer(cfg.data, None)[0], sweep_dir)
    return [f"--data.source={source}", f"--data.tokenizer={tokenizer}"]


def made_elsewhere(cfg: Config) -> bool:
    """A run directory left by other settings (another budget, data, lr) must not be resumed or reused."""
    saved = cfg.run_dir / "config.yaml"
    return saved.is_file() and yaml.safe_load(saved.read_text()) != cfg.to_dict()


def execute(point: GridPoint, threads: int | None) -> str:
    """Run one grid point to completion (or skip it); its status: done | diverged | failed."""
    cfg = point.cfg
    result = cfg.run_dir / RESULT
    if result.is_file():
        print(f"skip {cfg.train.run_name}: finished earlier", flush=True)
        return json.loads(result.read_text())["status"]
    started = time.perf_counter()
    try:
        code = launch(point.run, cfg.run_dir / "train.log", threads=threads)
    except RunBusy as err:
        print(f"{cfg.train.run_name}: {err}; left alone", flush=True)
        return "failed"
    status = {EXIT_OK: "done", EXIT_DIVERGED: "diverged"}.get(code, "failed")
    if status != "failed":
        result.write_text(json.dumps({"status": status, "optimizer": point.optimizer, "lr": point.lr}) + "\n")
    print(
        f"{cfg.train.run_name}: {status} (exit {code}) in {time.perf_counter() - started:.0f} s; "
        f"log {cfg.run_dir / 'train.log'}",
        flush=True,
    )
    return status


def run_sweep(args: argparse.Namespace, overrides: list[str]) -> tuple[list[GridPoint], float | None]:
    """AdamW's grid first; then every matrix optimizer's, with its AdamW-routed params (embedding, head, norms)
    at AdamW's best lr, so the comparison isolates the matrix rules (the same for every optimizer).
    Returns the points and that lr (None: no AdamW baseline ran). Raises SweepError."""
    names = args.optimizers.split(",")
    grid_points(args, names, overrides)  # every config resolves before the first run
    points: list[GridPoint] = []
    adamw_lr = None
    for phase in ([n for n in names if n == BASELINE], [n for n in names if n != BASELINE]):
        extra = [] if adamw_lr is None else [f"--optim.adamw_lr={adamw_lr}"]
        new = grid_points(args, phase, [*overrides, *extra])
        elsewhere = [str(p.cfg.run_dir) for p in new if made_elsewhere(p.cfg)]
        if elsewhere:
            raise SweepError(
                f"made with other settings (delete or use another --runs-dir): {', '.join(elsewhere)}"
            )
        statuses = run_parallel(lambda p: execute(p, args.threads or None), new, args.jobs)
        for point, status in zip(new, statuses, strict=True):
            point.status = status
        points += new
        if phase == [BASELINE]:
            failed = [p.cfg.train.run_name for p in new if p.status == "failed"]
            if failed:  # its best lr would be a guess, and would change once they are fixed
                raise SweepError(f"AdamW baseline runs failed ({', '.join(failed)}): see their train.log")
            best = best_run([p.result() for p in new])
            adamw_lr = best.lr if best is not None else None
    return points, adamw_lr


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line
        ]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores (torch {torch.__version__}, CPU)"


def report(args: argparse.Namespace, points: list[GridPoint], adamw_lr: float | None) -> str:
    """Read every run back, write the markdown table and the plot into args.out; the report's text."""
    first = points[0].cfg
    _, vocab_size, floor = open_source(first.data, "train", build_tokenizer(first.data, None)[0])
    state: dict[str, StateBytes] = {}
    for p in points:
        if p.optimizer not in state:
            state[p.optimizer] = optimizer_state_bytes(p.cfg, vocab_size)
    summaries = summarize([p.result() for p in points], state)
    t = first.train
    setting = (
        f"{first.model.name} ({state[points[0].optimizer].params / 1e6:.2f}M params), data {first.data.source}, "
        f"{t.steps} steps x {t.global_batch_size} x {t.seq_len} tokens, {t.schedule} schedule"
    )
    if floor is not None:
        setting += f"; entropy floor {floor:.4f} nats/token"
    routed = (
        f"AdamW's best lr ({adamw_lr:g})"
        if adamw_lr is not None
        else "the lr of their base config (no AdamW baseline ran)"
    )
    command = shlex.join(["python", "benchmarks/convergence.py", *args.argv])
    text = "\n".join(
        [
            f"Setting: {setting}. The matrix optimizers' AdamW-routed params (embedding, head, norms) use {routed}.",
            f"Command: `{command}`",
            f"Machine: {machine()}; {args.jobs} run(s) at a time, {args.threads or 'default'} thread(s) each",
            "",
            markdown_table(summaries, t.steps * t.global_batch_size * t.seq_len),
        ]
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "convergence.md").write_text(text + "\n")
    plot(summaries, floor, args.out / "convergence.png", setting.split(";")[0])
    return text


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    try:
        common = common_overrides(args, [*data_overrides(args, args.runs_dir), *overrides])
        points, adamw_lr = run_sweep(args, common)
    except (ConfigError, DataError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue the sweep", file=sys.stderr)
        return 130
    print(report(args, points, adamw_lr))
    print(f"\nwrote {args.out}/convergence.md and convergence.png ({time.perf_counter() - started:.0f} s)")
    failed = [p.cfg.train.run_name for p in points if p.status == "failed"]
    if failed:
        print(f"failed runs (see their train.log; re-run to retry): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
