"""Learning-rate schedules as a pure function of the step, so resuming needs nothing but the step number."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, total: int, kind: str, warmup_ratio: float, min_ratio: float, decay_ratio: float
) -> float:
    """Multiplier of each group's peak lr at optimizer step `step` (0-based) of `total`.

    cosine: linear warmup, then cosine from 1 to `min_ratio` (the GaLore setup: 10% warmup, to 0.1).
    wsd: linear warmup, constant, then a linear decay to `min_ratio` over the last `decay_ratio` of the steps.
    constant: linear warmup, then 1.
    """
    warmup = int(round(warmup_ratio * total))
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    if kind == "cosine":
        progress = (step - warmup) / max(1, total - warmup)
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    if kind == "wsd":
        decay_start = total - int(round(decay_ratio * total))
        if step < decay_start:
            return 1.0
        progress = (step - decay_start) / max(1, total - decay_start)
        return 1.0 - (1.0 - min_ratio) * min(progress, 1.0)
    raise ValueError(f"unknown schedule {kind!r}")
