"""Per-component memory accounting (trainer/memory/tracker.py): exact byte counts, the per-rank table, memory/* metrics
in metrics.jsonl and TensorBoard, profiler traces; step-list options."""

from __future__ import annotations

import json

import pytest
import torch

from optim import build_optimizer
from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged, train_in_process
from trainer.config import ConfigError, load_config
from trainer.engines.fsdp2 import FSDP2Engine
from trainer.memory.tensors import MiB, optimizer_state_bytes
from trainer.memory.tracker import MemoryBreakdown, MemoryTracker, format_table, parse_steps
from trainer.resolve import build_model, resolve

SHAPE = ["--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.seq_len=32"]


def test_parse_steps_and_config_validation():
    assert parse_steps("2,5-7") == {2, 5, 6, 7}
    assert parse_steps("") == set()
    with pytest.raises(ValueError, match="expected steps like"):
        parse_steps("2-")
    with pytest.raises(ConfigError, match="metrics.profile_steps: expected steps like '3', '1-3'"):
        load_config("tiny_adamw.yaml", ["--metrics.profile_steps=a"])
    assert load_config(
        "tiny_adamw.yaml", ["--metrics.memory_snapshot_steps=1-3"]
    ).metrics.memory_snapshot_steps


def test_optimizer_state_bytes_per_group():
    cfg = load_config("tiny_swan.yaml", SHAPE)
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cpu"))
    optimizer = build_optimizer(cfg.optim, model)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    adamw = optimizer.param_groups[1]["params"]  # embedding, norms, head
    expected = sum(8 * p.numel() + 4 for p in adamw)  # exp_avg, exp_avg_sq and an fp32 step counter
    assert optimizer_state_bytes(optimizer) == {"group0_swan": 0, "group1_adamw": expected}


def _two_tracked_steps() -> dict:
    cfg = load_config("tiny_adamw.yaml", SHAPE)
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cpu"))
    optimizer = build_optimizer(cfg.optim, model)
    engine = FSDP2Engine(model, optimizer)
    lines: list[str] = []
    tracker = MemoryTracker(engine, torch.device("cpu"), cfg.run_dir, info=lines.append)
    for step in (1, 2):
        tracker.begin(step)
        engine.forward_backward([torch.randint(0, 512, (4, 33))])
        engine.grad_norm()
        engine.step()
        tracker.end(step)
    last = tracker.last
    return {
        "n_bytes": 4 * sum(p.numel() for p in model.parameters()),
        "n_params": len(list(model.parameters())),
        "last": (last.params, last.grads, last.optimizer_state, last.peak, last.runtime, last.state),
        "lines": lines,
        "metrics": tracker.metrics(),
    }


@pytest.mark.slow
def test_tracker_counts_a_step_exactly():
    # A fresh process: resident-memory readings in a long-lived test process carry other tests' heap.
    got = run_distributed(_two_tracked_steps, 1)
    n_bytes = got["n_bytes"]
    params, grads, optimizer_state, peak, runtime, state = got["last"]
    assert (params, grads) == (n_bytes, n_bytes)  # gradients counted before the step drops them
    # tiny_adamw's two groups (hidden matrices; embedding, head, norms): moments and a 4-byte step per tensor
    assert set(optimizer_state) == {"group0_adamw", "group1_adamw"}
    assert sum(optimizer_state.values()) == 2 * n_bytes + 4 * got["n_params"]
    assert peak >= runtime + params + grads + state > 0
    lines, metrics = got["lines"], got["metrics"]
    assert len(lines) == 1 and lines[0].startswith("memory per rank after step 1")  # the table, once
    assert metrics["memory/params_mib"] == n_bytes / MiB and metrics["memory/peak_mib"] == peak / MiB
    by_group = [metrics[f"memory/optimizer_state/group{g}_adamw_mib"] for g in (0, 1)]
    assert by_group == [optimizer_state[f"group{g}_adamw"] / MiB for g in (0, 1)]
    assert sum(by_group) == pytest.approx(metrics["memory/optimizer_state_mib"], rel=1e-12)


def test_table_shows_every_rank_up_to_8_then_min_and_max():
    ranks = [
        MemoryBreakdown(10 * MiB, 10 * MiB, {"group0_adamw": 20 * MiB}, (50 + r) * MiB) for r in range(3)
    ]
    table = format_table(ranks, "title")
    assert table.splitlines()[1].split() == ["rank", "0", "rank", "1", "rank", "2"]
    assert (
        "other (activations, temporaries, buffers)" in table and table.splitlines()[-1].split()[-1] == "52.0"
    )
    wide = format_table(ranks * 4, "title")
    assert wide.splitlines()[1].split() == ["rank", "0", "min", "max"]


@pytest.mark.slow
def test_trainer_logs_memory_per_rank_and_writes_a_profile(tmp_path, capfd):
    overrides = [
        *FAST,
        "--train.steps=3",
        f"--train.runs_dir={tmp_path}",
        "--train.run_name=mem",
        "--metrics.tensorboard=true",
        "--metrics.log_every=2",
        "--metrics.profile_steps=2",
        "--metrics.memory_snapshot_steps=1",
    ]
    run_distributed(train_in_process, 2, "tiny_swan.yaml", overrides)
    out = capfd.readouterr().out
    assert "memory per rank after step 1, MiB (peak: resident memory (CPU))" in out
    assert out.count("memory per rank") == 1 and "rank 1" in out
    assert "allocator snapshots need CUDA" in out and not (tmp_path / "mem" / "memory").exists()
    run = tmp_path / "mem"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    memory = [r for r in records if "memory/peak_mib" in r]
    assert [r["step"] for r in memory] == [2, 3]  # log steps
    cfg = load_config("tiny_swan.yaml", overrides)
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cpu"))
    half = sum(4 * -(-p.shape[0] // 2) * p[0].numel() for p in model.parameters())  # rank 0's row shards
    assert memory[0]["memory/params_mib"] == pytest.approx(half / MiB)
    assert memory[0]["memory/grads_mib"] == pytest.approx(half / MiB)
    assert memory[0]["memory/optimizer_state/group0_swan_mib"] == 0.0
    assert memory[0]["memory/optimizer_state/group1_adamw_mib"] > 0
    assert memory[0]["memory/peak_max_over_ranks_mib"] >= memory[0]["memory/peak_mib"]
    assert logged(run, "memory/other_mib")[0] > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb")).Reload()
    assert [e.step for e in events.Scalars("memory/params_mib")] == [2, 3]
    traces = list((run / "tb" / "profile").glob("rank*.pt.trace.json"))
    assert sorted(t.name.split(".")[0] for t in traces) == ["rank0", "rank1"]
    trace = json.loads(traces[0].read_text())
    assert any(e.get("name") == "[memory]" for e in trace["traceEvents"])  # profiled with memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="allocator snapshots need CUDA")
def test_cuda_snapshot_is_written(tmp_path):
    cfg = load_config("tiny_adamw.yaml", SHAPE)
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cuda"))
    optimizer = build_optimizer(cfg.optim, model)
    engine = FSDP2Engine(model, optimizer)
    tracker = MemoryTracker(engine, torch.device("cuda"), tmp_path, snapshot_steps="1", info=print)
    tracker.begin(1)
    engine.forward_backward([torch.randint(0, 512, (4, 33), device="cuda")])
    engine.grad_norm()
    engine.step()
    tracker.end(1)
    snapshot = tmp_path / "memory" / "rank0_step1.pickle"
    assert snapshot.stat().st_size > 0
    assert tracker.last.peak >= tracker.last.params + tracker.last.grads + tracker.last.state
