"""Turn finished optimizer sweeps into evidence, as the benchmarking rules ask (equal budgets and freedoms, an
interior best lr, seeds): per optimizer its lr sweep and whether the best lr is interior, the seed mean and spread of its final eval loss, the
tokens its seed-mean curve needed to reach AdamW's (the token-efficiency figure of the SWAN and SinkGD papers);
markdown tables and plots for one sweep, a batch-size study and a width study."""

from __future__ import annotations

import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from statistics import fmean

from benchmarks.harness import StateBytes

BASELINE = "adamw"


@dataclass
class RunResult:
    """One (optimizer, lr, seed) run as read back from its run directory."""

    optimizer: str
    lr: float
    status: str  # done | diverged | failed | pending
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, eval loss)
    train_s: float = 0.0
    seed: int = 0

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1][1] if self.status == "done" and self.curve else None


def best_run(runs: list[RunResult]) -> RunResult | None:
    """The finished run with the lowest final eval loss (a diverged run is worse than any finished one)."""
    finished = [r for r in runs if r.final_loss is not None]
    return min(finished, key=lambda r: r.final_loss) if finished else None


def is_interior(runs: list[RunResult]) -> bool:
    """The best lr has a run at a smaller and at a larger lr: a wider grid would not find a better one nearby."""
    best = best_run(runs)
    return best is not None and min(r.lr for r in runs) < best.lr < max(r.lr for r in runs)


@dataclass
class OptimizerSummary:
    optimizer: str
    runs: list[RunResult]  # the seed-0 lr sweep, in lr order
    seeds: list[RunResult]  # the best lr at every seed, seed 0 first
    state: StateBytes
    tokens_to_target: float | None = None  # tokens the seed-mean curve needed to reach AdamW's final loss

    @property
    def best(self) -> RunResult | None:
        return best_run(self.runs)

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


def summarize(
    grids: dict[str, list[RunResult]], seeds: dict[str, list[RunResult]], state: dict[str, StateBytes]
) -> list[OptimizerSummary]:
    """Per optimizer its summary, ranked by seed-mean final eval loss (no mean: last), with the tokens its
    seed-mean curve needed to reach AdamW's seed-mean final eval loss."""
    summaries = [
        OptimizerSummary(name, sorted(runs, key=lambda r: r.lr), seeds.get(name, []), state[name])
        for name, runs in grids.items()
    ]
    summaries.sort(key=lambda s: (s.mean is None, s.mean or 0.0))
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


@dataclass
class SweepReport:
    """One full protocol (a model at a batch size) read back."""

    model: str
    tokens_per_step: int
    budget: int  # tokens per run
    setting: str  # one line: model, data, budget, schedule
    floor: float | None  # the data's entropy floor, when known
    phase1: list[RunResult]  # AdamW with one lr for every parameter
    summaries: list[OptimizerSummary]

    @property
    def label(self) -> str:
        return f"{self.model}, {_tokens(self.tokens_per_step)} tokens/step"


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K" if n >= 1e3 else f"{n:.0f}"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _best_lr(runs: list[RunResult]) -> str:
    best = best_run(runs)
    if best is None:
        return "—"
    return f"{best.lr:g}" if is_interior(runs) else f"{best.lr:g} † edge"


def _sweep_cell(runs: list[RunResult]) -> str:
    best = best_run(runs)
    cells = []
    for r in runs:
        cell = f"{r.lr:g}: {r.final_loss:.4f}" if r.final_loss is not None else f"{r.lr:g}: {r.status}"
        cells.append(f"**{cell}**" if r is best else cell)
    return " · ".join(cells)


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


def markdown_table(report: SweepReport) -> str:
    """Phase 1 in a line, then one row per optimizer, ranked; the footnotes say how to read the columns."""
    base = next((s for s in report.summaries if s.optimizer == BASELINE), None)
    target = baseline_mean(report.summaries)
    base_tokens = base.tokens_to_target if base is not None else None
    lines = [
        f"Phase 1, AdamW with one lr for every parameter: {_sweep_cell(report.phase1)}; "
        f"best {_best_lr(report.phase1)}, the lr of every optimizer's embedding, head and norms below.",
        "",
        "| rank | optimizer | matrix lr sweep (seed 0): final eval loss | best lr | final eval loss at best lr: "
        "mean [min, max] | vs AdamW | tokens to AdamW's loss | token efficiency vs AdamW | train time "
        "| optimizer state |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
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
        lines.append(
            f"| {rank if s.mean is not None else '—'} | {s.optimizer} | {_sweep_cell(s.runs)} | {_best_lr(s.runs)} "
            f"| {_mean_cell(s)} | {_vs_baseline(s, base)} | {reach} | {efficiency} | {train} | {state} |"
        )
    lines += [
        "",
        f"Budget: {_tokens(report.budget)} tokens per run. The matrix lr is the hidden matrices' (attention, "
        "MLP); AdamW's included. Bold: the best lr (lowest final eval loss; a diverged run counts as worse than "
        "any finished one). † the best lr is at the edge of its grid after the allowed extensions: not a result.",
        "Mean [min, max]: over the seeds (init) at the best lr; rows are ranked by the mean. vs AdamW: the "
        "difference of the means, real only when the [min, max] ranges do not overlap. Tokens to AdamW's loss: "
        "when the seed-mean eval curve first reaches AdamW's seed-mean final eval loss (linear between eval "
        "points); token efficiency = AdamW's tokens for it / this optimizer's. Train time: the trainer's own "
        "tokens/s windows, evals included, mean over seeds. Optimizer state: the state tensors after one step, "
        "per model parameter (the AdamW-routed embedding, head and norms included) and per element of the "
        "hidden matrices (the papers' figure).",
    ]
    return "\n".join(lines)


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
    """Seed-mean eval loss against tokens at each optimizer's best lr, min-max over seeds shaded: the whole run
    and a zoom on its second half."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    target = baseline_mean(report.summaries)
    shown = [s for s in report.summaries if s.mean_curve]
    for ax in axes:
        for s in shown:
            xs = [t / 1e6 for t, _ in s.mean_curve]
            (line,) = ax.plot(
                xs, [y for _, y in s.mean_curve], linewidth=1.4, label=f"{s.optimizer} (lr {s.best.lr:g})"
            )
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
    return "—" if s is None else f"{_best_lr(s.runs)}: {_mean_cell(s)}"


def batch_table(reports: list[SweepReport]) -> str:
    """Per optimizer and tokens per step: the best lr and its final eval loss over seeds."""
    head = " | ".join(f"{_tokens(r.tokens_per_step)} tokens/step" for r in reports)
    lines = [f"| optimizer | {head} |", "| --- |" + " --- |" * len(reports)]
    for name, row in _by_optimizer(reports).items():
        lines.append(f"| {name} | {' | '.join(map(_study_cell, row))} |")
    lines += [
        "",
        "Each cell: best matrix lr (seed 0; † at the edge of its grid): final eval loss mean [min, max] over "
        "seeds, at the same token budget.",
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
    ax.set_ylabel("final eval loss at best lr (seed mean)")
    ax.set_title(f"{reports[0].model}, {_tokens(reports[0].budget)} tokens per run", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def width_table(reports: list[SweepReport]) -> str:
    """Per optimizer and width: the best lr, and how far it moved from the first width to the last."""
    head = " | ".join(r.model for r in reports)
    lines = [
        f"| optimizer | {head} | best lr ratio {reports[-1].model} / {reports[0].model} |",
        "| --- |" + " --- |" * (len(reports) + 1),
    ]
    for name, row in _by_optimizer(reports).items():
        bests = [s.best if s is not None else None for s in row]
        ratio = f"{bests[-1].lr / bests[0].lr:.3g}" if bests[0] and bests[-1] else "—"
        lines.append(f"| {name} | {' | '.join(map(_study_cell, row))} | {ratio} |")
    lines += [
        "",
        "Each cell: best matrix lr (seed 0; † at the edge of its grid): final eval loss mean [min, max] over "
        "seeds. The ratio moves in steps of the grid factor: with factor 2, 0.5 or 2 is one grid step, the "
        "resolution of the sweep; an lr convention that transfers keeps it within 2x.",
    ]
    return "\n".join(lines)


def plot_width(reports: list[SweepReport], path: Path) -> None:
    """Final eval loss (seed 0) against the matrix lr, one panel per optimizer, one line per width."""
    plt = _pyplot()
    rows = _by_optimizer(reports)
    cols = min(4, len(rows))
    nrows = -(-len(rows) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 3 * nrows), squeeze=False)
    for ax, (name, row) in zip(axes.flat, rows.items(), strict=False):
        for report, s in zip(reports, row, strict=True):
            done = [r for r in s.runs if r.final_loss is not None] if s is not None else []
            if done:
                (line,) = ax.plot(
                    [r.lr for r in done], [r.final_loss for r in done], marker=".", label=report.model
                )
                ax.plot([s.best.lr], [s.best.final_loss], marker="*", markersize=10, color=line.get_color())
        ax.set_xscale("log")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("matrix lr")
        ax.set_ylabel("final eval loss (seed 0)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.set_visible(False)
    _save(fig, path)
