"""GPU-only bugs caught on a CPU: the per-step paths run with the model and batches on another device.

The first CUDA run crashed at its first evaluation: `torch.tensor(len(batch))` (made on the CPU) was stacked with a
CUDA loss. On a CPU machine both live on the CPU and nothing fails, so these tests run the same code with the model,
its optimizer state and every batch on the meta device, inside a fake process group (tests/fake_world.py): a
tensor made without the device it meets raises here as it would on CUDA, and a CPU tensor handed to a collective
fails as NCCL would refuse it.

Covered, for every optimizer: the training step as the loop runs it (`trainer.loop.Loop.step`: forward/backward,
the loss and stop-vote all-reduce, gradient norm, the divergence guard, clipping, the optimizer step, health on log
steps, the step timing, memory accounting and metrics, evaluation, the checkpoint) with the FSDP2 engine's code and with update_in_backward; the optimizer step with health on row-sharded
DTensor parameters (FSDP 1 x 4 and HSDP 2 x 2: the owner exchange and the reductions); DeepSpeed ZeRO's flat
partitions (the owner exchange over element ranges, and AdamW's partition health); the state a checkpoint saves.
Not covered (no values, or code that is not ours): the numbers, FSDP2's and DeepSpeed's own internals (fully_shard
cannot shard onto the meta device, so the engine's model here is unsharded), branches taken only when
`device.type == "cuda"` (synchronization, allocator statistics, CUDA RNG state, TF32), mixed-precision dtypes
(bf16 is chosen for CUDA only), checkpoint writes (DCP needs data), and collectives on objects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from optim import OPTIMIZER_NAMES, OPTIMIZERS, build_optimizer, track_health
from optim.sharded import FlatLayout, ShardInfo
from tests.fake_world import DEVICE, fake_world
from trainer.config import OptimConfig, load_config
from trainer.distributed import DistInfo
from trainer.engines.backward_update import BackwardUpdateEngine
from trainer.engines.dcp import ModelAndOptimizer
from trainer.engines.deepspeed import PartitionedAdamWHealth
from trainer.engines.fsdp2 import FSDP2Engine
from trainer.loop import Loop, evaluate
from trainer.memory.tracker import MemoryTracker
from trainer.preemption import StopSignals
from trainer.resolve import build_model, resolve
from trainer.train import open_data, prepare_around, start_run_dir
from trainer.watchdog import Watchdog

WORLD = 2
STEPS = [
    "--train.steps=4",
    "--train.global_batch_size=4",
    "--train.micro_batch_size=1",
    "--train.seq_len=16",
    "--train.eval_every=2",
    "--train.grad_clip=1.0",
    "--data.eval_sequences=4",
    "--metrics.log_every=2",
    "--metrics.tensorboard=false",
]


def _run(tmp_path: Path, optimizer: str, update_in_backward: bool) -> list[dict]:
    """Four training steps of tiny_<optimizer> on the meta device as rank 0 of a fake world of two (log and eval
    steps 2 and 4), then the state a checkpoint would save; the metrics.jsonl records."""
    extra = ["--optim.update_in_backward=true", "--train.micro_batch_size=2", "--train.grad_clip=0"]
    cfg = load_config(
        f"tiny_{optimizer}.yaml",
        [*STEPS, *(extra if update_in_backward else []), f"--train.runs_dir={tmp_path}"],
    )
    info = DistInfo(rank=0, world_size=WORLD, device=DEVICE)
    with fake_world(WORLD):
        run = resolve(cfg, WORLD, DEVICE)
        data = open_data(cfg, info)
        model = build_model(run, data.vocab_size, DEVICE)
        # fully_shard cannot shard onto the meta device: the engine's own code runs on the unsharded model
        opt = build_optimizer(cfg.optim, model)
        engine = (
            BackwardUpdateEngine(model, opt) if update_in_backward else FSDP2Engine(model, opt, max_norm=1.0)
        )
        prepared = prepare_around(run, data, engine, info)
        log = start_run_dir(prepared, info)
        memory = MemoryTracker.from_config(cfg.metrics, engine, DEVICE, cfg.run_dir, log.info)
        Loop(prepared, log, memory, StopSignals("", 1.0), Watchdog(0.0, 0, WORLD)).run()
        log.close()
        prepared.state.state_dict()  # what a checkpoint saves: trainer state (RNG gathered) and engine state
        try:
            ModelAndOptimizer(model, opt).state_dict()
        except (
            RuntimeError
        ) as err:  # torch 2.6 leaves meta tensors out of a state dict, then refuses it as empty
            if "state_dict is empty" not in str(err):
                raise
    return [json.loads(line) for line in (cfg.run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
def test_training_steps_keep_every_tensor_on_the_model_device(tmp_path: Path, optimizer: str) -> None:
    records = _run(tmp_path, optimizer, update_in_backward=False)
    logged = {key for record in records for key in record}
    assert {"loss", "grad_norm", "eval/loss", "optim/update_rms", "memory/params_mib"} <= logged
    assert {"optim/step_s", "optim/update_spectral_norm"} <= logged
    assert [r["step"] for r in records if "eval/loss" in r] == [2, 4]


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
def test_update_in_backward_keeps_every_tensor_on_the_model_device(tmp_path: Path, optimizer: str) -> None:
    records = _run(tmp_path, optimizer, update_in_backward=True)
    assert {"loss", "eval/loss", "optim/update_rms"} <= {key for record in records for key in record}


def test_evaluate_counts_rows_on_the_model_device(tmp_path: Path) -> None:
    """The first CUDA run's crash, by itself: the row count must be made where the losses are."""
    cfg = load_config("tiny_adamw.yaml", [*STEPS, f"--train.runs_dir={tmp_path}"])
    info = DistInfo(rank=0, world_size=WORLD, device=DEVICE)
    with fake_world(WORLD):
        data = open_data(cfg, info)
        model = build_model(resolve(cfg, WORLD, DEVICE), data.vocab_size, DEVICE)
        loss = evaluate(model, data.held_out, 2, DEVICE)  # raised "Tensor on device cpu is not on ... meta"
    assert loss == 0.0  # meta holds no values: the host read gives zeros (tests/fake_world.py)


# Row counts the world size does not divide, ranks that hold no rows, repeated and distinct shapes.
SHAPES = [(13, 7), (13, 7), (21, 13), (1, 5), (7, 21)]


def _sharded_params(mesh, placements: list) -> list[nn.Parameter]:
    """Meta DTensors row-sharded like FSDP2's (torch.chunk rows), each with a gradient placed like it."""
    shard_dim = len(placements) - 1
    world, rank = mesh.size(shard_dim), mesh.get_local_rank(shard_dim)
    params = []
    for m, n in SHAPES:
        rows = ShardInfo(torch.Size([m, n]), None, rank, world).local_rows
        local = torch.empty(rows, n, device=DEVICE)
        dt = DTensor.from_local(
            local, mesh, placements, run_check=False, shape=torch.Size([m, n]), stride=(n, 1)
        )
        p = nn.Parameter(dt)
        p.grad = DTensor.from_local(
            torch.empty_like(local), mesh, placements, run_check=False, shape=p.shape, stride=p.stride()
        )
        params.append(p)
    return params


@pytest.mark.parametrize("layout", ["fsdp4", "hsdp2x2"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_sharded_optimizer_step_keeps_every_tensor_on_the_model_device(layout: str, optimizer: str) -> None:
    with fake_world(4):
        if layout == "fsdp4":
            mesh, placements = init_device_mesh(DEVICE.type, (4,), mesh_dim_names=("dp_shard",)), [Shard(0)]
        else:
            names = ("dp_replicate", "dp_shard")
            mesh, placements = (
                init_device_mesh(DEVICE.type, (2, 2), mesh_dim_names=names),
                [Replicate(), Shard(0)],
            )
        opt = OPTIMIZERS[optimizer](_sharded_params(mesh, placements), lr=0.01)
        for _ in range(2):  # the second step reuses the owner plan and the state
            with track_health(opt) as health:
                opt.step()
            numbers = health.report()
    assert "update_rms" in numbers and "update_spectral_norm" in numbers


@pytest.mark.parametrize("optimizer", OPTIMIZER_NAMES)
def test_zero_flat_partitions_keep_every_tensor_on_the_model_device(optimizer: str) -> None:
    """DeepSpeed ZeRO-1/2 hands the optimizer one flat partition per param group that cuts across matrices."""
    with fake_world(WORLD):
        matrices = [nn.Parameter(torch.empty(shape, device=DEVICE)) for shape in SHAPES]
        numel = sum(p.numel() for p in matrices)
        partition = -(-numel // WORLD)
        flat = nn.Parameter(torch.empty(partition, device=DEVICE))
        flat.grad = torch.empty_like(flat)
        if optimizer == "adamw":
            opt = torch.optim.AdamW([flat], lr=0.01)
            opt.step()
            numbers = PartitionedAdamWHealth(opt, numel, DEVICE, [(flat, 0)]).report()
        else:
            starts = [sum(p.numel() for p in matrices[:k]) for k in range(len(matrices))]
            layout = FlatLayout.of_concatenation(
                matrices, [p.shape for p in matrices], starts, partition, torch.distributed.group.WORLD
            )
            opt = build_optimizer(OptimConfig(name=optimizer, lr=0.01), nn.Linear(5, 5, bias=False))
            opt.param_groups[0]["params"] = [flat]  # what ZeRO does to the matrix group
            opt.use_flat_partitions({flat: layout})
            with track_health(opt) as health:
                opt.step()
            numbers = health.report()
    assert "update_rms" in numbers
