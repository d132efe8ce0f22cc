"""A run from its config: prepare it (every check and the restore, nothing written), start its directory, and run
its loop (trainer/loop.py) under the guards of a long run: stop signals and the watchdog.

Order of a run: resolve the config for this launch (every cross-field check), open the data (source, tokenizer,
held-out set), check that the plan fits the device's memory, build the model and its engine, restore the latest
(intact) checkpoint; only then is anything written. Then the loop: step, log on log steps, evaluate, checkpoint
when due.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from models import num_params
from trainer.checkpoint import Checkpointer, CheckpointError, damage, latest_checkpoint, newest_intact
from trainer.config import Config, save_config
from trainer.data import Data, build_data, save_tokenizer
from trainer.distributed import DistInfo
from trainer.engines import Engine, build_engine
from trainer.guard import DivergenceGuard
from trainer.loop import Loop, Prepared, TrainState
from trainer.memory.preflight import check_memory_fits
from trainer.memory.tracker import MemoryTracker
from trainer.metrics import MetricsLogger
from trainer.preemption import StopSignals
from trainer.resolve import Run, build_model, resolve
from trainer.watchdog import Watchdog


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
    guard = DivergenceGuard.from_config(run.cfg.resilience, run.model.vocab_size)
    state = TrainState(
        data.train, dist_info.device, dist_info.rank, dist_info.world_size, run.cfg.train.seed, guard
    )
    checkpointer, resumed, damaged = restore(run, engine, state, dist_info)
    return Prepared(run, data, engine, state, checkpointer, resumed, base_lrs, damaged)


def train(cfg: Config, dist_info: DistInfo) -> dict[str, Any]:
    """Train `cfg` on this process's rank; {"step", "loss", "run_dir"}. Usage errors raise before any write; a
    diverged model raises loop.DivergedError, a stop signal preemption.PreemptedError (after its checkpoint)."""
    prepared = prepare(cfg, dist_info)
    log = start_run_dir(prepared, dist_info)
    memory = MemoryTracker.from_config(cfg.metrics, prepared.engine, dist_info.device, cfg.run_dir, log.info)
    r = cfg.resilience
    try:
        with (
            StopSignals(r.stop_signals, r.grace_s) as signals,
            Watchdog(r.watchdog_s, dist_info.rank, dist_info.world_size) as watchdog,
        ):
            loss = Loop(prepared, log, memory, signals, watchdog).run()
        prepared.checkpointer.wait()
    finally:
        log.close()
    return {"step": prepared.state.step, "loss": loss, "run_dir": str(cfg.run_dir)}


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
        train_seed=t.seed,
    )


def restore(
    run: Run, engine: Engine, state: TrainState, dist_info: DistInfo
) -> tuple[Checkpointer, Path | None, str]:
    """The run's checkpointer; the checkpoint it restored from (None if none): checkpoint.resume_from, else the
    latest complete one when checkpoint.resume is on; and, when that latest one is damaged and
    checkpoint.fall_back took the newest intact one instead, which one and why ("" otherwise)."""
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
    path, damaged = Path(ckpt.resume_from) if ckpt.resume_from else None, ""
    if path is None and ckpt.resume:
        path = latest_checkpoint(checkpointer.dir)
        problem = damage(path) if path is not None else None
        if problem is not None:
            intact = newest_intact(checkpointer.dir)
            if not ckpt.fall_back or intact is None:
                offer = (
                    f"the newest intact one is {intact}: rerun with --checkpoint.resume_from={intact}, or set "
                    f"checkpoint.fall_back=true to take it"
                    if intact
                    else "no intact checkpoint is left"
                )
                raise CheckpointError(f"{path}: damaged ({problem}); {offer}")
            damaged, path = f"{path.name} is damaged ({problem})", intact
    if path is not None:
        checkpointer.load(path, engine, state, expect={"optim": cfg.optim.name})
    return checkpointer, path, damaged


def start_run_dir(prepared: Prepared, dist_info: DistInfo) -> MetricsLogger:
    """Every input has been checked: create runs/<name>/ (config, tokenizer), clear what interrupted saves left,
    and the metrics logger."""
    run, data, state = prepared.run, prepared.data, prepared.state
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
        resumed_step=state.step,
        log_every=cfg.metrics.log_every,
    )
    for name in prepared.checkpointer.remove_leftovers():
        log.info(f"removed {name}, left by a save or removal that did not finish (never loaded)")
    if prepared.damaged:
        log.info(f"{prepared.damaged}: resuming from the newest intact checkpoint (checkpoint.fall_back)")
    if prepared.resumed is not None:
        log.info(f"resumed from {prepared.resumed} at step {state.step}")
    log.info(
        f"model {cfg.model.name}: {num_params(run.model) / 1e6:.2f}M params | optimizer {cfg.optim.name} | "
        f"world {run.world} | global batch {t.global_batch_size} x {t.seq_len} tokens | "
        f"accumulation {run.batches.accumulation}"
    )
    if data.entropy_floor is not None:
        log.info(f"generated corpus: best achievable loss (entropy floor) {data.entropy_floor:.4f}")
    return log
