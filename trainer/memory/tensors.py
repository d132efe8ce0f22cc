"""Where one rank's training tensors are and what they weigh: the engines report them, the tracker and the planner
count them. Kept apart from both so that an engine, the tracker and the Engine protocol import it without
importing each other."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch.distributed.tensor import DTensor

MiB = 2**20


def local_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of this rank's part of each tensor (the local shard of a DTensor); None entries count 0."""
    total = 0
    for t in tensors:
        if t is not None:
            t = t.to_local() if isinstance(t, DTensor) else t
            total += t.numel() * t.element_size()
    return total


def group_labels(optimizer: torch.optim.Optimizer) -> list[str]:
    """One name per param group: its index and rule, e.g. 'group0_swan', 'group1_adamw'."""
    default = type(optimizer).__name__.lower()
    return [f"group{i}_{g.get('algorithm') or default}" for i, g in enumerate(optimizer.param_groups)]


def state_tensors(states: Iterable[dict[str, Any]]) -> list[torch.Tensor]:
    """The tensors among optimizer per-parameter states (step counters included when they are tensors), nested
    dicts included (a matrix optimizer's state of a ZeRO flat partition holds one dict per matrix it owns)."""
    tensors: list[torch.Tensor] = []
    for state in states:
        for value in state.values():
            if torch.is_tensor(value):
                tensors.append(value)
            elif isinstance(value, dict):
                tensors.extend(state_tensors([value]))
    return tensors


def optimizer_state_tensors(optimizer: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    """Optimizer state tensors on this rank, per param group label."""
    return {
        label: state_tensors(optimizer.state.get(p, {}) for p in group["params"])
        for label, group in zip(group_labels(optimizer), optimizer.param_groups, strict=True)
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes of optimizer state tensors on this rank, per param group label."""
    return {label: local_bytes(ts) for label, ts in optimizer_state_tensors(optimizer).items()}


@dataclass
class TrainingTensors:
    """Where one rank's training tensors live now, by component: each engine reports its own layout.

    optimizer_state maps a label (a param group's, or e.g. 'master_weights' for ZeRO's fp32 copies, which the
    ZeRO paper counts as optimizer state too) to tensors; no tensor may appear twice.
    """

    params: list[torch.Tensor]
    grads: list[torch.Tensor | None]
    optimizer_state: dict[str, list[torch.Tensor]]

    @classmethod
    def of(cls, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> TrainingTensors:
        """The plain layout (FSDP2, ZeRO-0, one process): the optimizer steps the model's own parameters."""
        params = list(model.parameters())
        return cls(params, [p.grad for p in params], optimizer_state_tensors(optimizer))

    def bytes(self) -> tuple[int, int, dict[str, int]]:
        """(parameters, gradients, optimizer state per label) in bytes."""
        state = {label: local_bytes(ts) for label, ts in self.optimizer_state.items()}
        return local_bytes(self.params), local_bytes(self.grads), state
