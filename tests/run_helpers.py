"""Run the real trainer inside a test (in spawned gloo processes) and read back what a user would read."""

from __future__ import annotations

import json
from pathlib import Path

from tests.distributed import run_distributed
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.train import train

# A few seconds per run: tiny model, short sequences, few steps, one eval at the end on a small held-out set.
FAST = [
    "--train.steps=5",
    "--train.global_batch_size=8",
    "--train.micro_batch_size=2",
    "--train.seq_len=32",
    "--train.warmup_ratio=0.2",
    "--train.eval_every=0",
    "--data.eval_sequences=8",
    "--metrics.log_every=1",
    "--metrics.tensorboard=false",
    "--checkpoint.every=0",
    # the rest lr the suite is calibrated at: the configs' tuned ones (0.024-0.096) are for 2K tokens per step and
    # 20 warmup steps, and in 5 steps of 256 tokens they raise AdamW's loss
    "--optim.adamw_lr=0.006",
]


def train_in_process(config: str, overrides: list[str]) -> dict:
    """Entry point for run_distributed: one rank of a training run."""
    cfg = load_config(config, overrides)
    return train(cfg, init_distributed("cpu", "gloo"))


def trained_tiny_run(root: Path, world_size: int, steps: int) -> Path:
    """A short tiny_adamw run at `world_size` under `root`, with its final checkpoint; its run directory."""
    overrides = [*FAST, f"--train.steps={steps}", f"--train.runs_dir={root}", "--train.run_name=run"]
    run_distributed(train_in_process, world_size, "tiny_adamw.yaml", overrides)
    return root / "run"


def logged(run_dir: Path, key: str = "loss") -> list[float]:
    """The values of `key` in metrics.jsonl, in step order."""
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [rec[key] for rec in map(json.loads, lines) if key in rec]
