"""The benchmarks' one harness: how they launch the real trainer (launch/pretrain.py) and their own measurements in
fresh processes, and how they read back what a run wrote.

Why a subprocess per run: the benchmarks measure the product as a user runs it (its config validation, loop,
checkpoint resume and metrics.jsonl), not a copy of its loop, and each run gets a clean process and thread pool.
Every benchmark runs as a module from the repository root (`python -m benchmarks.<name>`), so nothing edits
`sys.path`.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import torch

from models import Llama
from optim import build_optimizer, route_parameters
from trainer.config import Config, load_config
from trainer.distributed import torchrun_command
from trainer.resolve import build_model, resolve

ROOT = Path(__file__).resolve().parent.parent
PRETRAIN = ROOT / "launch" / "pretrain.py"
EXIT_OK, EXIT_DIVERGED = 0, 3  # launch/pretrain.py: success; NonFiniteError (loss or gradient NaN/inf)
# The order-2 generated task (the next token depends on the last two): the plateau diagnostic's data
ORDER2_TASK = ("--data.vocab_size=64", "--data.generated_order=2")
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class TrainerRun:
    """One training run: a config (name in configs/ or path) and `--section.key=value` overrides."""

    config: str
    overrides: tuple[str, ...]

    def resolved(self) -> Config:
        """The config the trainer will run (raises ConfigError, as the launcher would)."""
        return load_config(self.config, self.overrides)

    @property
    def run_dir(self) -> Path:
        return self.resolved().run_dir

    def made_elsewhere(self) -> bool:
        """Whether its run directory was left by other settings (another budget, data, lr): such a directory
        must not be resumed or reused. The saved config is read through load_config, so a field added to the
        trainer since, at its default, still matches."""
        cfg = self.resolved()
        saved = cfg.run_dir / "config.yaml"
        return saved.is_file() and load_config(str(saved)).to_dict() != cfg.to_dict()


class RunBusy(RuntimeError):
    """Another process is training this run directory right now."""


def launch(run: TrainerRun, log_path: Path, nproc: int = 1, threads: int | None = 1) -> int:
    """Run launch/pretrain.py (torchrun when nproc > 1), appending its output to log_path; the exit code.

    threads: OMP_NUM_THREADS per process (None = inherit), so concurrent CPU runs do not oversubscribe cores.
    An flock on log_path, shared with the trainer process, keeps a second benchmark from training the same run
    directory at the same time (the OS drops it when both have exited, however they ended): RunBusy.
    """
    launcher = torchrun_command(nproc) if nproc > 1 else [sys.executable]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        try:
            fcntl.flock(log, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunBusy(f"{log_path.parent} is being trained by another process") from None
        cmd = [*launcher, str(PRETRAIN), "--config", run.config, *run.overrides]
        return subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode


def run_module(
    module: str, args: list[str], threads: int, env: dict[str, str] | None = None
) -> tuple[int, str]:
    """`python -m <module> <args>` in a fresh process from the repository root (a measurement that needs a process
    of its own, e.g. for its peak resident memory); (exit code, stdout), its stderr passed through."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **(env or {})}
    done = subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True
    )
    return done.returncode, done.stdout


def run_parallel(fn: Callable[[T], R], items: Iterable[T], jobs: int) -> list[R]:
    """fn over items, `jobs` at a time (threads that wait on subprocesses), results in item order.
    On Ctrl-C no further item starts (the running ones get the same SIGINT from the terminal)."""
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def read_records(run_dir: Path) -> list[dict]:
    """The run's metrics.jsonl records ([] before the first log)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def series(records: list[dict], key: str) -> list[tuple[int, float]]:
    """(step, value) of `key` in step order. A resumed run re-logs the steps after its checkpoint: the last
    record of a step wins, so an interrupted and resumed run reads like an uninterrupted one."""
    by_step = {rec["step"]: rec[key] for rec in records if key in rec}
    return sorted(by_step.items())


def eval_curve(records: list[dict]) -> list[tuple[int, float]]:
    """(tokens seen, eval loss) at every eval step that also logged its token count."""
    tokens = dict(series(records, "tokens"))
    return [(tokens[step], loss) for step, loss in series(records, "eval/loss") if step in tokens]


def train_seconds(records: list[dict]) -> float:
    """Training-loop wall time as the trainer measured it: each logged window's tokens over its tokens/s
    (evals inside a window included; process start-up and checkpoint saves after the last log are not)."""
    tokens = dict(series(records, "tokens"))
    seconds, seen = 0.0, 0
    for step, rate in series(records, "tokens_per_s"):
        seconds += (tokens[step] - seen) / rate
        seen = tokens[step]
    return seconds


@dataclass(frozen=True)
class StateBytes:
    """Optimizer state of a run's model: all of it, and the hidden matrices' share (the papers' per-element
    figures: AdamW 8, Muon/AuON 4, NorMuon 4 + 4/n, SWAN/SinkGD 0)."""

    total: int
    params: int
    matrix: int
    matrix_elements: int


def state_bytes_of(cfg: Config, data_vocab: int) -> StateBytes:
    """The state tensors of the run's optimizer on the run's model after one step.

    Built on the meta device (shapes and dtypes, no memory), so it is exact and instant at any model size.
    0-dim tensors (AdamW's step counters) are left out: they are bookkeeping, not per-parameter state.
    """
    with torch.device("meta"):
        model: Llama = build_model(resolve(cfg, 1, "cpu"), data_vocab, torch.device("meta"))
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = build_optimizer(cfg.optim, model)
    optimizer.step()

    def nbytes(p: torch.Tensor) -> int:
        state = optimizer.state.get(p, {}).values()
        return sum(v.numel() * v.element_size() for v in state if torch.is_tensor(v) and v.dim() > 0)

    matrices, _ = route_parameters(model)
    return StateBytes(
        total=sum(map(nbytes, params)),
        params=sum(p.numel() for p in params),
        matrix=sum(map(nbytes, matrices)),
        matrix_elements=sum(p.numel() for p in matrices),
    )
