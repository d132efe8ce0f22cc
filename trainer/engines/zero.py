"""What one DeepSpeed ZeRO stage keeps where, as one object per stage: the engine asks it how to configure DeepSpeed
and read its state, the memory planner how much each rank holds, the benchmarks where a matrix's elements sit.

| stage | weights | gradients | fp32 masters and optimizer state | what the optimizer is handed |
| --- | --- | --- | --- | --- |
| 0 | whole, fp32 (bf16 through autocast) | whole | whole, no masters | the model's own weights |
| 1 | whole, compute dtype | whole until reduced | partitioned | one flat partition per param group |
| 2 | whole, compute dtype | partitioned | partitioned | one flat partition per param group |
| 3 | partitioned | partitioned | partitioned | one flat partition per sub-group |

Read from DeepSpeed 0.19.x (deepspeed/runtime/zero/stage_1_and_2.py, stage3.py): the attribute names below are
that version's bookkeeping, read in this file only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim import Optimizer

from optim import is_adamw_group
from optim.sharded import FlatLayout, concatenation_bounds

BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's default reduce / all-gather bucket sizes


@dataclass(frozen=True)
class ZeroSizes:
    """Bytes one rank holds under a stage (the planner's figures)."""

    params: int
    grads: int
    optimizer_state: int  # fp32 masters included, as the ZeRO paper counts them
    buffers: int  # reduce / all-gather buckets, or ZeRO-0's cached bf16 weight casts
    grad_bytes_per_element: float


def _shard(nbytes: int, world: int) -> int:
    return -(-nbytes // world)


@dataclass(frozen=True)
class ZeroStage:
    stage: int

    @property
    def flat_partitions(self) -> bool:
        """Whether the optimizer steps flat fp32 partitions (with fp32 master weights) instead of the weights."""
        return self.stage >= 1

    def config(
        self, micro: int, accumulation: int, world: int, grad_clip: float, bf16: bool
    ) -> dict[str, Any]:
        """The DeepSpeed config our run config implies (nothing else is set: DeepSpeed's defaults hold). bf16:
        ZeRO-0 keeps fp32 weights, which the matrix rules step whole, and computes through autocast."""
        return {
            "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": accumulation,
            "train_batch_size": micro * accumulation * world,
            "gradient_clipping": grad_clip,
            "zero_optimization": {"stage": self.stage},
            "zero_allow_untested_optimizer": True,  # ours and torch's AdamW are not on DeepSpeed's tested list
            "bf16": {"enabled": bf16 and self.flat_partitions},
            "torch_autocast": {"enabled": bf16 and not self.flat_partitions, "dtype": "bfloat16"},
            "steps_per_print": 2**31 - 1,  # progress is ours (trainer/metrics.py)
        }

    def layouts(self, zero: Any, optimizer: Optimizer) -> dict[Tensor, FlatLayout]:
        """The flat fp32 partitions ZeRO-1/2/3 hand the matrix-rule param groups, each with where its matrices'
        pieces sit, from DeepSpeed's own bookkeeping. ZeRO-1/2: a group's params concatenated (at
        round_robin_bit16_offsets) and cut into equal partitions (partition_size). ZeRO-3: each param cut into equal
        partitions of partition_numel() elements, a sub-group's partitions of this rank concatenated."""
        matrix_groups = {i for i, g in enumerate(optimizer.param_groups) if not is_adamw_group(g)}
        layouts = {}
        if self.stage in (1, 2):
            for i in sorted(matrix_groups):
                layouts[zero.single_partition_of_fp32_groups[i]] = FlatLayout.of_concatenation(
                    zero.round_robin_bit16_groups[i],
                    [meta.shape for meta in zero.round_robin_bit16_meta[i]],
                    zero.round_robin_bit16_offsets[i],
                    int(zero.partition_size[i]),
                    zero.real_dp_process_group[i] or dist.group.WORLD,
                )
        elif self.stage == 3:
            for k, params in enumerate(zero.fp16_groups):
                if zero.sub_group_to_group_id[k] in matrix_groups:
                    layouts[zero.fp32_partitioned_groups_flat[k]] = FlatLayout.of_partitioned_matrices(
                        params,
                        [p.ds_shape for p in params],
                        [p.partition_numel() for p in params],
                        zero.dp_process_group or dist.group.WORLD,
                    )
        return layouts

    def masters(self, zero: Any) -> list[Tensor]:
        """This rank's fp32 master partitions (what the optimizer steps), in DeepSpeed's order."""
        return list(
            zero.fp32_partitioned_groups_flat if self.stage == 3 else zero.single_partition_of_fp32_groups
        )

    def master_groups(self, zero: Any) -> list[int]:
        """The param group of each master partition (ZeRO-3 cuts groups into sub-groups)."""
        masters = self.masters(zero)
        if self.stage == 3:
            return [zero.sub_group_to_group_id[k] for k in range(len(masters))]
        return list(range(len(masters)))

    def grad_norm(self, zero: Any, model: nn.Module) -> Tensor | float:
        """The global L2 norm of the reduced, unclipped gradients, the one DeepSpeed's step clips with; -1 when
        DeepSpeed found it non-finite. ZeRO-3 exposes it only through `_get_norm_groups` (a private method of
        0.19.x's DeepSpeedZeroOptimizer_Stage3), called here and nowhere else."""
        if not self.flat_partitions:  # whole gradients on the parameters, already all-reduced
            return torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None])
        if self.stage in (1, 2):
            return zero.scaled_global_norm()
        from deepspeed.runtime.utils import combine_grad_norm_groups

        return combine_grad_norm_groups(zero._get_norm_groups())

    def concatenated_bounds(self, numels: list[int], world: int) -> list[tuple[int, ...]]:
        """ZeRO-1/2's element bounds of matrices laid end to end in one group and cut into `world` equal
        partitions (DeepSpeed's layout without its alignment padding): what a benchmark can derive without
        DeepSpeed. Rank r holds elements bounds[r]:bounds[r + 1] of each matrix."""
        if self.stage not in (1, 2):
            raise ValueError(f"ZeRO-{self.stage} does not concatenate a group's matrices")
        partition = -(-sum(numels) // world)
        starts = [sum(numels[:k]) for k in range(len(numels))]
        return [
            concatenation_bounds(n, start, partition, world) for n, start in zip(numels, starts, strict=True)
        ]

    def sizes(
        self, n_params: int, compute_bytes: int, world: int, state: int, matrix_state: int, owned_state: int
    ) -> ZeroSizes:
        """Bytes per rank: n_params model parameters at compute_bytes per element in forward/backward; `state` the
        whole model's optimizer state of which `matrix_state` is the matrix rules' (living on the owner of its
        matrix: `owned_state` is the busiest rank's share). ZeRO-1/2/3 keep fp32 master partitions even when the
        weights are fp32 (trainer.memory measures them), gradients in the compute dtype, buckets of up to 5e8
        elements; ZeRO-0 everything whole and fp32, with cached bf16 weight casts under autocast."""
        if not self.flat_partitions:
            cast = n_params * 2 if compute_bytes == 2 else 0
            return ZeroSizes(n_params * 4, n_params * 4, state, cast, 4)
        c = compute_bytes
        params = _shard(n_params * c, world) if self.stage == 3 else n_params * c
        grads = n_params * c if self.stage == 1 else _shard(n_params * c, world)
        partitioned = _shard(state - matrix_state + n_params * 4, world) + owned_state
        bucket = min(BUCKET_ELEMENTS, n_params) * c
        return ZeroSizes(params, grads, partitioned, bucket, grads / n_params)
