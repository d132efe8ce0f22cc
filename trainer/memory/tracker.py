"""Memory of one rank, by component: parameters, gradients, optimizer state (per param group) and the rest.

Why: the reason SWAN and SinkGD exist is memory, so a run shows where its bytes go. Per measured step:
- parameters, gradients and optimizer state are counted tensor by tensor, as the engine reports where they live
  (`training_tensors()`: FSDP2's local shards, DeepSpeed's ZeRO partitions and fp32 master copies);
  gradients are counted when the optimizer starts stepping (with update_in_backward: the most alive at once);
- the peak comes from the CUDA caching allocator (tensor bytes, reset at every step) or, on CPU, from the
  process's peak resident set (VmHWM, reset at every step), where `runtime` is the resident memory that is not
  training tensors (interpreter, libraries, data), taken when the tracker is built;
- other = peak - runtime - parameters - gradients - optimizer state: activations, temporaries, FSDP buffers.
It also records CUDA allocator snapshots (PyTorch's memory visualizer, https://pytorch.org/memory_viz) and
torch.profiler traces (TensorBoard's profiler tab, chrome://tracing) for chosen steps.
"""

from __future__ import annotations

import resource
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.autograd import DeviceType

from trainer.config import parse_steps
from trainer.memory.tensors import MiB, local_bytes

if TYPE_CHECKING:
    from trainer.engines.protocol import Engine

_SNAPSHOT_ENTRIES = 100_000


def current_rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def reset_peak_rss() -> None:
    """Reset the kernel's peak-RSS mark of this process (Linux >= 4.0); elsewhere peak_rss() stays the peak
    since the process started."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def proc_bytes(path: str, field: str) -> int | None:
    """A `Field:   N kB` line of a /proc file (e.g. /proc/self/status VmHWM, /proc/meminfo MemAvailable) in
    bytes; None where the file or the field is missing (not Linux)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss() -> int:
    """Peak resident set since the last reset_peak_rss (VmHWM), else since the process started."""
    peak = proc_bytes("/proc/self/status", "VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class MemoryBreakdown:
    """One rank's bytes in one step. `peak` is allocator tensor bytes (CUDA) or resident memory (CPU)."""

    params: int
    grads: int
    optimizer_state: dict[str, int]
    peak: int
    runtime: int = 0  # CPU: resident memory that is not training tensors; CUDA: 0 (the context is outside)
    reserved: int = 0  # CUDA: the allocator's peak reserved bytes

    @property
    def state(self) -> int:
        return sum(self.optimizer_state.values())

    @property
    def other(self) -> int:
        """Activations, temporaries and buffers: what the peak holds beyond the counted components."""
        return max(0, self.peak - self.runtime - self.params - self.grads - self.state)

    def rows(self) -> list[tuple[str, int]]:
        rows = [("parameters", self.params), ("gradients", self.grads), ("optimizer state", self.state)]
        rows += [(f"  {label}", n) for label, n in self.optimizer_state.items()]
        rows.append(("other (activations, temporaries, buffers)", self.other))
        if self.runtime:
            rows.append(("runtime (interpreter, libraries, data)", self.runtime))
        if self.reserved:
            rows.append(("reserved by the allocator (peak)", self.reserved))
        rows.append(("peak", self.peak))
        return rows

    def metrics(self) -> dict[str, float]:
        """memory/* values in MiB for metrics.jsonl and TensorBoard."""
        out = {
            "memory/params_mib": self.params / MiB,
            "memory/grads_mib": self.grads / MiB,
            "memory/optimizer_state_mib": self.state / MiB,
            **{f"memory/optimizer_state/{k}_mib": v / MiB for k, v in self.optimizer_state.items()},
            "memory/other_mib": self.other / MiB,
            "memory/peak_mib": self.peak / MiB,
        }
        if self.runtime:
            out["memory/runtime_mib"] = self.runtime / MiB
        if self.reserved:
            out["memory/reserved_mib"] = self.reserved / MiB
        return out


def format_table(per_rank: list[MemoryBreakdown], title: str) -> str:
    """Components (MiB) by rank; with more than 8 ranks: rank 0, the minimum and the maximum over ranks."""
    rows = [r.rows() for r in per_rank]
    names = [name for name, _ in rows[0]]
    if len(per_rank) <= 8:
        headers = [f"rank {i}" for i in range(len(per_rank))]
        columns = [[n for _, n in r] for r in rows]
    else:
        values = list(zip(*[[n for _, n in r] for r in rows], strict=True))
        headers = ["rank 0", "min", "max"]
        columns = [[v[0] for v in values], [min(v) for v in values], [max(v) for v in values]]
    width = max(len(n) for n in names) + 2
    lines = [title, " " * width + "".join(f"{h:>12}" for h in headers)]
    for i, name in enumerate(names):
        lines.append(f"{name:<{width}}" + "".join(f"{col[i] / MiB:>12.1f}" for col in columns))
    return "\n".join(lines)


@dataclass
class _Window:
    """What one measured step collects between begin() and end()."""

    step: int
    grads: int = 0
    profiler: Any = None
    snapshot: bool = False


class MemoryTracker:
    """Measures every step of a training loop: `begin(step)` before its forward, `end(step)` after its update.

    Prints the per-rank table after the first measured step, returns memory/* values from `metrics()` (a
    collective: call it on every rank), and writes snapshots / profiler traces for the configured steps.
    """

    def __init__(
        self,
        engine: Engine,
        device: torch.device,
        run_dir: Path,
        *,
        enabled: bool = True,
        snapshot_steps: str = "",
        profile_steps: str = "",
        info: Callable[[str], None] = print,
    ):
        self.engine, self.device, self.run_dir = engine, device, run_dir
        self.enabled, self.info = enabled, info
        self.cuda = device.type == "cuda"
        self.snapshot_steps, self.profile_steps = parse_steps(snapshot_steps), parse_steps(profile_steps)
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.last: MemoryBreakdown | None = None
        self._window: _Window | None = None
        self._printed = False
        if self.snapshot_steps and not self.cuda:
            info("metrics.memory_snapshot_steps: allocator snapshots need CUDA; none are recorded on CPU")
            self.snapshot_steps = set()
        self.runtime = 0 if self.cuda else max(0, current_rss() - self._tensor_bytes())
        engine.optimizer.register_step_pre_hook(self._count_grads)

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        engine: Engine,
        device: torch.device,
        run_dir: Path,
        info: Callable[[str], None],
    ) -> MemoryTracker:
        """The tracker the trainer's MetricsConfig (memory, memory_snapshot_steps, profile_steps) asks for."""
        return cls(
            engine,
            device,
            run_dir,
            enabled=cfg.memory,
            snapshot_steps=cfg.memory_snapshot_steps,
            profile_steps=cfg.profile_steps,
            info=info,
        )

    def _tensor_bytes(self) -> int:
        """Training tensors alive now: parameters, gradients, optimizer state."""
        params, grads, state = self.engine.training_tensors().bytes()
        return params + grads + sum(state.values())

    def _count_grads(self, *_: Any) -> None:
        """Step pre-hook: the gradients alive when the optimizer starts (with update_in_backward: per param)."""
        if self._window is not None and self.enabled:
            live = local_bytes(self.engine.training_tensors().grads)
            self._window.grads = max(self._window.grads, live)

    def begin(self, step: int) -> None:
        """Start measuring `step`: reset the peak, start a snapshot / profiler trace if configured."""
        self._close_window()
        self._window = _Window(step)
        if step in self.snapshot_steps:
            torch.cuda.memory._record_memory_history(max_entries=_SNAPSHOT_ENTRIES)
            self._window.snapshot = True
        if step in self.profile_steps:
            self._window.profiler = self._start_profiler()
        if self.enabled:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            else:
                reset_peak_rss()

    def end(self, step: int) -> None:
        """Finish measuring `step` (after the optimizer update); print the table after the first one."""
        window = self._window
        if window is None or window.step != step:
            return
        if self.enabled:
            self.last = self._breakdown(window.grads)
            if not self._printed:
                self._printed = True
                per_rank = self._gather(self.last)
                where = "allocated tensors (CUDA)" if self.cuda else "resident memory (CPU)"
                self.info(format_table(per_rank, f"memory per rank after step {step}, MiB (peak: {where})"))
        self._close_window()

    def metrics(self) -> dict[str, float]:
        """memory/* values of the last measured step (rank 0's, plus the largest peak over ranks)."""
        if self.last is None:
            return {}
        out = self.last.metrics()
        if self.world > 1:
            peak = torch.tensor([float(self.last.peak)], device=self.device)
            dist.all_reduce(peak, op=dist.ReduceOp.MAX)
            out["memory/peak_max_over_ranks_mib"] = peak.item() / MiB
        return out

    def _breakdown(self, grads: int) -> MemoryBreakdown:
        params, _, state = self.engine.training_tensors().bytes()
        if self.cuda:
            peak = torch.cuda.max_memory_allocated(self.device)
            reserved = torch.cuda.max_memory_reserved(self.device)
            return MemoryBreakdown(params, grads, state, peak, reserved=reserved)
        return MemoryBreakdown(params, grads, state, peak_rss(), runtime=self.runtime)

    def _gather(self, mine: MemoryBreakdown) -> list[MemoryBreakdown]:
        if self.world == 1:
            return [mine]
        everyone: list[Any] = [None] * self.world
        dist.all_gather_object(everyone, mine)
        return everyone

    def _start_profiler(self) -> torch.profiler.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if self.cuda:
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        handler = torch.profiler.tensorboard_trace_handler(
            str(self.run_dir / "tb" / "profile"), worker_name=f"rank{self.rank}"
        )
        prof = torch.profiler.profile(
            activities=activities, profile_memory=True, record_shapes=True, on_trace_ready=handler
        )
        prof.start()
        return prof

    def _close_window(self) -> None:
        window, self._window = self._window, None
        if window is None:
            return
        if window.profiler is not None:
            window.profiler.stop()
            self.info(f"profiler trace of step {window.step}: {self.run_dir / 'tb' / 'profile'}")
        if window.snapshot:
            path = self.run_dir / "memory" / f"rank{self.rank}_step{window.step}.pickle"
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(path))
            torch.cuda.memory._record_memory_history(enabled=None)
            self.info(
                f"memory snapshot of step {window.step}: {path} (open it at https://pytorch.org/memory_viz)"
            )


@contextmanager
def peak_tensor_bytes() -> Iterator[dict[str, int]]:
    """Peak bytes of CPU tensors allocated inside the block and alive at once (torch.profiler's allocator
    events): {'peak': ..., 'net': ...}, filled in when the block exits.

    Unlike resident memory this is exact and free of the C library's heap behaviour, so it is what the memory
    planner is checked against. Tensors alive before the block are not included (add them yourself).
    """
    result: dict[str, int] = {}
    prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True)
    prof.start()
    try:
        yield result
    finally:
        prof.stop()
        events = [
            e
            for e in prof.profiler.kineto_results.events()
            if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
        ]
        live = peak = 0
        for e in sorted(events, key=lambda e: e.start_ns()):
            live += e.nbytes()
            peak = max(peak, live)
        result.update(peak=peak, net=live)
