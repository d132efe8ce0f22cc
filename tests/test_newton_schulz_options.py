"""Newton-Schulz coefficient sets against float64 SVD: Polar Express converges to the polar factor U V^T where
Keller Jordan's fixed polynomial plateaus, and the default stays Keller's, bit for bit."""

from __future__ import annotations

import pytest
import torch

from optim import Muon, NorMuon
from optim.newton_schulz import newton_schulz5, ns5_flops, ns5_schedule

SHAPES = [(64, 64), (96, 48), (48, 176)]


def _polar_error(
    shape: tuple[int, int], coefficients: str, steps: int, dtype: torch.dtype = torch.float32
) -> float:
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    return ((newton_schulz5(g, steps, dtype, coefficients).double() - polar).norm() / polar.norm()).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_converges_where_keller_plateaus(shape) -> None:
    keller = [_polar_error(shape, "keller", steps) for steps in (5, 10)]
    polar = [_polar_error(shape, "polar_express", steps) for steps in (5, 10)]
    assert min(keller) > 0.15  # Keller's polynomial leaves singular values spread around 1, at any depth
    assert polar[0] < 0.7 * keller[0]  # closer at the default 5 steps
    # and at 10 steps the polar factor itself: in float64 (rounding ~1e-15) what is left is the iteration's own
    # distance, 9e-8 for the square matrix (its smallest singular value converges last), 4e-15 for the others
    assert _polar_error(shape, "polar_express", 10, torch.float64) < 1e-6


def test_the_schedules_are_the_published_ones() -> None:
    keller, margin = ns5_schedule("keller", 5)
    assert keller == [(3.4445, -4.7750, 2.0315)] * 5 and margin == 1.0
    polar, margin = ns5_schedule("polar_express", 10)
    assert margin == 1.01 and polar[0] == pytest.approx((8.2051, -22.9019, 16.4607), abs=1e-4)
    assert polar[7:] == [(1.875, -1.25, 0.375)] * 3  # past the table: its last (unscaled) polynomial
    with pytest.raises(ValueError, match="ns_coefficients must be one of keller, polar_express"):
        ns5_schedule("you", 5)


@pytest.mark.parametrize("cls", [Muon, NorMuon])
def test_keller_stays_the_default_bit_for_bit(cls) -> None:
    torch.manual_seed(0)
    weights = [torch.nn.Parameter(torch.randn(24, 16)) for _ in range(2)]
    copies = [torch.nn.Parameter(w.detach().clone()) for w in weights]
    for w, c in zip(weights, copies, strict=True):
        w.grad = torch.randn_like(w)
        c.grad = w.grad.clone()
    cls(weights, lr=0.02).step()
    cls(copies, lr=0.02, ns_coefficients="keller").step()
    assert all(torch.equal(w, c) for w, c in zip(weights, copies, strict=True))
    other = [torch.nn.Parameter(w.detach().clone()) for w in copies]
    with pytest.raises(ValueError, match="ns_coefficients: .jordan. is not one of keller, polar_express"):
        cls(other, ns_coefficients="jordan")


@pytest.mark.slow
def test_the_variants_train_like_keller_on_a_tiny_run(tmp_path) -> None:
    """The loss-parity check: tiny_muon for 60 steps with Polar Express's coefficients and with the Gram form
    reaches Keller's standard-form loss within 2%."""
    from tests.distributed import run_distributed
    from tests.run_helpers import FAST, logged, train_in_process

    final = {}
    for name, option in (("keller", []), ("polar_express", ["--optim.ns_coefficients=polar_express"]),
                         ("gram", ["--optim.ns_form=gram"])):  # fmt: skip
        overrides = [
            *FAST, "--train.steps=60", "--metrics.log_every=10", "--optim.lr=0.02", *option,  # calibrated lr
            f"--train.runs_dir={tmp_path}", f"--train.run_name={name}",
        ]  # fmt: skip
        run_distributed(train_in_process, 1, "tiny_muon.yaml", overrides)
        losses = logged(tmp_path / name)
        assert losses[-1] < losses[0] - 0.5, name
        final[name] = losses[-1]
    assert final["polar_express"] == pytest.approx(final["keller"], rel=0.02)
    assert final["gram"] == pytest.approx(final["keller"], rel=0.02)
    swan = {}
    for whitening in ("coupled", "coupled_adaptive"):  # SWAN's adaptive whitening likewise
        overrides = [
            *FAST, "--train.steps=60", "--metrics.log_every=10", f"--optim.whitening={whitening}",
            f"--train.runs_dir={tmp_path}", f"--train.run_name=swan_{whitening}",
        ]  # fmt: skip
        run_distributed(train_in_process, 1, "tiny_swan.yaml", overrides)
        swan[whitening] = logged(tmp_path / f"swan_{whitening}")[-1]
    assert swan["coupled_adaptive"] == pytest.approx(swan["coupled"], rel=0.02)


def test_tf32_is_the_default_and_changes_nothing_on_cpu() -> None:
    from optim import build_optimizer
    from trainer.config import OptimConfig

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 16, bias=False))
    copy = torch.nn.Sequential(torch.nn.Linear(16, 24, bias=False), torch.nn.Linear(24, 16, bias=False))
    copy.load_state_dict(model.state_dict())
    for m in (model, copy):
        for p in m.parameters():
            p.grad = torch.ones_like(p) + torch.arange(p.numel()).view_as(p) % 7
    tf32 = build_optimizer(OptimConfig(name="swan", lr=0.01), model)  # the default
    fp32 = build_optimizer(OptimConfig(name="swan", lr=0.01, ns_tf32=False), copy)
    assert tf32.ns_tf32 and not fp32.ns_tf32
    tf32.step()
    fp32.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), copy.parameters(), strict=True))


def _grad_normed(shape: tuple[int, int], seed: int = 0) -> torch.Tensor:
    g = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    centered = g - g.mean(dim=1, keepdim=True)
    return centered / centered.square().mean(dim=1, keepdim=True).sqrt()


@pytest.mark.parametrize("shape", SHAPES)
def test_adaptive_whitening_reaches_its_tolerance_or_the_fixed_iterations_accuracy(shape) -> None:
    """The adaptive form's output is within ADAPTIVE_TOL of orthogonal, or as close as today's 10 fixed
    iterations get when those do not reach it, and its distance to the polar factor (float64 SVD of the
    GradNorm'ed gradient, without the zero singular value the row centring leaves) is of that size."""
    from optim.newton_schulz import (
        ADAPTIVE_TOL,
        coupled_adaptive,
        coupled_inverse_sqrt_polar,
        orthogonality_error,
    )

    g = _grad_normed(shape)
    u, s, vh = torch.linalg.svd(g.double(), full_matrices=False)
    keep = s > 1e-6 * s[0]
    polar = u[:, keep] @ vh[keep]
    floor = (1 - keep.double().mean()).sqrt().item()  # a zero singular value: |O O^T - I| >= 1/sqrt(p)
    ran: list[int] = []
    adaptive = coupled_adaptive(g, 10, ran=ran)
    fixed_error = orthogonality_error(coupled_inverse_sqrt_polar(g, 10)).item()
    error = orthogonality_error(adaptive).item()
    assert error <= max(ADAPTIVE_TOL + floor, fixed_error * 1.01), (error, fixed_error)
    assert (adaptive.double() - polar).norm() / polar.norm() < 3 * ADAPTIVE_TOL
    if shape[0] != shape[1]:  # rectangular: well conditioned, converged before the cap (square: slow to the
        assert ran[0] < 10  # floor its near-zero singular values approach, so it may take all 10)


def test_adaptive_whitening_stops_each_matrix_on_its_own() -> None:
    """A result does not depend on the matrices it is batched with (owner-computes batches differ by rank)."""
    from optim.newton_schulz import coupled_adaptive

    batch = torch.stack([_grad_normed((48, 96), seed) for seed in range(3)]).double()
    batch[1] *= 0.0  # an all-zero gradient stops at once, with a zero result
    together = coupled_adaptive(batch, 10, dtype=torch.float64)
    for k in range(
        3
    ):  # in float64 batched and single kernels differ by rounding (~1e-16); one iteration more or
        alone = coupled_adaptive(batch[k], 10, dtype=torch.float64)  # less would differ by > 1e-3
        torch.testing.assert_close(together[k], alone, rtol=1e-12, atol=1e-12)
    assert torch.equal(together[1], torch.zeros_like(together[1]))


@pytest.mark.parametrize("coefficients", ["keller", "polar_express"])
def test_the_gram_form_is_the_same_iteration_on_fewer_flops(coefficients) -> None:
    """NS5 on the p x p Gram matrix gives the standard form's result (to fp64 rounding; 1e-6 in fp32), is used
    only where it costs fewer FLOPs, and costs 1.42x fewer on a llama_350m MLP matrix."""
    from optim.newton_schulz import gram_flops, gram_is_cheaper

    for shape in [(48, 176), (176, 48), (40, 64)]:
        g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 5e-6)):
            standard = newton_schulz5(g, 5, dtype, coefficients)
            gram = newton_schulz5(g, 5, dtype, coefficients, form="gram")
            assert (standard - gram).abs().max().item() < tol, (shape, dtype)
    square = torch.randn(64, 64, generator=torch.Generator().manual_seed(2))
    assert not gram_is_cheaper(64, 64, 5)  # square: the standard form runs, bit for bit
    assert torch.equal(newton_schulz5(square, 5, torch.float32, coefficients, form="gram"),
                       newton_schulz5(square, 5, torch.float32, coefficients))  # fmt: skip
    assert gram_is_cheaper(1024, 1536, 5) is False and gram_is_cheaper(1024, 1600, 5)
    assert ns5_flops(1024, 2736, 5) / gram_flops(1024, 2736, 5) == pytest.approx(1.42, abs=0.01)
