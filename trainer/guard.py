"""The divergence guard: every step's loss and gradient norm judged before the optimizer applies the step.

Why: a run that diverges keeps going otherwise, printing "done" over a dead model and checkpointing it. The guard
costs nothing extra: it reads the two numbers the loop already brings to the host (the all-reduced loss and the
global gradient norm), so every rank reaches the same verdict without a collective of its own.

Verdicts, in order:
- nonfinite: the loss or the gradient norm is NaN or inf (the step must not be applied);
- dead: a gradient norm of exactly zero for `dead_steps` steps in a row (nothing can train any more);
- spike: the loss is above `spike_ceiling` x ln(vocabulary) (a model that is confidently wrong: a fresh one sits
  at ln(vocabulary)) at any step, or, once `spike_warmup` steps have fed the running statistic, above its running
  mean + `spike_sigma` x its running standard deviation (exponential moving averages of span `spike_window`; the
  deviation floored at 1% of the mean, so a flat curve does not make every wiggle a spike).
A spike does not enter the running statistic. `calm` says whether a checkpoint may be written now: no zero-norm
streak under way and no spike in the last CALM_STEPS steps, so no checkpoint is taken of a model that may be
broken. The statistic is part of the trainer state, so a resumed run judges as the uninterrupted one would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CALM_STEPS = 10  # steps without a spike before a checkpoint may be written again
SPREAD_FLOOR = 0.01  # the running deviation is at least this fraction of the running mean


@dataclass(frozen=True)
class Verdict:
    kind: str  # ok | nonfinite | spike | dead
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.kind == "ok"


OK = Verdict("ok")


class DivergenceGuard:
    def __init__(
        self,
        vocab_size: int,
        *,
        spike_sigma: float,
        spike_window: int,
        spike_warmup: int,
        spike_ceiling: float,
        dead_steps: int,
    ) -> None:
        self.ceiling = spike_ceiling * math.log(vocab_size) if spike_ceiling else math.inf
        self.sigma, self.warmup, self.dead_steps = spike_sigma, spike_warmup, dead_steps
        self.alpha = 2.0 / (spike_window + 1)
        self.mean = 0.0
        self.var = 0.0
        self.seen = 0  # losses in the running statistic
        self.zero_since: int | None = None  # first step of the current zero-norm streak
        self.last_spike = -CALM_STEPS  # step of the last spike

    @classmethod
    def from_config(cls, cfg: Any, vocab_size: int) -> DivergenceGuard:
        """The guard of the trainer's ResilienceConfig."""
        return cls(
            vocab_size,
            spike_sigma=cfg.spike_sigma,
            spike_window=cfg.spike_window,
            spike_warmup=cfg.spike_warmup,
            spike_ceiling=cfg.spike_ceiling,
            dead_steps=cfg.dead_steps,
        )

    def judge(self, step: int, loss: float, norm: float) -> Verdict:
        """The verdict on step `step` (1-based) before it is applied; updates the running statistic."""
        verdict = self._verdict(step, loss, norm)
        if verdict.ok:
            self._observe(loss)
        elif (
            verdict.kind == "spike"
        ):  # a non-finite step is never applied: the model stays as sound as it was
            self.last_spike = step
        return verdict

    def _verdict(self, step: int, loss: float, norm: float) -> Verdict:
        if not (math.isfinite(loss) and math.isfinite(norm)):
            return Verdict("nonfinite", f"non-finite loss {loss} or grad norm {norm}")
        if norm == 0.0 and self.dead_steps:
            self.zero_since = step if self.zero_since is None else self.zero_since
            if step - self.zero_since + 1 >= self.dead_steps:
                return Verdict("dead", f"the model is dead: zero gradient norm since step {self.zero_since}")
        else:
            self.zero_since = None
        if loss > self.ceiling:
            return Verdict(
                "spike", f"loss spike {loss:.4g} (above {self.ceiling:.4g}, a confidently wrong model)"
            )
        if self.sigma and self.seen >= self.warmup:
            spread = max(math.sqrt(self.var), SPREAD_FLOOR * abs(self.mean))
            limit = self.mean + self.sigma * spread
            if loss > limit:
                return Verdict(
                    "spike", f"loss spike {loss:.4g} (running mean {self.mean:.4g}, limit {limit:.4g})"
                )
        return OK

    def _observe(self, loss: float) -> None:
        if self.seen == 0:
            self.mean, self.var = loss, 0.0
        else:
            delta = loss - self.mean
            self.mean += self.alpha * delta
            self.var = (1 - self.alpha) * (self.var + self.alpha * delta * delta)
        self.seen += 1

    def calm(self, step: int) -> bool:
        """Whether a checkpoint of the model after step `step` may be written (see the module docstring)."""
        return self.zero_since is None and step - self.last_spike >= CALM_STEPS

    def state_dict(self) -> dict[str, Any]:
        return {"mean": self.mean, "var": self.var, "seen": self.seen, "zero_since": self.zero_since,
                "last_spike": self.last_spike}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mean, self.var, self.seen = state["mean"], state["var"], state["seen"]
        self.zero_since, self.last_spike = state["zero_since"], state["last_spike"]
