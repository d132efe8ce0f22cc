import math

import pytest

from trainer.schedule import lr_multiplier


def test_cosine_galore_setup() -> None:
    total = 100
    lrs = [lr_multiplier(s, total, "cosine", 0.1, 0.1, 0.0) for s in range(total)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup to the peak
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 45 / 90)))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)  # cosine ends at min_lr_ratio of the peak
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))


def test_wsd_and_constant() -> None:
    total = 100
    wsd = [lr_multiplier(s, total, "wsd", 0.1, 0.0, 0.2) for s in range(total)]
    assert wsd[10:80] == [1.0] * 70  # stable phase
    assert wsd[90] == pytest.approx(1 - 10 / 20)  # linear decay over the last 20%
    assert wsd[-1] == pytest.approx(1 / 20)
    assert [lr_multiplier(s, total, "constant", 0.0, 0.1, 0.2) for s in (0, 50, 99)] == [1.0, 1.0, 1.0]


def test_unknown_schedule() -> None:
    with pytest.raises(ValueError, match="unknown schedule"):
        lr_multiplier(0, 10, "linear", 0.0, 0.1, 0.1)
