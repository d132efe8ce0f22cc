"""The memory planner: per-rank bytes of a config's training step by component, before anything is launched.

How it predicts: what can be counted is counted, what is a rule of the engine is a formula.
- parameters, gradients: exact element counts of the model, sharded over the world (FSDP2: row chunks);
- optimizer state and the optimizer's temporaries (Newton-Schulz buffers, normalized copies, AdamW's sqrt): the
  optimizer from optim/ is built on the meta device and stepped twice, the second step under a dispatch mode
  that tracks live bytes, so the numbers follow the optimizer's code, not a table that drifts from it;
- activations and the backward's temporaries: the model's forward and backward run on the meta device under
  the same tracker (with activation checkpointing if configured), gradients counted at their sharded size;
- FSDP2 buffers (unsharded parameters and gradients of the gathered units) and DeepSpeed's ZeRO partitions:
  formulas from those engines' behaviour (`fsdp2_extra`, `trainer/engines/zero.py`'s `ZeroStage.sizes`);
- runtime: resident memory that is not tensors (CPU: the interpreter and libraries; CUDA: the context).
The peak is the largest of two phases: forward/backward (activations, gradients arriving) and the optimizer
step (all gradients + the step's temporaries). With update_in_backward there is no step phase.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from models import Llama, LlamaConfig, causal_lm_loss
from optim import build_optimizer, is_adamw_group, step_params
from optim.sharded import assign_owners
from trainer.config import Config
from trainer.engines.zero import ZeroStage
from trainer.memory.tensors import local_bytes, optimizer_state_bytes, state_tensors
from trainer.resolve import Run, resolve

GiB = 2**30
# Resident memory that is not tensors: Python + torch + gloo on this kind of CPU machine (measured: 0.27-0.35
# GiB), and on CUDA the context, cuBLAS/NCCL workspaces and allocator slack outside max_memory_allocated.
RUNTIME_BYTES = {"cpu": int(0.33 * GiB), "cuda": int(1.5 * GiB)}
FSDP2_PREFETCH = {"cpu": 0, "cuda": 1}  # units gathered ahead of the one computing (CUDA overlaps on streams)


class LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages created under this mode that are still alive, and their peak.

    Works on the meta device (nothing is allocated, sizes are exact). `resize(t, n)` re-counts a live tensor's
    storage as n bytes: how a gradient made at compute precision on one rank is counted at its real size.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._sizes: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        inputs = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in inputs and key not in self._sizes:
                    self._add(key, storage.nbytes())
                    weakref.finalize(storage, self._free, key)
        return out

    def _add(self, key: int, nbytes: int) -> None:
        self._sizes[key] = nbytes
        self.live += nbytes
        self.peak = max(self.peak, self.live)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def resize(self, t: Tensor, nbytes: int) -> None:
        key = t.untyped_storage()._cdata
        if key in self._sizes:
            self.live += nbytes - self._sizes[key]
            self._sizes[key] = nbytes
            self.peak = max(self.peak, self.live)


def flash_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal attention as the real runs compute it. On meta tensors torch picks SDPA's unfused math path, which
    keeps the T x T attention weights for backward; CPU and CUDA runs use flash kernels that keep the output and
    one log-sum-exp per row. The CPU flash op has meta kernels, and what it saves matches CUDA flash."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True)[0]


def _meta_model(mcfg: LlamaConfig) -> Llama:
    """The model on the meta device, attending as real runs do (flash_attention)."""
    with torch.device("meta"):
        return Llama(mcfg, attend=flash_attention)


def shard(nbytes: int, world: int) -> int:
    return -(-nbytes // world)


@dataclass
class ForwardBackward:
    """One micro-batch's forward + backward on the meta device, gradients counted at their stored size."""

    activations: int  # live after the forward: what backward needs (+ the loss)
    peak: int  # the largest live total during forward + backward, gradients included
    end: int  # live after the backward: the gradients (0 when they are dropped)


def simulate_forward_backward(
    run: Run, checkpointing: bool, grad_bytes_per_element: float, drop_grads: bool
) -> ForwardBackward:
    """Run the model's forward and backward on meta tensors and track live bytes (parameters excluded).

    grad_bytes_per_element: how this rank stores each gradient element (4 / world for fp32 row shards);
    drop_grads: free each gradient once complete (update_in_backward).
    """
    model = _meta_model(run.model).to(run.compute_dtype)
    if checkpointing:
        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block, preserve_rng_state=False)
    tokens = torch.zeros(run.micro_batch, run.seq_len + 1, dtype=torch.long, device="meta")
    with LiveBytes() as tracker:

        def on_grad(p: Tensor) -> None:
            if drop_grads:
                p.grad = None
            else:
                tracker.resize(p.grad, int(p.numel() * grad_bytes_per_element))

        for p in model.parameters():
            p.register_post_accumulate_grad_hook(on_grad)
        loss = causal_lm_loss(model, tokens)
        activations = tracker.live
        loss.backward()
        del loss
    return ForwardBackward(activations, tracker.peak, tracker.live)


@dataclass
class OptimizerSim:
    state: dict[str, int]  # bytes per param group (whole model, unsharded)
    temporaries: int  # peak extra bytes of one steady-state step (per_param: of the costliest parameter)
    adamw_param_bytes: int  # bytes of the params the AdamW path steps (for the foreach buffer on CUDA)
    comm_bytes: int  # element size of the row shards a whole-matrix rule sends to owners; 0: no such rule
    # each matrix-rule param's (shape, state bytes), and what the rule balances owners on (optim.base)
    matrix_state: list[tuple[tuple[int, int], int]] = field(default_factory=list)
    owner_cost: Any = None

    def owned_state(self, world: int) -> int:
        """The busiest rank's matrix-rule state under DeepSpeed ZeRO-1/2/3, where each matrix's state lives whole
        on the rank that computes its rule (optim.base.MatrixOptimizer._flat_step)."""
        if not self.matrix_state:
            return 0
        owners = assign_owners([shape for shape, _ in self.matrix_state], world, self.owner_cost)
        loads = [0] * world
        for (_, nbytes), owner in zip(self.matrix_state, owners, strict=True):
            loads[owner] += nbytes
        return max(loads)


def simulate_optimizer(cfg: Config, mcfg: LlamaConfig, per_param: bool) -> OptimizerSim:
    """Build the config's optimizer over a meta model, step it twice (the first creates the state), and
    track the second step's live bytes. per_param: step one parameter at a time (update_in_backward)."""
    model = _meta_model(mcfg)
    params = list(model.parameters())
    for p in params:
        p.grad = torch.empty_like(p)
    optimizer = build_optimizer(cfg.optim, model)
    optimizer.step()
    peak = 0
    for chunk in ([p] for p in params) if per_param else [params]:
        with LiveBytes() as tracker:
            step_params(optimizer, chunk)
        peak = max(peak, tracker.peak)
    adamw = [p for g in optimizer.param_groups if is_adamw_group(g) for p in g["params"]]
    comm = getattr(optimizer, "comm_dtype", None)  # set by the rules that gather whole matrices
    comm_bytes = torch.finfo(comm).bits // 8 if comm is not None else 0
    matrix_state = [
        (tuple(p.shape), local_bytes(state_tensors([optimizer.state[p]])))
        for g in optimizer.param_groups
        if not is_adamw_group(g)
        for p in g["params"]
    ]
    return OptimizerSim(
        optimizer_state_bytes(optimizer),
        peak,
        sum(p.numel() * 4 for p in adamw),
        comm_bytes,
        matrix_state,
        optimizer.owner_cost if matrix_state else None,  # only the matrix rules have owners
    )


@dataclass
class Units:
    """Elements of FSDP2's units as trainer/engines/fsdp2.py shards them: one per block, plus the root."""

    root: int  # embedding, final norm, head
    block: int  # one transformer block

    @classmethod
    def of(cls, model: Llama) -> Units:
        block = sum(p.numel() for p in model.layers[0].parameters())
        return cls(sum(p.numel() for p in model.parameters()) - block * len(model.layers), block)


def fsdp2_extra(units: Units, run: Run) -> tuple[int, int]:
    """FSDP2's bytes beyond a plain model's, per rank, at (the busiest point of backward, its end).

    During backward the root unit stays gathered (it is not resharded after forward), and so does the block
    being computed (+ the prefetched one on CUDA). At the end, the root's unsharded gradients (compute
    dtype) are copied into a reduce-scatter input (fp32) whose output is the sharded gradient the plain model's
    count already holds; gloo's CPU reduce-scatter works on one more copy of its input.
    """
    c, n = run.compute_bytes, run.world
    busiest = units.root * c + units.block * c * (1 + FSDP2_PREFETCH[run.device])
    end = units.root * (c + 4) - shard(units.root * 4, n)
    if run.device == "cpu" and n > 1:
        end += units.root * 4
    return busiest, end


@dataclass
class MemoryPlan:
    """Predicted bytes per rank; `rows` in display order, `peak` without and `total` with the runtime."""

    run: Run
    rows: list[tuple[str, int]] = field(default_factory=list)
    phases: dict[str, int] = field(default_factory=dict)
    runtime: int = 0

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    @property
    def peak_phase(self) -> str:
        return max(self.phases, key=self.phases.__getitem__)

    @property
    def total(self) -> int:
        return self.peak + self.runtime

    def get(self, name: str) -> int:
        return dict(self.rows)[name]

    def fits(self, device_bytes: int) -> bool:
        return self.total <= device_bytes

    def table(self, device_bytes: int | None = None) -> str:
        run = self.run
        title = (
            f"predicted memory per rank (GiB): {run.cfg.parallel.engine}, world {run.world}, {run.device}, "
            f"{str(run.compute_dtype).removeprefix('torch.')} compute, micro batch {run.micro_batch} x {run.seq_len}"
            + (", activation checkpointing" if run.checkpointing else "")
            + (", update in backward" if run.update_in_backward else "")
        )
        width = max(len(n) for n, _ in self.rows) + 2
        lines = [title]
        lines += [f"  {name:<{width}}{n / GiB:>9.3f}" for name, n in self.rows]
        lines += [f"  {'phase: ' + name:<{width}}{n / GiB:>9.3f}" for name, n in self.phases.items()]
        lines.append(f"  {'peak (' + self.peak_phase + ')':<{width}}{self.peak / GiB:>9.3f}")
        lines.append(f"  {'runtime (not tensors)':<{width}}{self.runtime / GiB:>9.3f}")
        lines.append(f"  {'total':<{width}}{self.total / GiB:>9.3f}")
        if device_bytes:
            verdict = "fits" if self.fits(device_bytes) else "does NOT fit"
            lines.append(
                f"{verdict} in {device_bytes / GiB:.1f} GiB ({(device_bytes - self.total) / GiB:+.2f} GiB headroom)"
            )
        return "\n".join(lines)


def _sharded_temporaries(raw: int, opt: OptimizerSim, world: int, matrix_elements: int) -> int:
    """A step's temporaries on one rank: the one-process bytes / world (elementwise and row-local work runs on
    row shards; whole matrices are computed once in the job, by their owners), plus for whole-matrix rules the
    all-to-all buffers of optim/sharded.py (this rank's rows out, its owned matrices in, in comm dtype)."""
    exchange = 2 * shard(matrix_elements * opt.comm_bytes, world) if world > 1 else 0
    return shard(raw, world) + exchange


def plan_memory(cfg: Config, world_size: int = 1, device: str = "cuda") -> MemoryPlan:
    """Predict one rank's memory for `cfg` (engine: cfg.parallel.engine) launched on `world_size` ranks of
    `device` ("cpu" | "cuda"). Raises ConfigError for what the trainer would refuse (update_in_backward's)."""
    return plan_run(resolve(cfg, world_size, device))


def plan_run(run: Run) -> MemoryPlan:
    """plan_memory for a config already resolved for its launch (the trainer's pre-flight check has one)."""
    meta = _meta_model(run.model)
    units = Units.of(meta)
    n_params = sum(p.numel() for p in meta.parameters())
    opt = simulate_optimizer(run.cfg, run.model, per_param=run.update_in_backward)
    if run.engine == "deepspeed":
        zero = ZeroStage(run.zero_stage)
        matrix = sum(nbytes for _, nbytes in opt.matrix_state)
        owned = opt.owned_state(run.world) if zero.flat_partitions else 0
        sizes = zero.sizes(n_params, run.compute_bytes, run.world, sum(opt.state.values()), matrix, owned)
        params, grads, state, grad_elem = (
            sizes.params,
            sizes.grads,
            sizes.optimizer_state,
            sizes.grad_bytes_per_element,
        )
        state_rows = [("optimizer state", state)]
        busiest = end = sizes.buffers
    else:
        # fp32 row shards of the weights and of the gradients (reduced in fp32)
        params = grads = shard(n_params * 4, run.world)
        state_rows = [(f"optimizer state: {k}", shard(v, run.world)) for k, v in opt.state.items()]
        state = sum(n for _, n in state_rows)
        busiest, end = fsdp2_extra(units, run)
        grad_elem = 4 / run.world
    temporaries = opt.temporaries
    if (
        run.device == "cuda" and not run.update_in_backward
    ):  # foreach AdamW: one sqrt buffer for all its params
        temporaries = max(temporaries, opt.adamw_param_bytes)
    matrix_elements = sum(p.numel() for p in meta.layers.parameters() if p.ndim == 2)
    optimizer_world = (
        1 if run.engine == "deepspeed" and run.zero_stage == 0 else run.world
    )  # ZeRO-0: whole copies
    temporaries = _sharded_temporaries(temporaries, opt, optimizer_world, matrix_elements)
    fb = simulate_forward_backward(run, run.checkpointing, grad_elem, run.update_in_backward)
    other = simulate_forward_backward(run, not run.checkpointing, grad_elem, run.update_in_backward)
    with_ac, without_ac = (fb, other) if run.checkpointing else (other, fb)
    if run.update_in_backward:
        # A unit's gradient buffer lives until its last parameter is updated; the root's (embedding, head) is
        # the largest and comes last, with the costliest single-parameter steps (AdamW on the embedding).
        grads = shard(units.root * 4, run.world)
        phases = {
            "backward with updates": params
            + state
            + max(fb.peak + busiest, fb.end + end + grads + temporaries)
        }
    else:
        phases = {
            "forward/backward": params + state + max(fb.peak + busiest, fb.end + end),
            "optimizer step": params + state + grads + temporaries,
        }
    plan = MemoryPlan(run, runtime=RUNTIME_BYTES[run.device], phases=phases)
    plan.rows = [
        ("parameters", params),
        ("gradients" + (" (largest unit, in backward)" if run.update_in_backward else ""), grads),
        *state_rows,
        ("activations without checkpointing", without_ac.activations),
        ("activations with checkpointing", with_ac.activations),
        ("forward/backward peak of activations, grads, temps", fb.peak),
        (f"{run.cfg.parallel.engine} buffers (in backward)", busiest),
        ("optimizer temporaries (NS buffers, copies)", temporaries),
    ]
    return plan
