"""Where numbers go: runs/<name>/metrics.jsonl, TensorBoard (runs/<name>/tb) and one console line per log step.

The logger owns its cadence (`is_log_step`) and its throughput window (`count` tokens as steps finish,
`throughput()` at a log step). Only rank 0 writes; the trainer reduces values across ranks before handing
them here.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, TextIO

import torch

# Dense bf16 peak TFLOP/s per device for MFU, by substring of torch.cuda.get_device_name().
KNOWN_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "4090": 165.0}


def detect_peak_tflops(device: torch.device) -> float:
    """Peak dense bf16 TFLOP/s of a known GPU; 0.0 (MFU not reported) on CPU or unknown devices."""
    if device.type != "cuda":
        return 0.0
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in KNOWN_PEAK_TFLOPS.items() if key in name), 0.0)


def format_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class MetricsLogger:
    """Appends one JSON object per logged step and mirrors scalars to TensorBoard."""

    def __init__(
        self,
        run_dir: Path,
        enabled: bool,
        tensorboard: bool,
        total_steps: int,
        resumed_step: int = 0,
        stream: TextIO | None = None,
        log_every: int = 10,
    ):
        """`resumed_step`: the step of the checkpoint this run resumed from. Records logged after it by an
        earlier attempt (steps that are about to be trained again) are dropped, so every step appears once.
        `stream`: where console lines go; None = sys.stdout as it is now (so a caller's redirect applies)."""
        self.enabled = enabled
        self.total_steps, self.log_every = total_steps, log_every
        self.stream = stream if stream is not None else sys.stdout
        self._start_step, self._start_time = resumed_step, time.perf_counter()
        self._window_time, self._window_tokens = self._start_time, 0
        self._jsonl = None
        self._tb = None
        if enabled:
            path = run_dir / "metrics.jsonl"
            if path.is_file():
                kept = [
                    line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resumed_step
                ]
                path.write_text("".join(f"{line}\n" for line in kept))
            self._jsonl = path.open("a")
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(run_dir / "tb"), purge_step=resumed_step + 1)

    def is_log_step(self, step: int) -> bool:
        """Steps (1-based) whose numbers are logged: every log_every-th and the last. Same on every rank."""
        return step % self.log_every == 0 or step == self.total_steps

    def count(self, tokens: int) -> None:
        """Tokens of a finished step, for the throughput window."""
        self._window_tokens += tokens

    def throughput(self, device: torch.device) -> float:
        """Tokens per second since the last call (or the start), then a new window begins."""
        if device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        rate = self._window_tokens / max(now - self._window_time, 1e-9)
        self._window_time, self._window_tokens = now, 0
        return rate

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)
            self._tb.flush()

    def progress(self, step: int, loss: float, tokens_per_s: float) -> None:
        """`step 120/200 | loss 3.2104 | 41.2k tok/s | ETA 0m31s` on rank 0."""
        if not self.enabled:
            return
        elapsed_s, steps_done = time.perf_counter() - self._start_time, step - self._start_step
        eta = elapsed_s / max(1, steps_done) * (self.total_steps - step)
        line = (
            f"step {step}/{self.total_steps} | loss {loss:.4f} | {tokens_per_s / 1e3:.1f}k tok/s"
            f" | ETA {format_duration(eta)}"
        )
        print(line, file=self.stream, flush=True)

    def info(self, message: str) -> None:
        if self.enabled:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()
