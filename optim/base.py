"""Machinery shared by every matrix optimizer: param groups, the AdamW groups, state, updates, health.

A `MatrixOptimizer` holds two kinds of param groups. Groups with `algorithm="adamw"` (embedding, head, norm
gains) are stepped by torch's own functional AdamW, so they equal `torch.optim.AdamW` exactly (same state:
`step`, `exp_avg`, `exp_avg_sq`). Every other group holds 2-D matrices and is stepped by the subclass's rule,
which sees all of the step's matrices at once (`_matrix_step`) so that whole-matrix work is one call.

State tensors have the type of their parameter (a DTensor with the parameter's placements under FSDP2), so
torch.distributed.checkpoint saves and reshards them; the math runs in place on their local blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial, reduce
from typing import Any

import torch
from torch import Tensor
from torch.optim.adamw import adamw as functional_adamw

from optim.batches import Batch
from optim.health import NO_RECORD, HealthTracker, NoRecord, StepHealth, shard_groups
from optim.newton_schulz import newton_schulz5, ns5_flops
from optim.options import Option, check_arguments
from optim.routing import is_adamw_group
from optim.sharded import (
    OVERLAP_BUCKETS,
    CommClock,
    FlatLayout,
    FlatPartition,
    MatrixSlot,
    apply_to_whole_matrices,
    local,
    math_dtype,
    shard_info,
)

# torch.optim.AdamW's defaults, used for any key an algorithm="adamw" group does not give.
ADAMW_DEFAULTS: dict[str, Any] = {"lr": 1e-3, "betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2}
_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


def resolve_dtype(dtype: str | torch.dtype | None, name: str) -> torch.dtype | None:
    """'bfloat16' | 'float32' | 'float64' (or the torch dtype, or None) -> torch dtype, else ValueError."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in _DTYPES:
        return _DTYPES[dtype]
    raise ValueError(f"{name} must be one of {', '.join(_DTYPES)}; got {dtype!r}")


def guarded_ratio(num: Tensor | float, den: Tensor) -> Tensor:
    """num / den, and 0 where den == 0 (an all-zero gradient must give a zero update, never NaN)."""
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(den.dtype).tiny), 0.0)


def _on_device(state: Any, device: torch.device) -> Any:
    """`state` with every tensor moved to `device`, dtypes kept (a flat partition's state nests per matrix)."""
    if torch.is_tensor(state):
        return state.to(device=device)
    if isinstance(state, dict):
        return {k: _on_device(v, device) for k, v in state.items()}
    return state


def _tf32_on_cuda(fn: Callable[[Tensor], Tensor], batch: Tensor) -> Tensor:
    """fn(batch) with fp32 matmuls in TF32 when the batch is on CUDA (10-bit mantissa products, fp32 sums)."""
    if batch.device.type != "cuda":
        return fn(batch)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")
    try:
        return fn(batch)
    finally:
        torch.set_float32_matmul_precision(precision)


def step_params(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    """optimizer.step() on `params` only: each param group narrowed to them, with its current settings (lr
    included) and the optimizer's own state, so the result is the one a full step gives those params. Exact for
    any rule whose update of a parameter reads only that parameter's gradient and state (every rule here)."""
    wanted = {id(p) for p in params}
    groups = optimizer.param_groups
    narrowed = [{**g, "params": [p for p in g["params"] if id(p) in wanted]} for g in groups]
    optimizer.param_groups = [g for g in narrowed if g["params"]]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


def step_chunks(slots: list[MatrixSlot], max_bytes: int) -> list[list[MatrixSlot]]:
    """Consecutive runs of slots whose fp32 per-rank size adds up to at most `max_bytes` (a larger matrix is a
    chunk of its own). Sizes come from global shapes, so every rank cuts the same chunks (the whole-matrix
    collectives of a chunk must match across ranks)."""
    chunks: list[list[MatrixSlot]] = []
    size = 0
    for slot in slots:
        nbytes = 4 * slot.rows * slot.cols // max(slot.info.world, 1)
        if not chunks or size + nbytes > max_bytes:
            chunks.append([])
            size = 0
        chunks[-1].append(slot)
        size += nbytes
    return chunks


class MatrixOptimizer(torch.optim.Optimizer):
    """Base class: the subclass's matrix rule for 2-D params, AdamW for groups with algorithm="adamw".

    It keeps what does not depend on the rule: param groups, the AdamW groups, state, chunking and the update
    itself. Distribution is optim/sharded.py's (row shards, owner-computes, ZeRO's flat partitions), health
    optim/health.py's: steps taken inside `with optimizer.tracking_health() as health:` record their updates
    into it; nothing extra is computed otherwise.
    """

    algorithm: str = ""  # the matrix rule's name, stored in its param groups
    options: tuple[Option, ...] = ()  # what the rule takes, checked by its constructor and the config
    # None defaults that another option decides: argument -> (that option, {its value: the default})
    dependent_defaults: dict[str, tuple[str, dict[str, Any]]] = {}
    provenance: dict[str, str] = {}  # where each argument's default comes from (docs: optim/reference.py)
    reports_orthogonality: bool = False  # NS-based rules report orth_error
    # A step handles its matrices in chunks of at most this many fp32 bytes of (per-rank) row blocks, so the rule's
    # temporaries (normalized / whitened copies, Newton-Schulz inputs) exist for one chunk at a time instead of for
    # every matrix of the model at once. Each matrix's math is independent, so chunking changes no formula; within a
    # chunk the work is batched over same-shape matrices (optim/batches.py), and a stacked matrix product may sum in
    # another order than a smaller stack, so other chunks agree to rounding. The size trades memory
    # for kernel launches: llama_350m's 168 hidden matrices are 19 chunks here (58 batches) and SWAN's fp32 step at
    # batch 1 peaks at 3.53 GiB; at 256 MiB, 5 chunks (15 batches, a quarter of the launches) but 4.43 GiB.
    max_step_bytes: int = 64 * 2**20
    # Rounds of the owner exchange (optim.sharded.apply_to_whole_matrices): a round's transfers overlap the next
    # round's compute. Every number is the same whatever the count.
    overlap_buckets: int = OVERLAP_BUCKETS
    # TF32 for the whole-matrix iterations' fp32 matmuls on CUDA (optim.ns_tf32; no effect on CPU): SWAN's fp32
    # whitening on an H200 took 4.8 ms per llama_350m layer instead of 12.6, at the same orth_error (0.134)
    ns_tf32: bool = True

    @classmethod
    def check_arguments(cls, **values: Any) -> None:
        """ValueError (one line) for a constructor argument outside the rule's option declarations."""
        check_arguments(cls.__name__, cls.options, values)

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        self._tracker: HealthTracker | None = None  # set inside tracking_health()
        self._sampled: Tensor | None = (
            None  # orth_error and update spectrum: the first of the first matrix group
        )
        self._record: StepHealth | NoRecord = NO_RECORD  # where the running step's updates are recorded
        self._partitions: dict[int, FlatPartition] = {}  # id(ZeRO flat partition) -> how it is stepped
        self.comm_clock = CommClock()  # exposed communication of the owner exchange, taken by the engine
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        params = param_group["params"]
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)
        param_group.setdefault("algorithm", self.algorithm)
        if is_adamw_group(param_group):
            for key, value in ADAMW_DEFAULTS.items():
                param_group.setdefault(key, value)
        elif param_group["algorithm"] != self.algorithm:
            raise ValueError(
                f"{type(self).__name__}: param group algorithm must be 'adamw' or {self.algorithm!r}"
            )
        else:
            if self._sampled is None and param_group["params"]:
                self._sampled = param_group["params"][0]
            for p in param_group["params"]:
                if p.ndim == 1:
                    raise ValueError(
                        f"{type(self).__name__}: 1-D parameters never take the matrix path; put them in a "
                        f"param group with algorithm='adamw' (got shape {tuple(p.shape)})"
                    )
                if p.ndim != 2:
                    raise ValueError(
                        f"{type(self).__name__}: the matrix path takes 2-D parameters only, got {tuple(p.shape)}"
                    )
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        slots: list[MatrixSlot] = []
        flats: list[tuple[dict, Tensor]] = []
        for group in self.param_groups:
            if is_adamw_group(group):
                self._adamw_step(group)
                continue
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.ndim == 1:  # a flat partition (DeepSpeed ZeRO-1/2/3 replaced the group's matrices)
                    flats.append((group, p))
                else:
                    slots.append(MatrixSlot(p, group, self.state[p], shard_info(p), local(p), local(p.grad)))
        self._run_rule(slots, self._new_record(slots))
        for group, flat in flats:
            self._step_partition(group, flat)
        return loss

    def _run_rule(self, slots: list[MatrixSlot], record: StepHealth | NoRecord) -> None:
        """The rule on `slots`, a chunk at a time, every update recorded in `record` (the sampled matrix leads the
        first chunk, which reports its orth_error)."""
        self._record = record
        try:
            for chunk in step_chunks(slots, self.max_step_bytes):
                self._matrix_step(chunk)
        finally:
            self._record = NO_RECORD
        record.settle([slot.param for slot in slots])
        if self._tracker is not None and record is not NO_RECORD:
            self._tracker.add(record)

    def _new_record(self, slots: list[MatrixSlot]) -> StepHealth | NoRecord:
        """The record of a step over row-sharded (or whole) matrices: sums in the parameters' math dtype (fp32;
        float64 for float64 parameters, whose numbers are then exact to float64 rounding like their update)."""
        if self._tracker is None or not slots:
            return NO_RECORD
        dtype = reduce(torch.promote_types, (math_dtype(s.param) for s in slots))
        sums = torch.zeros(3, dtype=dtype, device=slots[0].weight.device)
        numel = sum(s.rows * s.cols for s in slots)
        groups = shard_groups([s.param for s in slots])
        return StepHealth(sums, numel, *groups, self.reports_orthogonality, self._sampled)

    def use_flat_partitions(self, layouts: dict[Tensor, FlatLayout]) -> None:
        """Step matrix groups whose params DeepSpeed ZeRO replaced by flat 1-D partitions: `layouts` maps each
        partition to the matrices it holds pieces of (optim.sharded.FlatPartition steps them). Without a layout a
        flat partition is refused (a matrix rule never runs on a flattened partition)."""
        self._partitions = {
            id(flat): FlatPartition(layout, self.owner_cost) for flat, layout in layouts.items()
        }

    def owner_cost(self, m: int, n: int) -> float:
        """What owners are balanced on for a ZeRO flat step, and what the memory planner and benchmarks ask: the
        rule's dominant FLOPs per (m, n) matrix, Newton-Schulz's for the rules that configure it, else the element
        count (row, column and norm math)."""
        steps = getattr(self, "ns_steps", None)
        return ns5_flops(m, n, steps) if steps is not None else float(m * n)

    def _step_partition(self, group: dict, flat: Tensor) -> None:
        """One ZeRO flat partition's matrices, owner-computes (optim.sharded.FlatPartition), the rule running on the
        whole matrices this rank owns."""
        if id(flat) not in self._partitions:
            raise RuntimeError(
                f"{type(self).__name__}: a param group holds a flat partition with no layout; a matrix rule never "
                f"runs on a flattened partition (DeepSpeed ZeRO: see trainer/engines/deepspeed.py)"
            )
        part = self._partitions[id(flat)]
        owned = self.state[flat].setdefault("owned", {})  # matrix index -> that matrix's state
        slots = part.gather(flat, group, owned, self._sampled, self.comm_clock)
        record: StepHealth | NoRecord = NO_RECORD
        if self._tracker is not None:
            index = part.index_of(self._sampled)
            here = slots[0][1].param if slots and slots[0][0] == index else None
            cols = part.layout.infos[index].shape[1] if index is not None else None
            record = StepHealth.of_partition(part.layout, flat, here, cols, self.reports_orthogonality)
        self._run_rule([slot for _, slot in slots], record)
        part.scatter(flat, group, slots, self.comm_clock)

    @contextmanager
    def tracking_health(self) -> Iterator[HealthTracker]:
        """Measure the steps taken inside the block (optim.health.track_health is the public entry point).

        update_rms: RMS over all matrix elements of lr * (the rule's scaled direction), decoupled weight decay
        excluded; update_weight_ratio: |update|_F / |W|_F over all matrices together, W before the update;
        orth_error (NS-based rules): |O O^T - I|_F / sqrt(p) of the first matrix of the first matrix group;
        update_spectral_norm, update_stable_rank: |U|_2 and |U|_F^2 / |U|_2^2 of that matrix's update U (its
        local rows are kept until report(), which computes them: optim.health.update_spectrum).
        """
        self._tracker = HealthTracker()
        try:
            yield self._tracker
        finally:
            self._tracker = None

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's load, except that matrix-rule state keeps its saved dtype (fp32): torch would cast it to
        the parameter's dtype (bf16 parameters would silently get bf16 state)."""
        params = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups, strict=False):
            if not is_adamw_group(group):
                params.update(zip(saved["params"], group["params"], strict=False))
        state = dict(state_dict["state"])
        kept = {pid: state.pop(pid) for pid in list(state) if pid in params}
        super().load_state_dict({**state_dict, "state": state})
        for pid, saved_state in kept.items():
            self.state[params[pid]] = _on_device(saved_state, params[pid].device)

    def _matrix_step(self, slots: list[MatrixSlot]) -> None:
        """Update every matrix of this step (the subclass's rule)."""
        raise NotImplementedError

    def _adamw_step(self, group: dict) -> None:
        """torch's functional AdamW on the local blocks (elementwise, so shard-local is exact)."""
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
                state["step"] = torch.tensor(0.0, dtype=scalar)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            params.append(local(p))
            grads.append(local(p.grad))
            exp_avgs.append(local(state["exp_avg"]))
            exp_avg_sqs.append(local(state["exp_avg_sq"]))
            steps.append(state["step"])
        if not params:
            return
        beta1, beta2 = group["betas"]
        functional_adamw(  # every argument by name: the signature is the same in torch 2.2 .. 2.13
            params=params,
            grads=grads,
            exp_avgs=exp_avgs,
            exp_avg_sqs=exp_avg_sqs,
            max_exp_avg_sqs=[],
            state_steps=steps,
            foreach=None,
            capturable=False,
            differentiable=False,
            fused=None,
            grad_scale=None,
            found_inf=None,
            has_complex=False,
            amsgrad=False,
            beta1=beta1,
            beta2=beta2,
            lr=group["lr"],
            weight_decay=group["weight_decay"],
            eps=group["eps"],
            maximize=False,
        )

    def _state(self, slot: MatrixSlot, key: str) -> Tensor:
        """Local block of a state tensor shaped (and placed) like the parameter, in its math dtype (fp32 for
        fp32 and bf16 parameters), created as zeros."""
        if key not in slot.state:
            slot.state[key] = torch.zeros_like(slot.param, dtype=math_dtype(slot.param))
        return local(slot.state[key])

    def _configure_newton_schulz(
        self,
        ns_steps: int,
        ns_dtype: str | torch.dtype,
        comm_dtype: str | torch.dtype | None,
        ns_coefficients: str = "keller",
        ns_form: str = "standard",
    ) -> None:
        """Optimizer-wide Newton-Schulz settings: steps, compute dtype, the dtype of row shards on the wire under
        FSDP2 (None = the compute dtype), NS5's polynomials (optim.newton_schulz.NS_COEFFICIENTS) and whether
        NS5 iterates on the Gram matrix where that is cheaper (NS_FORMS)."""
        self.ns_steps = ns_steps
        self.ns_dtype = resolve_dtype(ns_dtype, "ns_dtype")
        self.comm_dtype = resolve_dtype(comm_dtype, "comm_dtype") or self.ns_dtype
        self.ns_coefficients, self.ns_form = ns_coefficients, ns_form

    def _momentum_inputs(self, slots: list[MatrixSlot], nesterov: list[bool]) -> list[Tensor]:
        """M <- mu M + (1 - mu) G (state in the math dtype, local rows, mu = the group's momentum); the matrix
        function's input is (1 - mu) G + mu M with Nesterov (as in Muon), else M. One foreach call per param
        group and dtype (the shapes may differ)."""
        bufs = [self._state(slot, "momentum_buffer") for slot in slots]
        grads = [
            s.grad if s.grad.dtype == b.dtype else s.grad.to(b.dtype)
            for s, b in zip(slots, bufs, strict=True)
        ]
        inputs = list(bufs)
        runs: dict[tuple, list[int]] = {}
        for i, slot in enumerate(slots):
            runs.setdefault((id(slot.group), nesterov[i], bufs[i].dtype), []).append(i)
        for (_, use_nesterov, _), idx in runs.items():
            mu = slots[idx[0]].group["momentum"]
            torch._foreach_lerp_([bufs[i] for i in idx], [grads[i] for i in idx], 1 - mu)
            if use_nesterov:
                looked_ahead = torch._foreach_lerp([grads[i] for i in idx], [bufs[i] for i in idx], mu)
                for i, x in zip(idx, looked_ahead, strict=True):
                    inputs[i] = x
        return inputs

    def _apply_batch(self, batch: Batch, directions: Tensor | list[Tensor], scale: float | Tensor) -> None:
        """W <- W (1 - lr wd) - lr * scale * direction for every matrix of `batch`: one foreach call for the decay
        and one for the update. directions: stacked [k, rows, cols] or one per matrix; scale: a number (the
        matrices share their shape) or one per matrix ([k])."""
        lr, wd = batch.group["lr"], batch.group["weight_decay"]
        per_matrix = isinstance(scale, Tensor)
        for k, slot in enumerate(batch.slots):
            self._record.add_update(
                slot.param, slot.weight, directions[k], scale[k] if per_matrix else scale, lr
            )
        weights = [slot.weight for slot in batch.slots]
        if wd:
            torch._foreach_mul_(weights, 1 - lr * wd)
        if per_matrix:
            stacked = directions if isinstance(directions, Tensor) else torch.stack(directions)
            directions = stacked * scale.view(-1, *[1] * (stacked.ndim - 1))
            alpha = -lr
        else:
            alpha = -lr * scale
        if isinstance(directions, Tensor):
            directions = list(directions.to(weights[0].dtype).unbind(0))
        elif directions[0].dtype != weights[0].dtype:
            directions = [d.to(weights[0].dtype) for d in directions]
        torch._foreach_add_(weights, directions, alpha=alpha)

    def _on_whole_matrices(
        self,
        slots: list[MatrixSlot],
        inputs: list[Tensor],
        fn: Callable[..., Tensor] = newton_schulz5,
        cost: Callable[..., float] = ns5_flops,
    ) -> list[Tensor]:
        """fn(X, steps, dtype) on each slot's whole matrix with the optimizer's Newton-Schulz options (see
        _configure_newton_schulz), owner-computed under sharding; this rank's rows of each result."""
        options = {"coefficients": self.ns_coefficients, "form": self.ns_form} if fn is newton_schulz5 else {}
        whole = partial(fn, steps=self.ns_steps, dtype=self.ns_dtype, **options)
        return apply_to_whole_matrices(
            partial(_tf32_on_cuda, whole) if self.ns_tf32 else whole,
            inputs,
            [s.info for s in slots],
            comm_dtype=self.comm_dtype,
            probe=self._record.orthogonality_probe(slots[0].param),
            cost=partial(cost, steps=self.ns_steps),
            buckets=self.overlap_buckets,
            clock=self.comm_clock,
        )
