"""update_spectral_norm and update_stable_rank: the spectrum of the sampled matrix's applied update.

Single process: every matrix optimizer (and variant) and torch's AdamW report |U|_2 and |U|_F^2 / |U|_2^2 of the
update U they actually applied to the sampled matrix (weights before and after the step, weight decay taken out),
against torch.linalg, on matrices with more columns than update_spectrum's Lanczos steps (so its Krylov space is
not the whole space); update_spectrum itself on a flat-topped spectrum (an NS5 output), a rank-deficient matrix (the
Krylov space closes early), a zero matrix and a single row.

Sharded (slow, gloo, world sizes 2 and 4): FSDP2 and HSDP 2 x 2 report the single-process numbers, with the sampled
matrix either wq (13 rows: uneven blocks) or wk (1 row: ranks holding no rows of it), on
tests/test_optim_distributed.py's stand-in model, cases and steps; and update_spectrum on hand-sharded blocks.

Tolerances. LANCZOS_REL = 1e-3 is update_spectrum's own truncation error (optim.health.SPECTRUM_STEPS: at most
1e-3 with 32 steps on the rules' updates, measured there; 2e-6 at most here): the comparisons with torch.linalg
that it applies to are made in float64 (float64 parameters, hence float64 updates and health), so that rounding
adds nothing (in fp32, storing the stepped weights rounds them by u32 |W|, up to 6e-5 of these updates). The
sharded numbers are float64 too, the same computation summed over ranks: test_optim_distributed's REL_TOL. FP32_REL
bounds update_spectrum in fp32 where Lanczos has the whole space (or closes early), so no truncation: it is
backward stable, the top Ritz value within ~k u32 = 2e-6 (k = 32 steps, u32 = 6e-8) and |U|_F^2 within
log2(m n) u32 = 1e-6 relative; 1e-5 is 3 times their sum (measured: 1.2e-7).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from optim import OPTIMIZERS, AdamW, MatrixOptimizer, track_health
from optim.health import SPECTRUM_STEPS, update_spectrum
from optim.newton_schulz import newton_schulz5
from tests.distributed import run_distributed
from tests.test_optim_distributed import CASES, REL_TOL, STEPS, _build, _step

KEYS = ("update_spectral_norm", "update_stable_rank")
WD = 0.1
LANCZOS_REL = 1e-3  # update_spectrum's truncation (module docstring)
FP32_REL = 1e-5  # update_spectrum's rounding in fp32, without truncation (module docstring)
# (optimizer name, constructor options): every rule, the non-default variants and whitening, default dtypes
RULES = [
    *((name, {}) for name in OPTIMIZERS),
    ("swan", {"whitening": "ns5"}),
    ("normuon", {"variant": "reference_code"}),
    ("auon", {"variant": "reference_code"}),
    ("hybrid_auon", {"variant": "reference_code"}),
]


def _reference(update: Tensor) -> dict[str, float]:
    """torch.linalg's numbers for a whole update, in float64."""
    u = update.double()
    spectral = torch.linalg.matrix_norm(u, ord=2).item()
    return {"update_spectral_norm": spectral, "update_stable_rank": (u.square().sum() / spectral**2).item()}


def _assert_close(got: dict[str, float], expected: dict[str, float], rel: float) -> None:
    for key in KEYS:
        assert got[key] == pytest.approx(expected[key], rel=rel), key


def _matrices(probe_shape: tuple[int, int], gen: torch.Generator) -> list[nn.Parameter]:
    """float64 parameters: the rules' state, math and health follow (optim.sharded.math_dtype)."""
    shapes = (probe_shape, (16, 16), (12, 20))
    return [nn.Parameter(torch.randn(s, generator=gen, dtype=torch.float64)) for s in shapes]


def _two_steps(opt: torch.optim.Optimizer, params: list[nn.Parameter], gen: torch.Generator) -> dict:
    """One untracked step (momentum and AdamW moments become non-trivial), then a tracked one; (report, the
    update applied to params[0] in the tracked step with decoupled weight decay taken out)."""
    for step in range(2):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        before = params[0].detach().clone()
        with track_health(opt, enabled=step == 1) as tracked:
            opt.step()
    lr = opt.param_groups[0]["lr"]
    applied = before * (1 - lr * WD) - params[0].detach()
    return tracked.report(), applied


@pytest.mark.parametrize("probe_shape", [(96, 64), (40, 72)], ids=["tall", "wide"])
@pytest.mark.parametrize(
    ("name", "options"), RULES, ids=[f"{n}-{'-'.join(o.values()) or 'default'}" for n, o in RULES]
)
def test_matrix_optimizers_report_the_spectrum_of_the_applied_update(name, options, probe_shape):
    assert (
        min(probe_shape) > SPECTRUM_STEPS
    )  # the Krylov space is not the whole space: update_spectrum is not
    gen = torch.Generator().manual_seed(0)  # exact by dimension
    params = _matrices(probe_shape, gen)
    opt = OPTIMIZERS[name](params, weight_decay=WD, **options)
    assert opt._sampled is params[0]  # the sampled matrix: the first of the first matrix group
    health, applied = _two_steps(opt, params, gen)
    _assert_close(health, _reference(applied), rel=LANCZOS_REL)


def test_adamw_reports_the_spectrum_of_its_first_two_dimensional_parameter_with_state():
    gen = torch.Generator().manual_seed(0)
    bias = nn.Parameter(torch.randn(7, generator=gen, dtype=torch.float64))  # 1-D: skipped
    frozen = nn.Parameter(
        torch.randn(5, 9, generator=gen, dtype=torch.float64)
    )  # 2-D but never stepped (no grad, no state): skipped
    params = _matrices((96, 64), gen)
    opt = AdamW([bias, frozen, *params], lr=1e-2, weight_decay=WD)
    for _ in range(2):
        for p in (bias, *params):
            p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
        before = params[0].detach().clone()
        opt.step()
    with track_health(opt) as tracked:
        pass
    health = tracked.report()
    applied = before * (1 - 1e-2 * WD) - params[0].detach()
    _assert_close(health, _reference(applied), rel=LANCZOS_REL)


def test_no_spectrum_without_a_step_of_the_sampled_matrix():
    gen = torch.Generator().manual_seed(0)
    params = _matrices((96, 64), gen)
    opt = OPTIMIZERS["muon"](params)
    for p in params[1:]:  # the sampled matrix has no gradient: it is not stepped
        p.grad = torch.randn(p.shape, generator=gen, dtype=p.dtype)
    with track_health(opt) as tracked:
        opt.step()
    health = tracked.report()
    assert "update_rms" in health and not set(KEYS) & set(health)


@pytest.mark.parametrize(
    "make",
    [
        lambda gen: newton_schulz5(torch.randn(256, 256, generator=gen), dtype=torch.float32),  # flat top
        lambda gen: torch.randn(5, 64, generator=gen),  # rank 5 < SPECTRUM_STEPS: the Krylov space closes
        lambda gen: torch.randn(1, 13, generator=gen),
        lambda gen: torch.randn(64, 3, generator=gen) @ torch.randn(3, 80, generator=gen),  # rank 3, tall
    ],
    ids=["ns5-output", "rank-deficient-wide", "one-row", "rank-deficient-tall"],
)
def test_update_spectrum_equals_torch_linalg(make: Callable[[torch.Generator], Tensor]):
    matrix = make(torch.Generator().manual_seed(0)).float()
    _assert_close(update_spectrum(matrix, None), _reference(matrix), rel=FP32_REL)


def test_update_spectrum_of_a_zero_matrix_is_zero():
    assert update_spectrum(torch.zeros(7, 40), None) == dict.fromkeys(KEYS, 0.0)


# ------------------------------------------------------------------------------------------- sharded (gloo)

LAYOUTS = {2: {"fsdp2": (2,)}, 4: {"fsdp4": (4,), "hsdp2x2": (2, 2)}}  # a 2-D shape is (replicate, shard)
PROBES = {"wq": lambda m: m.layers[0].attention.wq.weight, "wk": lambda m: m.layers[0].attention.wk.weight}
HAND_SHARDED = [
    (70, 48),
    (3, 40),
    (1, 13),
]  # more columns than Lanczos steps; fewer rows than 4 ranks; one row


def _sample(opt: torch.optim.Optimizer, param: Tensor) -> None:
    """Make `param` the sampled matrix: first in the first param group (AdamW samples its first 2-D parameter
    with state) and the matrix optimizers' probe (fixed when that group was added)."""
    params = opt.param_groups[0]["params"]
    params.insert(0, params.pop(next(i for i, p in enumerate(params) if p is param)))
    if isinstance(opt, MatrixOptimizer):
        opt._sampled = param


def _health(case: str, probe: str, mesh) -> dict[str, float]:
    """test_optim_distributed's training run (same model, seed, batch and steps), the last step tracked."""
    model, opt = _build(case, mesh)
    _sample(opt, PROBES[probe](model))
    for step in range(STEPS):
        with track_health(opt, enabled=step == STEPS - 1) as tracked:
            _step(model, opt, Counter())
    return tracked.report()


def _hand_sharded() -> list[dict[str, float]]:
    """update_spectrum of row blocks (torch.chunk semantics) over the world group; rank 3 of 4 holds no rows of
    the 3-row matrix and ranks 1.. none of the 1-row one."""
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(0)
    out = []
    for shape in HAND_SHARDED:
        whole = torch.randn(shape, generator=gen, dtype=torch.float64)
        chunk = -(-shape[0] // world)
        out.append(update_spectrum(whole[rank * chunk : (rank + 1) * chunk], dist.group.WORLD))
    return out


def _sharded_runs() -> dict:
    from torch.distributed.device_mesh import init_device_mesh

    out: dict = {"hand_sharded": _hand_sharded()}
    for layout, shape in LAYOUTS[dist.get_world_size()].items():
        names = ("shard",) if len(shape) == 1 else ("replicate", "shard")
        mesh = init_device_mesh("cpu", shape, mesh_dim_names=names)
        for case in CASES:
            for probe in PROBES:
                out[f"{layout}/{case}/{probe}"] = _health(case, probe, mesh)
    return out


@pytest.fixture(scope="module")
def sharded_runs() -> dict[int, dict]:
    return {world: run_distributed(_sharded_runs, world) for world in LAYOUTS}


@pytest.mark.slow
@pytest.mark.parametrize("world", list(LAYOUTS))
def test_sharded_spectrum_equals_single_process(sharded_runs, world):
    runs = sharded_runs[world]
    for case in CASES:
        for probe in PROBES:
            single = _health(case, probe, None)
            assert set(KEYS) <= set(single), case
            for layout in LAYOUTS[world]:
                sharded = runs[f"{layout}/{case}/{probe}"]
                assert set(sharded) == set(single), (layout, case, probe)
                for key in KEYS:
                    assert sharded[key] == pytest.approx(single[key], rel=REL_TOL), (layout, case, probe, key)


@pytest.mark.slow
@pytest.mark.parametrize("world", list(LAYOUTS))
def test_update_spectrum_on_hand_sharded_blocks(sharded_runs, world):
    gen = torch.Generator().manual_seed(0)
    for shape, sharded in zip(HAND_SHARDED, sharded_runs[world]["hand_sharded"], strict=True):
        whole = torch.randn(shape, generator=gen, dtype=torch.float64)
        _assert_close(sharded, update_spectrum(whole, None), rel=REL_TOL)  # float64, summed over ranks
        _assert_close(sharded, _reference(whole), rel=LANCZOS_REL)
