"""Routing, build_optimizer (the trainer's only entry point) and the health numbers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

from models import Llama, LlamaConfig
from optim import (
    OPTIMIZERS,
    SWAN,
    AdamW,
    Muon,
    NorMuon,
    SinkGD,
    build_optimizer,
    route_parameters,
    track_health,
)
from trainer.config import OptimConfig

TINY = LlamaConfig(
    dim=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, vocab_size=50, max_seq_len=16
)
HIDDEN = ("attention.wq", "attention.wk", "attention.wv", "attention.wo")
HIDDEN += ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def _expected_names(model: Llama) -> set[str]:
    return {f"layers.{i}.{name}.weight" for i in range(len(model.layers)) for name in HIDDEN}


def _routed_names(model: nn.Module, names: dict[int, str]) -> tuple[set[str], set[str]]:
    """Routing of `model`, reported with the plain model's parameter names (`names`: id -> name)."""
    matrices, others = route_parameters(model)
    return {names[id(p)] for p in matrices}, {names[id(p)] for p in others}


def test_routing_on_llama():
    torch.manual_seed(0)
    model = Llama(TINY)
    matrices, others = _routed_names(model, {id(p): n for n, p in model.named_parameters()})
    assert matrices == _expected_names(model)
    expected_others = {"tok_embeddings.weight", "norm.weight", "output.weight"}
    expected_others |= {f"layers.{i}.{n}.weight" for i in range(2) for n in ("attention_norm", "ffn_norm")}
    assert others == expected_others


def test_routing_through_checkpoint_and_compile_wrappers():
    """The trainer's order: checkpoint-wrap, then compile, each block; names gain wrapper components."""
    torch.manual_seed(0)
    model = Llama(TINY)
    plain_names = {id(p): n for n, p in model.named_parameters()}
    for i, block in enumerate(model.layers):
        model.layers[i] = torch.compile(checkpoint_wrapper(block))
    wrapped = torch.compile(model)
    names = [n for n, _ in wrapped.named_parameters()]
    assert any("_checkpoint_wrapped_module" in n and "_orig_mod" in n for n in names)
    matrices, others = _routed_names(wrapped, plain_names)
    assert matrices == _expected_names(model)
    assert "output.weight" in others and "tok_embeddings.weight" in others


def test_routing_excludes_lm_head_and_frozen_params():
    model = nn.ModuleDict({"proj": nn.Linear(4, 6), "lm_head": nn.Linear(6, 9), "frozen": nn.Linear(3, 3)})
    model["frozen"].weight.requires_grad_(False)
    model["frozen"].bias.requires_grad_(False)
    matrices, others = route_parameters(model)
    assert [p.shape for p in matrices] == [torch.Size([6, 4])]
    assert sorted(p.shape for p in others) == [torch.Size([6]), torch.Size([9]), torch.Size([9, 6])]


def test_build_adamw_is_torch_adamw():
    model = Llama(TINY)
    cfg = OptimConfig(name="adamw", lr=3e-4, weight_decay=0.1, beta1=0.8, beta2=0.95, eps=1e-6)
    opt = build_optimizer(cfg, model)
    assert type(opt) is AdamW and isinstance(opt, torch.optim.AdamW)  # torch's, with health and a comm clock
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (
        3e-4,
        (0.8, 0.95),
        1e-6,
        0.1,
    )
    assert len(group["params"]) == len(list(model.parameters()))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_build_routes_and_sets_groups(name):
    model = Llama(TINY)
    cfg = OptimConfig(name=name, lr=0.01, weight_decay=0.05, adamw_lr=2e-3, beta1=0.8, beta2=0.9, eps=1e-7)
    opt = build_optimizer(cfg, model)
    assert type(opt) is OPTIMIZERS[name]
    matrix, adamw = opt.param_groups
    assert len(matrix["params"]) == 7 * TINY.n_layers and matrix["algorithm"] == name
    assert (matrix["lr"], matrix["weight_decay"]) == (0.01, 0.05)
    assert adamw["algorithm"] == "adamw" and len(adamw["params"]) == 3 + 2 * TINY.n_layers
    assert (adamw["lr"], adamw["betas"], adamw["eps"], adamw["weight_decay"]) == (
        2e-3,
        (0.8, 0.9),
        1e-7,
        0.05,
    )


def test_build_passes_rule_options():
    model = Llama(TINY)
    opt = build_optimizer(OptimConfig(name="muon", ns_steps=3, ns_dtype="float32", nesterov=False), model)
    assert (opt.ns_steps, opt.ns_dtype, opt.param_groups[0]["nesterov"]) == (3, torch.float32, False)
    assert opt.comm_dtype == torch.float32  # comm_dtype unset: the ns_dtype
    cfg = OptimConfig(name="muon", ns_dtype="float32", comm_dtype="bfloat16")
    assert build_optimizer(cfg, model).comm_dtype == torch.bfloat16
    assert build_optimizer(OptimConfig(name="sinkgd", sinkgd_iters=2), model).iters == 2
    swan = build_optimizer(OptimConfig(name="swan", whitening="ns5"), model)
    assert (swan.whitening, swan.ns_steps) == ("ns5", 5)
    normuon = build_optimizer(OptimConfig(name="normuon", variant="reference_code", momentum=0.9), model)
    assert normuon.variant == "reference_code" and normuon.param_groups[0]["momentum"] == 0.9


@pytest.mark.parametrize(
    ("name", "option", "value"),
    [
        ("muon", "whitening", "ns5"),
        ("sinkgd", "ns_steps", 3),
        ("sinkgd", "variant", "paper"),
        ("adamw", "momentum", 0.9),
    ],
)
def test_build_rejects_options_the_optimizer_lacks(name, option, value):
    with pytest.raises(ValueError, match=f"optim.{option}: {name} has no such option"):
        build_optimizer(OptimConfig(name=name, **{option: value}), Llama(TINY))


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        (lambda p: SinkGD(p, iters=0), "SinkGD iters: must be >= 1, got 0"),
        (lambda p: Muon(p, ns_steps=0), "Muon ns_steps: must be >= 1, got 0"),
        (lambda p: Muon(p, momentum=1.0), "Muon momentum: must be >= 0.0 and < 1.0"),
        (
            lambda p: NorMuon(p, variant="bogus"),
            "NorMuon variant: 'bogus' is not one of paper, reference_code",
        ),
        (lambda p: SWAN(p, whitening="nope"), "SWAN whitening: 'nope' is not one of coupled"),
        (lambda p: SWAN(p, ns_dtype=torch.float16), "SWAN ns_dtype: 'float16' is not one of"),
    ],
)
def test_constructors_check_the_same_declarations(factory, message):
    """A rule built by hand is held to the declarations the config check reads (optim/options.py)."""
    with pytest.raises(ValueError, match=message):
        factory([nn.Parameter(torch.zeros(4, 3))])


def test_build_rejects_unknown_name():
    with pytest.raises(ValueError, match="unknown optimizer 'lion'"):
        build_optimizer(OptimConfig(name="lion"), Llama(TINY))


# ------------------------------------------------------------------------------------------------ health


def _params_with_grads(seed: int = 0) -> list[nn.Parameter]:
    """float64 matrices: the rules then keep float64 state and sums, so the health numbers can be held to the
    update measured as W_after - W_before, which in fp32 would lose three digits to cancellation (|W| ~ 1000 lr)."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(16, 16), (12, 20), (20, 12)]
    params = [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
    return params


def _update_stats(before, params):
    du = sum((p.detach() - b).square().sum() for p, b in zip(params, before, strict=True))
    dw = sum(b.square().sum() for b in before)
    numel = sum(p.numel() for p in params)
    return math.sqrt(du / numel), math.sqrt(du / dw)


def test_health_is_empty_unless_tracked():
    opt = SinkGD(_params_with_grads())
    with track_health(opt, enabled=False) as untracked:
        opt.step()
    assert untracked.report() == {}
    with track_health(opt) as tracked:
        opt.step()
    # SinkGD: no orth_error
    keys = {"update_rms", "update_weight_ratio", "update_spectral_norm", "update_stable_rank"}
    assert set(tracked.report()) == keys
    opt.step()  # outside a block nothing is measured, and the report of the block stays
    assert set(tracked.report()) == keys


@pytest.mark.parametrize("cls", [SinkGD, Muon, NorMuon, SWAN])
def test_health_matches_the_applied_update(cls):
    params = _params_with_grads()
    opt = cls(params, ns_dtype="float64") if cls is not SinkGD else cls(params)
    before = [p.detach().clone() for p in params]
    with track_health(opt) as tracked:
        opt.step()
    rms, ratio = _update_stats(before, params)
    health = tracked.report()
    # float64 throughout: cancellation in W_after - W_before costs ~1e3 x 1e-16
    assert health["update_rms"] == pytest.approx(rms, rel=1e-9)
    assert health["update_weight_ratio"] == pytest.approx(ratio, rel=1e-9)
    if cls is SinkGD:
        assert health["update_rms"] == pytest.approx(1e-3, rel=1e-9)  # per-element RMS exactly 1 times lr
    if cls is Muon:  # the first matrix (square): O = -dW / lr
        o = (before[0] - params[0].detach()) / 0.02
        expected = torch.linalg.matrix_norm(o @ o.T - torch.eye(16, dtype=o.dtype)) / 4
        # orth_error is computed in fp32 (16-term dot products: ~16 x 6e-8 of entries of size ~1)
        assert health["orth_error"] == pytest.approx(expected.item(), rel=1e-5)
        assert 0.0 < health["orth_error"] < 1.0


def test_health_of_torch_adamw_recomputes_the_last_update():
    params = _params_with_grads()
    opt = AdamW(params, lr=1e-2, weight_decay=0.0)
    with track_health(opt) as tracked:
        assert tracked.report() == {}  # no step yet
    before = [p.detach().clone() for p in params]
    opt.step()
    rms, _ = _update_stats(before, params)
    after_ratio = math.sqrt(
        sum((p.detach() - b).square().sum() for p, b in zip(params, before, strict=True))
        / sum(p.detach().square().sum() for p in params)
    )
    with track_health(opt) as tracked:
        pass
    health = (
        tracked.report()
    )  # recomputed in float64 from float64 state: exact to ~1e-13 of the cancellation above
    assert health["update_rms"] == pytest.approx(rms, rel=1e-9)
    assert health["update_weight_ratio"] == pytest.approx(after_ratio, rel=1e-9)
    with track_health(torch.optim.SGD(params, lr=0.1), enabled=False) as tracked:
        pass
    assert tracked.report() == {}
    with (
        pytest.raises(TypeError, match="SGD reports no health numbers"),
        track_health(torch.optim.SGD(params)),
    ):
        pass


def test_adamw_baseline_gets_the_matrix_optimizers_two_lrs():
    model = Llama(TINY)
    plain = build_optimizer(OptimConfig(name="adamw", lr=0.01), model)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["lr"] == 0.01
    split = build_optimizer(OptimConfig(name="adamw", lr=0.01, adamw_lr=0.002, adamw_weight_decay=0.1), model)
    matrices, others = route_parameters(model)
    hidden, rest = split.param_groups
    assert [id(p) for p in hidden["params"]] == [id(p) for p in matrices] and hidden["lr"] == 0.01
    assert [id(p) for p in rest["params"]] == [id(p) for p in others]
    assert (rest["lr"], rest["weight_decay"], hidden["weight_decay"]) == (0.002, 0.1, 0.0)
