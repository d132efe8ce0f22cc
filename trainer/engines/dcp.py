"""torch.distributed.checkpoint (DCP) for the FSDP2 engine: the model and optimizer as one Stateful, loaded only
after checking what can be checked, every failure reduced to one line (CheckpointError).

Each rank writes only its own shards (no gather to rank 0), and DCP's metadata lets a checkpoint load at another
world size. Loading checks, before touching any state: every shard file the metadata points to exists and is
long enough, and every tensor this run loads exists in the checkpoint with the same global shape.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful
from torch.optim import Optimizer

from trainer.checkpoint import METADATA, CheckpointError, one_line


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


def read_metadata(path: Path) -> Metadata:
    """DCP's index of the checkpoint: every tensor's global shape and which file holds which bytes."""
    try:
        return FileSystemReader(str(path)).read_metadata()
    except Exception as err:  # a damaged pickle raises anything from EOFError to UnpicklingError
        raise CheckpointError(f"{path}: unreadable {METADATA} ({type(err).__name__}: {err})") from None


def check_shards(path: Path, metadata: Metadata) -> None:
    """Every shard file the metadata points to exists and is long enough (catches lost or truncated files)."""
    needed: dict[str, int] = {}
    for info in metadata.storage_data.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{path}: missing shard file {name}")
        if file.stat().st_size < size:
            raise CheckpointError(
                f"{path}: shard file {name} is truncated ({file.stat().st_size} of {size} bytes)"
            )


def check_fits(path: Path, metadata: Metadata, state: Mapping[str, Any]) -> None:
    """Every tensor this run will load exists in the checkpoint with the same global shape."""
    saved = metadata.state_dict_metadata
    for key, tensor in flat_tensors(state).items():
        shown = key.removeprefix("app.")
        if key not in saved:
            raise CheckpointError(f"{path}: has no {shown} (saved by another model or optimizer?)")
        entry = saved[key]
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"{path}: {shown} is not a tensor in the checkpoint")
        if tuple(entry.size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: size mismatch for {shown}: saved {list(entry.size)} vs this run's {list(tensor.shape)}"
            )


def load_state(path: Path, state: Mapping[str, Any]) -> None:
    """DCP-load `state` in place from `path` after checking shard files and shapes; any failure is one line.

    Works with or without a process group (without one, e.g. for export, one process reads every shard).
    """
    metadata = read_metadata(path)
    check_shards(path, metadata)
    check_fits(path, metadata, state)
    try:
        with warnings.catch_warnings():  # no process group: DCP warns that it loads in one process, as meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(dict(state), checkpoint_id=str(path))
    except BaseException as err:  # dcp's CheckpointException derives from BaseException
        if not isinstance(err, Exception) and not hasattr(err, "failures"):
            raise  # KeyboardInterrupt, SystemExit
        raise CheckpointError(f"{path}: cannot load ({one_line(err)})") from None


def flat_tensors(state: Mapping[str, Any], prefix: str = "") -> dict[str, torch.Tensor]:
    """Tensors of a nested state dict under DCP's dotted keys ("app.model.layers.0.attention.wq.weight")."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, Stateful) and not isinstance(value, Mapping):
            value = value.state_dict()
        if isinstance(value, Mapping):
            out.update(flat_tensors(value, f"{name}."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out
