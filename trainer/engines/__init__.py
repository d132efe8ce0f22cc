"""Engines: what one optimizer step does to a model under one kind of parallelism, behind one protocol.

| parallel.engine | module | parallelism | checkpoint format |
| --- | --- | --- | --- |
| fsdp2 | fsdp2.py | FSDP2 `fully_shard` per block + root (HSDP with dp_replicate) | DCP, reshardable |
| fsdp2 with optim.update_in_backward | backward_update.py | as fsdp2, each update applied inside backward | DCP, reshardable |
| deepspeed | deepspeed.py, zero.py | DeepSpeed ZeRO-0..3 | DeepSpeed's, same world and stage |

The loop (trainer/train.py), the checkpointer and the memory tracker talk to every engine through `Engine`
(trainer/engines/protocol.py) and nothing else.
"""

from __future__ import annotations

from torch import nn
from torch.optim import Optimizer

from optim import build_optimizer
from trainer.config import Config, ConfigError
from trainer.distributed import DistInfo, build_mesh
from trainer.engines.protocol import Engine
from trainer.resolve import Run

__all__ = ["Engine", "build_engine"]


def build_engine(run: Run, model: nn.Module, dist_info: DistInfo) -> Engine:
    """Wrap `model` for the Run's engine, build its optimizer over the wrapped parameters, and the engine."""
    cfg, p = run.cfg, run.cfg.parallel
    blocks = {"activation_checkpointing": p.activation_checkpointing, "compile": run.compile}
    if run.engine == "deepspeed":
        from trainer.engines.deepspeed import DeepSpeedEngine
        from trainer.engines.fsdp2 import wrap_blocks

        wrap_blocks(model, **blocks)  # DeepSpeed takes the block-wrapped plain model
        return DeepSpeedEngine(
            model,
            _optimizer(cfg, model),
            zero_stage=p.zero_stage,
            micro_batch=run.batches.micro,
            accumulation=run.batches.accumulation,
            world_size=run.world,
            max_norm=cfg.train.grad_clip,
            bf16=run.bf16,
        )
    from trainer.engines.backward_update import BackwardUpdateEngine
    from trainer.engines.fsdp2 import FSDP2Engine, apply_fsdp

    apply_fsdp(model, build_mesh(dist_info, p.dp_replicate, p.dp_shard), bf16=run.bf16, **blocks)
    optimizer = _optimizer(cfg, model)
    if run.update_in_backward:
        return BackwardUpdateEngine(model, optimizer, async_save=cfg.checkpoint.async_save)
    return FSDP2Engine(model, optimizer, max_norm=cfg.train.grad_clip, async_save=cfg.checkpoint.async_save)


def _optimizer(cfg: Config, model: nn.Module) -> Optimizer:
    try:
        return build_optimizer(cfg.optim, model)
    except ValueError as err:
        raise ConfigError(f"optim: {err}") from None
