"""Where a profiled step's time goes: the top GPU kernels (or, on a CPU, operators by self time) of a torch.profiler
trace, and the shares by kind of work (matrix products, attention, the loss, casts and copies, communication, the
rest). Reads the Chrome trace the trainer writes for `metrics.profile_steps` (runs/<name>/tb/profile/*.json).

    python -m benchmarks.kernel_profile runs/NAME/tb/profile/rank0.*.pt.trace.json [--top 15]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

# Kinds of work by kernel (or operator) name, first match wins; everything else is "elementwise and other".
KINDS = [
    (
        "matrix products",
        re.compile(r"gemm|matmul|cutlass|xmma|nvjet|wgmma|cublas|aten::(mm|addmm|bmm|baddbmm)$", re.I),
    ),
    ("attention", re.compile(r"flash|fmha|attention|sdpa", re.I)),
    ("loss (cross-entropy)", re.compile(r"cross_entropy|log_softmax|nll_loss|softmax", re.I)),
    (
        "communication",
        re.compile(r"nccl|all_reduce|allreduce|all_gather|allgather|reduce_scatter|alltoall", re.I),
    ),
    ("casts and copies", re.compile(r"memcpy|memset|copy|_to_copy|aten::to$|cast|fill", re.I)),
    ("norms and reductions", re.compile(r"reduce|norm|sum|mean", re.I)),
]
OTHER = "elementwise and other"


def kind(name: str) -> str:
    return next((label for label, pattern in KINDS if pattern.search(name)), OTHER)


def op_times(events: list[dict]) -> tuple[dict[str, list[float]], str]:
    """{name: [calls, microseconds]} and what was counted: GPU kernels (and memcpy/memset) when the trace has
    them, else CPU operators by self time (their duration minus that of the operators they called)."""
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")]
    times: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    if gpu:
        for e in gpu:
            times[e["name"]][0] += 1
            times[e["name"]][1] += float(e.get("dur", 0.0))
        return dict(times), "GPU kernel time"
    ops = sorted(
        (e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
        key=lambda e: (e["tid"], e["ts"], -e.get("dur", 0.0)),
    )
    stack: list[tuple[float, str]] = []  # (end time, name) of the enclosing operators on this thread
    thread = None
    for e in ops:
        if e["tid"] != thread:
            stack, thread = [], e["tid"]
        start, dur = e["ts"], float(e.get("dur", 0.0))
        while stack and stack[-1][0] <= start:
            stack.pop()
        if stack:
            times[stack[-1][1]][1] -= dur  # the parent's self time excludes this child
        times[e["name"]][0] += 1
        times[e["name"]][1] += dur
        stack.append((start + dur, e["name"]))
    return dict(times), "CPU operator self time"


def summarize(path: Path, top: int = 15) -> str:
    """Markdown: total time, the shares by kind of work, and the top `top` kernels or operators."""
    events = json.loads(Path(path).read_text())["traceEvents"]
    times, what = op_times(events)
    total = sum(t for _, t in times.values()) or 1.0
    by_kind: dict[str, float] = defaultdict(float)
    for name, (_, t) in times.items():
        by_kind[kind(name)] += t
    lines = [
        f"{what}: {total / 1e3:.1f} ms in all.",
        "",
        "| kind of work | ms | share |",
        "| --- | ---: | ---: |",
    ]
    for label, t in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {label} | {t / 1e3:.1f} | {t / total:.1%} |")
    lines += ["", "| kernel / operator | kind | calls | ms | share |", "| --- | --- | ---: | ---: | ---: |"]
    for name, (calls, t) in sorted(times.items(), key=lambda kv: -kv[1][1])[:top]:
        shown = name if len(name) <= 90 else name[:87] + "..."
        shown = shown.replace("|", "/")
        lines.append(f"| `{shown}` | {kind(name)} | {calls} | {t / 1e3:.2f} | {t / total:.1%} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("trace", type=Path)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    print(summarize(args.trace, args.top))


if __name__ == "__main__":
    main()
