"""optim.update_in_backward: the same weights, losses, gradient norms and health numbers as the normal step, for a
plain model and for the trainer under FSDP2 (world sizes 1 and 2); refusals where it cannot be the same."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from optim import build_optimizer, step_params
from tests.distributed import run_distributed
from tests.run_helpers import FAST, logged, train_in_process
from trainer.config import ConfigError, load_config
from trainer.engines.backward_update import BackwardUpdateEngine
from trainer.engines.fsdp2 import FSDP2Engine
from trainer.resolve import build_model, resolve

SHAPE = ["--train.micro_batch_size=4", "--train.global_batch_size=4", "--train.seq_len=32"]
# What is not bitwise, and why (u32 = 6e-8; weights, losses, orth_error and the spectrum are the same bits):
# grad norm: update_in_backward adds each parameter's squared norm as its gradient arrives (backward order), the
# normal step takes the norm of the 21 per-parameter norms at once: 21 positive terms summed in another order,
# <= 20 u32 = 1.2e-6 relative in the square, half that in the norm, and a rounding each for the square and the
# sqrt: <= 7e-7.
NORM_REL = 1e-6
# health: the 14 hidden matrices' update and weight sums are added one parameter at a time in backward order
# instead of in one step's order: <= 13 u32 = 8e-7 relative in each sum; update_rms and update_weight_ratio are
# square roots of one sum and of a ratio of two: <= 8e-7. (torch AdamW's health is float64, from equal states.)
HEALTH_REL = 2e-6


def _run_plain(name: str, update_in_backward: bool, steps: int = 3) -> tuple[nn.Module, list[tuple]]:
    """A plain (unsharded) model trained `steps` steps on fixed random batches: (model, per-step numbers)."""
    cfg = load_config(f"tiny_{name}.yaml", SHAPE)
    model = build_model(resolve(cfg, 1, "cpu"), 512, torch.device("cpu"))
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
        assert n1 == n2 and not torch.equal(a, p0), n1  # every parameter was trained
        assert torch.equal(a, b), n1  # bitwise: the same rule on the same gradient
    for (loss1, norm1, health1), (loss2, norm2, health2) in zip(normal_record, record, strict=True):
        assert loss2 == loss1
        assert norm2 == pytest.approx(norm1, rel=NORM_REL)  # summed per parameter instead of at once
        assert health2.keys() == health1.keys() and health1
        assert health2 == pytest.approx(health1, rel=HEALTH_REL)


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
    """Rank 0's final weights (from the last checkpoint) and logs of a normal and an update-in-backward run."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    out = {}
    for uib in (False, True):
        run = f"{name}_{uib}"
        overrides = [
            *FAST,
            "--train.steps=3",
            "--train.global_batch_size=4",
            f"--train.micro_batch_size={4 // dist.get_world_size()}",
            f"--train.runs_dir={tmp}",
            f"--train.run_name={run}",
            f"--optim.update_in_backward={str(uib).lower()}",
        ]
        cfg = load_config(f"tiny_{name}.yaml", overrides)
        train_in_process(f"tiny_{name}.yaml", overrides)
        model = build_model(resolve(cfg, dist.get_world_size(), "cpu"), 512, torch.device("cpu"))
        state = {"app": {"model": get_model_state_dict(model)}}
        dcp.load(state, checkpoint_id=str(cfg.run_dir / "checkpoints" / "step_000003"))
        out[uib] = {k: v.clone() for k, v in state["app"]["model"].items()}
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("name", "world_size"), [("swan", 1), ("sinkgd", 1), ("swan", 2)])
def test_trainer_weights_after_three_steps_equal_the_normal_path(tmp_path, name, world_size):
    weights = run_distributed(_train_both, world_size, str(tmp_path), name)
    normal, in_backward = weights[False], weights[True]
    assert normal.keys() == in_backward.keys()
    for key in normal:
        assert torch.equal(in_backward[key], normal[key]), key  # bitwise: the same rule on the same gradient
    # The update-in-backward run really freed each gradient at once: fewer gradient bytes were ever alive.
    most_alive = logged(tmp_path / f"{name}_True", "memory/grads_mib")
    assert max(most_alive) < 0.5 * logged(tmp_path / f"{name}_False", "memory/grads_mib")[0]
    # losses and orth_error exact (the same weights, the same matrix's bits), the sums to NORM_REL / HEALTH_REL
    for key, rel in (
        ("loss", 0),
        ("grad_norm", NORM_REL),
        ("optim/update_rms", HEALTH_REL),
        ("optim/orth_error", 0),
    ):
        if key == "optim/orth_error" and name == "sinkgd":
            continue
        expected = logged(tmp_path / f"{name}_False", key)
        assert len(expected) == 3
        assert logged(tmp_path / f"{name}_True", key) == pytest.approx(expected, rel=rel, abs=0), key
