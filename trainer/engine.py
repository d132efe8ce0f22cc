"""The FSDP2 engine: what one optimizer step does to a sharded model, behind a small interface.

The loop in train.py talks only to this interface (forward_backward, grad_norm, step, skip, health,
training_tensors, checkpoint_state), so the DeepSpeed engine (trainer/engine_deepspeed.py, save / load instead
of checkpoint_state) can stand in for it without a second copy of the loop.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from optim import health_of
from trainer.memory import TrainingTensors


def causal_lm_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy of a packed batch [B, T+1], computed in fp32."""
    logits = model(batch[:, :-1])
    return F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())


class ModelAndOptimizer(Stateful):
    """DCP's view of the training state: FQN-keyed, DTensor-sharded model and optimizer state."""

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model = model
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return {
            "model": get_model_state_dict(self.model),
            "optim": get_optimizer_state_dict(self.model, self.optimizer),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_model_state_dict(self.model, state["model"], options=StateDictOptions(strict=True))
        set_optimizer_state_dict(self.model, self.optimizer, state["optim"])


class FSDP2Engine:
    """A model already sharded by trainer.parallel.apply_fsdp, with its optimizer."""

    def __init__(self, model: nn.Module, optimizer: Optimizer):
        self.model = model
        self.optimizer = optimizer

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate raw gradients over the micro-batches; return this rank's mean loss (detached)."""
        total = torch.zeros((), device=micro_batches[0].device)
        for micro in micro_batches:
            loss = causal_lm_loss(self.model, micro) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        return total

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the raw (accumulated, unclipped) gradients; exact under FSDP2."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm

    def step(self, grad_norm: torch.Tensor, max_norm: float) -> None:
        """Clip the raw gradients (never the processed update) when max_norm > 0, then step and drop the grads."""
        if max_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), max_norm, grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def skip(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def health(self) -> dict[str, float]:
        """The optimizer's update statistics for the optim/ metrics (collective under sharding)."""
        return health_of(self.optimizer)

    def training_tensors(self) -> TrainingTensors:
        """What the memory tracker counts: the local shards of parameters, gradients and optimizer state."""
        return TrainingTensors.of(self.model, self.optimizer)

    def checkpoint_state(self) -> dict[str, Stateful]:
        """What trainer.checkpoint saves and loads: each rank's shards of model and optimizer state."""
        return {"app": ModelAndOptimizer(self.model, self.optimizer)}
