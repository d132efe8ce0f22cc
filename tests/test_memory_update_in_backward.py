"""optim.update_in_backward: the same weights, losses, gradient norms and health numbers as the normal step, for a
plain model and for the trainer under FSDP2 (world sizes 1 and 2); refusals where it cannot be the same."""

from __future__ import annotations

from contextlib import nullcontext

import pytest
import torch
from torch import nn

from optim import OPTIMIZERS, build_optimizer, step_params
from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged, train_in_process
from tests.test_parallel import EPS32, SENSITIVITY, assert_within_sensitivity, one_ulp_off
from trainer.config import ConfigError, load_config
from trainer.engines.backward_update import BackwardUpdateEngine
from trainer.engines.fsdp2 import FSDP2Engine
from trainer.resolve import build_model, resolve

SHAPE = ["--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.seq_len=32"]
# Why the two paths agree to rounding and not to the bit: the normal step runs each rule on stacks of same-shape
# matrices (one batched matrix product per shape), update_in_backward on one matrix at a time, and a batched kernel
# may sum a product in another order than a one-matrix call (its work split across threads or blocked otherwise).
# The grad norm: update_in_backward adds each parameter's squared norm as its gradient arrives (backward order),
# the normal step takes the norm of the 21 per-parameter norms at once: 21 positive terms summed in another order.
# Health: the 14 hidden matrices' update and weight sums are added one parameter at a time in backward order.
# The plain-model test runs in float64 (model, state, Newton-Schulz), where all of this is rounding at 1.1e-16
# amplified by three steps of at most ten Newton-Schulz-type iterations (coefficients below 5) and a 21-term sum:
# far less than 1e4 times, so 1e-12 relative (to the largest weight, or to each number) on any CPU, while a skipped
# or doubled update moves the weights by lr x O(1).
REL64 = 1e-12
# The trainer test runs in fp32 through the real loop, so it is held to the normal run's own sensitivity instead
# (a twin run with one rounding moved per element and step: test_parallel's bound).


def _run_plain(name: str, update_in_backward: bool, steps: int = 3) -> tuple[nn.Module, list[tuple]]:
    """A plain (unsharded) model trained `steps` steps on fixed random batches in float64: (model, per-step
    numbers)."""
    rule = OPTIMIZERS.get(name)
    float64_ns = (
        ["--optim.ns_dtype=float64"] if rule and any(o.key == "ns_dtype" for o in rule.options) else []
    )
    cfg = load_config(f"tiny_{name}.yaml", [*SHAPE, *float64_ns])
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cpu")).double()
    optimizer = build_optimizer(cfg.optim, model)
    engine = BackwardUpdateEngine(model, optimizer) if update_in_backward else FSDP2Engine(model, optimizer)
    generator = torch.Generator().manual_seed(0)
    record = []
    for _ in range(steps):
        for group in optimizer.param_groups:  # a schedule: the hook must see this step's lr
            group["lr"] *= 0.5
        batch = torch.randint(0, 512, (4, 33), generator=generator)
        with engine.health(True) as health:  # the per-parameter steps inside backward add to it
            loss = engine.forward_backward([batch])
            norm = engine.grad_norm()
            engine.step()
        record.append((loss.item(), norm.item(), health.report()))
    return model, record


@pytest.mark.parametrize("name", ["swan", "sinkgd", "adamw", "normuon", "muon", "auon", "hybrid_auon"])
def test_plain_model_weights_equal_the_normal_step(name):
    initial = build_model(
        resolve(load_config(f"tiny_{name}.yaml", SHAPE), 1, "cpu"), 512, torch.device("cpu")
    )
    normal, normal_record = _run_plain(name, update_in_backward=False)
    in_backward, record = _run_plain(name, update_in_backward=True)
    for (n1, a), (n2, b), p0 in zip(
        normal.named_parameters(), in_backward.named_parameters(), initial.parameters(), strict=True
    ):
        assert n1 == n2 and not torch.equal(a, p0.double()), n1  # every parameter was trained
        # the same rule on the same gradient, to float64 rounding
        torch.testing.assert_close(a, b, rtol=0, atol=REL64 * a.abs().max().item(), msg=n1)
    for (loss1, norm1, health1), (loss2, norm2, health2) in zip(normal_record, record, strict=True):
        assert loss2 == pytest.approx(loss1, rel=REL64, abs=0)
        assert norm2 == pytest.approx(norm1, rel=REL64, abs=0)  # summed per parameter instead of at once
        assert health2.keys() == health1.keys() and health1
        assert health2 == pytest.approx(health1, rel=REL64, abs=0)


def test_step_params_steps_only_the_given_params():
    cfg = load_config("tiny_swan.yaml", SHAPE)
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cpu"))
    optimizer = build_optimizer(cfg.optim, model)
    generator = torch.Generator().manual_seed(0)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=generator)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    groups = optimizer.param_groups
    step_params(optimizer, [model.layers[0].attention.wq.weight, model.output.weight])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"layers.0.attention.wq.weight", "output.weight"}
    assert optimizer.param_groups is groups  # restored
    stateful = [p for p, state in optimizer.state.items() if state]
    assert len(stateful) == 1 and stateful[0] is model.output.weight  # the head's AdamW state, same dict


def test_a_gradient_no_hook_consumed_is_an_error():
    cfg = load_config("tiny_sinkgd.yaml", SHAPE)
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cpu"))
    engine = BackwardUpdateEngine(model, build_optimizer(cfg.optim, model))
    model.extra = nn.Linear(4, 4)  # registered after the engine: no hook, its gradient stays
    original = model.forward
    model.forward = lambda tokens, targets: original(tokens, targets) + model.extra(torch.ones(4)).sum()
    with pytest.raises(RuntimeError, match="not consumed by their post-accumulate-grad hook"):
        engine.forward_backward([torch.randint(0, 512, (4, 33))])


@pytest.mark.parametrize(
    ("overrides", "accumulation", "message"),
    [
        ([], 2, "needs one micro-batch per step"),
        (["--train.grad_clip=1.0"], 1, "set train.grad_clip=0"),
        (["--train.on_nonfinite=skip"], 1, "set train.on_nonfinite=stop"),
        (["--parallel.engine=deepspeed"], 1, "parallel.engine=fsdp2 only"),
    ],
)
def test_refusals_name_the_setting(overrides, accumulation, message):
    batch = [f"--train.global_batch_size={4 * accumulation}", "--train.micro_batch_size=4"]
    cfg = load_config("tiny_swan.yaml", ["--optim.update_in_backward=true", *batch, *overrides])
    with pytest.raises(ConfigError, match=message):
        resolve(cfg, 1, "cpu")


def _train_both(tmp: str, name: str) -> dict:
    """Rank 0's final weights (from the last checkpoint) of a normal run ("normal"), an update-in-backward run
    ("in_backward") and the normal run one ulp off ("off": its own sensitivity to rounding), and the initial
    weights ("initial")."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out = {}
    for label, uib, off in (("normal", False, False), ("in_backward", True, False), ("off", False, True)):
        overrides = [
            *FAST,
            "--train.steps=3",
            "--train.global_batch_size=4",
            f"--train.micro_batch_size={4 // dist.get_world_size()}",
            f"--train.runs_dir={tmp}",
            f"--train.run_name={name}_{label}",
            f"--optim.update_in_backward={str(uib).lower()}",
        ]
        cfg = load_config(f"tiny_{name}.yaml", overrides)
        with one_ulp_off() if off else nullcontext():
            train_in_process(f"tiny_{name}.yaml", overrides)
        model = build_model(resolve(cfg, dist.get_world_size(), "cpu"), 512, torch.device("cpu"))
        out["initial"] = {k: v.clone() for k, v in model.state_dict().items()}
        state = {"app": {"model": get_model_state_dict(model)}}
        dcp.load(state, checkpoint_id=str(cfg.run_dir / "checkpoints" / "step_000003"))
        out[label] = {k: v.clone() for k, v in state["app"]["model"].items()}
    return out


def _largest_difference(a: dict, b: dict) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "world_size"), [("swan", 1), ("sinkgd", 1), ("swan", 2)])
def test_trainer_weights_after_three_steps_equal_the_normal_path(tmp_path, name, world_size):
    weights = run_distributed(_train_both, world_size, str(tmp_path), name)
    normal, in_backward = weights["normal"], weights["in_backward"]
    assert normal.keys() == in_backward.keys()
    # the same rule on the same gradients, stacked or one matrix at a time: within the normal run's own
    # sensitivity to one rounding per element and step (test_parallel's bound); a dropped or doubled update
    # differs by about one step's movement (a third of three steps'), which the bound stays 10 times below
    largest = max(w.abs().max().item() for w in normal.values())
    bound = SENSITIVITY * (_largest_difference(weights["off"], normal) + EPS32 * largest)
    assert _largest_difference(in_backward, normal) <= bound
    assert _largest_difference(normal, weights["initial"]) / 3 > 10 * bound
    # The update-in-backward run really freed each gradient at once: fewer gradient bytes were ever alive.
    most_alive = logged(tmp_path / f"{name}_in_backward", "memory/grads_mib")
    assert max(most_alive) < 0.5 * logged(tmp_path / f"{name}_normal", "memory/grads_mib")[0]
    for key in ("loss", "grad_norm", "optim/update_rms", "optim/orth_error"):
        if key == "optim/orth_error" and name == "sinkgd":
            continue
        expected = logged(tmp_path / f"{name}_normal", key)
        assert len(expected) == 3
        got, off = logged(tmp_path / f"{name}_in_backward", key), logged(tmp_path / f"{name}_off", key)
        assert_within_sensitivity(got, expected, off, key)
