"""Turn a plain model into a distributed one: FSDP2 per block + root, mixed precision, activation checkpointing,
torch.compile. (The DeepSpeed engine takes the plain model instead; see trainer/engine_deepspeed.py.)

Order matters and follows torchtitan: checkpoint-wrap and compile each block first, then shard each block, then
the root (which holds the embedding, final norm and head), so that one block's parameters are all-gathered at a time.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def mixed_precision_policy(mode: str, device: torch.device) -> MixedPrecisionPolicy | None:
    """bf16 compute with fp32 gradient reduction on GPU (`auto`); full fp32 on CPU."""
    if mode == "bf16" or (mode == "auto" and device.type == "cuda"):
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return None


def wrap_blocks(
    model: nn.Module, *, activation_checkpointing: bool = False, compile: bool = False
) -> nn.Module:
    """Activation checkpointing and torch.compile per transformer block (both engines use this)."""
    for index, block in enumerate(model.layers):
        if activation_checkpointing:
            block = checkpoint_wrapper(block, preserve_rng_state=False)
        if compile:
            block = torch.compile(block)
        model.layers[index] = block
    return model


def apply_fsdp(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mixed_precision: str = "auto",
    activation_checkpointing: bool = False,
    compile: bool = False,
) -> nn.Module:
    """Shard `model` (a models.Llama with a `layers` ModuleList) in place over `mesh` and return it."""
    device = torch.device(mesh.device_type)
    policy = mixed_precision_policy(mixed_precision, device)
    kwargs = {"mesh": mesh, **({"mp_policy": policy} if policy else {})}
    wrap_blocks(model, activation_checkpointing=activation_checkpointing, compile=compile)
    for index, block in enumerate(model.layers):
        # The last block's parameters are needed right away by backward: keep them gathered after forward.
        fully_shard(block, reshard_after_forward=index < len(model.layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model
