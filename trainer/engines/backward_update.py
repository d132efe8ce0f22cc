"""Update in backward (optim.update_in_backward): each parameter is updated as soon as its gradient is complete,
and the gradient is dropped at once.

Why: with a stateless rule (SWAN, SinkGD) gradients are the largest thing left after the parameters; stepping
each one inside the backward pass keeps only a few layers' gradients alive, so the peak is about parameters +
activations (+ the AdamW state of the embedding, head and norms) instead of parameters + all gradients.

How: a post-accumulate-grad hook per parameter calls the optimizer's own `step()` restricted to that parameter
(`optim.step_params`: its param_groups narrowed to it, same settings, same state), so the optimizer math is the
optimizer's, not a copy. Exact for any rule whose update of a parameter reads only that parameter's gradient
and state, which is every optimizer in optim/. Under FSDP2 the hook fires on the sharded parameter right after
its gradient is reduce-scattered (torch calls post-accumulate-grad hooks of sharded parameters there), so
whole-matrix rules see the same row shards as in a normal step; a torch that does not is detected after the
first backward and refused. The price under FSDP2 at world size > 1: a whole-matrix rule's owner-computes
layer (optim/sharded.py) gets one matrix per call, so its Newton-Schulz work is not spread over the ranks.

Refused by trainer/resolve.py, because the update would no longer be the normal path's: gradient accumulation
(the update would use a partial gradient), global gradient clipping (needs every gradient before any update),
and on_nonfinite=skip (a bad gradient is applied before it can be seen; with `stop` the run stops unsaved).
Health: each per-parameter step adds its sums to the health block the loop opened around the step
(optim.health.track_health), so both paths report the same numbers.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from optim import step_params
from optim.sharded import all_reduce_sum, local, shard_info
from trainer.engines.fsdp2 import FSDP2Engine


class BackwardUpdateEngine(FSDP2Engine):
    """FSDP2Engine whose backward applies the updates: step() has nothing left to do."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, async_save: bool = False):
        super().__init__(model, optimizer, max_norm=0.0, async_save=async_save)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._group = shard_info(self._params[0]).group  # gradients are sharded over it (None: not sharded)
        # fp32 for bf16 and fp32 gradients (as the normal step's norm), float64 for a float64 model
        self._norm_dtype = torch.promote_types(self._params[0].dtype, torch.float32)
        self._grad_sq = torch.zeros((), dtype=self._norm_dtype, device=local(self._params[0]).device)
        for p in self._params:
            p.register_post_accumulate_grad_hook(self._update)

    def _update(self, p: Tensor) -> None:
        """The hook: note the raw gradient's norm, update p with the optimizer's rule, drop the gradient."""
        self._grad_sq += torch.linalg.vector_norm(local(p.grad), dtype=self._norm_dtype).square()
        step_params(self.optimizer, [p])
        p.grad = None

    def forward_backward(self, micro_batches: list[Tensor]) -> Tensor:
        """Forward and backward of the single micro-batch; every parameter is updated by the time it returns."""
        self._grad_sq.zero_()
        loss = super().forward_backward(micro_batches)
        if any(p.grad is not None for p in self.model.parameters()):
            raise RuntimeError(
                "optim.update_in_backward: some gradients were not consumed by their post-accumulate-grad "
                f"hook; this torch ({torch.__version__}) does not call them for FSDP2-sharded parameters"
            )
        return loss

    def grad_norm(self) -> Tensor:
        """Global L2 norm of the step's raw gradients, summed while they were alive."""
        return all_reduce_sum(self._grad_sq.clone(), self._group).sqrt()

    def step(self) -> float:
        """Nothing left to do: every update was applied during backward (their exposed communication with it)."""
        return self.optimizer.comm_clock.take()

    def skip(self) -> None:
        raise RuntimeError("optim.update_in_backward cannot skip a step: its updates are already applied")
