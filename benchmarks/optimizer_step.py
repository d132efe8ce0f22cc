"""Cost of one optimizer step on the hidden matrices of one llama_350m layer, as a ratio to AdamW.

The matrices (q, k, v, o: dim x dim; gate, up: ffn x dim; down: dim x ffn) get random gradients; every optimizer
steps the same tensors. Timing: warmup steps, then rounds in which every optimizer takes one step in a fresh
random order (interleaving spreads a noisy machine's slow moments over all of them); the median per optimizer.
Beside it, the FLOPs of one step from docs/optimizers.md: the matrix products exactly (NS5: ns_steps (4 p^2 q + 2 p^3) per
matrix, i.e. 20 p^2 q + 10 p^3 for 5 steps; SWAN's coupled iteration: 4 p^2 q + 6 ns_steps p^3, for
coupled_adaptive with the iterations it runs on these gradients), the elementwise work as an estimate (c FLOPs
per element, c counted from each rule's operations), and for the whole-matrix rules the mean orthogonality error
|O O^T - I|_F / sqrt(p) of their direction on these gradients (SWAN's GradNorm'ed ones have an exact zero singular
value for square and tall matrices, which floors it at 1/sqrt(p), 0.031 for p = 1024).

    python -m benchmarks.optimizer_step [--device cuda] [--ns-dtype float32] [--repeats 10]

`--count` prints another table instead, which needs no GPU: the device operations one optimizer step dispatches
for the whole model, with each shipped configs/llama350m_<optimizer>.yaml, counted on the meta device (shapes
and dtypes are real, nothing is computed). Each aten op that writes a device tensor is a kernel launch on CUDA
(a foreach op is one dispatch, a few launches); view ops launch nothing and are not counted; a host read of a
device value (`.item()`, a data-dependent branch) would be a device sync and is counted apart. torch's own AdamW
chooses its foreach path for the meta device as it does on CUDA.

    python -m benchmarks.optimizer_step --count
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections import Counter
from collections.abc import Callable
from typing import Any
from unittest import mock

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models import Llama, model_config
from optim import SWAN, AuON, HybridAuON, Muon, NorMuon, SinkGD, build_optimizer
from optim.newton_schulz import (
    coupled_adaptive,
    coupled_flops,
    coupled_inverse_sqrt_polar,
    newton_schulz5,
    ns5_flops,
    ns5_form_flops,
    orthogonality_error,
)
from optim.routing import route_parameters

# Estimated elementwise FLOPs per matrix element of one step (momentum lerps, normalizations, the update).
ELEMENTWISE = {"adamw": 12, "muon": 8, "swan": 8, "sinkgd": 32, "normuon": 13, "auon": 15, "hybrid_auon": 12}


def layer_shapes(model: str) -> list[tuple[int, int]]:
    cfg = model_config(model, vocab_size=1)  # the hidden matrices do not depend on the vocabulary
    dim, ffn, kv = cfg.dim, cfg.intermediate_size, cfg.n_kv_heads * cfg.head_dim
    return [(dim, dim), (kv, dim), (kv, dim), (dim, dim), (ffn, dim), (ffn, dim), (dim, ffn)]


def optimizers(ns_dtype: str | None) -> dict[str, tuple[Callable, Callable[[int, int], float]]]:
    """name -> (constructor over a param list, matmul FLOPs of one matrix (m, n))."""
    ns = {} if ns_dtype is None else {"ns_dtype": ns_dtype}
    return {
        "adamw": (lambda p: torch.optim.AdamW(p, lr=1e-3), lambda m, n: 0.0),
        "muon": (lambda p: Muon(p, **ns), lambda m, n: ns5_flops(m, n, 5)),
        "swan": (lambda p: SWAN(p, **ns), lambda m, n: coupled_flops(m, n, 10)),
        "swan_ns5": (lambda p: SWAN(p, whitening="ns5", **ns), lambda m, n: ns5_flops(m, n, 5)),
        "swan_adaptive": (lambda p: SWAN(p, whitening="coupled_adaptive", **ns), adaptive_flops),
        "sinkgd": (lambda p: SinkGD(p), lambda m, n: 0.0),
        "normuon": (lambda p: NorMuon(p, **ns), lambda m, n: ns5_flops(m, n, 5)),
        "muon_gram": (lambda p: Muon(p, ns_form="gram", **ns), lambda m, n: ns5_form_flops(m, n, 5, "gram")),
        "muon_polar": (
            lambda p: Muon(p, ns_coefficients="polar_express", **ns),
            lambda m, n: ns5_flops(m, n, 5),
        ),
        "auon": (lambda p: AuON(p), lambda m, n: 0.0),
        "hybrid_auon": (lambda p: HybridAuON(p, **ns), lambda m, n: ns5_flops(m, n, 1)),
    }


def adaptive_flops(m: int, n: int) -> float:
    """coupled_adaptive's FLOPs on one GradNorm'ed random (m, n) gradient: the iterations it runs there."""
    ran: list[int] = []
    coupled_adaptive(grad_norm(torch.randn(m, n, generator=torch.Generator().manual_seed(m * n))), ran=ran)
    return coupled_flops(m, n, ran[0])


def grad_norm(g: torch.Tensor) -> torch.Tensor:
    """SWAN's GradNorm (the whitening's input): rows centred and scaled to unit population std."""
    centered = g - g.mean(dim=1, keepdim=True)
    return centered / (centered.square().mean(dim=1, keepdim=True).sqrt() + 1e-8)


# The direction function and its input of each whole-matrix rule, for the orthogonality column.
DIRECTIONS = {
    "muon": lambda g: newton_schulz5(g, 5, torch.bfloat16),
    "muon_polar": lambda g: newton_schulz5(g, 5, torch.bfloat16, "polar_express"),
    "muon_gram": lambda g: newton_schulz5(g, 5, torch.bfloat16, form="gram"),
    "normuon": lambda g: newton_schulz5(g, 5, torch.bfloat16),
    "swan": lambda g: coupled_inverse_sqrt_polar(grad_norm(g), 10),
    "swan_adaptive": lambda g: coupled_adaptive(grad_norm(g), 10),
    "swan_ns5": lambda g: newton_schulz5(grad_norm(g), 5, torch.bfloat16),
}


def orthogonality(name: str, grads: list[torch.Tensor]) -> str:
    """Mean orth_error |O O^T - I|_F / sqrt(p) of the rule's direction over the layer's matrices."""
    if name not in DIRECTIONS:
        return "-"
    return f"{statistics.mean(orthogonality_error(DIRECTIONS[name](g)).item() for g in grads):.3f}"


def time_step(opt: torch.optim.Optimizer, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(
    model: str = "llama_350m",
    device: str = "cuda" if torch.cuda.is_available() else "cpu",
    ns_dtype: str | None = None,
    tf32: bool = False,
    warmup: int = 2,
    repeats: int = 7,
    only: list[str] | None = None,
) -> str:
    """The benchmark's table (markdown, with a two-line heading) for one setting."""
    dev = torch.device(device)
    shapes = layer_shapes(model)
    gen = torch.Generator(device=dev).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=dev, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=dev, generator=gen)
    table = optimizers(ns_dtype)
    names = ["adamw", *[n for n in table if n != "adamw" and (not only or n in only)]]
    opts = {name: table[name][0](params) for name in names}
    for opt in opts.values():
        opt.ns_tf32 = tf32
    precision = torch.get_float32_matmul_precision()
    if tf32 and dev.type == "cuda":  # the orth_error column's directions too
        torch.set_float32_matmul_precision("high")
    try:
        for _ in range(warmup):
            for opt in opts.values():
                opt.step()
        times: dict[str, list[float]] = {name: [] for name in names}
        rng = random.Random(0)
        for _ in range(repeats):
            order = list(names)
            rng.shuffle(order)
            for name in order:
                times[name].append(time_step(opts[name], dev))
        medians = {name: statistics.median(t) for name, t in times.items()}
        numel = sum(m * n for m, n in shapes)
        lines = [
            f"One optimizer step on one {model} layer's hidden matrices {shapes} ({numel / 1e6:.1f}M elements),",
            f"device {dev}, torch threads {torch.get_num_threads()}, median of {repeats} after {warmup}"
            f"{', fp32 matmuls in TF32' if tf32 and dev.type == 'cuda' else ''}.",
            "",
            "| optimizer | ns_dtype | step ms | x AdamW | matmul GFLOP | elementwise GFLOP (est.) | GFLOP/s "
            "| orth_error |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name in names:
            matmul = sum(table[name][1](m, n) for m, n in shapes)
            elementwise = ELEMENTWISE[name.split("_")[0] if name != "hybrid_auon" else name] * numel
            dtype = getattr(opts[name], "ns_dtype", None)
            dtype = str(dtype).removeprefix("torch.") if dtype is not None else "-"
            seconds = medians[name]
            lines.append(
                f"| {name} | {dtype} | {seconds * 1e3:.1f} | {seconds / medians['adamw']:.2f} "
                f"| {matmul / 1e9:.1f} | {elementwise / 1e9:.3f} | {(matmul + elementwise) / seconds / 1e9:.1f} "
                f"| {orthogonality(name, [p.grad for p in params])} |"
            )
    finally:
        torch.set_float32_matmul_precision(precision)
    return "\n".join(lines)


# ops that only make a new view of the same memory, though not marked as views
METADATA_OPS = {torch.ops.aten._unsafe_view, torch.ops.aten.detach, torch.ops.aten.alias}


class DispatchCounter(TorchDispatchMode):
    """Counts the aten ops that write a tensor on the meta device (kernels on a real device) and the host reads
    of a device value (syncs on a real device)."""

    def __init__(self) -> None:
        super().__init__()
        self.kernels: Counter[str] = Counter()
        self.syncs = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        on_device = any(isinstance(t, torch.Tensor) and t.is_meta for t in tree_leaves((args, kwargs, out)))
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += on_device
        elif on_device and not func.is_view and func.overloadpacket not in METADATA_OPS:
            self.kernels[str(func.overloadpacket)] += 1
        return out


def count_dispatches(name: str) -> tuple[DispatchCounter, int]:
    """One step (the second: the first makes the state) of configs/llama350m_<name>.yaml's optimizer on its
    model, on the meta device; the counter and the number of hidden matrices."""
    from trainer.config import load_config  # the benchmark's only trainer import: the shipped configs

    cfg = load_config(f"configs/llama350m_{name}.yaml")
    with torch.device("meta"):
        model = Llama(model_config(cfg.model.name, vocab_size=cfg.model.vocab_size or None))
    matrices, _ = route_parameters(model)
    optimizer = build_optimizer(cfg.optim, model)
    for p in model.parameters():
        p.grad = torch.empty_like(p)
    supported = "torch.optim.optimizer._get_foreach_kernels_supported_devices"
    with mock.patch(supported, lambda: ["cuda", "meta"]):
        optimizer.step()
        counter = DispatchCounter()
        with counter:
            optimizer.step()
    return counter, len(matrices)


def count_table(names: list[str]) -> str:
    """The --count table (markdown)."""
    lines = [
        "Device operations dispatched by one optimizer step of the shipped llama350m configs (meta device; "
        "kernels on CUDA).",
        "",
        "| optimizer | kernels per step | per hidden matrix | device syncs | most frequent |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for name in names:
        counter, matrices = count_dispatches(name)
        total = sum(counter.kernels.values())
        top = ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in counter.kernels.most_common(3))
        lines.append(f"| {name} | {total} | {total / matrices:.1f} | {counter.syncs} | {top} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="llama_350m")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--ns-dtype", choices=["bfloat16", "float32"], default=None, help="default: each's own"
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="the whole-matrix rules' fp32 matmuls in TF32 (CUDA: optim.ns_tf32)",
    )
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", help="subset of optimizers (adamw is always measured)")
    parser.add_argument(
        "--count", action="store_true", help="count the step's kernels on the meta device instead of timing"
    )
    args = parser.parse_args()
    if args.count:
        shipped = ["adamw", "muon", "normuon", "swan", "sinkgd", "auon", "hybrid_auon"]
        print(count_table([n for n in shipped if not args.only or n in args.only or n == "adamw"]))
        return
    print(measure(args.model, args.device, args.ns_dtype, args.tf32, args.warmup, args.repeats, args.only))


if __name__ == "__main__":
    main()
