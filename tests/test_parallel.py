"""FSDP2 over gloo: the same seed and global batch give the same losses at world sizes 1, 2 and 4.

Tolerance. These are fp32 training runs (the trainer has no float64 mode: its norms, RoPE and loss are fp32 by
design) whose layouts sum in other orders (shards, micro-batches, fused kernels), and training amplifies a rounding
difference step after step, by an amount no fixed tolerance knows. So the same test measures it: the reference
again, with its weights one ulp off at the start and its gradients and weights one ulp off at every step
(`one_ulp_off`: a rounding per element and step, as another reduction order makes them). The run under test may
differ from the reference by at most SENSITIVITY times (what that moved + one ulp of the number itself, EPS32: a
logged fp32 number is rounded once, so two runs a rounding apart can differ by an ulp where the ulp-off run happens
not to), comparing the largest relative differences over the steps (`assert_within_sensitivity`). The perturbation
is one ulp per element, while a reordered sum of n terms can move by up to log2(n) ulps (n <= 512 in these models'
widest sums): SENSITIVITY = 8. The layouts and engines compared here stay within 3.1 times the spread (NorMuon at
ZeRO-3 the farthest, at 1 and 2 threads alike); a real bug (a gradient averaged over the wrong ranks, a lost
micro-batch, a step applied twice) moves losses, norms and update sizes by 1e-3 or more (BUG), where these bounds
are 1e-6 .. 4e-5.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged, train_in_process

SENSITIVITY = 8  # log2 of the longest sum (see the module docstring)
EPS32 = torch.finfo(torch.float32).eps  # 1.2e-7, one ulp of an fp32 number relative to it (at most)
BUG = 1e-3  # the smallest relative change of a loss, norm or update size that a real bug makes (module docstring)


def _nudge(tensors: Iterator[torch.Tensor], gen: torch.Generator) -> None:
    """Move every element of `tensors` (this rank's shard of each) by one ulp, up or down by a random sign."""
    with torch.no_grad():
        for t in tensors:
            block = t.to_local() if hasattr(t, "to_local") else t
            up = torch.rand(block.shape, generator=gen) < 0.5
            block.copy_(torch.where(up, torch.nextafter(block, block + 1), torch.nextafter(block, block - 1)))


def nudge_one_ulp(model: nn.Module, generator: torch.Generator | None = None) -> None:
    """Move every weight of `model` (this rank's shard of it) by one ulp, up or down by a random sign drawn from
    `generator` (None: a fixed one)."""
    _nudge(model.parameters(), generator or torch.Generator().manual_seed(1))


@contextmanager
def one_ulp_off() -> Iterator[None]:
    """Within: every run the trainer starts (in this process) has its weights moved by one ulp (`nudge_one_ulp`)
    once its model is built and restored, and at every step its gradients before the step and its weights after
    it (new random signs each time): the reference's own sensitivity to roundings, one per element and step where
    another reduction order makes them."""
    import trainer.train

    real = trainer.train.restore

    def restore(run, engine, state, dist_info):
        restored = real(run, engine, state, dist_info)
        generator = torch.Generator().manual_seed(1)
        nudge_one_ulp(engine.model, generator)
        step = engine.step

        def step_then_nudge() -> float:
            _nudge((p.grad for p in engine.model.parameters() if p.grad is not None), generator)
            exposed = step()
            nudge_one_ulp(engine.model, generator)
            return exposed

        engine.step = step_then_nudge
        return restored

    trainer.train.restore = restore
    try:
        yield
    finally:
        trainer.train.restore = real


def train_runs(runs: Sequence[tuple[str, list[str], bool]]) -> None:
    """Entry point for run_distributed: each (config, overrides, one ulp off) trained in turn, in this process
    group (one spawn for several runs)."""
    for config, overrides, off in runs:
        with one_ulp_off() if off else nullcontext():
            train_in_process(config, overrides)


def _relative(a: float, b: float) -> float:
    return abs(a - b) / abs(b) if b else abs(a)


def assert_within_sensitivity(
    got: Sequence[float],
    reference: Sequence[float],
    one_ulp: Sequence[float],
    label: str = "",
    bug: float = BUG,
) -> None:
    """`got` (a per-step series of another run) is within SENSITIVITY times (the reference's own sensitivity +
    EPS32): largest relative differences over the steps, the sensitivity that of the reference's run one ulp off.
    `bug`: the smallest relative difference a real bug makes in these numbers; the bound must stay below it (else
    the comparison could no longer fail)."""
    assert len(got) == len(reference) == len(one_ulp), label
    spread = max(_relative(o, r) for o, r in zip(one_ulp, reference, strict=True))
    difference = max(_relative(g, r) for g, r in zip(got, reference, strict=True))
    bound = SENSITIVITY * (spread + EPS32)
    assert bound < bug, f"{label}: one ulp moved the reference by {spread:.1e}, too far to tell a bug"
    assert math.isfinite(difference) and difference <= bound, (
        f"{label}: {difference:.1e} from the reference, which one ulp moves by {spread:.1e}"
    )


def _overrides(root: Path, name: str, *extra: str) -> list[str]:
    return [*FAST, f"--train.runs_dir={root}", f"--train.run_name={name}", *extra]


@pytest.mark.slow
def test_world_sizes_1_2_4_give_the_same_adamw_losses(tmp_path) -> None:
    config = "tiny_adamw.yaml"
    runs = [(config, _overrides(tmp_path, "ws1"), False), (config, _overrides(tmp_path, "ws1_off"), True)]
    run_distributed(train_runs, 1, runs)
    for world_size in (2, 4):
        run_distributed(train_runs, world_size, [(config, _overrides(tmp_path, f"ws{world_size}"), False)])
    reference = logged(tmp_path / "ws1")
    assert len(reference) == 5 and reference[-1] < reference[0]
    for key in ("loss", "grad_norm"):  # the global grad norm (what clipping uses) too
        for world_size in (2, 4):
            assert_within_sensitivity(
                logged(tmp_path / f"ws{world_size}", key),
                logged(tmp_path / "ws1", key),
                logged(tmp_path / "ws1_off", key),
                f"world size {world_size} {key}",
            )


@pytest.mark.slow
def test_accumulation_and_activation_checkpointing_do_not_change_losses(tmp_path) -> None:
    # global 8 = micro 2 x accumulation 2 x world 2, against micro 4 x accumulation 1 x world 2, with recomputation.
    config = "tiny_adamw.yaml"
    plain = ["--train.micro_batch_size=4"]
    runs = [
        (config, _overrides(tmp_path, "plain", *plain), False),
        (config, _overrides(tmp_path, "plain_off", *plain), True),
        (config, _overrides(tmp_path, "checkpointed", "--parallel.activation_checkpointing=true"), False),
    ]
    run_distributed(train_runs, 2, runs)
    assert_within_sensitivity(
        logged(tmp_path / "checkpointed"), logged(tmp_path / "plain"), logged(tmp_path / "plain_off")
    )


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_ones(tmp_path) -> None:
    # torch.compile (inductor, CPU here) fuses kernels, so the agreement is to float rounding, not bitwise.
    config, steps = "tiny_adamw.yaml", "--train.steps=3"
    runs = [
        (config, _overrides(tmp_path, "eager", steps), False),
        (config, _overrides(tmp_path, "eager_off", steps), True),
        (config, _overrides(tmp_path, "compiled", steps, "--parallel.compile=true"), False),
    ]
    run_distributed(train_runs, 1, runs)
    assert_within_sensitivity(
        logged(tmp_path / "compiled"), logged(tmp_path / "eager"), logged(tmp_path / "eager_off")
    )
