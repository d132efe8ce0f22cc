"""Do the shipped lrs hold? Each optimizer's shipped tiny config (configs/<configs>_<optimizer>.yaml, its optim.lr
and optim.adamw_lr: the matrix lr and the rest lr) is trained at each batch size on the given corpus, at its own
pair and on a small grid around it, and the table says how far the shipped pair is from the best pair found.

The grid, per optimizer and batch size: the shipped pair and its "plus" (the matrix lr x factor and / factor with
the rest lr fixed, the rest lr x factor and / factor with the matrix lr fixed), then the pattern search of
benchmarks/convergence.py with the 4 axis neighbours: while the best finished pair (a diverged run is worse than any
finished one) lacks one of its axis neighbours, that neighbour is run, at most --max-extend grid steps beyond the
plus on any side. The search, the run names, the sharing of identical runs, the resume (a finished run is skipped,
an interrupted one resumes) and the data (one BPE tokenizer trained on the corpus by the trainer's own code,
shared by every run) are convergence.py's. With --seeds > 1 the shipped and the best pair are both re-run at every
seed (train.seed: init and data order) and compared by their seed means.

Every run sees --tokens tokens at every batch size (so fewer steps at a larger batch), --seq-len tokens per
sequence, and --eval-points evals. Writes <out>/validation_<corpus stem>.md and .json: per (optimizer, batch) the
shipped pair and its final eval loss, the best pair found and its loss, the gap in nats, whether the shipped pair
is within 0.1 nat of the best, whether the best is interior; then each grid.

    python -m benchmarks.validate_defaults --data austen --batch-sizes 16,64   # the shipped defaults' check
    python -m benchmarks.validate_defaults --data path/to/corpus.jsonl --batch-sizes 16,64 --optimizers adamw,muon
    python -m benchmarks.validate_defaults --data generated --quick      # smoke test: seconds per run

Any `--section.key=value` argument is passed to every run as a trainer config override.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.convergence import (
    OPTIMIZERS,
    PLUS,
    QUICK_OVERRIDES,
    Grid,
    Point,
    Sweep,
    SweepError,
    check_budget,
    header,
    make_sweeps,
    plus,
)
from benchmarks.convergence_report import RunResult, edge_hint, grid_table, seed_mean
from benchmarks.harness import ROOT, TrainerRun
from trainer.config import ConfigError, parse_args_and_overrides
from trainer.data import DataError

DEFAULTS = dict(tokens=1_572_864, batch_sizes=[16, 64], seq_len=128, eval_points=16, seeds=1)
QUICK = dict(tokens=3072, batch_sizes=[4, 8], seq_len=32, eval_points=3)  # 24 and 12 steps
WITHIN = 0.1  # nats: a shipped pair this close to the best pair found is good enough


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument(
        "--data",
        required=True,
        help="a corpus of benchmarks/real_text.py (austen: the held-out one; real = sotu) | a jsonl/text file or "
        "dir | generated",
    )
    parser.add_argument(
        "--batch-sizes", type=_ints, help="sequences per step, comma-separated (default 16,64)"
    )
    parser.add_argument("--tokens", type=int, help=f"tokens per run (default {DEFAULTS['tokens']:_})")
    parser.add_argument("--optimizers", help="comma-separated; default all")
    parser.add_argument(
        "--configs", default="tiny", help="shipped configs: configs/<CONFIGS>_<optimizer>.yaml"
    )
    parser.add_argument("--seq-len", type=int, help=f"tokens per sequence (default {DEFAULTS['seq_len']})")
    parser.add_argument("--eval-points", type=int, help=f"evals per run (default {DEFAULTS['eval_points']})")
    parser.add_argument(
        "--grid-factor", type=float, default=2.0, help="ratio of neighbouring lrs on either axis"
    )
    parser.add_argument(
        "--max-extend", type=int, default=4, help="grid steps beyond the starting plus on any side, at most"
    )
    parser.add_argument(
        "--seeds", type=int, help="seeds of the shipped and the best pair, 0 included (default 1)"
    )
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per run; 0 = inherit")
    parser.add_argument("--runs-dir", type=Path, help="default runs/validate_defaults[_quick]")
    parser.add_argument(
        "--out", type=Path, help="table + json; default benchmarks/results (<runs-dir>/results with --quick)"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny batches: a smoke test")
    args, overrides = parse_args_and_overrides(parser, argv)
    for key, value in {**DEFAULTS, **(QUICK if args.quick else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        overrides = [*QUICK_OVERRIDES, *overrides]
    args.optimizers = (args.optimizers or ",".join(OPTIMIZERS)).split(",")
    args.runs_dir = (
        args.runs_dir or ROOT / "runs" / f"validate_defaults{'_quick' if args.quick else ''}"
    ).resolve()
    args.out = args.out or (args.runs_dir / "results" if args.quick else ROOT / "benchmarks" / "results")
    args.stem = f"validation_{Path(args.data).stem}"
    return args, overrides


def shipped_model(args: argparse.Namespace) -> str:
    """The model of the shipped configs (make_sweeps sets it on every run): one for all, or SweepError."""
    models = {TrainerRun(f"{args.configs}_{n}", ()).resolved().model.name for n in args.optimizers}
    if len(models) != 1:
        raise SweepError(f"configs/{args.configs}_<optimizer>.yaml name several models: {sorted(models)}")
    return models.pop()


def validate(sweep: Sweep) -> tuple[list[Grid], dict[str, dict[tuple[float, float], list[Point]]]]:
    """Each optimizer's plus around its shipped pair, the 4-neighbour search, then the seeds of the shipped pair
    and of the best pair found."""
    grids = [sweep.grid(n, plus(), PLUS) for n in sweep.args.optimizers]
    sweep.search(grids)
    seeds = {}
    for g in grids:
        pairs = [g.pair((0, 0))]
        best = g.best()
        if best is not None and best != (0, 0):
            pairs.append(g.pair(best))
        seeds[g.optimizer] = {pair: sweep.seeded(g.optimizer, pair) for pair in pairs}
    sweep.run([p for by_pair in seeds.values() for runs in by_pair.values() for p in runs])
    return grids, seeds


@dataclass
class Row:
    """One optimizer at one batch size."""

    optimizer: str
    batch: int
    tokens_per_step: int
    shipped: tuple[float, float]
    shipped_runs: list[RunResult]  # the shipped pair at every seed
    best: tuple[float, float] | None  # the best pair of the seed-0 grid
    best_runs: list[RunResult]
    missing: list[tuple[float, float]]  # the best pair's axis neighbours not run: [] = interior
    grid: list[RunResult]  # seed 0, in (matrix lr, rest lr) order
    failed: bool  # a run of the grid failed (not diverged): the search stopped early

    @property
    def shipped_loss(self) -> float | None:
        return seed_mean(self.shipped_runs)

    @property
    def best_loss(self) -> float | None:
        return seed_mean(self.best_runs)

    @property
    def gap(self) -> float | None:
        """Shipped minus best, in nats (>= 0 with one seed; seed means can reverse it)."""
        if self.shipped_loss is None or self.best_loss is None:
            return None
        return self.shipped_loss - self.best_loss

    @property
    def within(self) -> bool:
        return self.gap is not None and self.gap <= WITHIN

    @property
    def interior(self) -> bool:
        return self.best is not None and not self.missing and not self.failed


def rows_of(
    sweep: Sweep, grids: list[Grid], seeds: dict[str, dict[tuple[float, float], list[Point]]]
) -> list[Row]:
    cfg = next(iter(sweep.points.values())).cfg.train
    rows = []
    for g in grids:
        k = g.best()
        best = g.pair(k) if k is not None else None
        shipped = g.pair((0, 0))
        by_pair = {pair: [p.result() for p in runs] for pair, runs in seeds[g.optimizer].items()}
        grid = [p.result() for _, p in sorted(g.points.items(), key=lambda kp: g.pair(kp[0]))]
        rows.append(
            Row(
                g.optimizer,
                cfg.global_batch_size,
                cfg.global_batch_size * cfg.seq_len,
                shipped,
                by_pair[shipped],
                best,
                by_pair.get(best, []),
                g.missing(),
                grid,
                g.failed,
            )
        )
    return rows


def _loss(runs: list[RunResult]) -> str:
    mean = seed_mean(runs)
    if mean is None:
        return (
            ", ".join(f"seed {r.seed} {'div' if r.status == 'diverged' else r.status}" for r in runs) or "—"
        )
    if len(runs) == 1:
        return f"{mean:.4f}"
    finals = [r.final_loss for r in runs]
    return f"{mean:.4f} [{min(finals):.4f}, {max(finals):.4f}]"


def _pair(pair: tuple[float, float] | None) -> str:
    return "—" if pair is None else f"{pair[0]:g}, {pair[1]:g}"


def table(rows: list[Row], seeds: int) -> str:
    lines = [
        "| optimizer | tokens/step | shipped pair (matrix lr, rest lr) | final eval loss at shipped pair | best pair "
        f"found | final eval loss at best pair | gap (nats) | within {WITHIN:g} nat | best interior |",
        "| --- |" + " --- |" * 8,
    ]
    for r in rows:
        gap = "—" if r.gap is None else f"{r.gap:+.4f}"
        if r.interior:
            interior = "yes"
        elif r.best is None:
            interior = "—"
        else:
            why = ["a run failed"] if r.failed else []
            why += [f"† edge ({edge_hint(r.best, r.missing)})"] if r.missing else []
            interior = f"no: {', '.join(why)}"
        lines.append(
            f"| {r.optimizer} | {r.tokens_per_step} ({r.batch} x {r.tokens_per_step // r.batch}) "
            f"| {_pair(r.shipped)} | {_loss(r.shipped_runs)} | {_pair(r.best)} | {_loss(r.best_runs)} | {gap} "
            f"| {'yes' if r.within else 'no'} | {interior} |"
        )
    seeds_text = (
        "the seed 0 run" if seeds == 1 else f"mean [min, max] over {seeds} seeds (init and data order)"
    )
    lines += [
        "",
        f"Losses: final eval loss, {seeds_text}. Best pair found: the lowest seed-0 final eval loss on the grid "
        "around the shipped pair (a diverged run counts as worse than any finished one). Gap: shipped minus best. "
        "Best interior: every axis neighbour of the best pair (one grid step in the matrix lr or the rest lr) "
        "was run; † edge names the missing directions (lr+: a larger matrix lr, rest-: a smaller rest lr), and "
        "a best pair at the edge may hide a better one beyond it.",
    ]
    return "\n".join(lines)


def _row_json(r: Row) -> dict:
    def pair(p: tuple[float, float] | None, runs: list[RunResult]) -> dict | None:
        if p is None:
            return None
        finals = [x.final_loss for x in runs]
        return {"lr": p[0], "rest_lr": p[1], "seed_finals": finals, "seed_mean": seed_mean(runs)}

    best = pair(r.best, r.best_runs)
    if best is not None:
        best["interior"] = r.interior
        best["missing_neighbours"] = [{"lr": m[0], "rest_lr": m[1]} for m in r.missing]
    return {
        "optimizer": r.optimizer,
        "batch": r.batch,
        "tokens_per_step": r.tokens_per_step,
        "shipped": pair(r.shipped, r.shipped_runs),
        "best": best,
        "gap_nats": r.gap,
        "within": r.within,
        "failed_runs": r.failed,
        "grid": [
            {"lr": x.lr, "rest_lr": x.rest_lr, "final_loss": x.final_loss, "status": x.status} for x in r.grid
        ],
    }


def write(args: argparse.Namespace, sweeps: list[Sweep], rows: list[Row], wall: float) -> str:
    """The markdown (header, the table, each grid) and its machine-readable twin."""
    points = [p for s in sweeps for p in s.points.values()]
    lines = header(args, "benchmarks.validate_defaults", points, wall)
    lines[-1] += "; starting grid: the shipped pair and its 4 axis neighbours"
    cfg = points[0].cfg
    t = cfg.train
    tokenizer = f", tokenized by {Path(cfg.data.tokenizer).parent.name}" if cfg.data.tokenizer else ""
    steps = ", ".join(
        f"{args.tokens // (b * args.seq_len)} at {b} x {args.seq_len}" for b in args.batch_sizes
    )
    lines += [
        "",
        f"Setting: corpus {Path(cfg.data.source).name}{tokenizer}; model {cfg.model.name}; tokens per step "
        f"{', '.join(str(b * args.seq_len) for b in args.batch_sizes)}; budget {args.tokens:,} tokens per run "
        f"(steps: {steps}); {t.schedule} schedule (warmup {t.warmup_ratio:g}), {args.eval_points} evals per run; "
        f"seeds {args.seeds} (init and data order); shipped pairs from configs/{args.configs}_<optimizer>.yaml.",
        "",
        table(rows, args.seeds),
    ]
    for r in rows:
        lines += [
            "",
            f"{r.optimizer} at {r.tokens_per_step} tokens/step: final eval loss (seed 0) around the shipped pair "
            f"({_pair(r.shipped)}); bold: the best, div: diverged, blank: not run.",
            "",
            grid_table(r.grid),
        ]
    text = "\n".join(lines)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.md").write_text(text + "\n")
    machine_readable = {
        "command": lines[0].removeprefix("Command: ").strip("`"),
        "date": str(datetime.date.today()),
        "corpus": cfg.data.source,
        "tokenizer": cfg.data.tokenizer or None,
        "model": cfg.model.name,
        "budget_tokens": args.tokens,
        "seq_len": args.seq_len,
        "seeds": args.seeds,
        "grid_factor": args.grid_factor,
        "max_extend": args.max_extend,
        "within_nats": WITHIN,
        "rows": [_row_json(r) for r in rows],
    }
    (args.out / f"{args.stem}.json").write_text(json.dumps(machine_readable, indent=1) + "\n")
    return text


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    started = time.perf_counter()
    try:
        check_budget(args)
        args.models = [shipped_model(args)]
        sweeps = make_sweeps(
            args, overrides
        )  # trains the corpus's tokenizer once (convergence.data_overrides)
        done = [(s, *validate(s)) for s in sweeps]
    except (ConfigError, DataError, SweepError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    rows = [row for result in done for row in rows_of(*result)]
    print(write(args, sweeps, rows, time.perf_counter() - started))
    within = sum(r.within for r in rows)
    print(f"\n{within} of {len(rows)} shipped pairs within {WITHIN:g} nat of the best pair found")
    print(f"wrote {args.out}/{args.stem}.md and {args.stem}.json")
    failed = [p.cfg.train.run_name for s in sweeps for p in s.points.values() if p.status == "failed"]
    if failed:
        print(f"failed runs (see their train.log; re-run to retry): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
