"""AuON and HybridAuON, both variants ("paper" and "reference_code"), against float64 references written here
from docs/optimizers.md ("AuON" and "Hybrid-AuON") and the authors' newest code
(ryyzn9/AuON @bba2e82, auon/optimizer.py), plain torch on whole matrices; plus the variant's defaults, the
argument check and the all-zero gradient.

Tolerance (relative, Frobenius norm of the difference of the updates over that of the update): the parameters are
float64, so the optimizers' state and elementwise math are float64 (optim.sharded.math_dtype), and with
ns_dtype="float64" (or no Newton-Schulz at all) the whole step is: the update must match the float64 reference to
test_optim_math's REL_TOL_F64 (float64 rounding), and to its REL_TOL (fp32 rounding) where Newton-Schulz runs in
fp32. Both are derived there.
"""

from __future__ import annotations

import pytest
import torch

from optim import AuON, HybridAuON
from tests.test_optim_math import (
    REL_TOL,
    REL_TOL_F64,
    _grads,
    _matrices,
    assert_matches_reference,
    ref_auon,
    ref_ns5,
)


def ref_auon_reference_code(w, g, st, lr=0.08, mu=0.95, wd=0.1, nesterov=True, hybrid_steps=None):
    """The authors' newest rule: D = U (AuON) or NS_k(U) (Hybrid); r = sqrt(mean(cosh(1.5 D / (|D|_F + 1e-7))^2));
    W <- W (1 - lr wd) - lr D / (r + 1e-8), no shape factor."""
    st["M"] = mu * st.get("M", torch.zeros_like(w)) + (1 - mu) * g
    u = (1 - mu) * g + mu * st["M"] if nesterov else st["M"]
    d = u if hybrid_steps is None else ref_ns5(u, hybrid_steps)
    r = torch.cosh(1.5 * d / (d.norm() + 1e-7)).square().mean().sqrt()
    return w * (1 - lr * wd) - lr * d / (r + 1e-8)


# test_gradient_scale: the normalizations' eps (X = U / (|U|_F + 1e-7), NS5's own 1e-7, the cosh argument's 1e-7,
# r + 1e-8) make the update scale-free only up to eps / |U|_F per normalization, |U|_F >= 1.4 for these gradients
# at scale 1: <= 7e-8 each, at most two of them and r's 1e-8 in one rule (<= 1.5e-7); float64 rounding adds
# nothing visible. 1e-6 is 7 times that.
SCALE_TOL = 1e-6
F64 = {"ns_dtype": "float64"}
REF = {"variant": "reference_code"}
# name -> (our optimizer over a param list, the float64 reference step); lr left unset takes the variant's.
# Cases without ns_dtype="float64" run NS in fp32 and are held to REL_TOL (FP32_NS).
CASES = {
    "auon_paper": (lambda p: AuON(p, weight_decay=0.1, variant="paper"), ref_auon),
    "auon_paper_lr": (
        lambda p: AuON(p, lr=0.05, weight_decay=0.1),
        lambda w, g, st: ref_auon(w, g, st, lr=0.05),
    ),
    "auon_reference_code": (lambda p: AuON(p, weight_decay=0.1, **REF), ref_auon_reference_code),
    "auon_reference_code_lr": (
        lambda p: AuON(p, lr=0.3, weight_decay=0.1, **REF),
        lambda w, g, st: ref_auon_reference_code(w, g, st, lr=0.3),
    ),
    "auon_reference_code_plain_momentum": (
        lambda p: AuON(p, weight_decay=0.1, nesterov=False, **REF),
        lambda w, g, st: ref_auon_reference_code(w, g, st, nesterov=False),
    ),
    "hybrid_auon_paper": (
        lambda p: HybridAuON(p, weight_decay=0.1, variant="paper", **F64),
        lambda w, g, st: ref_auon(w, g, st, hybrid_steps=1),
    ),
    "hybrid_auon_paper_5": (
        lambda p: HybridAuON(p, weight_decay=0.1, ns_steps=5, **F64),
        lambda w, g, st: ref_auon(w, g, st, hybrid_steps=5),
    ),
    "hybrid_auon_reference_code": (
        lambda p: HybridAuON(p, weight_decay=0.1, **REF, **F64),
        lambda w, g, st: ref_auon_reference_code(w, g, st, hybrid_steps=5),
    ),
    "hybrid_auon_reference_code_default_dtype": (  # ns_dtype unset: the variant's float32
        lambda p: HybridAuON(p, weight_decay=0.1, **REF),
        lambda w, g, st: ref_auon_reference_code(w, g, st, hybrid_steps=5),
    ),
    "hybrid_auon_reference_code_2": (
        lambda p: HybridAuON(p, lr=0.02, weight_decay=0.1, ns_steps=2, **REF, **F64),
        lambda w, g, st: ref_auon_reference_code(w, g, st, lr=0.02, hybrid_steps=2),
    ),
}
FP32_NS = {"hybrid_auon_reference_code_default_dtype"}


@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(name):
    """3 steps with momentum on a square, a wide (m < n) and a tall (m > n) matrix."""
    factory, ref_step = CASES[name]
    params = _matrices()
    assert {p.shape[0] > p.shape[1] for p in params} == {True, False}
    assert_matches_reference(name, factory(params), ref_step, REL_TOL if name in FP32_NS else REL_TOL_F64)


@pytest.mark.parametrize(
    ("cls", "variant", "expected"),
    [
        (AuON, "paper", 1.0),
        (AuON, "reference_code", 10.0),
        (HybridAuON, "paper", 1.0),
        (HybridAuON, "reference_code", 1.0),
    ],
)
def test_gradient_scale(cls, variant, expected):
    """What tells AuON's forms apart: r sees only D / |D|_F, so the reference update is linear in the
    gradient's scale, while the paper's (a unit-Frobenius direction) does not depend on it. Hybrid's NS
    normalizes its input, so both of its forms are scale-free."""
    kwargs = {"ns_dtype": "float64"} if cls is HybridAuON else {}
    updates = []
    for scale in (1.0, 10.0):
        params = _matrices()
        before = [p.detach().clone() for p in params]
        opt = cls(params, variant=variant, **kwargs)
        for p, g in zip(params, _grads(0), strict=True):
            p.grad = scale * g
        opt.step()
        updates.append([p.detach() - b for p, b in zip(params, before, strict=True)])
    for small, large in zip(*updates, strict=True):
        rel = ((large - expected * small).norm() / large.norm()).item()
        assert rel < SCALE_TOL, f"{cls.__name__} {variant}: {rel:.2e}"


def test_defaults_follow_the_variant():
    p = [torch.nn.Parameter(torch.ones(3, 4))]
    for cls in (AuON, HybridAuON):
        assert cls(p).variant == "paper"
        assert cls(p).param_groups[0]["lr"] == 0.24
        assert cls(p, variant="paper").param_groups[0]["lr"] == 0.24
        assert cls(p, variant="reference_code").param_groups[0]["lr"] == 0.08
        assert cls(p, lr=0.01, variant="reference_code").param_groups[0]["lr"] == 0.01
    paper, reference = HybridAuON(p), HybridAuON(p, variant="reference_code")
    assert (paper.ns_steps, paper.ns_dtype, paper.comm_dtype) == (1, torch.bfloat16, torch.bfloat16)
    assert (reference.ns_steps, reference.ns_dtype, reference.comm_dtype) == (5, torch.float32, torch.float32)
    explicit = HybridAuON(p, variant="reference_code", ns_steps=3, ns_dtype="bfloat16", comm_dtype="float32")
    assert (explicit.ns_steps, explicit.ns_dtype, explicit.comm_dtype) == (3, torch.bfloat16, torch.float32)
    explicit = HybridAuON(p, ns_steps=5, ns_dtype="float32")
    assert (explicit.ns_steps, explicit.ns_dtype, explicit.param_groups[0]["lr"]) == (5, torch.float32, 0.24)


@pytest.mark.parametrize("cls", [AuON, HybridAuON])
def test_unknown_variant_raises(cls):
    p = [torch.nn.Parameter(torch.ones(3, 4))]
    with pytest.raises(ValueError, match=r"variant: 'reference' is not one of paper, reference_code"):
        cls(p, variant="reference")


@pytest.mark.parametrize("variant", ["paper", "reference_code"])
@pytest.mark.parametrize("cls", [AuON, HybridAuON])
def test_zero_gradient_gives_zero_update(cls, variant):
    params = _matrices()
    before = [p.detach().clone() for p in params]
    opt = cls(params, weight_decay=0.0, variant=variant)
    for _ in range(2):
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        for p, b in zip(params, before, strict=True):
            assert torch.isfinite(p).all()
            assert torch.equal(p.detach(), b)
            assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros_like(p))  # float64, as p
