"""Turn finished optimizer sweeps into evidence, as the benchmarking rules ask (equal budgets and freedoms, an
interior best lr, seeds): per optimizer its 2-D lr grid (hidden-matrix lr x the lr of the AdamW-routed rest) and
whether the best pair is interior, the seed mean and spread of its final eval loss at that pair, the tokens its
seed-mean curve needed to reach AdamW's (the token-efficiency figure of the SWAN and SinkGD papers); markdown
tables, a machine-readable summary and plots for one sweep, a batch-size study and a width study."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from benchmarks.harness import StateBytes

BASELINE = "adamw"
Pair = tuple[float, float]  # (matrix lr, rest lr): optim.lr and optim.adamw_lr


@dataclass
class RunResult:
    """One (optimizer, matrix lr, rest lr, seed) run as read back from its run directory."""

    optimizer: str
    lr: float  # the hidden matrices' (optim.lr)
    rest_lr: float  # the AdamW-routed embedding, head and norms' (optim.adamw_lr)
    status: str  # done | diverged | failed | pending
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, eval loss)
    train_s: float = 0.0
    seed: int = 0

    @property
    def pair(self) -> Pair:
        return (self.lr, self.rest_lr)

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1][1] if self.status == "done" and self.curve else None


def best_run(runs: list[RunResult]) -> RunResult | None:
    """The finished run with the lowest final eval loss (a diverged run is worse than any finished one)."""
    finished = [r for r in runs if r.final_loss is not None]
    return min(finished, key=lambda r: r.final_loss) if finished else None


def seed_mean(runs: list[RunResult]) -> float | None:
    """Mean final eval loss over the seeds; None unless every seed finished."""
    if not runs or any(r.final_loss is None for r in runs):
        return None
    return fmean(r.final_loss for r in runs)


@dataclass
class OptimizerSummary:
    optimizer: str
    runs: list[RunResult]  # the seed-0 grid, in (matrix lr, rest lr) order
    seeds: list[RunResult]  # the best pair at every seed, seed 0 first
    state: StateBytes
    base: Pair  # the grid's centre: the base config's (optim.lr, optim.adamw_lr)
    missing: list[Pair]  # neighbours of the best pair that were not run: [] = interior
    tokens_to_target: float | None = None  # tokens the seed-mean curve needed to reach AdamW's final loss

    @property
    def best(self) -> RunResult | None:
        return best_run(self.runs)

    @property
    def interior(self) -> bool:
        return self.best is not None and not self.missing

    @property
    def mean_curve(self) -> list[tuple[int, float]] | None:
        """Eval loss averaged over the seeds at each token count; None unless every seed finished."""
        if not self.seeds or any(r.final_loss is None for r in self.seeds):
            return None
        points = list(zip(*(r.curve for r in self.seeds), strict=False))
        return [(p[0][0], fmean(loss for _, loss in p)) for p in points]

    @property
    def mean(self) -> float | None:
        curve = self.mean_curve
        return curve[-1][1] if curve else None

    @property
    def spread(self) -> tuple[float, float]:
        """(min, max) of the seeds' final eval losses (only meaningful when `mean` is not None)."""
        finals = [r.final_loss for r in self.seeds if r.final_loss is not None]
        return min(finals), max(finals)


def summarize(summaries: list[OptimizerSummary]) -> list[OptimizerSummary]:
    """The summaries ranked by seed-mean final eval loss (no mean: last), each with the tokens its seed-mean curve
    needed to reach AdamW's seed-mean final eval loss."""
    summaries = sorted(summaries, key=lambda s: (s.mean is None, s.mean or 0.0))
    target = baseline_mean(summaries)
    for s in summaries:
        if target is not None and s.mean_curve:
            s.tokens_to_target = tokens_to_reach(s.mean_curve, target)
    return summaries


def baseline_mean(summaries: list[OptimizerSummary]) -> float | None:
    return next((s.mean for s in summaries if s.optimizer == BASELINE), None)


def tokens_to_reach(curve: list[tuple[int, float]], target: float) -> float | None:
    """Tokens at which the eval loss first reaches `target`, linearly interpolated between eval points."""
    previous = None
    for tokens, loss in curve:
        if loss <= target:
            if previous is None:
                return float(tokens)
            t0, l0 = previous
            return t0 + (l0 - target) / (l0 - loss) * (tokens - t0)
        previous = (tokens, loss)
    return None


def first_below(curve: list[tuple[int, float]], threshold: float) -> int | None:
    """Tokens of the first eval point whose loss is below `threshold` (no interpolation); None = never."""
    return next((tokens for tokens, loss in curve if loss < threshold), None)


@dataclass
class SweepReport:
    """One full protocol (a model at a batch size) read back."""

    model: str
    batch: int  # sequences per step
    seq_len: int
    budget: int  # tokens per run
    setting: str  # one line: model, data, budget, schedule
    floor: float | None  # the data's entropy floor, when known
    summaries: list[OptimizerSummary]
    factor: float  # ratio of neighbouring lrs on either axis of the grids
    plateau: float | None = None  # the order-2 diagnostic's threshold, below ln(vocab) (generated data only)

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.seq_len

    @property
    def label(self) -> str:
        return f"{self.model}, {_tokens(self.tokens_per_step)} tokens/step"

    def plateau_step(self, s: OptimizerSummary) -> str:
        """The first eval step at which the seed-mean eval loss is below the plateau threshold, or 'never'."""
        if s.mean_curve is None:
            return "—"
        tokens = first_below(s.mean_curve, self.plateau)
        return "never" if tokens is None else str(tokens // self.tokens_per_step)


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def edge_hint(best: Pair, missing: list[Pair]) -> str:
    """Which way the best pair lacks a neighbour: 'lr+' (no run at a larger matrix lr, the same rest lr), 'rest-'
    (a smaller rest lr, the same matrix lr); 'diagonal' when only neighbours off both axes are missing."""
    hints = []
    for axis, name in ((0, "lr"), (1, "rest")):
        on_axis = [m[axis] for m in missing if m[1 - axis] == best[1 - axis]]
        hints += [name + "-"] if any(x < best[axis] for x in on_axis) else []
        hints += [name + "+"] if any(x > best[axis] for x in on_axis) else []
    return ", ".join(hints) or ("diagonal" if missing else "")


def best_pair_cell(s: OptimizerSummary) -> str:
    best = s.best
    if best is None:
        return "—"
    cell = f"{best.lr:g}, {best.rest_lr:g}"
    return cell if s.interior else f"{cell} † edge ({edge_hint(best.pair, s.missing)})"


def _mean_cell(s: OptimizerSummary) -> str:
    if s.mean is None:
        bad = [f"seed {r.seed} {r.status}" for r in s.seeds if r.final_loss is None]
        return ", ".join(bad) or "—"
    low, high = s.spread
    n = len(s.seeds)
    return f"{s.mean:.4f} [{low:.4f}, {high:.4f}] ({n} seed{'s' if n > 1 else ''})"


def _vs_baseline(s: OptimizerSummary, base: OptimizerSummary | None) -> str:
    """Mean difference to AdamW; real only where the two seed ranges do not overlap (rule 3)."""
    if base is None or s is base or s.mean is None or base.mean is None:
        return "—"
    (low, high), (base_low, base_high) = s.spread, base.spread
    real = high < base_low or low > base_high
    return f"{s.mean - base.mean:+.4f} ({'beyond' if real else 'within'} spread)"


def grid_table(runs: list[RunResult]) -> str:
    """The seed-0 grid as a 2-D table: a row per matrix lr, a column per rest lr, cells final eval loss, 'div'
    (diverged) or 'failed', the best in bold, a pair not run blank."""
    best = best_run(runs)
    lrs = sorted({r.lr for r in runs})
    rests = sorted({r.rest_lr for r in runs})
    by_pair = {r.pair: r for r in runs}
    lines = [
        "| matrix lr ↓ rest lr → | " + " | ".join(f"{x:g}" for x in rests) + " |",
        "| --- |" + " --- |" * len(rests),
    ]
    for lr in lrs:
        cells = []
        for rest in rests:
            r = by_pair.get((lr, rest))
            if r is None or r.status == "pending":
                cells.append("")
                continue
            cell = (
                f"{r.final_loss:.4f}"
                if r.final_loss is not None
                else {"diverged": "div"}.get(r.status, r.status)
            )
            cells.append(f"**{cell}**" if r is best else cell)
        lines.append(f"| {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_table(report: SweepReport) -> str:
    """One row per optimizer, ranked; the footnotes say how to read the columns; then each optimizer's grid."""
    base = next((s for s in report.summaries if s.optimizer == BASELINE), None)
    target = baseline_mean(report.summaries)
    base_tokens = base.tokens_to_target if base is not None else None
    plateau = report.plateau is not None
    lines = [
        "| rank | optimizer | best pair (matrix lr, rest lr) | final eval loss at best pair: mean [min, max] "
        "| vs AdamW | tokens to AdamW's loss | token efficiency vs AdamW | "
        + ("steps to leave the order-2 plateau | " if plateau else "")
        + "train time | optimizer state |",
        "| --- |" + " --- |" * (9 if plateau else 8),
    ]
    for rank, s in enumerate(report.summaries, 1):
        if s.tokens_to_target is not None:
            reach = f"{_tokens(s.tokens_to_target)} ({s.tokens_to_target / report.budget:.0%} of budget)"
            efficiency = f"{base_tokens / s.tokens_to_target:.2f}x" if base_tokens else "—"
        else:
            reach, efficiency = (
                ("not reached", "—") if s.mean is not None and target is not None else ("—", "—")
            )
        train = f"{fmean(r.train_s for r in s.seeds):.3g} s" if s.seeds else "—"
        st = s.state
        state = (
            f"{_bytes(st.total)}: {st.total / st.params:.2f} B/param, "
            f"{st.matrix / st.matrix_elements:.2f} B/matrix element"
        )
        escape = f"{report.plateau_step(s)} | " if plateau else ""
        lines.append(
            f"| {rank if s.mean is not None else '—'} | {s.optimizer} | {best_pair_cell(s)} | {_mean_cell(s)} "
            f"| {_vs_baseline(s, base)} | {reach} | {efficiency} | {escape}{train} | {state} |"
        )
    lines += [
        "",
        f"Budget: {_tokens(report.budget)} tokens per run. Every optimizer, AdamW included, has two lrs: the "
        "matrix lr of the hidden matrices (attention, MLP; optim.lr) and the rest lr of the AdamW-routed "
        "embedding, head and norms (optim.adamw_lr), tuned together on a 2-D log grid (factor "
        f"{report.factor:g} on each axis; the grids are below). Best pair: the lowest seed-0 final eval loss (a "
        "diverged run counts as worse than any finished one). † edge: a neighbour of the best pair (one grid "
        "step in either lr or both) was not run within the allowed extensions, in the directions named (lr+: a "
        "larger matrix lr, rest-: a smaller rest lr, diagonal: only a pair off both axes): not a result.",
        "Mean [min, max]: over the seeds (seeds: init and data order) at the best pair; rows are ranked by the "
        "mean. vs AdamW: the difference of the means, real only when the [min, max] ranges do not overlap. Tokens "
        "to AdamW's loss: when the seed-mean eval curve first reaches AdamW's seed-mean final eval loss (linear "
        "between eval points); token efficiency = AdamW's tokens for it / this optimizer's. Train time: the "
        "trainer's own tokens/s windows, evals included, mean over seeds. Optimizer state: the state tensors "
        "after one step, per model parameter (the AdamW-routed embedding, head and norms included) and per "
        "element of the hidden matrices (the papers' figure).",
    ]
    if plateau:
        lines.append(
            f"Steps to leave the order-2 plateau: the first eval step at which the seed-mean eval loss is below "
            f"{report.plateau:.4f} (ln(vocab) less a margin: the plateau itself, what the embedding and head reach "
            "alone, is about 0.1 below ln(vocab)), or never: a diagnostic of the "
            "order-2 task, not a criterion."
        )
    for s in sorted(report.summaries, key=lambda s: s.optimizer != BASELINE):
        lines += [
            "",
            f"{s.optimizer}: final eval loss (seed 0) over the grid, {len(s.runs)} runs around the base pair "
            f"({s.base[0]:g}, {s.base[1]:g}); bold: the best, div: diverged, blank: not run.",
            "",
            grid_table(s.runs),
        ]
    return "\n".join(lines)


def summary_json(s: OptimizerSummary) -> dict:
    """One optimizer's grid, best pair and seeds, machine-readable (the defaults and the lr transfer read it)."""
    best = s.best
    return {
        "base": {"lr": s.base[0], "rest_lr": s.base[1]},
        "best": None
        if best is None
        else {
            "lr": best.lr,
            "rest_lr": best.rest_lr,
            "interior": s.interior,
            "missing_neighbours": [{"lr": m[0], "rest_lr": m[1]} for m in s.missing],
        },
        "seed_finals": [r.final_loss for r in s.seeds],
        "seed_mean": s.mean,
        "grid": [
            {"lr": r.lr, "rest_lr": r.rest_lr, "final_loss": r.final_loss, "status": r.status} for r in s.runs
        ],
    }


def report_json(report: SweepReport) -> dict:
    return {
        "model": report.model,
        "batch": report.batch,
        "seq_len": report.seq_len,
        "tokens_per_step": report.tokens_per_step,
        "budget_tokens": report.budget,
        "setting": report.setting,
        "grid_factor": report.factor,
        "optimizers": {s.optimizer: summary_json(s) for s in report.summaries},
    }


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    _pyplot().close(fig)


def plot_curves(report: SweepReport, path: Path) -> None:
    """Seed-mean eval loss against tokens at each optimizer's best pair, min-max over seeds shaded: the whole run
    and a zoom on its second half."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    target = baseline_mean(report.summaries)
    shown = [s for s in report.summaries if s.mean_curve]
    for ax in axes:
        for s in shown:
            xs = [t / 1e6 for t, _ in s.mean_curve]
            label = f"{s.optimizer} (lr {s.best.lr:g}, rest {s.best.rest_lr:g})"
            (line,) = ax.plot(xs, [y for _, y in s.mean_curve], linewidth=1.4, label=label)
            per_seed = list(zip(*(r.curve for r in s.seeds), strict=False))
            lows = [min(loss for _, loss in p) for p in per_seed]
            highs = [max(loss for _, loss in p) for p in per_seed]
            ax.fill_between(xs, lows, highs, color=line.get_color(), alpha=0.2, linewidth=0)
        if report.floor is not None:
            ax.axhline(
                report.floor,
                color="black",
                linestyle="--",
                linewidth=1,
                label=f"entropy floor {report.floor:.3f}",
            )
        if target is not None:
            ax.axhline(target, color="gray", linestyle=":", linewidth=1, label=f"AdamW final {target:.3f}")
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("eval loss (nats/token), seed mean")
        ax.grid(alpha=0.3)
    late = [y for s in shown for t, y in s.mean_curve if t >= report.budget / 2]
    if late:
        low, high = min(late), max(late)
        if report.floor is not None and report.floor > low - (high - low):  # show the floor when it is near
            low = report.floor
        pad = 0.05 * (high - low) + 1e-3
        axes[1].set_xlim(report.budget / 2e6, report.budget / 1e6)
        axes[1].set_ylim(low - pad, high + pad)
    axes[0].set_title(textwrap.fill(report.setting.split(";")[0], 70), fontsize=8)
    axes[1].set_title("second half of training (shaded: min-max over seeds)", fontsize=9)
    axes[1].legend(fontsize=7)
    _save(fig, path)


def _by_optimizer(reports: list[SweepReport]) -> dict[str, list[OptimizerSummary | None]]:
    """optimizer -> its summary in each report (None where it did not run), in the first report's order."""
    names = list(dict.fromkeys(s.optimizer for r in reports for s in r.summaries))
    return {n: [next((s for s in r.summaries if s.optimizer == n), None) for r in reports] for n in names}


def _study_cell(s: OptimizerSummary | None) -> str:
    return "—" if s is None else f"{best_pair_cell(s)}: {_mean_cell(s)}"


def batch_table(reports: list[SweepReport]) -> str:
    """Per optimizer and tokens per step: the best pair and its final eval loss over seeds."""
    head = " | ".join(f"{_tokens(r.tokens_per_step)} tokens/step" for r in reports)
    lines = [f"| optimizer | {head} |", "| --- |" + " --- |" * len(reports)]
    for name, row in _by_optimizer(reports).items():
        lines.append(f"| {name} | {' | '.join(map(_study_cell, row))} |")
    lines += [
        "",
        "Each cell: best pair (matrix lr, rest lr; seed 0; † edge: not interior on its 2-D grid): final eval loss "
        "mean [min, max] over seeds (init and data order), at the same token budget.",
    ]
    return "\n".join(lines)


def plot_batch(reports: list[SweepReport], path: Path) -> None:
    """Best final eval loss (seed mean, min-max bars) against tokens per step, one line per optimizer."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name, row in _by_optimizer(reports).items():
        done = [
            (r.tokens_per_step, s)
            for r, s in zip(reports, row, strict=True)
            if s is not None and s.mean is not None
        ]
        if not done:
            continue
        xs, ys = [x for x, _ in done], [s.mean for _, s in done]
        bars = [[s.mean - s.spread[0] for _, s in done], [s.spread[1] - s.mean for _, s in done]]
        ax.errorbar(xs, ys, yerr=bars, marker="o", capsize=3, linewidth=1.4, label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks([r.tokens_per_step for r in reports], [_tokens(r.tokens_per_step) for r in reports])
    ax.set_xlabel("tokens per step (equal tokens per run)")
    ax.set_ylabel("final eval loss at best pair (seed mean)")
    ax.set_title(f"{reports[0].model}, {_tokens(reports[0].budget)} tokens per run", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def width_table(reports: list[SweepReport]) -> str:
    """Per optimizer and width: the best pair, and how far each lr moved from the first width to the last."""
    head = " | ".join(r.model for r in reports)
    lines = [
        f"| optimizer | {head} | best pair ratio {reports[-1].model} / {reports[0].model} |",
        "| --- |" + " --- |" * (len(reports) + 1),
    ]
    for name, row in _by_optimizer(reports).items():
        bests = [s.best if s is not None else None for s in row]
        ratio = (
            f"matrix lr {bests[-1].lr / bests[0].lr:.3g}, rest lr {bests[-1].rest_lr / bests[0].rest_lr:.3g}"
            if bests[0] and bests[-1]
            else "—"
        )
        lines.append(f"| {name} | {' | '.join(map(_study_cell, row))} | {ratio} |")
    lines += [
        "",
        "Each cell: best pair (matrix lr, rest lr; seed 0; † edge: not interior on its 2-D grid): final eval loss "
        "mean [min, max] over seeds (init and data order). The ratios move in steps of the grid factor: with "
        "factor 2, 0.5 or 2 is one grid step, the resolution of the sweep; an lr convention that transfers keeps "
        "them within 2x.",
    ]
    return "\n".join(lines)


def plot_width(reports: list[SweepReport], path: Path) -> None:
    """Final eval loss (seed 0) through each width's best pair, one panel per optimizer: against the matrix lr at
    the best rest lr (solid) and against the rest lr at the best matrix lr (dashed)."""
    plt = _pyplot()
    rows = _by_optimizer(reports)
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3 * nrows), squeeze=False)
    for ax, (name, row) in zip(axes.flat, rows.items(), strict=False):
        for report, s in zip(reports, row, strict=True):
            best = s.best if s is not None else None
            if best is None:
                continue
            done = [r for r in s.runs if r.final_loss is not None]
            matrix = sorted((r.lr, r.final_loss) for r in done if r.rest_lr == best.rest_lr)
            rest = sorted((r.rest_lr, r.final_loss) for r in done if r.lr == best.lr)
            (line,) = ax.plot(*zip(*matrix, strict=True), marker=".", label=f"{report.model}: matrix lr")
            ax.plot(
                *zip(*rest, strict=True), marker=".", linestyle="--", color=line.get_color(), label="rest lr"
            )
            ax.plot([best.lr], [best.final_loss], marker="*", markersize=10, color=line.get_color())
            ax.plot([best.rest_lr], [best.final_loss], marker="*", markersize=10, color=line.get_color())
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("lr (solid: matrix, dashed: rest)")
        ax.set_ylabel("final eval loss (seed 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    _save(fig, path)
