"""Each optimizer against a float64 reference written here from docs/optimizers.md, never from
the implementation; plus the properties every optimizer must have (zero gradient, state_dict round trip,
1-D params, p.grad untouched, AdamW groups == torch.optim.AdamW, Muon == torch.optim.Muon).

Tolerance (relative: Frobenius norm of the difference of the updates over that of the update): the parameters are
float64, so the optimizers' state and elementwise math are float64 too (optim.sharded.math_dtype); with
ns_dtype="float64" the whole step is float64 and must match to REL_TOL_F64, float64 rounding. The Newton-Schulz
rules are also run with ns_dtype="float32" (their iterations in fp32), held to REL_TOL, fp32 rounding; both bounds
are derived below from the unit roundoff and the amplification of these steps.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from optim import OPTIMIZERS, SWAN, AuON, HybridAuON, Muon, NorMuon, SinkGD
from optim.health import track_health
from optim.newton_schulz import coupled_inverse_sqrt_polar

SHAPES = [(16, 16), (12, 20), (20, 12)]  # square, wide, tall
STEPS = 3
# Each step's update differs from the reference's by rounding only (another operation order: fused baddbmm, batched
# matmuls, in-place lerps), n u per operation (u: unit roundoff, n <= 20 terms per sum), amplified by the
# Newton-Schulz / whitening iterations and 3 steps of momentum. That amplification is a property of these inputs, the
# same on every machine: in float64 the worst case (SWAN's coupled whitening, of ill-conditioned square matrices)
# is 7e-15 = 66 u64 (u64 = 1.1e-16), and its fp32 run 2.7e-6 = 45 u32 (u32 = 6e-8).
# Float64 throughout: 1e-11 = 9e4 u64, 1e3 times the amplification, while a formula error (an eps of 1e-7 where
# the spec has 1e-8 in a normalization, a missing factor) moves the update by 1e-9 or (far) more.
REL_TOL_F64 = 1e-11
# Newton-Schulz in fp32: 3e-5 = 500 u32, 7 times the amplification (another CPU's fp32 rounding pattern can give a
# few times the 45 u32 of this one's; the 1e-5 used before was 170 u32, 2.5 times it).
REL_TOL = 3e-5

# ---------------------------------------------------------------- float64 references, from the spec's text


def ref_ns5(x: torch.Tensor, steps: int) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        A = x @ x.T
        B = b * A + c * A @ A
        x = a * x + B @ x
    return x.T if tall else x


def ref_coupled_whitening(g: torch.Tensor, steps: int) -> torch.Tensor:
    tall = g.shape[0] > g.shape[1]
    x = g.T if tall else g
    A = x @ x.T
    norm_a = A.norm()
    eye = torch.eye(A.shape[0], dtype=A.dtype)
    Y, Z = A / norm_a, eye
    for _ in range(steps):
        T = 3 * eye - Z @ Y
        Y, Z = 0.5 * Y @ T, 0.5 * T @ Z
    d = Z @ x / norm_a.sqrt()
    return d.T if tall else d


def ref_muon(w, g, st, lr=0.05, mu=0.95, wd=0.1, nesterov=True):
    m, n = w.shape
    st["M"] = mu * st.get("M", torch.zeros_like(w)) + (1 - mu) * g
    u = (1 - mu) * g + mu * st["M"] if nesterov else st["M"]
    return w * (1 - lr * wd) - lr * math.sqrt(max(1, m / n)) * ref_ns5(u, 5)


def ref_swan(w, g, st, lr=0.01, wd=0.1, whitening="coupled", eps=1e-8):
    m, n = w.shape
    gt = (g - g.mean(dim=1, keepdim=True)) / (g.std(dim=1, correction=0, keepdim=True) + eps)
    d = ref_coupled_whitening(gt, 10) if whitening == "coupled" else ref_ns5(gt, 5)
    return w * (1 - lr * wd) - lr * math.sqrt(max(m, n)) * d


def ref_sinkgd(w, g, st, lr=0.01, wd=0.1, iters=5):
    m, n = w.shape
    x = g.clone()
    for _ in range(iters):
        x = x * math.sqrt(n) / x.norm(dim=1, keepdim=True).clamp_min(1e-8)
        x = x * math.sqrt(m) / x.norm(dim=0, keepdim=True).clamp_min(1e-8)
    return w * (1 - lr * wd) - lr * x


def ref_normuon(w, g, st, lr=0.05, b1=0.95, b2=0.95, eps=1e-8, wd=0.1, variant="paper"):
    m, n = w.shape
    st["M"] = b1 * st.get("M", torch.zeros_like(w)) + (1 - b1) * g
    u = (1 - b1) * g + b1 * st["M"] if variant == "reference_code" else st["M"]
    o = ref_ns5(u, 5)
    st["v"] = b2 * st.get("v", torch.zeros(m, dtype=w.dtype)) + (1 - b2) * (o * o).mean(dim=1)
    o_hat = o / (st["v"].sqrt() + eps)[:, None]
    if variant == "paper":
        return w * (1 - lr * wd) - lr * 0.2 * math.sqrt(m * n) / o_hat.norm() * o_hat
    o_hat = o_hat * o.norm() / o_hat.norm()
    return w * (1 - lr * wd) - lr * math.sqrt(max(1, m / n)) * o_hat


def ref_auon(w, g, st, lr=0.24, mu=0.95, wd=0.1, hybrid_steps=None):
    m, n = w.shape
    st["M"] = mu * st.get("M", torch.zeros_like(w)) + (1 - mu) * g
    u = (1 - mu) * g + mu * st["M"]
    x = u / (u.norm() + 1e-7) if hybrid_steps is None else ref_ns5(u, hybrid_steps)
    r = torch.cosh(x).square().mean().sqrt()
    return w * (1 - lr * wd) - lr * math.sqrt(max(1, m / n)) * x / (r + 1e-8)


# name -> (our optimizer over a param list, the reference step with matching hyperparameters); `ns` sets the
# Newton-Schulz rules' ns_dtype (SWAN's coupled whitening included).
def _cases(ns: dict[str, str]) -> dict:
    return {
        "muon": (lambda p: Muon(p, lr=0.05, weight_decay=0.1, **ns), ref_muon),
        "muon_plain": (
            lambda p: Muon(p, lr=0.05, weight_decay=0.1, nesterov=False, **ns),
            lambda w, g, st: ref_muon(w, g, st, nesterov=False),
        ),
        "swan": (lambda p: SWAN(p, lr=0.01, weight_decay=0.1, **ns), ref_swan),
        "swan_ns5": (
            lambda p: SWAN(p, lr=0.01, weight_decay=0.1, whitening="ns5", **ns),
            lambda w, g, st: ref_swan(w, g, st, whitening="ns5"),
        ),
        "sinkgd": (lambda p: SinkGD(p, lr=0.01, weight_decay=0.1), ref_sinkgd),
        "normuon": (lambda p: NorMuon(p, lr=0.05, weight_decay=0.1, **ns), ref_normuon),
        "normuon_reference_code": (
            lambda p: NorMuon(p, lr=0.05, weight_decay=0.1, variant="reference_code", **ns),
            lambda w, g, st: ref_normuon(w, g, st, variant="reference_code"),
        ),
        "auon": (lambda p: AuON(p, weight_decay=0.1), ref_auon),
        "hybrid_auon": (
            lambda p: HybridAuON(p, weight_decay=0.1, **ns),
            lambda w, g, st: ref_auon(w, g, st, hybrid_steps=1),
        ),
        "hybrid_auon_5": (
            lambda p: HybridAuON(p, weight_decay=0.1, ns_steps=5, **ns),
            lambda w, g, st: ref_auon(w, g, st, hybrid_steps=5),
        ),
    }


CASES = _cases({"ns_dtype": "float64"})  # every case in float64 throughout
# the rules with a Newton-Schulz iteration (or SWAN's whitening), again with it in fp32
FP32_NS_CASES = {
    name: case for name, case in _cases({"ns_dtype": "float32"}).items() if name not in ("sinkgd", "auon")
}


def _matrices(seed: int = 0) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in SHAPES]


def _grads(step: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    return [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]


@pytest.mark.parametrize(
    ("name", "ns_dtype"), [*((n, "float64") for n in CASES), *((n, "float32") for n in FP32_NS_CASES)]
)
def test_matches_float64_reference(name, ns_dtype):
    factory, ref_step = (CASES if ns_dtype == "float64" else FP32_NS_CASES)[name]
    assert_matches_reference(
        name, factory(_matrices()), ref_step, REL_TOL_F64 if ns_dtype == "float64" else REL_TOL
    )


def assert_matches_reference(name: str, opt, ref_step, tol: float) -> None:
    """STEPS steps of `opt` (built over _matrices()) and of the float64 reference step give the same updates."""
    params = [p for g in opt.param_groups for p in g["params"]]
    ref_w = [p.detach().clone() for p in params]
    ref_state = [{} for _ in params]
    for step in range(STEPS):
        before = [p.detach().clone() for p in params]
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g
        opt.step()
        ref_before = [w.clone() for w in ref_w]
        ref_w = [ref_step(w, g, st) for w, g, st in zip(ref_w, _grads(step), ref_state, strict=True)]
        for p, b, w, rb in zip(params, before, ref_w, ref_before, strict=True):
            ours, ref = p.detach() - b, w - rb
            rel = ((ours - ref).norm() / ref.norm()).item()
            assert rel < tol, f"{name} step {step} shape {tuple(p.shape)}: relative error {rel:.2e}"


def test_coupled_whitening_converges_to_polar_factor():
    """The coupled iteration's target is the polar factor U V^T (checked against an SVD, many steps)."""
    gen = torch.Generator().manual_seed(1)
    for shape in SHAPES:
        g = torch.randn(shape, generator=gen, dtype=torch.float64)
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        polar = coupled_inverse_sqrt_polar(g, steps=40, dtype=torch.float64)
        # converged (quadratically, long before 40 steps): what is left is float64 rounding amplified by the polar
        # factor's conditioning, ~kappa u64 (kappa <= 70 for these matrices): ~1e-14 (measured 9e-15); an
        # iteration that converged elsewhere, or slowly, is 1e-3 or more off
        assert (polar - u @ vh).norm() / (u @ vh).norm() < 1e-8


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_gradient_gives_zero_update(name):
    params = _matrices()
    before = [p.detach().clone() for p in params]
    opt = OPTIMIZERS[name](params)
    for p in params:
        p.grad = torch.zeros_like(p)
    with track_health(opt) as tracked:
        opt.step()
    for p, b in zip(params, before, strict=True):
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach(), b)
    health = tracked.report()
    assert health["update_rms"] == 0.0 and math.isfinite(health["update_weight_ratio"])


def _with_adamw_group(factory, params, extra):
    return factory(
        [{"params": params}, {"params": extra, "algorithm": "adamw", "lr": 0.01, "weight_decay": 0.1}]
    )


@pytest.mark.parametrize("name", list(CASES))
def test_state_dict_round_trip(name):
    factory = CASES[name][0]
    params, bias = _matrices(), torch.nn.Parameter(torch.ones(7, dtype=torch.float64))
    opt = _with_adamw_group(factory, params, [bias])
    for step in range(2):
        for p, g in zip(params, _grads(step), strict=True):
            p.grad = g
        bias.grad = torch.full_like(bias, 0.5 + step)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())
    params2 = [torch.nn.Parameter(p.detach().clone()) for p in params]
    bias2 = torch.nn.Parameter(bias.detach().clone())
    opt2 = _with_adamw_group(factory, params2, [bias2])
    opt2.load_state_dict(saved)
    for p, p2, g in zip(params, params2, _grads(5), strict=True):
        p.grad, p2.grad = g, g.clone()
    bias.grad = bias2.grad = torch.full_like(bias, -1.0)
    opt.step()
    opt2.step()
    for a, b in zip([*params, bias], [*params2, bias2], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_one_dimensional_params_never_take_the_matrix_path(name):
    cls = OPTIMIZERS[name]
    with pytest.raises(ValueError, match="1-D parameters never take the matrix path"):
        cls([torch.nn.Parameter(torch.ones(3, 4)), torch.nn.Parameter(torch.ones(4))])
    bias = torch.nn.Parameter(torch.ones(4))
    opt = cls([{"params": [torch.nn.Parameter(torch.ones(3, 4))]}, {"params": [bias], "algorithm": "adamw"}])
    assert opt.param_groups[1]["algorithm"] == "adamw"


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_step_leaves_grad_untouched(name):
    params, bias = _matrices(), torch.nn.Parameter(torch.ones(7, dtype=torch.float64))
    opt = _with_adamw_group(OPTIMIZERS[name], params, [bias])
    for p, g in zip(params, _grads(0), strict=True):
        p.grad = g.clone()
    bias.grad = torch.full_like(bias, 0.3)
    for _ in range(2):
        opt.step()
    for p, g in zip(params, _grads(0), strict=True):
        assert torch.equal(p.grad, g)
    assert torch.equal(bias.grad, torch.full_like(bias, 0.3))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_adamw_groups_equal_torch_adamw(name):
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(10, 6, generator=gen)  # 2-D but routed to AdamW, as the embedding is
    gain = torch.randn(6, generator=gen)
    ours = [torch.nn.Parameter(emb.clone()), torch.nn.Parameter(gain.clone())]
    theirs = [torch.nn.Parameter(emb.clone()), torch.nn.Parameter(gain.clone())]
    matrix = torch.nn.Parameter(torch.randn(5, 6, generator=gen))
    hp = {"lr": 3e-3, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.05}
    opt = OPTIMIZERS[name]([{"params": [matrix]}, {"params": ours, "algorithm": "adamw", **hp}])
    ref = torch.optim.AdamW(theirs, **hp)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen) for p in ours]
        for a, b, g in zip(ours, theirs, grads, strict=True):
            a.grad, b.grad = g, g.clone()
        matrix.grad = torch.randn(matrix.shape, generator=gen)
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(opt.state[a][key], ref.state[b][key])


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch >= 2.9")
def test_muon_equals_torch_muon():
    """torch's Muon runs NS5 in bf16 (as our default ns_dtype) with the same operation order."""
    ours, theirs = _matrices(), _matrices()
    ours = [torch.nn.Parameter(p.detach().float()) for p in ours]
    theirs = [torch.nn.Parameter(p.detach().float()) for p in theirs]
    opt = Muon(ours)
    ref = torch.optim.Muon(
        theirs, lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn="original"
    )
    for step in range(STEPS):
        for a, b, g in zip(ours, theirs, _grads(step), strict=True):
            a.grad, b.grad = g.float(), g.float()
        opt.step()
        ref.step()
    # bitwise: the same bf16 operations in the same order (our |X| + 1e-7 is |X| itself in bf16, torch's clamp at
    # its eps a no-op). bf16 leaves no middle ground: an element rounded otherwise
    # in one iteration moves the result by a bf16 ulp (4e-3 relative), 1e-5 in these weights or more
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_variant_arguments_are_checked():
    p = [torch.nn.Parameter(torch.ones(3, 4))]
    with pytest.raises(ValueError, match="variant"):
        NorMuon(p, variant="paperr")
    with pytest.raises(ValueError, match="whitening"):
        SWAN(p, whitening="zca")
    with pytest.raises(ValueError, match="ns_dtype"):
        Muon(p, ns_dtype="float8")
    assert SWAN(p).ns_steps == 10 and SWAN(p).ns_dtype == torch.float32
    assert SWAN(p, whitening="ns5").ns_steps == 5 and SWAN(p, whitening="ns5").ns_dtype == torch.bfloat16
    assert HybridAuON(p).ns_steps == 1 and Muon(p).ns_dtype == torch.bfloat16
    assert NorMuon(p).param_groups[0]["lr"] == 1e-3
    assert NorMuon(p, variant="reference_code").param_groups[0]["lr"] == 0.02
