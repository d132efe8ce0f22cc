"""Sharded, atomic, optionally asynchronous checkpoints with torch.distributed.checkpoint (DCP).

Layout of runs/<name>/checkpoints/:
    step_000100/            complete: DCP shards (one file per rank) + .metadata + trainer_state.json (last)
    step_000200.partial/    being written (or left by a crash): never loaded, removed by the next save
    step_000050.old/        being deleted by keep_last (or left by a crash): never loaded, removed by the next save

Why this shape: each rank writes only its own shards (no gather to rank 0), DCP's metadata lets a checkpoint load
at another world size, and a directory becomes `step_N` by one rename after every rank has finished (DCP writes
.metadata only after every rank's shards are written; trainer_state.json follows it), so a kill at any moment
leaves either the old or the new checkpoint, never a half one that looks whole.

Async saves copy the state to CPU memory (the only blocking part), then write it in a background thread whose
collectives run on a dedicated gloo group, so they never interleave with the training's collectives. The rename
happens as soon as the write completes; the next save and the end of training wait for it.

Loading checks what it can before touching any state and reduces every failure to one line (CheckpointError):
a missing or truncated shard file, a tensor whose shape differs from this run's model, a trainer-state field that
must match (the optimizer). Nothing is ever deleted on a failed load.

Engines: a DCP engine (FSDP2Engine) hands over its state as DCP Statefuls (`checkpoint_state()`) and gets all of
the above; an engine with its own format (DeepSpeed) writes and reads its files itself (`save(path)` /
`load(path)`), synchronously, inside the same partial-directory-then-rename commit.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import traceback
import warnings
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.stateful import Stateful

TRAINER_STATE = "trainer_state.json"
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
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1] if found else None


def read_trainer_state(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / TRAINER_STATE).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: unreadable {TRAINER_STATE} ({err})") from None


# ------------------------------------------------------------------------------------------------ checks


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


class DCPEngine(Protocol):
    def checkpoint_state(self) -> dict[str, Stateful]:
        """Model and optimizer state as DCP Statefuls (DTensor-sharded: each rank saves its own shards)."""
        ...


class OwnFormatEngine(Protocol):
    def save(self, path: Path) -> None:
        """Every rank writes its own files under `path` (an existing directory)."""
        ...

    def load(self, path: Path) -> None: ...


class Checkpointer:
    """Saves and restores the whole training state under one run's checkpoints/ directory.

    `engine` provides model + optimizer state (DCPEngine or OwnFormatEngine); `trainer_state` is the JSON side
    (step, tokens, data position, RNG, config), written by rank 0 as the last file before the rename.
    """

    def __init__(self, ckpt_dir: Path, keep_last: int, is_main: bool, async_save: bool = False):
        self.dir = ckpt_dir
        self.keep_last = keep_last
        self.is_main = is_main
        self.async_save = async_save
        self._pending: Future | None = None
        self._committer = ThreadPoolExecutor(max_workers=1) if async_save and is_main else None
        # Background writes synchronise ranks over their own gloo group (a collective, so built on every rank).
        self._group = dist.new_group(backend="gloo") if async_save and dist.is_initialized() else None

    def save(self, step: int, engine: DCPEngine | OwnFormatEngine, trainer_state: dict[str, Any]) -> Path:
        """Write the engine's state into step_N.partial, then trainer_state.json and the rename (rank 0).

        Sync: returns when step_N is committed. Async (DCP engines): returns once the state is copied to CPU
        memory; the write and the commit continue in the background (`wait()` blocks until they are done).
        """
        self.wait()
        final = self.dir / step_dir_name(step)
        partial = final.with_name(final.name + PARTIAL)
        if self.is_main:
            for stale in [*self.dir.glob(f"*{PARTIAL}"), *self.dir.glob(f"*{TRASH}")]:
                shutil.rmtree(stale, ignore_errors=True)
            partial.mkdir(parents=True, exist_ok=True)
        _barrier()
        dcp_engine = hasattr(engine, "checkpoint_state")
        if dcp_engine and self.async_save:
            # FileSystemWriter is an AsyncStager: async_save copies the state to CPU memory before returning.
            writer = FileSystemWriter(str(partial))
            written = dcp.async_save(
                engine.checkpoint_state(), storage_writer=writer, process_group=self._group
            )
            if self._committer is None:
                self._pending = written
            else:  # rank 0's write completes after every rank's shards and the metadata are on disk
                self._pending = self._committer.submit(
                    lambda: (written.result(), self._commit(partial, final, trainer_state))
                )
            return final
        if dcp_engine:  # returns on rank 0 only after every rank's shards and the metadata are written
            dcp.save(engine.checkpoint_state(), storage_writer=FileSystemWriter(str(partial)))
        else:
            engine.save(partial)
            _barrier()  # an own format makes no promise about the other ranks when rank 0 returns
        if self.is_main:
            self._commit(partial, final, trainer_state)
        _barrier()
        return final

    def wait(self) -> None:
        """Block until the pending async save (if any) is written and committed; re-raise its failure."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def load(
        self, path: Path, engine: DCPEngine | OwnFormatEngine, expect: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """Restore the engine's state in place from a complete checkpoint; return its trainer state.

        `expect`: trainer-state fields that must match this run (e.g. {"optim": "normuon"}). Raises
        CheckpointError with one line naming the problem; never deletes anything.
        """
        if not is_complete(path):
            raise CheckpointError(f"{path}: not a complete checkpoint (no {TRAINER_STATE})")
        trainer_state = read_trainer_state(path)
        for key, value in (expect or {}).items():
            if trainer_state.get(key) != value:
                raise CheckpointError(
                    f"{path}: saved with {key} {trainer_state.get(key)!r}, this run has {value!r}"
                )
        if hasattr(engine, "checkpoint_state"):
            load_state(path, engine.checkpoint_state())
            return trainer_state
        try:
            engine.load(path)
        except Exception as err:
            raise CheckpointError(f"{path}: cannot load ({one_line(err)})") from None
        return trainer_state

    def _commit(self, partial: Path, final: Path, trainer_state: dict[str, Any]) -> None:
        """trainer_state.json (fsynced) last, then one rename makes the checkpoint visible; then keep_last."""
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
        """Keep the newest keep_last complete checkpoints (0 = all); a removal is a rename first, so a kill
        mid-removal never leaves a half-deleted directory that looks complete."""
        if self.keep_last <= 0:
            return
        for old in list_checkpoints(self.dir)[: -self.keep_last]:
            trash = old.with_name(old.name + TRASH)
            old.rename(trash)
            shutil.rmtree(trash, ignore_errors=True)


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
