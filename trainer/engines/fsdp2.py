"""The FSDP2 engine: a model sharded with `fully_shard`, its optimizer, and DCP checkpoints of both.

Wrapping order follows torchtitan: checkpoint-wrap and compile each block first, then shard each block, then
the root (which holds the embedding, final norm and head), so that one block's parameters are all-gathered at a
time. Mixed precision: bf16 compute with fp32 gradient reduction when the Run's compute dtype is bf16.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.optim import Optimizer

from models import causal_lm_loss
from optim.health import HealthReport, track_health
from trainer.engines.dcp import ModelAndOptimizer, load_state
from trainer.memory.tensors import TrainingTensors


def wrap_blocks(
    model: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False
) -> nn.Module:
    """Activation checkpointing and torch.compile per transformer block (both engines use this). Compiled in
    place (`Module.compile`), so parameter and checkpoint names are the same with and without it, and a run can
    resume the other way."""
    for index, block in enumerate(model.layers):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block.compile()
        model.layers[index] = block
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    bf16: bool = False,
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Shard `model` (a models.Llama with a `layers` ModuleList) in place over `mesh` and return it."""
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else None
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    wrap_blocks(model, activation_checkpointing=activation_checkpointing, compile=compile)
    for index, block in enumerate(model.layers):
        # The last block's parameters are needed right away by backward: keep them gathered after forward.
        fully_shard(block, reshard_after_forward=index < len(model.layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


class FSDP2Engine:
    """A model already sharded by apply_fsdp, with its optimizer (see trainer/engines/__init__.py's Engine)."""

    def __init__(
        self, model: nn.Module, optimizer: Optimizer, *, max_norm: float = 0.0, async_save: bool = False
    ):
        self.model = model
        self.optimizer = optimizer
        self.max_norm = max_norm
        self.async_save = async_save
        self._norm: torch.Tensor | None = None
        # Background checkpoint writes synchronise ranks over their own gloo group, never interleaving with the
        # training's collectives (built here: creating a group is a collective).
        self._save_group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate raw gradients over the micro-batches; return this rank's mean loss (detached)."""
        total = torch.zeros((), device=micro_batches[0].device)
        for micro in micro_batches:
            loss = causal_lm_loss(self.model, micro) / len(micro_batches)
            loss.backward()
            total += loss.detach()
        self._norm = None
        return total

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the raw (accumulated, unclipped) gradients; exact under FSDP2."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        self._norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
        return self._norm

    def step(self) -> float:
        """Clip the raw gradients (never the processed update) when max_norm > 0, then step and drop the grads;
        the optimizer's exposed communication."""
        if self.max_norm > 0:
            norm = self._norm if self._norm is not None else self.grad_norm()
            torch.nn.utils.clip_grads_with_norm_(self.model.parameters(), self.max_norm, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self.optimizer.comm_clock.take()

    def skip(self) -> None:
        """Drop this step's gradients without updating anything."""
        self.optimizer.zero_grad(set_to_none=True)

    @contextmanager
    def health(self, enabled: bool) -> Iterator[HealthReport]:
        """The optimizer's update statistics of the steps inside the block (report(): collective)."""
        with track_health(self.optimizer, enabled) as report:
            yield report

    def training_tensors(self) -> TrainingTensors:
        """What the memory tracker counts: the local shards of parameters, gradients and optimizer state."""
        return TrainingTensors.of(self.model, self.optimizer)

    def save(self, path: Path) -> Future | None:
        """Each rank writes its shards under `path` (DCP). Sync: None once every rank's shards and the metadata
        are written. Async: returns once the state is copied to CPU memory, with the write's Future."""
        state = {"app": ModelAndOptimizer(self.model, self.optimizer)}
        writer = FileSystemWriter(str(path))
        if self.async_save:  # FileSystemWriter stages to CPU memory before async_save returns
            staged = {"app": _copy_cpu_tensors(state["app"].state_dict())}
            return dcp.async_save(staged, storage_writer=writer, process_group=self._save_group)
        dcp.save(state, storage_writer=writer)
        return None

    def load(self, path: Path) -> None:
        """Restore model and optimizer in place from `path`, at any world size (CheckpointError if it cannot)."""
        load_state(path, {"app": ModelAndOptimizer(self.model, self.optimizer)})


def _copy_cpu_tensors(state: Any) -> Any:
    """`state` with every tensor already in CPU memory copied. DCP's async staging copies device tensors to CPU
    memory, but torch 2.6's leaves CPU tensors as they are, so training would go on writing into what is being
    saved (a CPU run's weights; AdamW's step counts, CPU scalars even on a GPU)."""
    if isinstance(state, torch.Tensor):
        return state.clone() if state.device.type == "cpu" else state
    if isinstance(state, dict):
        return {key: _copy_cpu_tensors(value) for key, value in state.items()}
    if isinstance(state, list | tuple):
        return type(state)(_copy_cpu_tensors(value) for value in state)
    return state
