"""Newton-Schulz coefficient sets against float64 SVD: Polar Express converges to the polar factor U V^T where
Keller Jordan's fixed polynomial plateaus, and the default stays Keller's, bit for bit."""

from __future__ import annotations

import pytest
import torch

from optim import Muon, NorMuon
from optim.newton_schulz import newton_schulz5, ns5_schedule

SHAPES = [(64, 64), (96, 48), (48, 176)]


def _polar_error(shape: tuple[int, int], coefficients: str, steps: int) -> float:
    g = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u, _, vh = torch.linalg.svd(g, full_matrices=False)
    polar = u @ vh
    return (
        (newton_schulz5(g, steps, torch.float32, coefficients).double() - polar).norm() / polar.norm()
    ).item()


@pytest.mark.parametrize("shape", SHAPES)
def test_polar_express_converges_where_keller_plateaus(shape) -> None:
    keller = [_polar_error(shape, "keller", steps) for steps in (5, 10)]
    polar = [_polar_error(shape, "polar_express", steps) for steps in (5, 10)]
    assert min(keller) > 0.15  # Keller's polynomial leaves singular values spread around 1, at any depth
    assert polar[0] < 0.7 * keller[0]  # closer at the default 5 steps
    assert polar[1] < 1e-5  # and at 10 the polar factor to fp32 accuracy


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
    with pytest.raises(ValueError, match="ns_coefficients must be one of"):
        cls(other, ns_coefficients="jordan")


@pytest.mark.slow
def test_polar_express_trains_like_keller_on_a_tiny_run(tmp_path) -> None:
    """The loss-parity check: tiny_muon for 60 steps with each set reaches the same loss within 2%."""
    from tests.distributed import run_distributed
    from tests.run_helpers import FAST, logged, train_in_process

    final = {}
    for coefficients in ("keller", "polar_express"):
        overrides = [
            *FAST, "--train.steps=60", "--metrics.log_every=10", f"--optim.ns_coefficients={coefficients}",
            f"--train.runs_dir={tmp_path}", f"--train.run_name={coefficients}",
        ]  # fmt: skip
        run_distributed(train_in_process, 1, "tiny_muon.yaml", overrides)
        losses = logged(tmp_path / coefficients)
        assert losses[-1] < losses[0] - 0.5, coefficients
        final[coefficients] = losses[-1]
    assert final["polar_express"] == pytest.approx(final["keller"], rel=0.02)
