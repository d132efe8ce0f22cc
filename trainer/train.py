"""The training loop. Everything it needs is built by the services next to it; this file only orders them."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import Llama, flops_per_token, model_config, num_params
from optim import build_optimizer
from trainer.backward_update import BackwardUpdateEngine
from trainer.checkpoint import Checkpointer, latest_checkpoint, restore_rng, rng_states
from trainer.config import Config, ConfigError, save_config
from trainer.data import build_loader
from trainer.distributed import DistInfo, all_reduce_mean, build_mesh
from trainer.engine import FSDP2Engine, causal_lm_loss
from trainer.engine_deepspeed import DeepSpeedEngine
from trainer.memory import MemoryTracker
from trainer.metrics import MetricsLogger, detect_peak_tflops
from trainer.parallel import apply_fsdp, wrap_blocks
from trainer.schedule import lr_multiplier


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the run stops before anything is saved from that state."""


@dataclass
class Batches:
    """How one optimizer step's global batch splits over ranks and micro-batches."""

    local: int
    micro: int
    accumulation: int

    @classmethod
    def plan(cls, cfg: Config, world_size: int) -> Batches:
        t = cfg.train
        if t.global_batch_size % (t.micro_batch_size * world_size):
            raise ConfigError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({t.micro_batch_size}) x world size ({world_size})"
            )
        local = t.global_batch_size // world_size
        return cls(local=local, micro=t.micro_batch_size, accumulation=local // t.micro_batch_size)


def build_model(cfg: Config, data_vocab: int, device: torch.device) -> Llama:
    """Same seed, same full initialisation on every rank, then moved; FSDP2 shards it afterwards."""
    try:
        mcfg = model_config(
            cfg.model.name, vocab_size=cfg.model.vocab_size or None, max_seq_len=cfg.train.seq_len
        )
    except ValueError:
        mcfg = model_config(cfg.model.name, vocab_size=data_vocab, max_seq_len=cfg.train.seq_len)
    if mcfg.vocab_size < data_vocab:
        raise ConfigError(
            f"model.vocab_size ({mcfg.vocab_size}) is smaller than the data's vocabulary ({data_vocab})"
        )
    torch.manual_seed(cfg.train.seed)
    return Llama(mcfg).to(device)


@torch.no_grad()
def evaluate(model: nn.Module, eval_loader, micro: int, device: torch.device) -> float:
    """Mean loss over the whole held-out set (batches weighted by their size, exact over ranks)."""
    model.eval()
    total = torch.zeros(2, device=device)
    for batch in eval_loader.eval_batches(micro):
        total += torch.stack([causal_lm_loss(model, batch.to(device)) * len(batch), torch.tensor(len(batch))])
    model.train()
    total = all_reduce_mean(total)
    return (total[0] / total[1]).item()


def train(cfg: Config, dist_info: DistInfo) -> dict[str, Any]:
    t, device, is_main = cfg.train, dist_info.device, dist_info.is_main
    run_dir = cfg.run_dir
    batches = Batches.plan(cfg, dist_info.world_size)
    loader_args = dict(
        seq_len=t.seq_len,
        global_batch_size=t.global_batch_size,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        run_dir=run_dir,
    )
    loader = build_loader(cfg.data, **loader_args)
    eval_loader = build_loader(
        cfg.data, **{**loader_args, "global_batch_size": cfg.data.eval_sequences}, split="eval"
    )
    model = build_model(cfg, loader.vocab_size, device)
    n_params, flops_tok = num_params(model.cfg), flops_per_token(model.cfg, t.seq_len)
    par = cfg.parallel
    if par.engine == "fsdp2":
        mesh = build_mesh(dist_info, par.dp_replicate, par.dp_shard)
        apply_fsdp(
            model,
            mesh,
            mixed_precision=par.mixed_precision,
            activation_checkpointing=par.activation_checkpointing,
            compile=par.compile,
        )
    else:  # DeepSpeed takes the (block-wrapped) plain model
        wrap_blocks(model, activation_checkpointing=par.activation_checkpointing, compile=par.compile)
    try:
        optimizer = build_optimizer(cfg.optim, model)
    except ValueError as err:
        raise ConfigError(f"optim: {err}") from None

    if cfg.optim.update_in_backward:
        engine = BackwardUpdateEngine(model, optimizer, cfg, batches.accumulation)
    elif cfg.parallel.engine == "deepspeed":
        engine = DeepSpeedEngine(model, optimizer, cfg, batches.accumulation, dist_info.world_size)
    else:
        engine = FSDP2Engine(model, optimizer)
    ckpt = cfg.checkpoint
    checkpointer = Checkpointer(run_dir / "checkpoints", ckpt.keep_last, is_main, ckpt.async_save)
    # The config's peak lrs, taken before a resume: a checkpoint's param groups hold scheduled ones.
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    step, tokens = 0, 0
    resume = Path(ckpt.resume_from) if ckpt.resume_from else None
    if resume is None and ckpt.resume:
        resume = latest_checkpoint(run_dir / "checkpoints")
    if resume is not None:  # before anything is written: a checkpoint that does not fit changes nothing
        saved = checkpointer.load(resume, engine, expect={"optim": cfg.optim.name})
        step, tokens = saved["step"], saved["tokens"]
        loader.load_state_dict(saved["data"])
        restore_rng(saved, dist_info.rank, dist_info.world_size, t.seed, device)
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
    log = MetricsLogger(run_dir, is_main, cfg.metrics.tensorboard, t.steps, resumed_step=step)
    memory = MemoryTracker.from_config(cfg.metrics, engine, device, run_dir, log.info)
    if resume is not None:
        log.info(f"resumed from {resume} at step {step}")
    log.info(
        f"model {cfg.model.name}: {n_params / 1e6:.2f}M params | optimizer {cfg.optim.name} | "
        f"world {dist_info.world_size} | global batch {t.global_batch_size} x {t.seq_len} tokens | "
        f"accumulation {batches.accumulation}"
    )
    if loader.entropy_floor is not None:
        log.info(f"generated corpus: best achievable loss (entropy floor) {loader.entropy_floor:.4f}")

    peak_flops = (cfg.metrics.peak_tflops or detect_peak_tflops(device)) * 1e12
    tokens_per_step = t.global_batch_size * t.seq_len
    skips, start_step, start_time = 0, step, time.perf_counter()
    window_time, window_tokens = start_time, 0
    last_loss = float("nan")
    while step < t.steps:
        mult = lr_multiplier(step, t.steps, t.schedule, t.warmup_ratio, t.min_lr_ratio, t.decay_ratio)
        for group, base in zip(optimizer.param_groups, base_lrs, strict=True):
            group["lr"] = base * mult
        logging_step = (step + 1) % cfg.metrics.log_every == 0 or step + 1 == t.steps
        optimizer.track_health = logging_step

        memory.begin(step + 1)
        batch = loader.next_batch().to(device)
        loss_value = all_reduce_mean(engine.forward_backward(list(batch.split(batches.micro)))).item()
        norm = engine.grad_norm()
        if not (math.isfinite(loss_value) and math.isfinite(norm.item())):
            skips += 1
            if t.on_nonfinite == "stop" or skips > t.max_skips:
                checkpointer.wait()  # an async save in flight holds an earlier, finite state: let it commit
                raise NonFiniteError(
                    f"non-finite loss {loss_value} or grad norm {norm.item()} at step {step + 1}; "
                    f"stopping without saving (last checkpoint is intact)"
                )
            log.info(f"step {step + 1}: non-finite loss or gradient, step skipped ({skips}/{t.max_skips})")
            engine.skip()
            step += 1
            continue
        skips = 0
        engine.step(norm, t.grad_clip)
        step += 1
        memory.end(step)
        tokens += tokens_per_step
        window_tokens += tokens_per_step
        last_loss = loss_value

        if logging_step:
            if device.type == "cuda":
                torch.cuda.synchronize()
            now = time.perf_counter()
            tok_s = window_tokens / (now - window_time)
            values = {
                "loss": loss_value,
                "lr": base_lrs[0] * mult,
                "grad_norm": norm.item(),
                "tokens": tokens,
                "tokens_per_s": tok_s,
                **{f"optim/{k}": v for k, v in engine.health().items()},
                **memory.metrics(),
            }
            if peak_flops:
                values["mfu"] = flops_tok * tok_s / (peak_flops * dist_info.world_size)
            log.log(step, values)
            log.progress(step, loss_value, tok_s, now - start_time, step - start_step)
            window_time, window_tokens = now, 0
        if (t.eval_every and step % t.eval_every == 0) or step == t.steps:
            eval_loss = evaluate(model, eval_loader, batches.micro, device)
            log.log(step, {"eval/loss": eval_loss})
            log.info(f"step {step}: eval loss {eval_loss:.4f}")
        if (cfg.checkpoint.every and step % cfg.checkpoint.every == 0) or step == t.steps:
            trainer_state = {
                "step": step,
                "tokens": tokens,
                "data": loader.state_dict(),
                "world_size": dist_info.world_size,
                "model": cfg.model.name,
                "model_config": dict(vars(model.cfg)),
                "optim": cfg.optim.name,
                "config": cfg.to_dict(),
                "rng": rng_states(device),
            }
            path = checkpointer.save(step, engine, trainer_state)
            log.info(f"{'writing' if ckpt.async_save else 'saved'} checkpoint {path}")
    checkpointer.wait()
    log.close()
    return {"step": step, "loss": last_loss, "run_dir": str(run_dir)}
