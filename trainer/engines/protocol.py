"""The Engine protocol: what the loop, the checkpointer and the memory tracker may ask of an engine, and nothing
more. It lives apart from the factory (trainer/engines/__init__.py), which imports every engine, so that the
services it is written for import it without importing the engines."""

from __future__ import annotations

from concurrent.futures import Future
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

import torch
from torch import nn
from torch.optim import Optimizer

from optim.health import HealthReport
from trainer.memory.tensors import TrainingTensors


class Engine(Protocol):
    """A wrapped model and its optimizer; the clip threshold is fixed at construction."""

    model: nn.Module
    optimizer: Optimizer

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate the raw gradients of the step's micro-batches; this rank's mean loss (detached)."""
        ...

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the step's raw (reduced, unclipped) gradients."""
        ...

    def step(self) -> float:
        """Clip (if configured), update, drop the gradients; the seconds the step waited on communication it
        could not overlap (the optimizer's own exchange)."""
        ...

    def skip(self) -> None:
        """Drop the step's gradients without updating anything (a non-finite step)."""
        ...

    def health(self, enabled: bool) -> AbstractContextManager[HealthReport]:
        """A block measuring the optimizer's updates inside it; its report() is a collective."""
        ...

    def training_tensors(self) -> TrainingTensors:
        """Where this rank's parameters, gradients and optimizer state live now (for the memory tracker)."""
        ...

    def save(self, path: Path) -> Future | None:
        """Write this rank's model and optimizer state under `path`; a Future while an async write runs."""
        ...

    def load(self, path: Path) -> None:
        """Restore model and optimizer state in place from `path`."""
        ...
