"""Atomic checkpoints of a whole training state: when to save, the commit, keep-last-k, and resume.

Layout of runs/<name>/checkpoints/:
    step_000100/            complete: the engine's files (DCP shards + .metadata, or DeepSpeed's) +
                            trainer_state.json (written last)
    step_000200.partial/    being written (or left by a crash): never loaded, removed by the next save
    step_000050.old/        being deleted by keep_last (or left by a crash): never loaded, removed by the next save

Why this shape: every rank writes its own part (the engine's format: DCP shards under FSDP2, reshardable to
another world size; ZeRO partitions under DeepSpeed), and a directory becomes `step_N` by one rename after every
rank has finished, trainer_state.json last, so a kill at any moment leaves either the old or the new checkpoint,
never a half one that looks whole.

Async saves (FSDP2 with checkpoint.async_save): the engine copies its state to CPU memory (the only blocking
part) and writes it in the background; the commit follows in a thread as soon as the write completes; the next
save and the end of training wait for it.

Loading reduces every failure to one line (CheckpointError): a missing or truncated shard, a tensor whose shape
differs from this run's model (trainer/engines/dcp.py checks both before touching any state), a trainer-state
field that must match (the optimizer). Nothing is ever deleted on a failed load.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import traceback
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from trainer.config import Config, ConfigError, config_from_mapping

if TYPE_CHECKING:
    from trainer.engines.protocol import Engine

TRAINER_STATE = "trainer_state.json"
MANIFEST = "manifest.json"  # every file of the checkpoint with its size, written at the commit
METADATA = ".metadata"
PARTIAL = ".partial"
TRASH = ".old"
_STEP_DIR = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used (missing shard, other model shape, ...): one line, nothing deleted."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def is_complete(path: Path) -> bool:
    """A committed checkpoint: named step_N (no suffix) with its trainer state, the file written last."""
    return _STEP_DIR.fullmatch(path.name) is not None and (path / TRAINER_STATE).is_file()


def list_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if is_complete(p)]
    return sorted(found, key=step_of)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def file_sizes(path: Path) -> dict[str, int]:
    """Every file under `path` (relative names) with its size in bytes; the manifest and trainer state excluded."""
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name not in (MANIFEST, TRAINER_STATE)
    }


def damage(path: Path) -> str | None:
    """What is wrong with a complete checkpoint's files against the sizes its commit recorded (a missing or
    truncated file: a lost disk block, a copy cut short), or None. A checkpoint without a manifest (written before
    manifests existed) is not checked here; the engine's own load checks what it can."""
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        recorded = json.loads(manifest.read_text())
    except (OSError, ValueError) as err:
        return f"unreadable {MANIFEST} ({err})"
    for name, size in recorded.items():
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} when committed"
    return None


def newest_intact(ckpt_dir: Path, before: int | None = None) -> Path | None:
    """The newest complete, undamaged checkpoint (of a step below `before`, when given)."""
    for path in reversed(list_checkpoints(ckpt_dir)):
        if (before is None or step_of(path) < before) and damage(path) is None:
            return path
    return None


def step_of(path: Path) -> int:
    return int(_STEP_DIR.fullmatch(path.name).group(1))


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable {TRAINER_STATE} ({err})") from None


def saved_config(path: Path) -> Config:
    """The resolved run config a checkpoint was saved with, typed (keys of another version skipped)."""
    where = str(path / TRAINER_STATE)
    try:
        return config_from_mapping(read_trainer_state(path).get("config", {}), where, known_only=True)
    except ConfigError as err:
        raise CheckpointError(f"{path}: its saved config does not load ({err})") from None


def one_line(err: BaseException) -> str:
    """The root cause of a (DCP-wrapped, per-rank) failure as `Type: first line`."""
    failures = getattr(err, "failures", None)  # dcp's CheckpointException: {rank: (exception, traceback)}
    if failures:
        err = next(iter(failures.values()))[0]
    text = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()
    return text[0] if text else type(err).__name__


# --------------------------------------------------------------------------------------------------- RNG


def rng_states(device: torch.device) -> list[dict[str, str]]:
    """Every rank's torch (and CUDA) RNG state, gathered to rank 0 (other ranks get []). Collective."""
    mine = {"cpu": _encode(torch.get_rng_state())}
    if device.type == "cuda":
        mine["cuda"] = _encode(torch.cuda.get_rng_state(device))
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [mine]
    gathered: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(mine, gathered, dst=0)
    return gathered or []


def restore_rng(saved: dict[str, Any], rank: int, world_size: int, seed: int, device: torch.device) -> None:
    """This rank's saved RNG state when the world size is unchanged.

    At another world size the saved per-rank streams cannot map onto the new ranks: each rank seeds torch from
    (seed, step, rank) instead, deterministic but not the stream an uninterrupted run would have drawn.
    """
    states = saved.get("rng") or []
    if saved.get("world_size") == world_size and len(states) == world_size:
        torch.set_rng_state(_decode(states[rank]["cpu"]))
        if device.type == "cuda" and "cuda" in states[rank]:
            torch.cuda.set_rng_state(_decode(states[rank]["cuda"]), device)
        return
    torch.manual_seed(hash((seed, saved["step"], rank)) % 2**63)


def _encode(state: torch.Tensor) -> str:
    return base64.b64encode(state.cpu().numpy().tobytes()).decode("ascii")


def _decode(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


# -------------------------------------------------------------------------------------------- checkpointer


class Checkpointer:
    """Decides when to save, saves and restores the whole training state under one run's checkpoints/.

    Two parts: the engine's model + optimizer state (its own format, `engine.save` / `engine.load`) and the
    trainer's state (a Stateful: step, tokens, data position, RNG), written by rank 0 as trainer_state.json,
    the last file before the rename, together with `identity` (model, optimizer, world size, config).
    """

    def __init__(
        self,
        ckpt_dir: Path,
        *,
        keep_last: int,
        is_main: bool,
        every: int = 0,
        total_steps: int = 0,
        identity: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ):
        self.dir, self.every, self.total_steps, self.enabled = ckpt_dir, every, total_steps, enabled
        self.keep_last, self.is_main = keep_last, is_main
        self.identity = dict(identity or {})
        self._pending: Future | None = None
        self._committer = ThreadPoolExecutor(max_workers=1) if is_main else None

    def due(self, step: int) -> bool:
        """Every `every` steps (0: never) and at the last step; never when disabled."""
        return self.enabled and ((self.every > 0 and step % self.every == 0) or step == self.total_steps)

    def save(self, step: int, engine: Engine, state: Stateful) -> Path:
        """Write the engine's state into step_N.partial, then trainer_state.json and the rename (rank 0).

        Collective. Sync engines: returns when step_N is committed. An engine whose save returns a Future (async
        DCP): returns once the state is copied to CPU memory; the write and the commit continue in the
        background (`wait()` blocks until they are done).
        """
        self.wait()
        final = self.dir / step_dir_name(step)
        partial = final.with_name(final.name + PARTIAL)
        if self.is_main:
            for stale in [*self.dir.glob(f"*{PARTIAL}"), *self.dir.glob(f"*{TRASH}")]:
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
        _barrier()
        trainer_state = {**state.state_dict(), **self.identity}  # collective (RNG states are gathered)
        written = engine.save(partial)
        if written is not None:
            if self._committer is None:
                self._pending = written
            else:  # rank 0's write completes after every rank's shards and the metadata are on disk
                self._pending = self._committer.submit(
                    lambda: (written.result(), self._commit(partial, final, trainer_state))
                )
            return final
        _barrier()  # an engine's format makes no promise about the other ranks when rank 0 returns
        if self.is_main:
            self._commit(partial, final, trainer_state)
        _barrier()
        return final

    def remove_leftovers(self) -> list[str]:
        """Remove what interrupted saves and removals left (step_N.partial, step_N.old; never loaded); their names.
        Rank 0, once every input of the run has been checked."""
        if not self.is_main or not self.dir.is_dir():
            return []
        leftovers = sorted([*self.dir.glob(f"*{PARTIAL}"), *self.dir.glob(f"*{TRASH}")])
        for path in leftovers:
            shutil.rmtree(path, ignore_errors=True)
        return [path.name for path in leftovers]

    def wait(self) -> None:
        """Block until the pending async save (if any) is written and committed; re-raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load(
        self, path: Path, engine: Engine, state: Stateful, expect: Mapping[str, Any] | None = None
    ) -> None:
        """Restore the engine's and the trainer's state in place from a complete checkpoint.

        `expect`: trainer-state fields that must match this run (e.g. {"optim": "normuon"}). Raises
        CheckpointError with one line naming the problem; never deletes anything.
        """
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})")
        problem = damage(path)
        if problem is not None:
            raise CheckpointError(f"{path}: damaged ({problem})")
        trainer_state = read_trainer_state(path)
        for key, value in (expect or {}).items():
            if trainer_state.get(key) != value:
                raise CheckpointError(
                    f"{path}: saved with {key} {trainer_state.get(key)!r}, this run has {value!r}"
                )
        try:
            engine.load(path)
        except CheckpointError:
            raise
        except Exception as err:
            raise CheckpointError(f"{path}: cannot load ({one_line(err)})") from None
        state.load_state_dict(trainer_state)

    def _commit(self, partial: Path, final: Path, trainer_state: dict[str, Any]) -> None:
        """The manifest of every file's size, then trainer_state.json (both fsynced) last, then one rename makes the
        checkpoint visible; then keep_last."""
        with (partial / MANIFEST).open("w") as f:
            json.dump(file_sizes(partial), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        with (partial / TRAINER_STATE).open("w") as f:
            json.dump(trainer_state, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # the same step saved again (a run resumed from an earlier checkpoint)
            final.rename(final.with_name(final.name + TRASH))
        partial.rename(final)
        shutil.rmtree(final.with_name(final.name + TRASH), ignore_errors=True)
        self._prune()

    def _prune(self) -> None:
        """Keep the newest keep_last intact checkpoints (0 = all): only intact ones count, so a damaged one never
        pushes out the last good one; damaged ones are left for a person to look at. A removal is a rename first,
        so a kill mid-removal never leaves a half-deleted directory that looks complete."""
        if self.keep_last <= 0:
            return
        intact = [path for path in list_checkpoints(self.dir) if damage(path) is None]
        for old in intact[: -self.keep_last]:
            trash = old.with_name(old.name + TRASH)
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
