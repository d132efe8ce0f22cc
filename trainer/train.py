"""The training loop and its state. Everything it needs is built by the services next to it; this file orders them.

Order of a run: resolve the config for this launch (every cross-field check), open the data (source, tokenizer,
held-out set), check that the plan fits the device's memory, build the model and its engine, restore the latest
checkpoint; only then is anything written. Then: step, log on log steps, evaluate, checkpoint when due.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models import causal_lm_loss, flops_per_token, num_params
from trainer.checkpoint import Checkpointer, latest_checkpoint, restore_rng, rng_states
from trainer.config import Config, save_config
from trainer.data import Data, HeldOutSet, TrainStream, build_data, save_tokenizer
from trainer.distributed import DistInfo, all_reduce_max, all_reduce_mean
from trainer.engines import Engine, build_engine
from trainer.memory.preflight import check_memory_fits
from trainer.memory.tracker import MemoryTracker
from trainer.metrics import MetricsLogger, detect_peak_tflops
from trainer.resolve import Run, build_model, resolve
from trainer.schedule import lr_multiplier


class NonFiniteError(RuntimeError):
    """Loss or gradient became NaN/inf; the run stops before anything is saved from that state."""


@dataclass
class TrainState:
    """Everything of the loop that a checkpoint restores, as one Stateful: step, tokens seen, the train
    stream's position and every rank's RNG. (Model and optimizer state belong to the engine.)"""

    stream: TrainStream
    device: torch.device
    rank: int
    world_size: int
    seed: int
    step: int = 0
    tokens: int = 0
    skips: int = field(
        default=0, compare=False
    )  # consecutive skipped steps (not saved: a resume starts at 0)

    def state_dict(self) -> dict[str, Any]:
        """A collective: the RNG states are gathered to rank 0."""
        return {
            "step": self.step,
            "tokens": self.tokens,
            "data": self.stream.state_dict(),
            "world_size": self.world_size,
            "rng": rng_states(self.device),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step, self.tokens = saved["step"], saved["tokens"]
        self.stream.load_state_dict(saved["data"])
        restore_rng(saved, self.rank, self.world_size, self.seed, self.device)


@torch.no_grad()
def evaluate(model: nn.Module, held_out: HeldOutSet, micro: int, device: torch.device) -> float:
    """Mean loss over the whole held-out set (batches weighted by their size, exact over ranks)."""
    model.eval()
    total = torch.zeros(2, device=device)  # [sum of loss x rows, rows], on the device the losses are on
    for batch in held_out.batches(micro):
        loss = causal_lm_loss(model, batch.to(device))
        total += torch.stack([loss * len(batch), torch.full_like(loss, len(batch))])
    model.train()
    total = all_reduce_mean(total)
    return (total[0] / total[1]).item()


@dataclass
class Prepared:
    """A run ready for its first step: everything is checked and restored, nothing is written yet."""

    run: Run
    data: Data
    engine: Engine
    state: TrainState
    checkpointer: Checkpointer
    resumed: Path | None  # the checkpoint restored from
    base_lrs: list[float]  # every param group's peak lr, from the config (a checkpoint holds scheduled ones)


def prepare(cfg: Config, dist_info: DistInfo) -> Prepared:
    """Resolve the config for this launch, open the data, check that the plan fits the device's memory, build the
    model and its engine, restore the latest checkpoint. Usage errors (and a checkpoint that does not fit) raise
    here, before any write."""
    run = resolve(cfg, dist_info.world_size, dist_info.device)
    data = open_data(cfg, dist_info)
    check_memory_fits(run, dist_info)
    engine = build_engine(run, build_model(run, data.vocab_size, dist_info.device), dist_info)
    return prepare_around(run, data, engine, dist_info)


def prepare_around(run: Run, data: Data, engine: Engine, dist_info: DistInfo) -> Prepared:
    """The run around a built engine: its train state and checkpointer, restored from the latest checkpoint."""
    base_lrs = [group["lr"] for group in engine.optimizer.param_groups]
    state = TrainState(data.train, dist_info.device, dist_info.rank, dist_info.world_size, run.cfg.train.seed)
    checkpointer, resumed = restore(run, engine, state, dist_info)
    return Prepared(run, data, engine, state, checkpointer, resumed, base_lrs)


def schedule_lrs(prepared: Prepared) -> float:
    """Set every param group's lr for the next step (its peak times the schedule); the multiplier."""
    t, optimizer = prepared.run.cfg.train, prepared.engine.optimizer
    mult = lr_multiplier(
        prepared.state.step, t.steps, t.schedule, t.warmup_ratio, t.min_lr_ratio, t.decay_ratio
    )
    for group, base in zip(optimizer.param_groups, prepared.base_lrs, strict=True):
        group["lr"] = base * mult
    return mult


def train(cfg: Config, dist_info: DistInfo) -> dict[str, Any]:
    """Train `cfg` on this process's rank; {"step", "loss", "run_dir"}. Usage errors raise before any write."""
    prepared = prepare(cfg, dist_info)
    log = start_run_dir(prepared.run, prepared.data, dist_info, prepared.resumed, prepared.state.step)
    memory = MemoryTracker.from_config(cfg.metrics, prepared.engine, dist_info.device, cfg.run_dir, log.info)
    loss = math.nan
    while prepared.state.step < cfg.train.steps:
        loss = train_step(prepared, log, memory)
    prepared.checkpointer.wait()
    log.close()
    return {"step": prepared.state.step, "loss": loss, "run_dir": str(cfg.run_dir)}


def train_step(prepared: Prepared, log: MetricsLogger, memory: MemoryTracker) -> float:
    """One optimizer step and what follows it when due: its numbers on log steps, an evaluation, a checkpoint.
    The step's loss (NaN for a skipped step). Every tensor it makes is on the engine's device, and it reads
    values to the host once per step (the loss and gradient norm) plus on log and eval steps. The data thread stops
    after the last step, or when the step raises (trainer/data/prefetch.py)."""
    run, engine, state, t = prepared.run, prepared.engine, prepared.state, prepared.run.cfg.train
    try:
        device = state.device
        mult = schedule_lrs(prepared)
        logging = log.is_log_step(state.step + 1)
        memory.begin(state.step + 1)
        with engine.health(logging) as health:
            batch = state.stream.next_batch().to(device, non_blocking=True)
            loss = all_reduce_mean(engine.forward_backward(list(batch.split(run.batches.micro))))
            loss, norm = torch.stack([loss, engine.grad_norm().to(loss.dtype)]).tolist()
            with timed(device, logging) as times:
                exposed = take_or_skip_step(engine, state, loss, norm, run, prepared.checkpointer, log)
                times["exposed_comm_s"] = exposed or 0.0
            finite = exposed is not None
        state.step += 1
        if state.step == t.steps:
            state.stream.close()
        if not finite:
            return math.nan
        memory.end(state.step)
        state.tokens += run.tokens_per_step
        log.count(run.tokens_per_step)
        if logging:
            lr = prepared.base_lrs[0] * mult
            log_step(log, run, state, device, loss, norm, lr, {**health.report(), **times}, memory.metrics())
            log.log(state.step, {"data/wait_s": state.stream.wait_s()})
        if (t.eval_every and state.step % t.eval_every == 0) or state.step == t.steps:
            eval_loss = evaluate(engine.model, prepared.data.held_out, run.batches.micro, device)
            log.log(state.step, {"eval/loss": eval_loss})
            log.info(f"step {state.step}: eval loss {eval_loss:.4f}")
        if prepared.checkpointer.due(state.step):
            path = prepared.checkpointer.save(state.step, engine, state)
            log.info(f"{'writing' if run.cfg.checkpoint.async_save else 'saved'} checkpoint {path}")
        return loss
    except BaseException:
        state.stream.close()
        raise


def open_data(cfg: Config, dist_info: DistInfo) -> Data:
    """The run's train stream and held-out set, checked (nothing is written); batches for a CUDA device come in
    pinned memory, so the loop copies them with non_blocking=True."""
    t = cfg.train
    return build_data(
        cfg.data,
        seq_len=t.seq_len,
        global_batch_size=t.global_batch_size,
        rank=dist_info.rank,
        world_size=dist_info.world_size,
        run_dir=cfg.run_dir,
        pin_device=dist_info.device if dist_info.device.type == "cuda" else None,
    )


def restore(
    run: Run, engine: Engine, state: TrainState, dist_info: DistInfo
) -> tuple[Checkpointer, Path | None]:
    """The run's checkpointer, and the checkpoint it restored from (None if none): checkpoint.resume_from, else
    the latest complete one when checkpoint.resume is on."""
    cfg, ckpt = run.cfg, run.cfg.checkpoint
    identity = {"model": cfg.model.name, "model_config": dict(vars(run.model)), "optim": cfg.optim.name}
    checkpointer = Checkpointer(
        cfg.run_dir / "checkpoints",
        every=ckpt.every,
        enabled=ckpt.enabled,
        total_steps=cfg.train.steps,
        keep_last=ckpt.keep_last,
        is_main=dist_info.is_main,
        identity={**identity, "config": cfg.to_dict()},
    )
    path = Path(ckpt.resume_from) if ckpt.resume_from else None
    if path is None and ckpt.resume:
        path = latest_checkpoint(cfg.run_dir / "checkpoints")
    if path is not None:
        checkpointer.load(path, engine, state, expect={"optim": cfg.optim.name})
    return checkpointer, path


def start_run_dir(
    run: Run, data: Data, dist_info: DistInfo, resumed: Path | None, step: int
) -> MetricsLogger:
    """Every input has been checked: create runs/<name>/ (config, tokenizer) and the metrics logger."""
    cfg, t = run.cfg, run.cfg.train
    if dist_info.is_main:
        cfg.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, cfg.run_dir / "config.yaml")
        if data.new_tokenizer is not None:
            save_tokenizer(data.new_tokenizer, cfg.run_dir)
    log = MetricsLogger(
        cfg.run_dir,
        dist_info.is_main,
        cfg.metrics.tensorboard,
        t.steps,
        resumed_step=step,
        log_every=cfg.metrics.log_every,
    )
    if resumed is not None:
        log.info(f"resumed from {resumed} at step {step}")
    log.info(
        f"model {cfg.model.name}: {num_params(run.model) / 1e6:.2f}M params | optimizer {cfg.optim.name} | "
        f"world {run.world} | global batch {t.global_batch_size} x {t.seq_len} tokens | "
        f"accumulation {run.batches.accumulation}"
    )
    if data.entropy_floor is not None:
        log.info(f"generated corpus: best achievable loss (entropy floor) {data.entropy_floor:.4f}")
    return log


@contextmanager
def timed(device: torch.device, enabled: bool) -> Iterator[dict[str, float]]:
    """On logging steps, the optimizer step's wall time and the time its owner exchange spent waiting for
    transfers (exposed communication, which the block sets from the engine's step), of the slowest rank:
    optim/step_s, optim/exposed_comm_s (CUDA: synchronized around the step, so the step's kernels are counted; the
    exposed part is host time, which NCCL's stream-ordered waits do not show). A collective on logging steps;
    nothing otherwise."""
    times: dict[str, float] = {}
    if not enabled:
        yield times
        return
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield times
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    measured = torch.tensor([elapsed, times.get("exposed_comm_s", 0.0)], dtype=torch.float64, device=device)
    times["step_s"], times["exposed_comm_s"] = all_reduce_max(measured).tolist()


def take_or_skip_step(
    engine: Engine,
    state: TrainState,
    loss: float,
    norm: float,
    run: Run,
    checkpointer: Checkpointer,
    log: MetricsLogger,
) -> float | None:
    """Step the engine when loss and gradient are finite; else skip the step (on_nonfinite=skip, at most
    max_skips in a row) or stop without saving. The step's exposed communication in seconds, None if skipped."""
    if math.isfinite(loss) and math.isfinite(norm):
        state.skips = 0
        return engine.step()
    t = run.cfg.train
    state.skips += 1
    if t.on_nonfinite == "stop" or state.skips > t.max_skips:
        checkpointer.wait()  # an async save in flight holds an earlier, finite state: let it commit
        raise NonFiniteError(
            f"non-finite loss {loss} or grad norm {norm} at step {state.step + 1}; "
            f"stopping without saving (last checkpoint is intact)"
        )
    log.info(
        f"step {state.step + 1}: non-finite loss or gradient, step skipped ({state.skips}/{t.max_skips})"
    )
    engine.skip()
    return None


def log_step(
    log: MetricsLogger,
    run: Run,
    state: TrainState,
    device: torch.device,
    loss: float,
    norm: float,
    lr: float,
    health: dict[str, float],
    memory: dict[str, float],
) -> None:
    """One log step's numbers: loss, lr, grad norm, throughput (and MFU on known GPUs), optimizer health and
    step times (optim/*), memory."""
    tok_s = log.throughput(device)
    values = {
        "loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens": state.tokens,
        "tokens_per_s": tok_s,
        **{f"optim/{k}": v for k, v in health.items()},
        **memory,
    }
    peak_flops = (run.cfg.metrics.peak_tflops or detect_peak_tflops(device)) * 1e12
    if peak_flops:
        values["mfu"] = flops_per_token(run.model, run.seq_len) * tok_s / (peak_flops * run.world)
    log.log(state.step, values)
    log.progress(state.step, loss, tok_s)
