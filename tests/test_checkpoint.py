"""Checkpoints in one process: atomic commit, keep_last, exact round trip of every optimizer, one-line errors,
async snapshots and RNG state. (Multi-process resume and resharding: test_checkpoint_resume.py.)"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

import trainer.engines.fsdp2 as fsdp2
from models import Llama, model_config
from optim import OPTIMIZER_NAMES, build_optimizer
from trainer.checkpoint import (
    Checkpointer,
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    restore_rng,
    rng_states,
    saved_config,
)
from trainer.config import OptimConfig, load_config
from trainer.engines.dcp import ModelAndOptimizer, flat_tensors
from trainer.engines.fsdp2 import FSDP2Engine

# Without a process group DCP warns that it saves in one process: that is what these tests do.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


def _engine(optim: str = "adamw", vocab: int = 64, async_save: bool = False) -> FSDP2Engine:
    torch.manual_seed(0)
    model = Llama(model_config("llama_tiny", vocab_size=vocab, max_seq_len=16))
    optimizer = build_optimizer(OptimConfig(name=optim, lr=1e-2), model)
    return FSDP2Engine(model, optimizer, max_norm=1.0, async_save=async_save)


class Record:
    """A trainer state for these tests: a dict saved as trainer_state.json and loaded back."""

    def __init__(self, **values):
        self.values = values

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.values = dict(state)


def _train(engine: FSDP2Engine, steps: int, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = torch.randint(0, 64, (4, 17), generator=gen)
        loss = engine.forward_backward(list(batch.split(2)))
        engine.grad_norm()
        engine.step()
    return loss.item()


def _params(engine: FSDP2Engine) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in engine.model.named_parameters()}


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and mtime: 'nothing was deleted or changed'."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in root.rglob("*")
        if p.is_file()
    }


def _names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _save(directory: Path, engine: FSDP2Engine, step: int, keep_last: int = 0, **kw) -> Path:
    return Checkpointer(directory, keep_last=keep_last, is_main=True, **kw).save(
        step, engine, Record(step=step, optim="adamw")
    )


def test_commit_is_a_rename_and_keep_last_prunes_only_after_the_newer_one_is_complete(tmp_path, monkeypatch):
    engine = _engine()
    seen_while_writing = []
    real_save = fsdp2.dcp.save

    def recording_save(*args, **kwargs):
        seen_while_writing.append(sorted(p.name for p in tmp_path.iterdir()))
        return real_save(*args, **kwargs)

    monkeypatch.setattr(fsdp2.dcp, "save", recording_save)
    checkpointer = Checkpointer(tmp_path, keep_last=2, is_main=True)
    for step in (1, 2, 3):
        checkpointer.save(step, engine, Record(step=step))
    # While step 3 was being written, steps 1 and 2 were both still there; step 1 went only after step 3's rename.
    assert seen_while_writing[-1] == ["step_000001", "step_000002", "step_000003.partial"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000002", "step_000003"]
    committed = sorted(os.listdir(tmp_path / "step_000003"))
    assert committed == [".metadata", "__0_0.distcp", "manifest.json", "trainer_state.json"]
    sizes = json.loads(
        (tmp_path / "step_000003" / "manifest.json").read_text()
    )  # every file's size, recorded
    assert sizes == {name: (tmp_path / "step_000003" / name).stat().st_size for name in committed[:2]}
    assert json.loads((tmp_path / "step_000003" / "trainer_state.json").read_text()) == {"step": 3}

    # Leftovers of a crash (a partial save, a half-removed old one) are never listed, and the next save clears them.
    (tmp_path / "step_000004.partial").mkdir()
    (tmp_path / "step_000004.partial" / "__0_0.distcp").write_bytes(b"x")
    (tmp_path / "step_000001.old").mkdir()
    (
        tmp_path / "step_000009"
    ).mkdir()  # no metadata, no trainer state: not a checkpoint (and not ours to delete)
    assert latest_checkpoint(tmp_path) == tmp_path / "step_000003"
    checkpointer.save(5, engine, Record(step=5))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000003", "step_000005", "step_000009"]


def test_saving_the_same_step_again_replaces_it(tmp_path):
    engine = _engine()
    _save(tmp_path, engine, 4)
    _train(engine, 1, seed=1)
    _save(tmp_path, engine, 4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_000004"]


@pytest.mark.parametrize("optim", OPTIMIZER_NAMES)
def test_round_trip_continues_bit_for_bit(tmp_path, optim):
    """Model + optimizer state (momentum, NorMuon's row second moment, AdamW moments and step counts) survive."""
    engine = _engine(optim)
    _train(engine, 3, seed=1)
    path = _save(tmp_path, engine, 3)
    lr_after_save = [g["lr"] for g in engine.optimizer.param_groups]
    expected_loss = _train(engine, 2, seed=2)
    expected = _params(engine)

    fresh = _engine(optim)
    fresh.optimizer.param_groups[0]["lr"] = 123.0  # the checkpoint's hyperparameters replace the fresh ones
    Checkpointer(tmp_path, keep_last=0, is_main=True).load(path, fresh, Record())
    assert [g["lr"] for g in fresh.optimizer.param_groups] == lr_after_save
    assert _train(fresh, 2, seed=2) == expected_loss
    got = _params(fresh)
    for name, value in expected.items():
        assert torch.equal(got[name], value), name


@pytest.mark.parametrize("optim", OPTIMIZER_NAMES)
def test_dcp_initialising_a_fresh_optimizer_state_leaves_weights_grads_and_state_clean(optim):
    """Before a load, get_optimizer_state_dict fills an empty optimizer state with a zero-lr step on zero grads.
    That step must not move the weights (SWAN whitens a zero matrix, NorMuon divides by zero norms), leave NaN
    in the state, or leave zero grads for the next step to accumulate into."""
    engine = _engine(optim)
    weights = _params(engine)
    state = flat_tensors({"app": ModelAndOptimizer(engine.model, engine.optimizer)})  # what a load asks first
    assert any(".optim.state." in key for key in state)
    assert all(torch.isfinite(t).all() for t in state.values())
    assert all(p.grad is None for p in engine.model.parameters())
    for name, value in _params(engine).items():
        assert torch.equal(value, weights[name]), name


def _unlisted(checkpoint: Path, name: str) -> Path:
    """`name` in a checkpoint whose manifest is gone (as one written before manifests existed)."""
    (checkpoint / "manifest.json").unlink()
    return checkpoint / name


@pytest.fixture
def saved(tmp_path) -> Path:
    engine = _engine()
    _train(engine, 1, seed=1)
    return _save(tmp_path / "checkpoints", engine, 1)


@pytest.mark.parametrize(
    "damage, engine_kwargs, expect, message",
    [
        # the sizes its commit recorded (manifest.json) catch a lost or cut file before anything is read
        (lambda p: (p / "__0_0.distcp").unlink(), {}, None, "damaged (__0_0.distcp is missing)"),
        (lambda p: os.truncate(p / "__0_0.distcp", 100), {}, None, "damaged (__0_0.distcp is 100 bytes, "),
        (lambda p: (p / ".metadata").write_bytes(b"garbage"), {}, None, "damaged (.metadata is 7 bytes, "),
        # a checkpoint without a manifest (written before them): DCP's own checks say the same
        (lambda p: _unlisted(p, "__0_0.distcp").unlink(), {}, None, "missing shard file __0_0.distcp"),
        (
            lambda p: os.truncate(_unlisted(p, "__0_0.distcp"), 100),
            {},
            None,
            "shard file __0_0.distcp is truncated",
        ),
        (lambda p: _unlisted(p, ".metadata").write_bytes(b"garbage"), {}, None, "unreadable .metadata"),
        (lambda p: (p / "trainer_state.json").write_text("{"), {}, None, "unreadable trainer_state.json"),
        (lambda p: (p / "trainer_state.json").unlink(), {}, None, "not a complete checkpoint"),
        (
            lambda p: None,
            {"vocab": 96},
            None,
            "size mismatch for model.tok_embeddings.weight: saved [64, 64] vs this run's [96, 64]",
        ),
        (
            lambda p: None,
            {"optim": "normuon"},
            None,
            "has no optim.state.layers.0.attention.wq.weight.momentum",
        ),
        (lambda p: None, {}, {"optim": "muon"}, "saved with optim 'adamw', this run has 'muon'"),
    ],
    ids=[
        "missing-shard",
        "truncated-shard",
        "bad-metadata",
        "missing-shard-no-manifest",
        "truncated-shard-no-manifest",
        "bad-metadata-no-manifest",
        "bad-state",
        "no-state",
        "shape",
        "keys",
        "optim",
    ],
)
def test_a_damaged_or_incompatible_checkpoint_is_one_line_and_deletes_nothing(
    saved, damage, engine_kwargs, expect, message
):
    damage(saved)
    before = _snapshot(saved.parent)
    engine = _engine(**engine_kwargs)
    weights = _params(engine)
    with pytest.raises(CheckpointError) as err:
        Checkpointer(saved.parent, keep_last=1, is_main=True).load(saved, engine, Record(), expect=expect)
    text = str(err.value)
    assert message in text and text.startswith(str(saved)), text
    assert "\n" not in text and "Traceback" not in text
    assert _snapshot(saved.parent) == before
    for name, value in _params(engine).items():  # the checks run before any tensor is touched
        assert torch.equal(value, weights[name]), name


def test_async_save_snapshots_the_state_and_commits_when_the_write_is_done(tmp_path, monkeypatch):
    engine = _engine(async_save=True)
    _train(engine, 1, seed=1)
    weight = engine.model.output.weight
    at_save = weight.detach().clone()

    class SlowWriter(fsdp2.FileSystemWriter):
        def write_data(self, plan, planner):
            time.sleep(0.5)
            return super().write_data(plan, planner)

    monkeypatch.setattr(fsdp2, "FileSystemWriter", SlowWriter)
    checkpointer = Checkpointer(tmp_path, keep_last=0, is_main=True)
    path = checkpointer.save(1, engine, Record(step=1))
    with torch.no_grad():
        weight.add_(1.0)  # training goes on while the checkpoint is written
    assert not path.exists() and path.with_name(path.name + ".partial").is_dir()
    checkpointer.wait()
    assert latest_checkpoint(tmp_path) == path
    fresh = _engine()
    checkpointer.load(path, fresh, Record())
    assert torch.equal(fresh.model.output.weight, at_save)


def test_rng_state_is_restored_at_the_same_world_size_and_reseeded_at_another():
    torch.manual_seed(7)
    torch.rand(3)
    saved = {"step": 10, "world_size": 1, "rng": rng_states(torch.device("cpu"))}
    expected = torch.rand(5)
    torch.manual_seed(0)
    restore_rng(saved, rank=0, world_size=1, seed=0, device=torch.device("cpu"))
    assert torch.equal(torch.rand(5), expected)

    draws = []
    for rank in (0, 1, 0):
        restore_rng(saved, rank=rank, world_size=2, seed=0, device=torch.device("cpu"))
        draws.append(torch.rand(5))
    assert torch.equal(draws[0], draws[2]) and not torch.equal(draws[0], draws[1])


class OwnFormat:
    """An engine that writes its own files (as DeepSpeed does) instead of handing DCP its state."""

    def __init__(self, value: int):
        self.value = value

    def save(self, path: Path) -> None:
        (path / "state.json").write_text(json.dumps(self.value))  # synchronous: returns None

    def load(self, path: Path) -> None:
        self.value = json.loads((path / "state.json").read_text())


def test_an_engine_with_its_own_format_gets_the_same_commit_and_one_line_errors(tmp_path):
    checkpointer = Checkpointer(tmp_path, keep_last=1, is_main=True)
    for step in (1, 2):
        saved = checkpointer.save(step, OwnFormat(step * 10), Record(step=step))
        assert saved == tmp_path / f"step_00000{step}"
    assert _names(tmp_path) == ["step_000002"]
    assert _names(tmp_path / "step_000002") == ["manifest.json", "state.json", "trainer_state.json"]
    engine, state = OwnFormat(0), Record()
    checkpointer.load(tmp_path / "step_000002", engine, state)
    assert state.values == {"step": 2} and engine.value == 20
    (tmp_path / "step_000002" / "state.json").write_text("2")  # a file of another size: the manifest says so
    with pytest.raises(
        CheckpointError, match=r"step_000002: damaged \(state.json is 1 bytes, 2 when committed\)$"
    ):
        checkpointer.load(tmp_path / "step_000002", engine, state)
    (tmp_path / "step_000002" / "manifest.json").unlink()  # without one, the engine's own error, in one line
    (tmp_path / "step_000002" / "state.json").unlink()
    with pytest.raises(
        CheckpointError, match=r"step_000002: cannot load \(FileNotFoundError: .*state.json'\)$"
    ):
        checkpointer.load(tmp_path / "step_000002", engine, state)


def test_saves_are_due_every_n_steps_and_at_the_end_unless_disabled(tmp_path: Path) -> None:
    every_4 = Checkpointer(tmp_path, keep_last=1, is_main=True, every=4, total_steps=10)
    assert [s for s in range(1, 11) if every_4.due(s)] == [4, 8, 10]
    end_only = Checkpointer(tmp_path, keep_last=1, is_main=True, total_steps=10)
    assert [s for s in range(1, 11) if end_only.due(s)] == [10]
    disabled = Checkpointer(tmp_path, keep_last=1, is_main=True, every=4, total_steps=10, enabled=False)
    assert not any(disabled.due(s) for s in range(1, 11))


def test_the_saved_config_reads_back_typed_and_skips_keys_of_another_version(tmp_path: Path) -> None:
    cfg = load_config("tiny_normuon.yaml", ["--parallel.zero_stage=2", "--optim.ns_steps=3"])
    saved = cfg.to_dict()
    saved["optim"]["a_key_of_a_later_version"] = 1
    saved["a_section_of_a_later_version"] = {"x": 1}
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1, "config": saved}))
    read = saved_config(tmp_path)
    assert read.parallel.zero_stage == 2 and read.optim.ns_steps == 3 and read.optim.name == "normuon"
    saved["train"]["steps"] = "many"
    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 1, "config": saved}))
    with pytest.raises(CheckpointError, match="saved config does not load .*train.steps: expected int"):
        saved_config(tmp_path)
