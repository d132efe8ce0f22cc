"""Sharded Newton-Schulz (owner-computes) against gather-everywhere, per rank and step, at several world sizes.

Every rank holds torch.chunk row blocks of every hidden matrix of the model (as FSDP2 leaves them) and
orthogonalizes all of them with NS5 two ways in the same run:
- owner-computes: `optim.sharded.apply_to_whole_matrices` (all-to-all to FLOP-balanced owners, NS5 once per
  matrix in the job, all-to-all back);
- naive: all-gather every matrix on every rank (padded row blocks), NS5 on every matrix everywhere (one
  shape at a time, to fit in memory).
Each world size runs in its own gloo processes with one torch thread each (four processes share two cores
here), so compute is measured as each rank's CPU time (thread time of the NS5 calls), which the sharing does
not inflate the way it inflates wall time. Per rank and step: NS5 FLOPs (from the shapes each rank's NS5
calls received), NS5 CPU time, communication wall time (each collective timed after a barrier, so waiting for
a straggler's compute is not counted as communication) and bytes sent to other ranks (all-to-all: the splits
for other ranks; all-gather: the block times world - 1); beside it the step's wall time and the peak RSS.

    python -m benchmarks.sharded_ns [--model llama_350m] [--layers 24] [--world-sizes 1 2 4] [--steps 2]
"""

from __future__ import annotations

import argparse
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass
from unittest import mock

import torch
import torch.distributed as dist
from torch import Tensor

from models import model_config
from optim.base import resolve_dtype
from optim.newton_schulz import newton_schulz5, ns5_flops
from optim.sharded import ShardInfo, apply_to_whole_matrices
from tests.distributed import run_distributed

NS_STEPS = 5


@dataclass
class Meter:
    """One rank's totals over the measured steps."""

    flops: float = 0.0
    compute_cpu_s: float = 0.0
    comm_wall_s: float = 0.0
    bytes_sent: int = 0
    step_wall_s: float = 0.0
    step_cpu_s: float = 0.0  # the process's CPU time (all threads: gloo's too) over the whole step
    peak_rss_mb: float = 0.0


def hidden_shapes(model: str, layers: int | None) -> list[tuple[int, int]]:
    """(m, n) of the attention q, k, v, o and MLP gate, up, down weights of every layer."""
    cfg = model_config(model)
    dim, ffn, kv = cfg.dim, cfg.intermediate_size, cfg.n_kv_heads * cfg.head_dim
    layer = [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (ffn, dim), (dim, ffn)]
    return layer * (cfg.n_layers if layers is None else layers)


def metered_ns5(meter: Meter, dtype: torch.dtype) -> Callable[[Tensor], Tensor]:
    def fn(batch: Tensor) -> Tensor:
        start = time.thread_time()
        out = newton_schulz5(batch, steps=NS_STEPS, dtype=dtype)
        meter.compute_cpu_s += time.thread_time() - start
        meter.flops += batch.shape[0] * ns5_flops(*batch.shape[-2:], steps=NS_STEPS)
        return out

    return fn


@contextmanager
def metered_collectives(meter: Meter) -> Iterator[None]:
    """Time the all-to-all and all-gather calls (after a barrier) and count the bytes each sends away."""
    real_all_to_all, real_all_gather = dist.all_to_all_single, dist.all_gather

    def timed(group, sent: int, call: Callable[[], object]) -> object:
        dist.barrier(group=group)
        start = time.perf_counter()
        out = call()
        meter.comm_wall_s += time.perf_counter() - start
        meter.bytes_sent += sent
        return out

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, group=None):
        others = sum(input_split_sizes) - input_split_sizes[dist.get_rank(group)]
        return timed(
            group,
            others * input.element_size(),
            lambda: real_all_to_all(output, input, output_split_sizes, input_split_sizes, group=group),
        )

    def all_gather(tensor_list, tensor, group=None):
        sent = tensor.numel() * tensor.element_size() * (dist.get_world_size(group) - 1)
        return timed(group, sent, lambda: real_all_gather(tensor_list, tensor, group=group))

    with ExitStack() as stack:
        stack.enter_context(mock.patch.object(dist, "all_to_all_single", all_to_all_single))
        stack.enter_context(mock.patch.object(dist, "all_gather", all_gather))
        yield


def gather_everywhere(
    fn: Callable[[Tensor], Tensor], blocks: list[Tensor], infos: list[ShardInfo], comm_dtype: torch.dtype
) -> list[Tensor]:
    """The baseline: every rank all-gathers every matrix (row blocks padded to ceil(m / world) rows) and
    computes all of them, keeping its own rows. One all-gather and one batched call per shape, so that only
    one shape's whole matrices are held at a time (all at once would not fit four ranks in this machine)."""
    rank, world, group = infos[0].rank, infos[0].world, infos[0].group
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, info in enumerate(infos):
        by_shape.setdefault(tuple(info.shape), []).append(i)
    out: list[Tensor] = list(blocks)
    for idx in by_shape.values():
        info = infos[idx[0]]
        send = torch.zeros(len(idx), info.chunk, info.shape[1], dtype=comm_dtype)
        for k, i in enumerate(idx):
            send[k, : blocks[i].shape[0]] = blocks[i]
        received = [torch.empty_like(send) for _ in range(world)]
        dist.all_gather(received, send, group=group)
        wholes = torch.cat([piece[:, : info.rows_of(src)] for src, piece in enumerate(received)], dim=1)
        del received, send
        results = fn(wholes)
        for k, i in enumerate(idx):
            out[i] = results[k, info.row_slice(rank)].to(blocks[i].dtype)
    return out


def rank_blocks(shapes: list[tuple[int, int]]) -> tuple[list[Tensor], list[ShardInfo]]:
    """This rank's row blocks of seeded random matrices (the same whole matrices at every world size)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    infos = [ShardInfo(torch.Size(shape), dist.group.WORLD, rank, world) for shape in shapes]
    blocks = []
    for i, info in enumerate(infos):
        whole = torch.randn(info.shape, generator=torch.Generator().manual_seed(i))
        blocks.append(whole[info.row_slice(rank)].clone())
    return blocks, infos


def bench_rank(
    shapes: list[tuple[int, int]], ns_dtype: str, comm_dtype: str, warmup: int, steps: int
) -> dict:
    """Entry point of each rank: owner-computes steps, then naive steps; every rank's meters to rank 0."""
    blocks, infos = rank_blocks(shapes)
    ns, wire = resolve_dtype(ns_dtype, "ns_dtype"), resolve_dtype(comm_dtype, "comm_dtype")
    methods = {
        "owner-computes": lambda fn: apply_to_whole_matrices(fn, blocks, infos, comm_dtype=wire),
        "gather-everywhere": lambda fn: gather_everywhere(fn, blocks, infos, wire),
    }
    meters, outputs = {}, {}
    for name, method in methods.items():
        for _ in range(warmup):
            method(metered_ns5(Meter(), ns))
        meter = Meter()
        with metered_collectives(meter):
            for _ in range(steps):
                dist.barrier()
                start, start_cpu = time.perf_counter(), time.process_time()
                outputs[name] = method(metered_ns5(meter, ns))
                meter.step_wall_s += time.perf_counter() - start
                meter.step_cpu_s += time.process_time() - start_cpu
        meter.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        meters[name] = asdict(meter)
    diff = max((a.float() - b.float()).abs().max().item() for a, b in zip(*outputs.values(), strict=True))
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, {"meters": meters, "max_diff": diff})
    return {"ranks": gathered}


def report(
    world: int, ranks: list[dict], steps: int, total_gflop: float, base_cpu: float | None
) -> list[str]:
    """Table rows of one world size. `total_gflop`: NS5 of every matrix once; `base_cpu`: NS CPU s per step
    at world size 1 (the smaller of the two methods')."""
    rows = []
    for method in ("owner-computes", "gather-everywhere"):
        meters = [r["meters"][method] for r in ranks]
        gflop = [m["flops"] / steps / 1e9 for m in meters]
        cpu = [m["compute_cpu_s"] / steps for m in meters]
        ratio = f"{max(cpu) / base_cpu:.2f}" if base_cpu else "-"
        imbalance = max(gflop) / (total_gflop / world)
        comm = sum(m["comm_wall_s"] for m in meters) / world / steps
        sent = max(m["bytes_sent"] for m in meters) / steps / 2**20
        wall = max(m["step_wall_s"] for m in meters) / steps
        step_cpu = max(m["step_cpu_s"] for m in meters) / steps
        rss = max(m["peak_rss_mb"] for m in meters)
        rows.append(
            f"| {world} | {method} | {min(gflop):.0f} / {max(gflop):.0f} | {imbalance:.2f} "
            f"| {sum(cpu) / world:.2f} / {max(cpu):.2f} | {ratio} | {comm:.2f} | {sent:.0f} | {step_cpu:.2f} "
            f"| {wall:.2f} | {rss:.0f} |"
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama_350m")
    parser.add_argument("--layers", type=int, default=None, help="first N layers only (default: all)")
    parser.add_argument("--world-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--ns-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--comm-dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    shapes = hidden_shapes(args.model, args.layers)
    total = sum(ns5_flops(m, n, NS_STEPS) for m, n in shapes) / 1e9
    print(
        f"NS5 ({NS_STEPS} steps, {args.ns_dtype}, {args.comm_dtype} on the wire) on the {len(shapes)} hidden "
        f"matrices of {args.model} ({sum(m * n for m, n in shapes) / 1e6:.0f}M elements, {total:.0f} GFLOP "
        f"per step); gloo on CPU, one torch thread per rank; per rank and step, mean of {args.steps} steps "
        f"after {args.warmup} warmup.\n"
    )
    print(
        "| world | method | NS GFLOP/rank min / max | max / even split | NS CPU s/rank mean / max "
        "| max vs ws1 "
        "| comm wall s/rank | MiB sent/rank | step CPU s | step wall s | peak RSS MiB |"
    )
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base_cpu, diffs = None, []
    for world in args.world_sizes:
        ranks = run_distributed(
            bench_rank, world, shapes, args.ns_dtype, args.comm_dtype, args.warmup, args.steps
        )["ranks"]
        if base_cpu is None and world == 1:  # one process: both methods are the single-device NS5
            base_cpu = min(m["compute_cpu_s"] for m in ranks[0]["meters"].values()) / args.steps
        print("\n".join(report(world, ranks, args.steps, total, base_cpu)), flush=True)
        diffs.append(max(r["max_diff"] for r in ranks))
    print(f"\nmax |owner-computes - gather-everywhere| over all results: {max(diffs):.2e}")


if __name__ == "__main__":
    main()
