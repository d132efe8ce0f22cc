"""Update in backward (optim.update_in_backward): each parameter is updated as soon as its gradient is complete,
and the gradient is dropped at once.

Why: with a stateless rule (SWAN, SinkGD) gradients are the largest thing left after the parameters; stepping
each one inside the backward pass keeps only a few layers' gradients alive, so the peak is about parameters +
activations (+ the AdamW state of the embedding, head and norms) instead of parameters + all gradients.

How: a post-accumulate-grad hook per parameter calls the optimizer's own `step()` restricted to that parameter
(`step_params`: its param_groups narrowed to it, same settings, same state), so the optimizer math is the
optimizer's, not a copy. Exact for any rule whose update of a parameter reads only that parameter's gradient
and state, which is every optimizer in optim/. Under FSDP2 the hook fires on the sharded parameter right after
its gradient is reduce-scattered (torch calls post-accumulate-grad hooks of sharded parameters there), so
whole-matrix rules see the same row shards as in a normal step; a torch that does not is detected after the
first backward and refused. The price under FSDP2 at world size > 1: a whole-matrix rule's owner-computes
layer (optim/sharded.py) gets one matrix per call, so its Newton-Schulz work is not spread over the ranks.

Refused (ConfigError), because the update would no longer be the normal path's: gradient accumulation (the
update would use a partial gradient), global gradient clipping (needs every gradient before any update), and
on_nonfinite=skip (a bad gradient is applied before it can be seen; with `stop` the run stops unsaved).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from optim.health import StepHealth, summarize
from optim.sharded import all_reduce_sum, local, shard_info
from trainer.config import Config, ConfigError
from trainer.engine import FSDP2Engine


def check_update_in_backward(cfg: Config, accumulation: int) -> None:
    """ConfigError naming the setting that cannot work with optim.update_in_backward."""
    if cfg.parallel.engine != "fsdp2":
        raise ConfigError("optim.update_in_backward is implemented for parallel.engine=fsdp2 only")
    if accumulation > 1:
        raise ConfigError(
            f"optim.update_in_backward needs one micro-batch per step (an update needs the step's whole "
            f"gradient, which accumulation builds over {accumulation} backward passes): set "
            f"train.micro_batch_size to train.global_batch_size / world size"
        )
    if cfg.train.grad_clip > 0:
        raise ConfigError(
            "optim.update_in_backward cannot clip by the global gradient norm (it needs every gradient before "
            "the first update); set train.grad_clip=0"
        )
    if cfg.train.on_nonfinite == "skip":
        raise ConfigError(
            "optim.update_in_backward cannot skip a step with a non-finite gradient (its updates are applied "
            "during backward); set train.on_nonfinite=stop"
        )


def step_params(optimizer: torch.optim.Optimizer, params: Sequence[Tensor]) -> None:
    """optimizer.step() on `params` only: each param group narrowed to them, with its current settings (lr
    included) and the optimizer's own state, so the result is the one a full step gives those params."""
    wanted = {id(p) for p in params}
    groups = optimizer.param_groups
    narrowed = [{**g, "params": [p for p in g["params"] if id(p) in wanted]} for g in groups]
    optimizer.param_groups = [g for g in narrowed if g["params"]]
    try:
        optimizer.step()
    finally:
        optimizer.param_groups = groups


class BackwardUpdateEngine(FSDP2Engine):
    """FSDP2Engine whose backward applies the updates: step() has nothing left to do."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, cfg: Config, accumulation: int):
        check_update_in_backward(cfg, accumulation)
        super().__init__(model, optimizer)
        self._params = [p for p in model.parameters() if p.requires_grad]
        self._group = shard_info(self._params[0]).group  # gradients are sharded over it (None: not sharded)
        self._grad_sq = torch.zeros((), device=local(self._params[0]).device)
        self._health: StepHealth | None = None
        # The matrix a normal step probes for orth_error: the first of the first matrix-rule param group.
        matrix_groups = [
            g["params"] for g in optimizer.param_groups if g.get("algorithm", "adamw") != "adamw"
        ]
        self._probed = matrix_groups[0][0] if matrix_groups else None
        for p in self._params:
            p.register_post_accumulate_grad_hook(self._update)

    def _update(self, p: Tensor) -> None:
        """The hook: note the raw gradient's norm, update p with the optimizer's rule, drop the gradient."""
        self._grad_sq += torch.linalg.vector_norm(local(p.grad), dtype=torch.float32).square()
        step_params(self.optimizer, [p])
        self._merge_health(p, getattr(self.optimizer, "_health", None))
        p.grad = None

    def _merge_health(self, p: Tensor, health: StepHealth | None) -> None:
        """Add one parameter's health sums (update and weight squares) to the step's; orth_error is the one of
        the matrix a normal step probes, so both paths report the same numbers. `health` is the optimizer's
        record of its last step (`_health` of optim/base.py)."""
        if health is None:
            return
        if self._health is None:
            self._health = dataclasses.replace(health, sums=torch.zeros_like(health.sums), numel=0)
        self._health.sums[:2] += health.sums[:2]
        self._health.numel += health.numel
        if p is self._probed:
            self._health.sums[2] = health.sums[2]

    def forward_backward(self, micro_batches: list[Tensor]) -> Tensor:
        """Forward and backward of the single micro-batch; every parameter is updated by the time it returns."""
        self._grad_sq.zero_()
        self._health = None
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

    def step(self, grad_norm: Tensor, max_norm: float) -> None:
        """Nothing left to do: every update was applied during backward."""

    def skip(self) -> None:
        raise RuntimeError("optim.update_in_backward cannot skip a step: its updates are already applied")

    def health(self) -> dict[str, float]:
        """The step's update statistics, summed over its per-parameter steps (collective under sharding)."""
        if not hasattr(self.optimizer, "reports_orthogonality"):  # torch's AdamW: recomputed from its state
            return super().health()
        return summarize(self._health, self.optimizer.reports_orthogonality) if self._health else {}
