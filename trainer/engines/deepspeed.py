"""The DeepSpeed engine: the same optimizer step as the FSDP2 engine, with ZeRO stages 0-3 underneath.

The loop talks to both engines through one protocol (trainer/engines/__init__.py), so the loop, the lr
schedule, metrics and checkpoints stay one copy. How our config maps onto DeepSpeed's:
- micro batch and accumulation -> train_micro_batch_size_per_gpu / gradient_accumulation_steps. The boundary is set
  explicitly per micro-batch, so gradients are reduced once per step and DeepSpeed divides each micro-batch loss
  by the accumulation count, exactly what FSDP2Engine does by hand.
- train.grad_clip -> gradient_clipping: DeepSpeed clips the raw, reduced gradients by their global norm (the norm
  grad_norm() returns) with torch's formula.
- the lr schedule stays ours: train.py writes every param group's lr before each step; DeepSpeed's partitioned
  optimizers step those same group dicts.
- bf16 (mixed_precision auto on GPU, or bf16): ZeRO-0 uses torch autocast, so weights stay fp32 and whole, which
  the matrix optimizers need; ZeRO-1/2/3 use DeepSpeed's bf16 weights with fp32 master partitions.

Optimizers: every optimizer at every stage. At ZeRO-0 the matrix optimizers step the model's own 2-D weights. At
ZeRO-1/2/3 DeepSpeed replaces each param group's params by one flat 1-D fp32 partition per rank that cuts across
matrices (ZeRO-3: one per sub-group, stepped one at a time); `ZeroStage.layouts` (engines/zero.py) reads from DeepSpeed's own bookkeeping
where each matrix's pieces sit in those partitions, and the optimizer steps them owner-computes
(`MatrixOptimizer.use_flat_partitions`, optim/base.py): whole matrices, each on one rank, the same rule code as
FSDP2's. This is DeepSpeed's optimizer-wrapping contract (`deepspeed.initialize(optimizer=...)`: ZeRO hands the
wrapped optimizer its partitions and calls its `step()`), with no patch of DeepSpeed itself.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.optim import Optimizer

from models import causal_lm_loss
from optim import is_adamw_group, route_parameters
from optim.health import HealthReport, adamw_update_sums, health_numbers, track_health
from optim.sharded import FlatLayout
from trainer.checkpoint import saved_config
from trainer.config import ConfigError
from trainer.engines.zero import ZeroStage
from trainer.memory.tensors import TrainingTensors, group_labels, state_tensors

TAG = "deepspeed"  # DeepSpeed's save_checkpoint(dir, tag) writes into dir/tag; the tag is fixed, dir is the step's


def check_whole_matrices(
    optimizer: Optimizer, model: nn.Module, layouts: dict[torch.Tensor, FlatLayout]
) -> None:
    """Refuse to train unless every matrix-rule param is the model's own 2-D weight (ZeRO-0) or, at ZeRO-1/2/3,
    each of the model's matrices sits in exactly one laid-out flat partition: no stage may fall back to another
    rule, or step a matrix twice or never."""
    own = {id(p) for p in model.parameters()}
    laid_out = [id(p) for layout in layouts.values() for p in layout.params]
    for group in optimizer.param_groups:
        if is_adamw_group(group):
            continue
        for p in group["params"]:
            if p.ndim == 2 and id(p) in own or p.ndim == 1 and any(p is flat for flat in layouts):
                continue
            raise ConfigError(
                f"DeepSpeed handed {type(optimizer).__name__} a tensor of shape {tuple(p.shape)} that is neither one "
                f"of the model's 2-D weights nor a flat partition with a layout; a matrix rule never runs on it"
            )
    if layouts and (
        len(laid_out) != len(set(laid_out)) or set(laid_out) != {id(p) for p in route_parameters(model)[0]}
    ):
        raise ConfigError(
            "DeepSpeed's partitions of the matrix-rule groups do not hold each of the model's hidden matrices once"
        )


class DeepSpeedEngine:
    """A plain (unsharded) model and its optimizer, handed to deepspeed.initialize."""

    def __init__(
        self,
        model: nn.Module,
        optimizer: Optimizer,
        *,
        zero_stage: int,
        micro_batch: int,
        accumulation: int,
        world_size: int,
        max_norm: float,
        bf16: bool,
    ):
        try:
            import deepspeed
            from deepspeed.utils import logger as ds_logger
        except ImportError:
            raise ConfigError(
                "parallel.engine=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'"
            ) from None

        ds_logger.setLevel(logging.WARNING)
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            raise ConfigError(
                "the model was built under deepspeed.zero.Init (partitioned parameters); build it whole and let "
                "deepspeed.initialize partition it (every rank holds the whole model only until then)"
            )
        self.device = next(model.parameters()).device
        self.zero = ZeroStage(zero_stage)
        self.numel = sum(p.numel() for p in model.parameters())  # before ZeRO-3 partitions them
        config = self.zero.config(micro_batch, accumulation, world_size, max_norm, bf16)
        # a matrix rule steps flat partitions owner-computes; plain AdamW's partitions are DeepSpeed's own business
        self.partitioned_adamw = self.zero.flat_partitions and all(
            map(is_adamw_group, optimizer.param_groups)
        )
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
        layouts = {}
        if self.zero.flat_partitions and not self.partitioned_adamw:
            layouts = self.zero.layouts(self.engine.optimizer, optimizer)
            optimizer.use_flat_partitions(layouts)
        check_whole_matrices(optimizer, model, layouts)
        self.model = model
        self.optimizer = optimizer
        self.labels = group_labels(optimizer)  # ZeRO narrows param_groups to the one it steps, so fixed here

    def forward_backward(self, micro_batches: list[torch.Tensor]) -> torch.Tensor:
        """Accumulate gradients over the micro-batches (reduced at the last); return this rank's mean loss."""
        total = torch.zeros((), device=micro_batches[0].device)
        for index, micro in enumerate(micro_batches):
            self.engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            loss = causal_lm_loss(self.engine, micro)
            self.engine.backward(loss)  # DeepSpeed divides by gradient_accumulation_steps
            total += loss.detach() / len(micro_batches)
        return total

    def grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the reduced, unclipped gradients: the one DeepSpeed's step clips with."""
        norm = self.zero.grad_norm(self.engine.optimizer, self.model)
        norm = torch.as_tensor(norm, dtype=torch.float32, device=self.device)
        return torch.where(norm < 0, math.nan, norm)  # DeepSpeed reports a non-finite norm as -1

    def step(self) -> float:
        """DeepSpeed's step: clip (gradient_clipping = train.grad_clip, set at start-up), update, drop grads; the
        owner exchange's exposed communication."""
        self.engine.step()
        return self.optimizer.comm_clock.take()

    def skip(self) -> None:
        """Drop this step's gradients without updating anything."""
        if not self.zero.flat_partitions:
            self.engine.zero_grad()
            return
        # At ZeRO-1..3 the gradients live in DeepSpeed's partitions; its step discards non-finite ones itself.
        self.engine.step()
        if self.engine.was_step_applied():
            raise RuntimeError("DeepSpeed applied a step the trainer skipped: its gradients were finite")

    @contextmanager
    def health(self, enabled: bool) -> Iterator[HealthReport]:
        """The optim/ numbers FSDP2 logs. ZeRO-0: the optimizer's own (whole tensors). ZeRO-1..3: AdamW's last
        update recomputed from its state over this rank's flat partitions (their padding is zero: no update, no
        weight), then summed over ranks: exact, as under FSDP2. report() is collective."""
        if self.partitioned_adamw and enabled:
            partitions = self.zero.masters(self.engine.optimizer)
            groups = self.zero.master_groups(self.engine.optimizer)
            yield PartitionedAdamWHealth(
                self.optimizer, self.numel, self.device, list(zip(partitions, groups, strict=True))
            )
        else:
            with track_health(self.optimizer, enabled) as report:
                yield report

    def training_tensors(self) -> TrainingTensors:
        """What the memory tracker counts. ZeRO-0: the model's and optimizer's own tensors, as under FSDP2.
        ZeRO-1..3: the model's weights as this rank holds them (ZeRO-3: its partitions in `ds_tensor`, beside
        any parameter gathered now; DeepSpeed keeps small ones gathered), the fp32 master partitions the
        optimizer steps (optimizer state, as the ZeRO paper counts them) and, while they exist, their gradients.
        The optimizer state is read through the master partitions (ZeRO-3 empties the param groups between steps)."""
        if not self.zero.flat_partitions:
            return TrainingTensors.of(self.model, self.optimizer)
        masters = self.zero.masters(self.engine.optimizer)
        weights = list(self.model.parameters())
        partitions = [p.ds_tensor for p in weights if getattr(p, "ds_tensor", None) is not None]
        return TrainingTensors(
            params=weights + partitions,
            grads=[p.grad for p in weights] + [m.grad for m in masters],
            optimizer_state={**self._state_by_group(masters), "master_weights": masters},
        )

    def _state_by_group(self, masters: list[torch.Tensor]) -> dict[str, list[torch.Tensor]]:
        """Optimizer state per param group label, read through the master partitions it is keyed by (ZeRO-3 empties
        the param groups between steps)."""
        state: dict[str, list[torch.Tensor]] = {label: [] for label in self.labels}
        for group, master in zip(self.zero.master_groups(self.engine.optimizer), masters, strict=True):
            state[self.labels[group]] += state_tensors([self.optimizer.state.get(master, {})])
        return state

    def save(self, path: Path) -> Future | None:
        """Every rank writes its own ZeRO partitions (DeepSpeed's format) into path/deepspeed/; synchronous."""
        self.engine.save_checkpoint(str(path), tag=TAG, save_latest=False)
        return None

    def load(self, path: Path) -> None:
        """DeepSpeed's load of path/deepspeed/: needs the ZeRO stage and world size of the run that saved it."""
        saved = saved_config(path).parallel
        if not (path / TAG).is_dir():
            raise FileNotFoundError(f"no {TAG}/ directory: saved by parallel.engine={saved.engine}")
        if saved.zero_stage != self.zero.stage:
            raise ValueError(f"saved at ZeRO-{saved.zero_stage}, this run is ZeRO-{self.zero.stage}")
        self.engine.load_checkpoint(
            str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The whole fp32 weights of a DeepSpeed checkpoint (path/deepspeed/) on CPU, in one process: at ZeRO-1/2/3
    the fp32 master partitions merged by DeepSpeed's own reader (deepspeed.utils.zero_to_fp32), at ZeRO-0 the
    module's weights. Both unpickle DeepSpeed's files, so read only checkpoints of your own runs."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if saved_config(path).parallel.zero_stage == 0:
        return torch.load(path / TAG / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)[
            "module"
        ]
    return dict(get_fp32_state_dict_from_zero_checkpoint(str(path), tag=TAG))


class PartitionedAdamWHealth:
    """AdamW's numbers over DeepSpeed's flat ZeRO partitions (see DeepSpeedEngine.health). No
    update_spectral_norm / update_stable_rank: a flat partition cuts across matrices, so no rank holds rows of a
    sampled matrix to iterate on, and gathering one would cost a collective of a whole matrix per logging step."""

    def __init__(
        self,
        optimizer: Optimizer,
        numel: int,
        device: torch.device,
        partitions: list[tuple[torch.Tensor, int]],
    ):
        """partitions: this rank's master partitions with the param group of each (ZeRO.master_groups)."""
        self.optimizer, self.numel, self.device, self.partitions = optimizer, numel, device, partitions

    def report(self) -> dict[str, float]:
        groups, state = self.optimizer.param_groups, self.optimizer.state
        # ZeRO-1/2's groups hold this rank's partitions; ZeRO-3 empties them between steps, so each partition is
        # taken with its group's hyperparameters (lr, weight decay: optim.adamw_lr's two groups differ) from the map
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        for master, group in self.partitions:
            if master in state:
                sums += adamw_update_sums([(master, state[master])], groups[group], self.device)
        dist.all_reduce(sums)
        return health_numbers(*sums.tolist(), self.numel)
