"""Turn a finished optimizer sweep into evidence: best lr per optimizer, the tokens it needed to reach AdamW's
best final eval loss (the token-efficiency figure of the SWAN and SinkGD papers), a markdown table and a plot."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.trainer_runs import StateBytes

BASELINE = "adamw"


@dataclass
class RunResult:
    """One (optimizer, lr) run as read back from its run directory."""

    optimizer: str
    lr: float
    status: str  # done | diverged | failed
    curve: list[tuple[int, float]] = field(default_factory=list)  # (tokens, eval loss)
    train_s: float = 0.0

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1][1] if self.status == "done" and self.curve else None


@dataclass
class OptimizerSummary:
    optimizer: str
    runs: list[RunResult]  # in lr order
    state: StateBytes
    # Tokens the best run needed to reach the baseline's best final eval loss (None: never reached).
    tokens_to_target: float | None = None

    @property
    def best(self) -> RunResult | None:
        return best_run(self.runs)

    @property
    def best_at_edge(self) -> bool:
        """The best lr is the smallest or largest of the grid: a wider sweep might find a better one."""
        best = self.best
        return best is not None and len(self.runs) > 1 and (best is self.runs[0] or best is self.runs[-1])


def best_run(runs: list[RunResult]) -> RunResult | None:
    """The finished run with the lowest final eval loss."""
    finished = [r for r in runs if r.final_loss is not None]
    return min(finished, key=lambda r: r.final_loss) if finished else None


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


def summarize(results: list[RunResult], state: dict[str, StateBytes]) -> list[OptimizerSummary]:
    """Per optimizer (in first-seen order) its runs and, against the baseline's best final eval loss, the tokens
    its best run needed. state: optimizer -> its optimizer-state bytes."""
    names = list(dict.fromkeys(r.optimizer for r in results))
    summaries = [
        OptimizerSummary(
            name, sorted((r for r in results if r.optimizer == name), key=lambda r: r.lr), state[name]
        )
        for name in names
    ]
    target = baseline_loss(summaries)
    if target is not None:
        for s in summaries:
            if s.best is not None:
                s.tokens_to_target = tokens_to_reach(s.best.curve, target)
    return summaries


def baseline_loss(summaries: list[OptimizerSummary]) -> float | None:
    base = next((s.best for s in summaries if s.optimizer == BASELINE), None)
    return base.final_loss if base is not None else None


def _tokens(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e5 else f"{n / 1e3:.1f}K"


def _bytes(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.1f} KiB"


def _sweep_cell(s: OptimizerSummary) -> str:
    cells = []
    for r in s.runs:
        value = f"{r.final_loss:.4f}" if r.final_loss is not None else r.status
        cell = f"{r.lr:g}: {value}"
        cells.append(f"**{cell}**" if r is s.best else cell)
    return " · ".join(cells)


def markdown_table(summaries: list[OptimizerSummary], budget_tokens: int) -> str:
    """One row per optimizer; the footnotes say how to read the columns."""
    base = next((s for s in summaries if s.optimizer == BASELINE), None)
    base_tokens = base.tokens_to_target if base is not None else None
    target = baseline_loss(summaries)
    lines = [
        "| optimizer | lr sweep: final eval loss | best final eval loss | tokens to AdamW's loss "
        "| token efficiency vs AdamW | train time | optimizer state |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for s in summaries:
        best = s.best
        loss = f"{best.final_loss:.4f}{' †' if s.best_at_edge else ''}" if best else "—"
        if s.tokens_to_target is not None:
            reach = f"{_tokens(s.tokens_to_target)} ({s.tokens_to_target / budget_tokens:.0%} of budget)"
            efficiency = f"{base_tokens / s.tokens_to_target:.2f}x" if base_tokens else "—"
        else:
            reach, efficiency = ("not reached", "—") if best and target is not None else ("—", "—")
        train = f"{best.train_s:.3g} s" if best else "—"
        st = s.state
        state = (
            f"{_bytes(st.total)}: {st.total / st.params:.2f} B/param, "
            f"{st.matrix / st.matrix_elements:.2f} B/matrix element"
        )
        lines.append(
            f"| {s.optimizer} | {_sweep_cell(s)} | {loss} | {reach} | {efficiency} | {train} | {state} |"
        )
    lines += [
        "",
        f"Budget: {_tokens(budget_tokens)} tokens per run. Bold: the best lr (lowest final eval loss), whose "
        "curve the other columns use. † the best lr is at the edge of the grid: a wider sweep might do better.",
        "Tokens to AdamW's loss: when the eval loss first reaches AdamW's best final eval loss (linear between "
        "eval points); token efficiency = AdamW's tokens for it / this optimizer's. Train time: the trainer's "
        "own tokens/s windows, evals included. Optimizer state: the state tensors after one step, per model "
        "parameter (the AdamW-routed embedding, head and norms included) and per element of the hidden "
        "matrices (attention and MLP weights, the spec's figure).",
    ]
    return "\n".join(lines)


def plot(summaries: list[OptimizerSummary], floor: float | None, path: Path, title: str) -> None:
    """Eval loss against tokens, best lr per optimizer: the whole run and a zoom on its second half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    target = baseline_loss(summaries)
    curves = [(s, s.best) for s in summaries if s.best is not None and s.best.curve]
    budget = max((run.curve[-1][0] for _, run in curves), default=1)
    for ax in axes:
        for s, run in curves:
            xs, ys = zip(*run.curve, strict=True)
            ax.plot([x / 1e6 for x in xs], ys, label=f"{s.optimizer} (lr {run.lr:g})", linewidth=1.4)
        if floor is not None:
            ax.axhline(floor, color="black", linestyle="--", linewidth=1, label=f"entropy floor {floor:.3f}")
        if target is not None:
            ax.axhline(
                target, color="gray", linestyle=":", linewidth=1, label=f"AdamW best final {target:.3f}"
            )
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("eval loss (nats/token)")
        ax.grid(alpha=0.3)
    late = [y for _, run in curves for x, y in run.curve if x >= budget / 2]
    if late:
        low, high = min(late), max(late)
        if floor is not None and floor > low - (high - low):  # show the floor when it is near the curves
            low = floor
        pad = 0.05 * (high - low) + 1e-3
        axes[1].set_xlim(budget / 2e6, budget / 1e6)
        axes[1].set_ylim(low - pad, high + pad)
    axes[0].set_title(title, fontsize=9)
    axes[1].set_title("second half of training", fontsize=9)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
