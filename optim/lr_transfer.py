"""The lr convention across widths: how far each optimizer's best hidden-matrix lr moves when the model widens.

A user tunes on a small model and runs a large one. The width study (README Results, "Width transfer":
`python benchmarks/convergence.py --models llama_tiny,llama_tiny_w192 --tokens 786432`, real text, width 64 and
192 at the same depth and batch) measured the best lr of each rule at both widths, on a grid of factor 2:

- SWAN, Muon, SinkGD, Hybrid-AuON: the same best lr at both widths (their updates have a per-element RMS that
  does not depend on the shape, or Muon's sqrt(m/n) rescaling of it): exponent 0.
- NorMuon, AuON, AdamW's hidden matrices: one grid step lower at 3x the width (0.5x): exponent
  log(0.5) / log(3) = -0.63.

    lr(width) = lr(width_0) * (width / width_0) ** WIDTH_EXPONENT[optimizer]

This is a measured rule over one 3x step, extrapolated beyond it; it says nothing about the batch, which also
moves the best lr (README Results, "Batch size"). The llama350m_* configs take their matrix lrs from it.
"""

from __future__ import annotations

import math

ONE_GRID_STEP_PER_3X = math.log(0.5) / math.log(3.0)

WIDTH_EXPONENT = {
    "swan": 0.0,
    "muon": 0.0,
    "sinkgd": 0.0,
    "hybrid_auon": 0.0,
    "normuon": ONE_GRID_STEP_PER_3X,
    "auon": ONE_GRID_STEP_PER_3X,
    "adamw": ONE_GRID_STEP_PER_3X,  # its hidden matrices (with the rest apart)
}


def transfer_lr(optimizer: str, lr: float, from_width: int, to_width: int) -> float:
    """The hidden-matrix lr at `to_width` for an optimizer whose best lr at `from_width` is `lr`, to two
    significant digits (the sweeps' resolution is a factor 2)."""
    if optimizer not in WIDTH_EXPONENT:
        raise ValueError(f"no width convention for {optimizer!r}: one of {', '.join(WIDTH_EXPONENT)}")
    return float(f"{lr * (to_width / from_width) ** WIDTH_EXPONENT[optimizer]:.2g}")
