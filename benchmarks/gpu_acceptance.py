"""The GPU acceptance run: in a few minutes on one GPU, with no downloads, prove the headline configs work end to
end and measure what CPU runs cannot, into one dated markdown report.

    python -m benchmarks.gpu_acceptance --out benchmarks/results/gpu/          # on a GPU machine (~6 minutes)
    python -m benchmarks.gpu_acceptance --smoke --out /tmp/acceptance           # CPU, tiny models (~1 minute)

Sections, each time-boxed (a section that cannot finish in its share reports what it measured and says what it
skipped), the report rewritten after every measurement so a cut run still holds everything measured so far:
  a. every optimizer's headline config (configs/llama350m_<optimizer>.yaml; --smoke: tiny_<optimizer>.yaml) on the
     generated corpus at vocab 32000, a short warm-up so the loss moves: trains with evaluation and a checkpoint,
     a second run resumes from the checkpoint and must log the uninterrupted run's losses, then the Hugging Face
     export (and, once, transformers' logits against ours);
  b. throughput at the shipped config (512 x 256 tokens per step): tokens/s, step time against AdamW's, MFU, the
     optimizer step's time and share, memory by component; plus SWAN with update_in_backward and with activation
     checkpointing;
     then the speed targets against the first H200 run's numbers, and the memory planner's largest micro batch;
  c. the optimizer step on one llama_350m layer (benchmarks/optimizer_step.py) with fp32 matmuls and with TF32,
     and SWAN's TF32 whitening (the CUDA default) against fp32 on a tiny run;
  d. where one AdamW step and one SWAN step spend their time: the top kernels of a profiled step
     (benchmarks/kernel_profile.py);
  e. the CUDA-only tests and the fast test lane with CUDA visible (tests that need an absent package skip);
  f. with more than one GPU: the headline configs at N GPUs against 1 GPU (NCCL, sharded Newton-Schulz);
     --smoke runs this section with 2 CPU processes so the code path is exercised everywhere.
Training runs happen in this process (one CUDA context and process group for all of them; a launch costs ~25 s on
an H200, most of it start-up), except section f's, which need torchrun.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import math
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import EXIT_OK, ROOT, TrainerRun, launch, read_records, series
from benchmarks.kernel_profile import summarize
from benchmarks.optimizer_step import measure as measure_optimizer_step
from launch.export_hf import export, load_model
from optim import OPTIMIZER_NAMES
from trainer.config import load_config
from trainer.distributed import init_distributed
from trainer.memory.planner import plan_memory
from trainer.train import train

GiB = 2**30
NO_DOWNLOAD = ["--data.source=generated", "--data.tokenizer="]


@dataclass(frozen=True)
class Mode:
    """What one acceptance run trains: the GPU settings, or the CPU smoke test's tiny ones."""

    name: str
    configs: str  # configs/<configs>_<optimizer>.yaml
    vocab: int
    correctness: tuple[str, ...]  # section a's settings (and section f's)
    throughput: tuple[str, ...]  # section b's settings beside the config's own batch
    throughput_steps: int
    one_micro_batch: tuple[str, ...]  # update_in_backward's batch: one micro-batch per step
    layer_model: str  # section c's model
    layer_repeats: int
    tests: tuple[str, ...]  # section e's pytest selection
    budgets: dict[str, float]  # seconds per section


GPU = Mode(
    name="gpu",
    configs="llama350m",
    vocab=32000,
    # 64 x 256 tokens per step in micro-batches of 8 (accumulation 8 on one GPU, 1 on eight), so section f can run
    # the same global batches at up to 8 GPUs
    correctness=("--train.global_batch_size=64", "--train.micro_batch_size=8", "--data.eval_sequences=64"),
    throughput=("--data.eval_sequences=64",),
    throughput_steps=7,
    one_micro_batch=("--train.global_batch_size=64",),
    layer_model="llama_350m",
    layer_repeats=7,
    tests=("-m", "not slow"),
    budgets={"a": 150, "b": 150, "c": 45, "d": 20, "e": 60, "f": 90},
)
SMOKE = Mode(
    name="smoke",
    configs="tiny",
    vocab=512,
    # the tiny configs' tuned rest lrs (up to 0.096) are for 2K tokens per step and 20 warmup steps: at 256 tokens
    # and one warmup step they raise AdamW's loss in 4 steps, and this section checks that the loss goes down
    correctness=(
        "--train.global_batch_size=8",
        "--train.micro_batch_size=2",
        "--train.seq_len=32",
        "--optim.adamw_lr=0.006",
    ),  # fmt: skip
    throughput=("--train.seq_len=32",),
    throughput_steps=7,
    one_micro_batch=("--train.micro_batch_size=16",),
    layer_model="llama_3m",
    layer_repeats=1,
    tests=("tests/test_schedule.py",),  # the section's code path; the suite itself runs this smoke test
    budgets={s: 600.0 for s in "abcdef"},  # a smoke test runs everything: its time is the test's business
)
SECTIONS = {
    "a": "a. Headline configs end to end",
    "b": "b. Throughput and memory at the shipped config",
    "c": "c. The optimizer step on one layer",
    "d": "d. Where a step's time goes",
    "e": "e. Tests with the GPU visible",
    "f": "f. More than one GPU",
}


# ------------------------------------------------------------------------------------------------- the report


@dataclass
class Report:
    """The markdown report, rewritten whole (atomically) after every change, so that a cut run keeps its numbers."""

    path: Path
    header: list[str]
    parts: dict[str, list[str]] = field(default_factory=dict)
    status: dict[str, str] = field(default_factory=dict)
    footer: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, section: str, *lines: str) -> None:
        with self.lock:
            self.parts.setdefault(section, []).extend(lines)
            self._write()

    def set_status(self, section: str, status: str) -> None:
        with self.lock:
            self.status[section] = status
            self._write()

    def finish(self, *lines: str) -> None:
        with self.lock:
            self.footer = list(lines)
            self._write()

    def _write(self) -> None:
        lines = [*self.header, "", "| section | status |", "| --- | --- |"]
        lines += [f"| {SECTIONS[s]} | {self.status.get(s, 'not run')} |" for s in SECTIONS]
        for s in SECTIONS:
            if s in self.parts:
                lines += ["", f"## {SECTIONS[s]}", "", *self.parts[s]]
        lines += ["", *self.footer]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("\n".join(lines).rstrip() + "\n")
        tmp.replace(self.path)


def machine_lines(mode: Mode, command: str) -> list[str]:
    cuda = torch.cuda.is_available()
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = f"{torch.cuda.device_count()} x {props.name} ({props.total_memory / GiB:.0f} GiB)"
        versions = f"CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, NCCL {torch.cuda.nccl.version()}"
    else:
        device, versions = (
            f"no GPU: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            "CPU build",
        )
    return [
        f"# GPU acceptance run ({mode.name} mode), {datetime.date.today().isoformat()}",
        "",
        f"- machine: {device}; host {platform.node()}, {os.cpu_count()} CPUs",
        f"- torch {torch.__version__}, {versions}, Python {platform.python_version()}",
        f"- command: `{command}`",
        f"- started {datetime.datetime.now().isoformat(timespec='seconds')}",
    ]


# --------------------------------------------------------------------------------------------- running things


@dataclass
class Clock:
    """The run's time: a soft budget per section and a hard limit for the whole run."""

    start: float
    hard_s: float

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@contextlib.contextmanager
def section(report: Report, key: str, budget_s: float, clock: Clock) -> Iterator[Callable[[float], bool]]:
    """Run one section; yields `fits(estimate_s)`: whether another piece of that length fits its budget and the
    run's hard limit. A failure is recorded with its one-line cause and the run goes on with the next section."""
    start = time.perf_counter()
    skipped: list[bool] = []

    def fits(estimate_s: float) -> bool:
        used = time.perf_counter() - start
        ok = used + estimate_s <= budget_s and clock.elapsed() + estimate_s <= clock.hard_s - 30
        if not ok:
            skipped.append(True)
        return ok

    report.set_status(key, "running")
    print(f"[{clock.elapsed():5.0f} s] {SECTIONS[key]}", flush=True)
    try:
        yield fits
    except Exception as err:  # a section's failure is a finding: record it, go on with the next section
        report.add(
            key, "", f"**failed**: `{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}`"
        )
        report.set_status(key, f"failed after {time.perf_counter() - start:.0f} s")
        traceback.print_exc()
        return
    finally:
        free_memory()
    took = time.perf_counter() - start
    report.set_status(key, f"{'partial (time box)' if skipped else 'done'} in {took:.0f} s")


def scratch_dir() -> Path:
    """Where the run directories go: memory (/dev/shm) when it has room for a few 350M checkpoints of 4.4 GB,
    which writes them several times faster than a disk; else $TMPDIR."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40 * GiB:
        return shm
    return Path(os.environ.get("TMPDIR", "/tmp"))


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_training(config: str, overrides: list[str], log_path: Path) -> dict[str, Any]:
    """One training run in this process (the process group is already up); its output goes to `log_path`."""
    cfg = load_config(config, overrides)
    with log_path.open("a") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        try:
            return train(cfg, init_distributed(cfg.parallel.device, cfg.parallel.backend))
        finally:
            free_memory()


def losses(run_dir: Path, key: str = "loss") -> dict[int, float]:
    return dict(series(read_records(run_dir), key))


def fmt(x: float, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if math.isfinite(x) else str(x)


def one_line(err: BaseException) -> str:
    text = str(err).splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:200]


# ----------------------------------------------------------------------------------------------- the sections


def correctness(mode: Mode, runs: Path, report: Report, fits: Callable[[float], bool]) -> dict[str, Path]:
    """Section a: train 4 steps with evaluation and checkpoints at 2 and 4; resume from step 2 in a second run
    directory; the resumed steps must log the uninterrupted losses; export the final checkpoint."""
    report.add(
        "a",
        f"`configs/{mode.configs}_<optimizer>.yaml` {' '.join(NO_DOWNLOAD)} --data.vocab_size={mode.vocab} "
        f"{' '.join(mode.correctness)} --train.steps=4 --train.warmup_ratio=0.25 --checkpoint.every=2 "
        "--train.eval_every=2 --metrics.log_every=1; then the same from step 2's checkpoint "
        "(`--checkpoint.resume_from`) in another run directory; then `launch/export_hf.py` of step 4.",
        "",
        "| optimizer | losses, steps 1-4 | eval loss at 4 | resumed losses 3-4 | resumed - uninterrupted "
        "| export | result |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    )
    kept: dict[str, Path] = {}
    estimate = 0.0  # then the last optimizer's time
    for name in OPTIMIZER_NAMES:
        if not fits(estimate):
            report.add("a", f"| {name} | skipped: out of time | | | | | |")
            continue
        start = time.perf_counter()
        base = [
            *NO_DOWNLOAD,
            f"--data.vocab_size={mode.vocab}",
            *mode.correctness,
            "--train.steps=4",
            "--train.warmup_ratio=0.25",
            "--train.eval_every=2",
            "--checkpoint.every=2",
            "--metrics.log_every=1",
            "--metrics.tensorboard=false",
            f"--train.runs_dir={runs}",
        ]
        try:
            row = correctness_row(mode, name, base, runs)
            kept[name] = runs / f"a_{name}"
        except Exception as err:  # one optimizer's failure is a row of the table
            traceback.print_exc()
            row = f"| {name} | **failed**: `{one_line(err)}` | | | | | fail |"
        report.add("a", row)
        shutil.rmtree(runs / f"a_{name}_resumed", ignore_errors=True)
        estimate = time.perf_counter() - start
        print(f"    a {name}: {estimate:.0f} s", flush=True)
    return kept


def correctness_row(mode: Mode, name: str, base: list[str], runs: Path) -> str:
    config = f"{mode.configs}_{name}.yaml"
    run_training(config, [*base, f"--train.run_name=a_{name}"], runs / "a.log")
    full = runs / f"a_{name}"
    resume = ["--checkpoint.resume_from", str(full / "checkpoints" / "step_000002")]
    run_training(config, [*base, f"--train.run_name=a_{name}_resumed", *resume], runs / "a.log")
    first, again = losses(full), losses(runs / f"a_{name}_resumed")
    evals = losses(full, "eval/loss")
    diffs = [abs(again[s] - first[s]) for s in (3, 4)]
    bitwise = all(again[s] == first[s] for s in (3, 4))
    moved = first[4] < first[1]
    out = runs / f"a_{name}_hf"
    export(full / "checkpoints" / "step_000004", out)
    exported = f"{sum(f.stat().st_size for f in out.iterdir()) / GiB:.2f} GiB"
    if name == OPTIMIZER_NAMES[0]:
        exported += f", transformers logits max diff {hf_logits_difference(full, out):.1e}"
    shutil.rmtree(out, ignore_errors=True)
    ok = max(diffs) <= 1e-3 * first[3] and moved and math.isfinite(evals.get(4, math.nan))
    return (
        f"| {name} | {' '.join(fmt(first[s], 3) for s in range(1, 5))} | {fmt(evals.get(4, math.nan), 3)} "
        f"| {fmt(again[3], 3)} {fmt(again[4], 3)} | {'0 (bitwise)' if bitwise else f'{max(diffs):.1e}'} "
        f"| {exported} | {'pass' if ok else 'FAIL'} |"
    )


def hf_logits_difference(run_dir: Path, exported: Path) -> float:
    """transformers' LlamaForCausalLM from the export against our model from the checkpoint, on the CPU in fp32."""
    from transformers import LlamaForCausalLM

    ours = load_model(run_dir / "checkpoints" / "step_000004").eval()
    theirs = LlamaForCausalLM.from_pretrained(str(exported)).float().eval()
    tokens = torch.randint(0, ours.cfg.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (theirs(tokens).logits - ours(tokens)).abs().max().item()


def throughput(mode: Mode, runs: Path, report: Report, fits: Callable[[float], bool], trace_of: dict) -> None:
    """Section b: each optimizer at its shipped batch, plus SWAN's memory savers; step 7 of AdamW and SWAN is
    profiled for section d (the windows timed are steps 3-4 and 5-6; steps 1-2 warm up)."""
    steps = mode.throughput_steps
    # (label, optimizer, run name, overrides); SWAN's memory savers next to SWAN, before a time box can cut them
    variants = [(name, name, name, []) for name in ("adamw", "swan")]
    variants += [
        ("swan, activation checkpointing", "swan", "swan_ac", ["--parallel.activation_checkpointing=true"]),
        (
            "swan, update_in_backward (one micro-batch per step)",
            "swan",
            "swan_uib",
            ["--optim.update_in_backward=true", *mode.one_micro_batch],
        ),
    ]
    variants += [(name, name, name, []) for name in OPTIMIZER_NAMES if name not in ("adamw", "swan")]
    cfg = load_config(f"{mode.configs}_adamw.yaml", [*NO_DOWNLOAD, f"--data.vocab_size={mode.vocab}"])
    t = cfg.train
    report.add(
        "b",
        f"`configs/{mode.configs}_<optimizer>.yaml` {' '.join(NO_DOWNLOAD)} --data.vocab_size={mode.vocab} "
        f"{' '.join(mode.throughput)} --train.steps={steps} --metrics.log_every=2: {t.global_batch_size} x "
        f"{t.seq_len} tokens per step in micro-batches of {t.micro_batch_size} on one device. Medians of the "
        "windows of steps 3-4 and 5-6; the optimizer step and memory from the trainer's own metrics "
        "(`optim/step_s`, `memory/*`: peak = the allocator's peak of a step). update_in_backward needs one "
        f"micro-batch per step: its row adds `{' '.join(mode.one_micro_batch)}` (micro-batches of the same size, "
        "so the same activations; its optimizer step runs inside backward).",
        "",
        "| run | tokens/s | step | x AdamW | optimizer step | its share | MFU | params | grads "
        "| optimizer state | other | peak | reserved |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    )
    adamw_step = None
    measured: dict[str, Measured] = {}  # the plain runs, for the targets
    estimate = 0.0  # then the last run's time
    for label, name, run_name, extra in variants:
        if not fits(estimate):
            report.add("b", f"| {label} | skipped: out of time |" + " |" * 11)
            continue
        start = time.perf_counter()
        run_name = f"b_{run_name}"
        profile = name in ("adamw", "swan") and not extra
        overrides = [
            *NO_DOWNLOAD,
            f"--data.vocab_size={mode.vocab}",
            *mode.throughput,
            *extra,
            f"--train.steps={steps}",
            "--metrics.log_every=2",
            "--train.eval_every=0",
            "--checkpoint.enabled=false",
            "--metrics.tensorboard=false",
            f"--train.runs_dir={runs}",
            f"--train.run_name={run_name}",
            *([f"--metrics.profile_steps={steps}"] if profile else []),
        ]
        try:
            run_training(f"{mode.configs}_{name}.yaml", overrides, runs / "b.log")
            row, numbers = throughput_row(label, runs / run_name, adamw_step)
            adamw_step = adamw_step or (numbers.step_s if name == "adamw" else None)
            if not extra:
                measured[name] = numbers
            if profile:
                traces = sorted((runs / run_name / "tb" / "profile").glob("*.json"))
                if traces:
                    trace_of[name] = traces[0]
        except Exception as err:
            traceback.print_exc()
            row = f"| {label} | **failed**: `{one_line(err)}` |" + " |" * 11
        report.add("b", row)
        estimate = time.perf_counter() - start
        print(f"    b {label}: {estimate:.0f} s", flush=True)
    report.add("b", *targets_table(measured), "", largest_micro_batch(mode))


def throughput_row(label: str, run_dir: Path, adamw_step: float | None) -> tuple[str, Measured]:
    records = read_records(run_dir)
    timed = [r for r in records if r["step"] in (4, 6) and "tokens_per_s" in r]
    if not timed:
        raise RuntimeError(f"no timed windows in {run_dir / 'metrics.jsonl'}")
    median = lambda key: sorted(r.get(key, math.nan) for r in timed)[len(timed) // 2]  # noqa: E731
    tok_s, opt_s = median("tokens_per_s"), median("optim/step_s")
    step_s = timed[0]["tokens"] / timed[0]["step"] / tok_s
    mem = timed[-1]
    gib = lambda key: f"{mem.get(key, math.nan) / 1024:.1f}"  # noqa: E731
    mfu = median("mfu")
    ratio = f"{step_s / adamw_step:.2f}x" if adamw_step else ("1.00x" if label == "adamw" else "-")
    row = (
        f"| {label} | {tok_s:,.0f} | {step_s * 1e3:.0f} ms | {ratio} | {opt_s * 1e3:.0f} ms | {opt_s / step_s:.1%} "
        f"| {f'{mfu:.1%}' if math.isfinite(mfu) else 'n/a'} | {gib('memory/params_mib')} | {gib('memory/grads_mib')} "
        f"| {gib('memory/optimizer_state_mib')} | {gib('memory/other_mib')} | {gib('memory/peak_mib')} "
        f"| {gib('memory/reserved_mib') if 'memory/reserved_mib' in mem else '-'} |"
    )
    return row, Measured(tok_s, step_s, opt_s, mfu)


@dataclass(frozen=True)
class Measured:
    """One optimizer's throughput at the shipped config (section b)."""

    tokens_per_s: float
    step_s: float
    optimizer_step_s: float
    mfu: float


# The first H200 run (torch 2.11, CUDA 13, no torch.compile, full fp32 logits, one kernel per matrix and
# operation in the optimizer step, SWAN's whitening in fp32), at the same shipped config: (tokens/s, MFU).
BEFORE = {
    "adamw": (102_500, 0.216),
    "muon": (98_800, 0.208),
    "normuon": (101_800, 0.215),
    "sinkgd": (96_800, 0.204),
    "swan": (85_400, 0.180),
}
MFU_TARGET = 0.40  # AdamW at llama_350m on one H200
STEP_TARGET = 1.05  # every optimizer's step against AdamW's
SHARE_TARGET = {"swan": 0.05}  # the optimizer step's share of the step; 3% for the others
SHARE_DEFAULT = 0.03


def targets_table(measured: dict[str, Measured]) -> list[str]:
    """The GPU speed targets against this run, beside the first H200 run's numbers (BEFORE)."""
    adamw = measured.get("adamw")
    lines = [
        "",
        "Targets (GPU only; the first H200 run's numbers beside this run's): AdamW's MFU >= "
        f"{MFU_TARGET:.0%}; every step <= {STEP_TARGET:.2f}x AdamW's; the optimizer step <= "
        f"{SHARE_DEFAULT:.0%} of the step ({SHARE_TARGET['swan']:.0%} for SWAN).",
        "",
        "| optimizer | tokens/s before | tokens/s now | MFU before | MFU now | step vs AdamW before | now "
        "| optimizer step share | result |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, m in measured.items():
        tok_before, mfu_before = BEFORE.get(name, (math.nan, math.nan))
        ratio_before = BEFORE["adamw"][0] / tok_before if name in BEFORE else math.nan
        ratio = m.step_s / adamw.step_s if adamw else math.nan
        share = m.optimizer_step_s / m.step_s
        met = ratio <= STEP_TARGET and share <= SHARE_TARGET.get(name, SHARE_DEFAULT)
        if name == "adamw":
            met = met and m.mfu >= MFU_TARGET
        result = ("met" if met else "MISSED") if torch.cuda.is_available() else "n/a (no GPU)"
        lines.append(
            f"| {name} | {shown(tok_before, ',.0f')} | {m.tokens_per_s:,.0f} | {shown(mfu_before, '.1%')} "
            f"| {shown(m.mfu, '.1%')} | {shown(ratio_before, '.2f', 'x')} | {shown(ratio, '.2f', 'x')} "
            f"| {share:.1%} | {result} |"
        )
    return lines


def shown(x: float, spec: str, unit: str = "") -> str:
    """`x` formatted, or "-" where it was not measured (NaN: an optimizer the first run did not time, MFU on a
    CPU)."""
    return f"{x:{spec}}{unit}" if math.isfinite(x) else "-"


def largest_micro_batch(mode: Mode) -> str:
    """The memory planner's largest micro batch of AdamW's shipped config that fits this device (powers of 2)."""
    if not torch.cuda.is_available():
        return "no GPU: no device memory to plan against"
    memory = torch.cuda.get_device_properties(0).total_memory
    base = load_config(f"{mode.configs}_adamw.yaml", [*NO_DOWNLOAD, f"--data.vocab_size={mode.vocab}"])
    fits, micro = [], base.train.micro_batch_size
    while micro <= base.train.global_batch_size:
        size = [f"--train.micro_batch_size={micro}"]
        plan = plan_memory(load_config(f"{mode.configs}_adamw.yaml", [*NO_DOWNLOAD, *size]), 1, "cuda")
        if not plan.fits(memory):
            break
        fits.append(f"{micro} ({plan.peak / GiB:.1f} GiB)")
        micro *= 2
    return (
        f"memory planner, AdamW at {base.train.global_batch_size} x {base.train.seq_len} tokens per step: micro "
        f"batches that fit {memory / GiB:.0f} GiB: {', '.join(fits) or 'none'}"
    )


def tf32_parity(runs: Path, report: Report) -> None:
    """SWAN's whitening in TF32 (the CUDA default) against fp32 on a tiny run: the loss gap must be within what
    another seed moves it."""
    base = [
        *NO_DOWNLOAD, "--train.steps=40", "--train.eval_every=0", "--checkpoint.enabled=false",
        "--metrics.log_every=1", "--metrics.tensorboard=false", "--parallel.compile=false",
        f"--train.runs_dir={runs}",
    ]  # fmt: skip
    variants = {"tf32": ["--optim.ns_tf32=true"], "fp32": ["--optim.ns_tf32=false"]}
    variants["fp32, seed 1"] = [*variants["fp32"], "--train.seed=1"]
    final = {}
    for label, extra in variants.items():
        name = "c_swan_" + label.replace(", ", "_").replace(" ", "")
        run_training("tiny_swan.yaml", [*base, *extra, f"--train.run_name={name}"], runs / "c.log")
        final[label] = losses(runs / name)[40]
    gap, spread = abs(final["tf32"] - final["fp32"]), abs(final["fp32, seed 1"] - final["fp32"])
    report.add(
        "c",
        "",
        "SWAN's whitening in TF32 against fp32, `configs/tiny_swan.yaml` 40 steps on this device: final loss "
        + ", ".join(f"{label} {value:.4f}" for label, value in final.items())
        + f"; |TF32 - fp32| {gap:.4f} against another seed's {spread:.4f}: {'PASS' if gap <= spread else 'FAIL'}",
    )


def optimizer_step(mode: Mode, report: Report, fits: Callable[[float], bool], runs: Path) -> None:
    """Section c: benchmarks/optimizer_step.py, fp32 matmuls as they are and in TF32; SWAN's TF32 loss parity."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for tf32 in (False, True):
        if not fits(0.0 if tf32 is False else 8.0):
            report.add("c", "", f"skipped (TF32 {tf32}): out of time")
            continue
        table = measure_optimizer_step(
            mode.layer_model, device, tf32=tf32, warmup=2, repeats=mode.layer_repeats
        )
        report.add("c", "", table)
    if fits(10.0):
        tf32_parity(runs, report)
    else:
        report.add("c", "", "skipped (SWAN's TF32 loss parity): out of time")


def profile(report: Report, trace_of: dict[str, Path]) -> None:
    """Section d: the profiled steps of section b, summarized."""
    if not trace_of:
        report.add("d", "no profiled step (section b did not run AdamW or SWAN)")
    for name, trace in trace_of.items():
        report.add(
            "d",
            "",
            f"### {name}: one step of section b's run (`metrics.profile_steps`)",
            "",
            summarize(trace),
        )


def tests(mode: Mode, report: Report, budget_s: float) -> None:
    """Section e: the fast lane (the CUDA-only tests are in it) with the GPU visible."""
    cmd = [sys.executable, "-m", "pytest", "-q", *mode.tests, "-rs", "-p", "no:cacheprovider"]
    report.add("e", f"`{' '.join(cmd[1:])}` (the CUDA-only tests run here; elsewhere they skip)")
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
        tail = done.stdout.strip().splitlines()[-25:]
        report.add("e", "", f"exit code {done.returncode}", "", "```", *tail, "```")
        if done.returncode != 0:
            report.add("e", "", "**failed**: see the tail above")
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"").decode(errors="replace").strip().splitlines()[-10:]
        report.add("e", "", f"**cut after {budget_s:.0f} s**", "", "```", *tail, "```")


def several_devices(
    mode: Mode, runs: Path, report: Report, fits: Callable[[float], bool], kept: dict
) -> None:
    """Section f: the headline configs at N devices (torchrun) against the 1-device runs of section a."""
    n = torch.cuda.device_count() if torch.cuda.is_available() else 2
    if mode is GPU and n < 2:
        report.add("f", "skipped: one GPU visible (the code path runs in --smoke with 2 CPU processes)")
        return
    report.add(
        "f",
        f"section a's runs (steps 1-4) at {n} {'GPUs' if mode is GPU else 'CPU processes'} "
        "(`torchrun --standalone`), same global batches:",
        "",
        "| optimizer | losses at 1 | losses at N | max relative difference | result |",
        "| --- | --- | --- | --- | --- |",
    )
    for name in ("swan", "normuon"):
        if name not in kept:
            report.add("f", f"| {name} | no 1-device run (section a) | | | |")
            continue
        if not fits(45.0 if mode is GPU else 0.0):
            report.add("f", f"| {name} | skipped: out of time | | | |")
            continue
        overrides = (f"--train.runs_dir={runs}", f"--train.run_name=f_{name}", "--checkpoint.resume=false")
        code = launch(TrainerRun(str(kept[name] / "config.yaml"), overrides), runs / f"f_{name}.log", nproc=n)
        if code != EXIT_OK:
            report.add("f", f"| {name} | **failed** (exit {code}, see {runs / f'f_{name}.log'}) | | | |")
            continue
        one, many = losses(kept[name]), losses(runs / f"f_{name}")
        rel = max(abs(many[s] - one[s]) / abs(one[s]) for s in one)
        limit = 2e-2 if mode is GPU else 1e-4  # bf16 compute vs fp32 on CPU
        report.add(
            "f",
            f"| {name} | {' '.join(fmt(one[s], 3) for s in sorted(one))} | "
            f"{' '.join(fmt(many[s], 3) for s in sorted(many))} | {rel:.1e} | {'pass' if rel <= limit else 'FAIL'} |",
        )
        shutil.rmtree(runs / f"f_{name}", ignore_errors=True)


# ----------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu")
    parser.add_argument(
        "--smoke", action="store_true", help="CPU, tiny models: the code path, in about a minute"
    )
    parser.add_argument("--runs-dir", type=Path, help="scratch run directories (default: a fresh temp dir)")
    parser.add_argument("--sections", default="".join(SECTIONS), help="which sections, e.g. 'abf'")
    parser.add_argument(
        "--hard-limit-s", type=float, default=540.0, help="the run ends here whatever it is doing"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    mode = SMOKE if args.smoke else GPU
    if mode is GPU and not torch.cuda.is_available():
        print("error: no GPU visible; use --smoke for the CPU smoke test", file=sys.stderr)
        return 2
    clock = Clock(time.perf_counter(), args.hard_limit_s)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d-%H%M")
    device = torch.cuda.get_device_name(0).split()[-1] if mode is GPU else "cpu"
    report = Report(
        args.out / f"acceptance-{stamp}-{device}.md",
        machine_lines(mode, " ".join(["python -m benchmarks.gpu_acceptance", *sys.argv[1:]])),
    )
    runs = args.runs_dir or scratch_dir() / f"gpu_acceptance_{os.getpid()}"
    runs.mkdir(parents=True, exist_ok=True)

    def cut() -> None:  # the hard limit: keep what was measured, say so, and end now
        report.finish(
            f"**Cut at the hard limit ({args.hard_limit_s:.0f} s)**; the sections above hold what was measured."
        )
        os._exit(124)

    watchdog = threading.Timer(args.hard_limit_s, cut)
    watchdog.daemon = True
    watchdog.start()
    if mode is SMOKE:
        os.environ.setdefault("OMP_NUM_THREADS", "1")
    init_distributed("cuda" if mode is GPU else "cpu")
    kept: dict[str, Path] = {}
    traces: dict[str, Path] = {}
    wanted = set(args.sections)
    if "a" in wanted:
        with section(report, "a", mode.budgets["a"], clock) as fits:
            kept = correctness(mode, runs, report, fits)
    if "b" in wanted:
        with section(report, "b", mode.budgets["b"], clock) as fits:
            throughput(mode, runs, report, fits, traces)
    if "d" in wanted:
        with section(report, "d", mode.budgets["d"], clock):
            profile(report, traces)
    if "c" in wanted:
        with section(report, "c", mode.budgets["c"], clock) as fits:
            optimizer_step(mode, report, fits, runs)
    if "e" in wanted:
        with section(report, "e", mode.budgets["e"], clock):
            tests(mode, report, max(10.0, min(mode.budgets["e"], clock.hard_s - 60 - clock.elapsed())))
    if "f" in wanted:
        with section(report, "f", mode.budgets["f"], clock) as fits:
            several_devices(mode, runs, report, fits, kept)
    watchdog.cancel()
    report.finish(f"Wall time {clock.elapsed():.0f} s (hard limit {args.hard_limit_s:.0f} s).")
    if args.runs_dir is None:
        shutil.rmtree(runs, ignore_errors=True)
    print(f"report: {report.path}")
    failed = any(s.startswith("failed") for s in report.status.values())
    text = report.path.read_text()
    return 1 if failed or "| FAIL |" in text or "**failed**" in text else 0


if __name__ == "__main__":
    sys.exit(main())
