"""The steps of a run and what may interrupt them, in one object: the loop's state, its per-step work, and its
answers to a diverging model (the guard: trainer/guard.py), a preemption signal (trainer/preemption.py) and a
stalled rank (trainer/watchdog.py).

A step: the lr for it; its batch (batches listed in data.skip_batches are dropped first); forward and backward;
one all-reduce carrying the loss and every rank's stop vote; one host read of [loss, gradient norm, vote]; the
guard's verdict before anything is applied; the optimizer step; then, when due, its numbers, an evaluation and a
checkpoint (postponed while the guard is not calm, so no checkpoint is taken of a model that may be broken). A
stop vote from any rank makes every rank save a checkpoint after that same step and stop (PreemptedError).

A verdict that is not ok: with resilience.rollback, the step is dropped and the run rolls back to the newest
intact checkpoint before it, keeps the data position it has (the batches since that checkpoint, the bad one
included, are skipped), optionally trains at a lower lr for a while, and goes on; more than max_rollbacks stop
it. Without: a non-finite step follows train.on_nonfinite (stop, or skip up to max_skips in a row), a spike is
named and the step applied, a dead model stops the run. Every event is named in the console and logged as
guard/* in metrics.jsonl and TensorBoard.
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

from models import causal_lm_loss, flops_per_token
from trainer.checkpoint import Checkpointer, newest_intact, restore_rng, rng_states, step_of
from trainer.config import parse_steps
from trainer.data import Data, HeldOutSet, TrainStream
from trainer.distributed import all_reduce_max, all_reduce_mean
from trainer.engines import Engine
from trainer.guard import DivergenceGuard, Verdict
from trainer.memory.tracker import MemoryTracker
from trainer.metrics import MetricsLogger, detect_peak_tflops
from trainer.preemption import PreemptedError, StopSignals
from trainer.resolve import Run
from trainer.schedule import lr_multiplier
from trainer.watchdog import Watchdog


class DivergedError(RuntimeError):
    """The model diverged (a dead model, a non-finite step it may not skip, rollbacks used up): the run stops
    without saving that state; the last checkpoint is intact."""


class NonFiniteError(DivergedError):
    """Loss or gradient became NaN/inf and train.on_nonfinite says stop (or too many were skipped)."""


@dataclass
class TrainState:
    """Everything of the loop that a checkpoint restores, as one Stateful: step, tokens seen, the train stream's
    position, the divergence guard's running statistic and every rank's RNG. (Model and optimizer state belong to
    the engine.)"""

    stream: TrainStream
    device: torch.device
    rank: int
    world_size: int
    seed: int
    guard: DivergenceGuard
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
            "guard": self.guard.state_dict(),
            "world_size": self.world_size,
            "rng": rng_states(self.device),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        self.step, self.tokens = saved["step"], saved["tokens"]
        self.stream.load_state_dict(saved["data"])
        if "guard" in saved:  # checkpoints from before the guard judge afresh
            self.guard.load_state_dict(saved["guard"])
        restore_rng(saved, self.rank, self.world_size, self.seed, self.device)


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
    damaged: str = (
        ""  # the newer checkpoint passed over because it is damaged (checkpoint.fall_back), and why
    )


def schedule_lrs(prepared: Prepared, factor: float = 1.0) -> float:
    """Set every param group's lr for the next step (its peak times the schedule, times `factor`); the
    multiplier."""
    t, optimizer = prepared.run.cfg.train, prepared.engine.optimizer
    mult = factor * lr_multiplier(
        prepared.state.step, t.steps, t.schedule, t.warmup_ratio, t.min_lr_ratio, t.decay_ratio
    )
    for group, base in zip(optimizer.param_groups, prepared.base_lrs, strict=True):
        group["lr"] = base * mult
    return mult


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


class Loop:
    """The steps of one prepared run (see the module docstring)."""

    def __init__(
        self,
        prepared: Prepared,
        log: MetricsLogger,
        memory: MemoryTracker,
        signals: StopSignals,
        watchdog: Watchdog,
    ) -> None:
        self.p, self.log, self.memory, self.signals, self.watchdog = prepared, log, memory, signals, watchdog
        self.cfg = prepared.run.cfg
        self.skip_batches = parse_steps(self.cfg.data.skip_batches)
        self.rollbacks = 0
        self.slow_until = 0  # after a rollback, steps up to this one train at rollback_lr_factor x the lr
        self.postponed = False  # a due checkpoint waits for the guard to be calm

    def run(self) -> float:
        """Every step to train.steps; the last loss. The data thread stops at the end or when a step raises."""
        loss = math.nan
        try:
            while self.p.state.step < self.cfg.train.steps:
                loss = self.step()
        finally:
            self.p.state.stream.close()
        return loss

    def step(self) -> float:
        """One step and what follows it when due; its loss (NaN when it was dropped)."""
        run, engine, state, t = self.p.run, self.p.engine, self.p.state, self.cfg.train
        n = state.step + 1
        slow = self.cfg.resilience.rollback_lr_factor if n <= self.slow_until else 1.0
        mult = schedule_lrs(self.p, slow)
        logging = self.log.is_log_step(n)
        self.memory.begin(n)
        with engine.health(logging) as health:
            batch = self._batch(n).to(state.device, non_blocking=True)
            self.watchdog.beat(n, "forward/backward")
            local = engine.forward_backward(list(batch.split(run.batches.micro)))
            vote = torch.full_like(local, 1.0 if self.signals.requested else 0.0)
            loss, stop = all_reduce_mean(torch.stack([local, vote]))
            loss, norm, stop = torch.stack([loss, engine.grad_norm().to(loss.dtype), stop]).tolist()
            verdict = state.guard.judge(n, loss, norm)
            if not verdict.ok and not self._apply_anyway(n, verdict):
                return math.nan
            self.watchdog.beat(n, "optimizer step")
            with timed(state.device, logging) as times:
                times["exposed_comm_s"] = engine.step()
        state.skips = 0
        state.step += 1
        self.memory.end(n)
        state.tokens += run.tokens_per_step
        self.log.count(run.tokens_per_step)
        if logging:
            self.watchdog.beat(n, "logging")
            lr = self.p.base_lrs[0] * mult
            log_step(
                self.log, run, state, loss, norm, lr, {**health.report(), **times}, self.memory.metrics()
            )
            self.log.log(n, {"data/wait_s": state.stream.wait_s()})
        if (t.eval_every and n % t.eval_every == 0) or n == t.steps:
            self.watchdog.beat(n, "evaluation")
            eval_loss = evaluate(engine.model, self.p.data.held_out, run.batches.micro, state.device)
            self.log.log(n, {"eval/loss": eval_loss})
            self.log.info(f"step {n}: eval loss {eval_loss:.4f}")
        if stop > 0:
            self._stop(n)
        if self.p.checkpointer.due(n) or self.postponed:
            self._checkpoint(n)
        return loss

    def _batch(self, n: int) -> torch.Tensor:
        """Step n's batch; batches of data.skip_batches (1-based, as an uninterrupted run numbers them) dropped."""
        self.watchdog.beat(n, "data")
        stream = self.p.state.stream
        while stream.state_dict()["rows"] // self.cfg.train.global_batch_size + 1 in self.skip_batches:
            stream.next_batch()
        return stream.next_batch()

    def _apply_anyway(self, n: int, verdict: Verdict) -> bool:
        """The answer to a verdict that is not ok (see the module docstring): whether to apply the step anyway;
        a dropped step has been dealt with (rolled back, or skipped) when this returns False."""
        r, t, engine = self.cfg.resilience, self.cfg.train, self.p.engine
        self.log.log(n, {f"guard/{verdict.kind}": 1.0})
        if r.rollback:
            engine.skip()
            self._roll_back(n, verdict)
            return False
        if verdict.kind == "spike":
            self.log.info(f"step {n}: {verdict.message}; applied (resilience.rollback is off)")
            return True
        self.p.checkpointer.wait()  # an async save in flight holds an earlier, sound state: let it commit
        if verdict.kind == "dead":
            raise DivergedError(f"step {n}: {verdict.message}; stopping without saving ({self._kept(n)})")
        state = self.p.state
        state.skips += 1
        if t.on_nonfinite == "stop" or state.skips > t.max_skips:
            raise NonFiniteError(f"{verdict.message} at step {n}; stopping without saving ({self._kept(n)})")
        self.log.info(f"step {n}: non-finite loss or gradient, step skipped ({state.skips}/{t.max_skips})")
        engine.skip()
        state.step += 1
        return False

    def _roll_back(self, n: int, verdict: Verdict) -> None:
        """Back to the newest intact checkpoint before step n, the data position kept (its window skipped)."""
        r, state, checkpointer = self.cfg.resilience, self.p.state, self.p.checkpointer
        checkpointer.wait()
        self.rollbacks += 1
        target = newest_intact(checkpointer.dir, before=n)
        if self.rollbacks > r.max_rollbacks or target is None:
            why = (
                f"{r.max_rollbacks} rollbacks used" if target is not None else "no checkpoint to roll back to"
            )
            raise DivergedError(f"step {n}: {verdict.message}; {why}: stopping ({self._kept(n)})")
        self.watchdog.beat(n, "rollback")
        position = state.stream.state_dict()  # after step n's batch
        checkpointer.load(target, self.p.engine, state)
        state.stream.load_state_dict(position)
        back, skipped = step_of(target), n - step_of(target)
        self.slow_until = back + r.rollback_lr_steps
        slower = (
            f"; lr x{r.rollback_lr_factor:g} for {r.rollback_lr_steps} steps" if r.rollback_lr_steps else ""
        )
        self.log.info(
            f"step {n}: {verdict.message}: rolled back to {target.name}, skipping the batches of steps "
            f"{back + 1}-{n} ({skipped} batches, {skipped * self.p.run.tokens_per_step} tokens){slower} "
            f"(rollback {self.rollbacks} of {r.max_rollbacks})"
        )
        self.log.log(
            n, {"guard/rollback": 1.0, "guard/rolled_back_to": back, "guard/skipped_batches": skipped}
        )

    def _kept(self, n: int) -> str:
        """What a run that stops without saving leaves to resume from."""
        last = newest_intact(self.p.checkpointer.dir, before=n + 1)
        return f"{last.name} is intact" if last is not None else "no checkpoint was written"

    def _checkpoint(self, n: int) -> None:
        """Save the state after step n, unless the guard is not calm (then at the first calm step)."""
        if not self.p.state.guard.calm(n):
            if not self.postponed:
                self.log.info(f"step {n}: checkpoint postponed until the loss and gradients look sound again")
            self.postponed = True
            return
        self.postponed = False
        self.watchdog.beat(n, "checkpoint")
        path = self.p.checkpointer.save(n, self.p.engine, self.p.state)
        self.log.info(f"{'writing' if self.cfg.checkpoint.async_save else 'saved'} checkpoint {path}")

    def _stop(self, n: int) -> None:
        """A rank received a stop signal: every rank saves after this step, then the run stops."""
        name = self.signals.requested or "a stop signal (on another rank)"
        self.log.info(f"step {n}: {name} received: saving a checkpoint, then stopping")
        if not self.p.state.guard.calm(n):
            self.p.checkpointer.wait()
            raise DivergedError(f"step {n}: stopped on {name} without saving: the model does not look sound")
        self.watchdog.beat(n, "checkpoint")
        path = self.p.checkpointer.save(n, self.p.engine, self.p.state)
        self.p.checkpointer.wait()
        raise PreemptedError(f"stopped at step {n} on {name}; checkpoint {path} committed: rerun to resume")


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


def log_step(
    log: MetricsLogger,
    run: Run,
    state: TrainState,
    loss: float,
    norm: float,
    lr: float,
    health: dict[str, float],
    memory: dict[str, float],
) -> None:
    """One log step's numbers: loss, lr, grad norm, throughput (and MFU on known GPUs), optimizer health and
    step times (optim/*), memory."""
    tok_s = log.throughput(state.device)
    values = {
        "loss": loss,
        "lr": lr,
        "grad_norm": norm,
        "tokens": state.tokens,
        "tokens_per_s": tok_s,
        **{f"optim/{k}": v for k, v in health.items()},
        **memory,
    }
    peak_flops = (run.cfg.metrics.peak_tflops or detect_peak_tflops(state.device)) * 1e12
    if peak_flops:
        values["mfu"] = flops_per_token(run.model, run.seq_len) * tok_s / (peak_flops * run.world)
    log.log(state.step, values)
    log.progress(state.step, loss, tok_s)
