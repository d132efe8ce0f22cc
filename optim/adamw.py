"""The AdamW baseline: torch's AdamW, measuring its health like every optimizer here (optim.health)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from optim.health import AdamWHealth
from optim.sharded import CommClock


class AdamW(torch.optim.AdamW):
    """torch.optim.AdamW, unchanged, plus what the trainer asks of every optimizer here: `tracking_health()` (its
    last update recomputed from its state) and a `comm_clock` (it exchanges nothing, so it stays at 0)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.comm_clock = CommClock()

    @contextmanager
    def tracking_health(self) -> Iterator[AdamWHealth]:
        yield AdamWHealth(self)
