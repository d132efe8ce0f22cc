"""Sharded, atomic checkpoints with torch.distributed.checkpoint (DCP).

Layout of runs/<name>/checkpoints/:
    step_000100/            complete checkpoint: DCP shards (one file per rank) + .metadata + trainer_state.json
    step_000200.partial/    being written (or left by a crash): never loaded, removed by the next save

Why this shape: each rank writes only its own shards (no gather to rank 0), DCP's metadata lets a checkpoint load
at another world size, and a directory becomes `step_N` by one rename after every rank has finished, so a kill at
any moment leaves either the old or the new checkpoint, never a half one that looks whole.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Protocol

import torch.distributed as dist

TRAINER_STATE = "trainer_state.json"
PARTIAL = ".partial"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing shard, other model shape, ...): one line, nothing deleted."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    return path.is_dir() and not path.name.endswith(PARTIAL) and (path / TRAINER_STATE).is_file()


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.glob("step_*") if is_complete(p)]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable {TRAINER_STATE} ({err})") from None


class ShardedState(Protocol):
    """What an engine provides: each rank writes / reads its own shards of model and optimizer state."""

    def save(self, path: Path) -> None: ...

    def load(self, path: Path) -> None: ...


class Checkpointer:
    """Saves and restores the whole training state under one run's checkpoints/ directory."""

    def __init__(self, ckpt_dir: Path, keep_last: int, is_main: bool):
        self.dir = ckpt_dir
        self.keep_last = keep_last
        self.is_main = is_main

    def save(self, step: int, state: ShardedState, trainer_state: dict[str, Any]) -> Path:
        """Write shards into step_N.partial, then (rank 0, after every rank is done) the trainer state and rename."""
        final = self.dir / step_dir_name(step)
        partial = final.with_name(final.name + PARTIAL)
        if self.is_main:
            for stale in self.dir.glob(f"*{PARTIAL}"):
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
        _barrier()
        state.save(partial)
        _barrier()
        if self.is_main:
            (partial / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=1))
            if final.exists():  # re-saving the same step (e.g. the final save right after a periodic one)
                shutil.rmtree(final)
            partial.rename(final)
            self._prune()
        _barrier()
        return final

    def load(self, path: Path, state: ShardedState) -> dict[str, Any]:
        """Restore `state` in place from a complete checkpoint; return its trainer state."""
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})")
        trainer_state = read_trainer_state(path)
        try:
            state.load(path)
        except Exception as err:  # DCP wraps per-rank failures; reduce them to one line for the user
            first = str(err).strip().splitlines()
            raise CheckpointError(
                f"{path}: cannot load ({type(err).__name__}: {first[0] if first else ''})"
            ) from None
        return trainer_state

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.dir)[: -self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
