"""Convergence benchmark: optimizers compared at equal tokens with equal tuning freedom, each run by the real
trainer (one launch/pretrain.py process per run, world size 1).

The protocol, per model and batch size (the project's benchmarking rules: same budget, same freedoms, interior
best lr, seeds):
1. AdamW with one lr for every parameter (optim.adamw_lr = optim.lr), swept on a log grid: its best lr is the lr
   of every optimizer's AdamW-routed params (embedding, head, norms) in phase 2.
2. The hidden-matrix lr of every optimizer, AdamW included, swept on a log grid (factor --grid-factor, from
   --grid-points around the lr of configs/<configs>_<optimizer>.yaml; AdamW's around phase 1's best).
   After each pass a grid whose best lr sits at an edge gets the next point beyond it, at most --max-extend per
   side; a diverged run (trainer exit 3) counts as worse than any finished one.
3. Each optimizer's best lr is re-run at --seeds seeds (train.seed: the init; the data order is the trainer's,
   the same for every run); tables rank by the seed-mean final eval loss and report its [min, max].
Every run sees --tokens tokens, --batch x --seq-len per step, and evaluates at the same --eval-points token
counts. Identical configs share one run directory (runs-dir/<sweep>/<optimizer>_lr<lr>_rest<lr>[_seed<n>]).
Resumable: a finished run (its result.json) is skipped, an interrupted one continues from its latest checkpoint
through the trainer's own resume; a run directory made with other settings is an error, never mixed in.

    python -m benchmarks.convergence                                  # one sweep: llama_tiny, batch 16, real text
    python -m benchmarks.convergence --batch-sizes 16,64,256          # batch-size study at equal tokens
    python -m benchmarks.convergence --models llama_tiny,llama_tiny_w192   # width transfer
    python -m benchmarks.convergence --reduced                        # ~15 min on 2 cores (0.5M tokens, 2 seeds)
    python -m benchmarks.convergence --quick                          # smoke test: seconds per run
    python -m benchmarks.convergence --data generated                 # the order-2 diagnostic (*_generated.md)

Any `--section.key=value` argument is passed to every run as a trainer config override.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.convergence_report import (
    BASELINE,
    RunResult,
    SweepReport,
    batch_table,
    markdown_table,
    plot_batch,
    plot_curves,
    plot_width,
    summarize,
    width_table,
)
from benchmarks.harness import (
    EXIT_DIVERGED,
    EXIT_OK,
    ORDER2_TASK,
    RunBusy,
    TrainerRun,
    eval_curve,
    launch,
    read_records,
    run_parallel,
    state_bytes_of,
    train_seconds,
)
from benchmarks.real_text import real_text_jsonl
from trainer.config import CHOICES, Config, ConfigError, parse_args_and_overrides
from trainer.data import DataError, build_tokenizer, open_source, save_tokenizer

OPTIMIZERS = CHOICES["optim.name"]  # every optimizer the trainer knows, AdamW first
BATCH_OPTIMIZERS = "adamw,swan,sinkgd,muon,normuon"  # --batch-sizes default: the stateless claims and Muon's
# Budget defaults: 1536 steps x 16 x 128 = 3.1M tokens, a multiple of 256 x 128 x 16 (batch 256, 16 evals).
DEFAULTS = dict(tokens=3_145_728, batch=16, seq_len=128, eval_points=16, seeds=3, grid_points=3, data="real")
REDUCED = dict(tokens=524_288, seeds=2)  # ~15 min for the 7-optimizer sweep with --jobs 2 on 2 cores
QUICK = dict(tokens=3072, batch=8, seq_len=32, eval_points=3, data="generated")  # 12 steps, an eval every 4
QUICK_OVERRIDES = ("--data.eval_sequences=8",)
RESULT = "result.json"  # written into a run directory when the run has finished (or diverged)
# The generated corpus at order 2 over 64 tokens: the next token depends on the last two, so a bigram model
# (embedding + head, AdamW in every optimizer) is stuck near ln 64 and only the hidden matrices (attention + MLP,
# the matrix rules' job) take the loss down toward the floor. Order 1 would not tell the matrix rules apart.


class SweepError(RuntimeError):
    """The sweep cannot go on as asked (one line for the user)."""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--optimizers", help=f"comma-separated; default all ({BATCH_OPTIMIZERS} with --batch-sizes)"
    )
    parser.add_argument("--configs", default="tiny", help="base configs: configs/<CONFIGS>_<optimizer>.yaml")
    parser.add_argument("--model", default="llama_tiny", help="a size in models/registry.py")
    study = parser.add_mutually_exclusive_group()
    study.add_argument(
        "--batch-sizes", type=_ints, help="batch-size study: the protocol per batch (sequences)"
    )
    study.add_argument("--models", help="width study: the protocol per model, comma-separated")
    parser.add_argument("--tokens", type=int, help=f"tokens per run (default {DEFAULTS['tokens']:_})")
    parser.add_argument("--batch", type=int, help=f"sequences per step (default {DEFAULTS['batch']})")
    parser.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {DEFAULTS['seq_len']})")
    parser.add_argument("--eval-points", type=int, help=f"evals per run (default {DEFAULTS['eval_points']})")
    parser.add_argument("--grid-factor", type=float, default=2.0, help="ratio of neighbouring lrs")
    parser.add_argument(
        "--grid-points", type=int, help=f"starting lrs per grid (default {DEFAULTS['grid_points']})"
    )
    parser.add_argument("--max-extend", type=int, default=4, help="lrs added beyond each edge at most")
    parser.add_argument(
        "--seeds", type=int, help=f"seeds at each best lr, 0 included (default {DEFAULTS['seeds']})"
    )
    parser.add_argument(
        "--data", help="real (default) | generated (the order-2 diagnostic) | a text file or dir"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run; 0 = inherit")
    parser.add_argument("--runs-dir", type=Path, help="default runs/convergence[_reduced|_quick]")
    parser.add_argument(
        "--out", type=Path, help="tables + plots; default benchmarks/results (<runs-dir>/results)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--reduced", action="store_true", help="0.5M tokens, 2 seeds: ~15 min on 2 cores")
    budget.add_argument("--quick", action="store_true", help="a few steps on a tiny batch: a smoke test")
    args, overrides = parse_args_and_overrides(parser, argv)
    preset = {**DEFAULTS, **(REDUCED if args.reduced else QUICK if args.quick else {})}
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        overrides = [*QUICK_OVERRIDES, *overrides]
    args.mode = "batch" if args.batch_sizes else "width" if args.models else "sweep"
    args.models = args.models.split(",") if args.models else [args.model]
    args.batch_sizes = args.batch_sizes or [args.batch]
    args.optimizers = (
        args.optimizers or (BATCH_OPTIMIZERS if args.mode == "batch" else ",".join(OPTIMIZERS))
    ).split(",")
    suffix = "_reduced" if args.reduced else "_quick" if args.quick else ""
    root = Path(__file__).resolve().parent.parent
    args.runs_dir = (args.runs_dir or root / "runs" / f"convergence{suffix}").resolve()
    args.out = args.out or (args.runs_dir / "results" if args.quick else root / "benchmarks" / "results")
    args.stem = "convergence" + {"sweep": "", "batch": "_batch", "width": "_width"}[args.mode]
    args.stem += "_reduced" if args.reduced else ""
    args.stem += (
        "" if args.data == "real" else f"_{Path(args.data).stem}"
    )  # generated, or a local source's name
    return args, overrides


def check_budget(args: argparse.Namespace) -> None:
    """Equal budgets: every run sees exactly --tokens tokens and evaluates at the same token counts, so the
    budget must be a whole number of eval intervals at every batch size. Raises SweepError."""
    unit = math.lcm(*(b * args.seq_len * args.eval_points for b in args.batch_sizes))
    if args.tokens % unit:
        suggestion = max(1, round(args.tokens / unit)) * unit
        raise SweepError(
            f"--tokens {args.tokens} is not a multiple of batch x seq_len x eval_points ({unit} for every "
            f"batch size): try --tokens {suggestion}"
        )


def data_overrides(args: argparse.Namespace, overrides: list[str]) -> list[str]:
    """Generated: the order-2 task (harness.ORDER2_TASK). Real text (benchmarks/real_text.py) or a local path: one BPE tokenizer trained
    here (the trainer's own training code) and shared by every run of every sweep."""
    if args.data == "generated":
        return list(ORDER2_TASK)
    source = real_text_jsonl() if args.data == "real" else Path(args.data).expanduser().resolve()
    cfg = TrainerRun(f"{args.configs}_adamw", (*overrides, f"--data.source={source}")).resolved()
    tokenizer_dir = args.runs_dir / f"tokenizer_{source.stem}_{cfg.data.vocab_size}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        save_tokenizer(build_tokenizer(cfg.data, None)[0], tokenizer_dir)
    return [f"--data.source={source}", f"--data.tokenizer={tokenizer_dir / 'tokenizer.json'}"]


@dataclass(eq=False)
class Point:
    """One run of the sweep: an optimizer at a matrix lr, its other params at rest_lr, one seed."""

    optimizer: str
    lr: float
    rest_lr: float
    seed: int
    run: TrainerRun
    cfg: Config
    status: str = "pending"  # then done | diverged | failed

    def result(self) -> RunResult:
        records = read_records(self.cfg.run_dir)
        curve = eval_curve(records)
        return RunResult(self.optimizer, self.lr, self.status, curve, train_seconds(records), self.seed)


@dataclass
class Grid:
    """One optimizer's seed-0 lr grid: offset k runs lr = base * factor**k (3 significant digits), so two grids
    on the same base name the same lrs and share their runs."""

    optimizer: str
    base: float
    factor: float
    start: tuple[int, int]  # first and last offset of the starting grid
    rest_lr: float | None  # None: phase 1, every parameter at the matrix lr
    points: dict[int, Point] = field(default_factory=dict)

    def lr(self, k: int) -> float:
        return float(f"{self.base * self.factor**k:.3g}")

    def losses(self) -> dict[int, float | None]:
        """offset -> final eval loss (None: diverged) of the finished and diverged points."""
        return {
            k: p.result().final_loss
            for k, p in sorted(self.points.items())
            if p.status in ("done", "diverged")
        }

    @property
    def failed(self) -> bool:
        return any(p.status == "failed" for p in self.points.values())

    def best(self) -> int | None:
        return best_offset(self.losses())


def best_offset(losses: dict[int, float | None]) -> int | None:
    """The offset of the lowest final eval loss; a diverged point (None) is worse than any finished one."""
    finished = {k: v for k, v in losses.items() if v is not None}
    return min(finished, key=finished.__getitem__) if finished else None


def extension(losses: dict[int, float | None], start: tuple[int, int], max_extend: int) -> list[int]:
    """Offsets to run next so that the best lr ends up interior: the one beyond each edge the best finished point
    sits at, while that side has fewer than max_extend points beyond the starting grid. Every point diverged:
    the one below the lowest (a smaller lr is what a divergence asks for). [] = interior, or the limit reached."""
    low, high, best = min(losses), max(losses), best_offset(losses)
    new = []
    if (best is None or best == low) and start[0] - low < max_extend:
        new.append(low - 1)
    if best is not None and best == high and high - start[1] < max_extend:
        new.append(high + 1)
    return new


@dataclass
class Sweep:
    """One protocol: a model at a batch size, its runs under runs_dir/<name>."""

    dir: Path
    overrides: list[str]  # what every run shares
    args: argparse.Namespace
    points: dict[str, Point] = field(default_factory=dict)  # by run name: an identical config is one run

    def point(self, optimizer: str, lr: float, rest_lr: float, seed: int) -> Point:
        name = f"{optimizer}_lr{lr:g}_rest{rest_lr:g}" + (f"_seed{seed}" if seed else "")
        if name not in self.points:
            lrs = (f"--optim.lr={lr}", f"--optim.adamw_lr={rest_lr}", f"--train.seed={seed}")
            run = TrainerRun(
                f"{self.args.configs}_{optimizer}", (*self.overrides, *lrs, f"--train.run_name={name}")
            )
            self.points[name] = Point(optimizer, lr, rest_lr, seed, run, run.resolved())
        return self.points[name]

    def grid(self, optimizer: str, rest_lr: float | None, centre: int = 0) -> Grid:
        base = TrainerRun(f"{self.args.configs}_{optimizer}", ()).resolved().optim.lr
        low = centre - (self.args.grid_points - 1) // 2
        return Grid(optimizer, base, self.args.grid_factor, (low, low + self.args.grid_points - 1), rest_lr)

    def add(self, grid: Grid, k: int) -> Point:
        lr = grid.lr(k)
        grid.points[k] = self.point(grid.optimizer, lr, lr if grid.rest_lr is None else grid.rest_lr, 0)
        return grid.points[k]

    def run(self, points: list[Point]) -> None:
        """Every pending point, --jobs at a time. Raises SweepError for a run directory of other settings."""
        todo = [p for p in dict.fromkeys(points) if p.status == "pending"]
        elsewhere = [str(p.cfg.run_dir) for p in todo if p.run.made_elsewhere()]
        if elsewhere:
            raise SweepError(
                f"made with other settings (delete or use another --runs-dir): {', '.join(elsewhere)}"
            )
        statuses = run_parallel(lambda p: execute(p, self.args.threads or None), todo, self.args.jobs)
        for point, status in zip(todo, statuses, strict=True):
            point.status = status

    def until_interior(self, grids: list[Grid]) -> None:
        """Run the starting grids, then extend each (a grid with a failed run stops) until no edge asks for more."""
        new = [self.add(g, k) for g in grids for k in range(g.start[0], g.start[1] + 1)]
        while new:
            self.run(new)
            new = [
                self.add(g, k)
                for g in grids
                if not g.failed
                for k in extension(g.losses(), g.start, self.args.max_extend)
            ]

    def protocol(self) -> tuple[Grid, list[Grid], dict[str, list[Point]]]:
        """Phase 1 (AdamW, one lr), phase 2 (every optimizer's matrix lr, the rest at phase 1's best), then the
        seeds at each best lr. Raises SweepError when phase 1 has no usable best lr."""
        phase1 = self.grid(BASELINE, None)
        self.until_interior([phase1])
        best = phase1.best()
        if phase1.failed or best is None:  # its best lr would be a guess, and change once they are fixed
            raise SweepError(f"{self.dir.name}: AdamW's phase-1 runs failed or diverged: see their train.log")
        rest_lr = phase1.lr(best)
        grids = [self.grid(n, rest_lr, best if n == BASELINE else 0) for n in self.args.optimizers]
        self.until_interior(grids)
        seeds = {}
        for g in grids:
            k = g.best()
            if k is not None and not g.failed:
                seeds[g.optimizer] = [
                    self.point(g.optimizer, g.lr(k), rest_lr, s) for s in range(self.args.seeds)
                ]
        self.run([p for runs in seeds.values() for p in runs])
        return phase1, grids, seeds


def make_sweeps(args: argparse.Namespace, overrides: list[str]) -> list[Sweep]:
    """One Sweep per (model, batch size), named by everything that makes its runs differ from another sweep's."""
    data = data_overrides(args, overrides)
    micro = TrainerRun(f"{args.configs}_adamw", ()).resolved().train.micro_batch_size  # the base configs'
    sweeps = []
    for model in args.models:
        for batch in args.batch_sizes:
            steps = args.tokens // (batch * args.seq_len)
            every = steps // args.eval_points
            name = f"{Path(args.data).stem}_{model}_{args.tokens}tok_b{batch}x{args.seq_len}"
            common = [
                f"--model.name={model}",
                f"--train.steps={steps}",
                f"--train.global_batch_size={batch}",
                f"--train.micro_batch_size={math.gcd(batch, micro)}",  # divides the batch
                f"--train.seq_len={args.seq_len}",
                f"--train.eval_every={every}",
                f"--metrics.log_every={every}",  # the eval steps also log their token count
                f"--checkpoint.every={every * max(1, args.eval_points // 4)}",
                "--checkpoint.keep_last=1",
                "--metrics.tensorboard=false",
                f"--train.runs_dir={args.runs_dir / name}",
                *data,
                *overrides,
            ]
            sweeps.append(Sweep(args.runs_dir / name, common, args))
    return sweeps


def execute(point: Point, threads: int | None) -> str:
    """Run one point to completion (or skip it); its status: done | diverged | failed."""
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
    wall = time.perf_counter() - started
    if status != "failed":
        result.write_text(json.dumps({"status": status, "wall_s": round(wall, 1)}) + "\n")
    print(
        f"{cfg.train.run_name}: {status} (exit {code}) in {wall:.0f} s; log {cfg.run_dir / 'train.log'}",
        flush=True,
    )
    return status


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


def read_back(phase1: Grid, grids: list[Grid], seeds: dict[str, list[Point]]) -> SweepReport:
    """Every run of one protocol read back from its run directory."""
    first = phase1.points[phase1.start[0]].cfg
    _, vocab_size, floor = open_source(first.data, "train", build_tokenizer(first.data, None)[0])
    state = {g.optimizer: state_bytes_of(next(iter(g.points.values())).cfg, vocab_size) for g in grids}
    results = {g.optimizer: [p.result() for p in g.points.values()] for g in grids}
    summaries = summarize(results, {n: [p.result() for p in runs] for n, runs in seeds.items()}, state)
    t = first.train
    params = next(iter(state.values())).params
    setting = (
        f"{first.model.name} ({params / 1e6:.2f}M params), data {Path(first.data.source).name}, "
        f"{t.steps} steps x {t.global_batch_size} x {t.seq_len} tokens, {t.schedule} schedule "
        f"(warmup {t.warmup_ratio:g}), an eval every {t.eval_every} steps"
    )
    if floor is not None:
        setting += f"; entropy floor {floor:.4f} nats/token"
    budget = t.steps * t.global_batch_size * t.seq_len
    phase1_runs = [p.result() for _, p in sorted(phase1.points.items())]
    tokens_per_step = t.global_batch_size * t.seq_len
    return SweepReport(first.model.name, tokens_per_step, budget, setting, floor, phase1_runs, summaries)


def report(args: argparse.Namespace, reports: list[SweepReport], sweeps: list[Sweep], wall: float) -> str:
    """The markdown of this mode (header, study table, one section per sweep), written with its plot."""
    run_wall = sum(
        json.loads(path.read_text()).get("wall_s", 0.0)
        for s in sweeps
        for p in s.points.values()
        if (path := p.cfg.run_dir / RESULT).is_file()
    )
    command = shlex.join(["python", "benchmarks/convergence.py", *args.argv])
    lines = [
        f"Command: `{command}`",
        f"Machine: {machine()}; {args.jobs} run(s) at a time, {args.threads or 'default'} thread(s) each",
        f"Date: {datetime.date.today()}; wall time {wall:.0f} s this invocation, {run_wall:.0f} s of runs in all "
        f"({sum(len(s.points) for s in sweeps)} runs; seeds {args.seeds}, grid factor {args.grid_factor:g})",
        "",
    ]
    if args.mode == "sweep":
        lines += [f"Setting: {reports[0].setting}.", "", markdown_table(reports[0])]
        plot_curves(reports[0], args.out / f"{args.stem}.png")
    else:
        table, plot = (batch_table, plot_batch) if args.mode == "batch" else (width_table, plot_width)
        lines.append(table(reports))
        for r in reports:
            lines += ["", f"### {r.label}", "", f"Setting: {r.setting}.", "", markdown_table(r)]
        plot(reports, args.out / f"{args.stem}.png")
    text = "\n".join(lines)
    (args.out / f"{args.stem}.md").write_text(text + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    try:
        check_budget(args)
        sweeps = make_sweeps(args, overrides)
        done = [s.protocol() for s in sweeps]
    except (ConfigError, DataError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue the sweep", file=sys.stderr)
        return 130
    args.out.mkdir(parents=True, exist_ok=True)
    reports = [read_back(*result) for result in done]
    print(report(args, reports, sweeps, time.perf_counter() - started))
    print(f"\nwrote {args.out}/{args.stem}.md and {args.stem}.png")
    failed = [p.cfg.train.run_name for s in sweeps for p in s.points.values() if p.status == "failed"]
    if failed:
        print(f"failed runs (see their train.log; re-run to retry): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
