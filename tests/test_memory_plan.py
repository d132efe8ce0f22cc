"""The memory planner (trainer/memory/planner.py, launch/estimate_memory.py) against measurements of the real
training step on CPU, and its scaling rules."""

from __future__ import annotations

import pytest
import torch

from launch.estimate_memory import main as estimate_main
from models import model_config, num_params
from tests.distributed import run_distributed
from trainer.config import ConfigError, load_config
from trainer.memory.planner import GiB, LiveBytes, plan_memory

SHAPE = ["--train.seq_len=32", "--train.global_batch_size=2", "--train.micro_batch_size=2"]
# (model, optimizer, extra overrides): the six, plus update in backward and activation checkpointing.
CASES = [
    ("llama_tiny", "adamw", []),
    ("llama_tiny", "swan", []),
    ("llama_tiny", "normuon", []),
    ("llama_60m", "adamw", []),
    ("llama_60m", "swan", []),
    ("llama_60m", "normuon", []),
    ("llama_60m", "sinkgd", ["--optim.update_in_backward=true"]),
    ("llama_tiny", "adamw", ["--parallel.activation_checkpointing=true", "--train.seq_len=128"]),
]


def _config(model: str, optim: str, extra: list[str]):
    return load_config(f"tiny_{optim}.yaml", [*SHAPE, f"--model.name={model}", *extra])


def _measure_all(cases: list) -> list[dict]:
    """Two steps of each case in this (world size 1) process: the trainer's accounting and the tensor peak."""
    from trainer.distributed import init_distributed
    from trainer.memory.measure import measure_steps

    info = init_distributed("cpu", "gloo")
    out = []
    for model, optim, extra in cases:
        m = measure_steps(_config(model, optim, extra), info, steps=2)
        c = m.components
        out.append({"params": c.params, "grads": c.grads, "state": c.state, "peak": m.peak_tensor_bytes})
    return out


@pytest.mark.slow
def test_prediction_within_15_percent_of_the_measured_cpu_step():
    measured = run_distributed(_measure_all, 1, CASES)
    for (model, optim, extra), got in zip(CASES, measured, strict=True):
        plan = plan_memory(_config(model, optim, extra), world_size=1, device="cpu")
        case = f"{model} {optim} {' '.join(extra)}"
        assert plan.get("parameters") == got["params"], case
        state = sum(n for name, n in plan.rows if name.startswith("optimizer state"))
        assert state == got["state"], case
        if "--optim.update_in_backward=true" not in extra:
            assert plan.get("gradients") == got["grads"], case
        else:  # the most gradient bytes alive at once: a part of the root unit (embedding, head)
            assert 0 < got["grads"] <= plan.get("gradients (largest unit, in backward)"), case
        assert plan.peak == pytest.approx(got["peak"], rel=0.15), case


def test_live_bytes_counts_new_storages_until_freed():
    a = torch.empty(1000, device="meta")  # before the mode: not counted
    with LiveBytes() as tracker:
        b = a * 2  # 4000 new bytes
        c = b.view(10, 100)  # a view: nothing new
        a.add_(1)  # in place: nothing new
        del b, c
        d = torch.empty(500, device="meta", dtype=torch.float64)  # 4000
    assert (tracker.peak, tracker.live) == (4000, 4000)
    del d


@pytest.mark.slow  # a few seconds: plans llama_350m on the meta device
def test_static_components_shard_over_the_world():
    cfg = load_config("llama350m_adamw.yaml", ["--train.micro_batch_size=1"])
    one, four = plan_memory(cfg, 1, device="cuda"), plan_memory(cfg, 4, device="cuda")
    n_params = num_params(model_config("llama_350m"))
    assert one.get("parameters") == one.get("gradients") == 4 * n_params
    assert one.get("optimizer state: group0_adamw") == 8 * n_params + 4 * (24 * 9 + 3)  # + fp32 step counters
    for name in ("parameters", "gradients", "optimizer state: group0_adamw"):
        assert four.get(name) == pytest.approx(one.get(name) / 4, abs=4)
    assert four.peak < one.peak / 2


@pytest.mark.slow  # a few seconds: plans llama_350m on the meta device
def test_bf16_gpu_swan_with_update_in_backward_heads_to_04x_of_adamw():
    shape = ["--train.micro_batch_size=1", "--train.global_batch_size=1"]
    adamw = plan_memory(load_config("llama350m_adamw.yaml", shape), 1, device="cuda")
    swan = plan_memory(load_config("llama350m_swan.yaml", [*shape, "--optim.update_in_backward=true"]), 1)
    assert swan.run.compute_dtype == torch.bfloat16
    assert 0.3 < swan.peak / adamw.peak < 0.45  # tensors only (the CUDA context is the same for both)


def test_planner_refuses_what_the_trainer_refuses():
    cfg = load_config("llama350m_swan.yaml", ["--optim.update_in_backward=true"])  # 8 micro-batches
    with pytest.raises(ConfigError, match="one micro-batch per step"):
        plan_memory(cfg, 1)


def test_cli_says_whether_it_fits(capsys):
    args = ["--config", "tiny_swan", "--device", "cpu", "--world-size", "2"]
    assert estimate_main([*args, "--device-memory-gb", "64"]) == 0
    out = capsys.readouterr().out
    assert (
        "world 2, cpu, float32 compute" in out
        and "optimizer state: group1_adamw" in out
        and "fits in 64.0" in out
    )
    assert estimate_main([*args, "--device-memory-gb", "0.01"]) == 1
    assert "does NOT fit in 0.0 GiB" in capsys.readouterr().out
    assert estimate_main([*args, "--optim.nme=swan"]) == 2
    assert "unknown config key 'optim.nme'" in capsys.readouterr().err
    assert estimate_main(["--config", "tiny_swan", "--world-size", "0"]) == 2


def test_activation_checkpointing_row_is_smaller():
    plan = plan_memory(load_config("llama350m_adamw.yaml", ["--train.micro_batch_size=4"]), 8)
    assert plan.get("activations with checkpointing") < plan.get("activations without checkpointing") / 4
    assert plan.get("activations without checkpointing") > GiB  # 4 x 256 tokens x 24 layers of bf16


@pytest.mark.slow
def test_memory_benchmark_table_quick(tmp_path):
    from benchmarks.memory import main as benchmark_main

    out = tmp_path / "memory.md"
    args = ["--config", "tiny", "--seq-len", "32", "--variants", "adamw,sinkgd+uib", "--threads", "1"]
    assert benchmark_main([*args, "--out", str(out)]) == 0
    rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")][2:]
    assert [r[0].strip() for r in rows] == ["adamw", "sinkgd + update_in_backward"]
    assert rows[0][6].strip() == "1.00x"  # RSS vs AdamW
    for row in rows:  # the planner against the measured tensor peak
        assert abs(float(row[9].strip().rstrip("%"))) < 15
