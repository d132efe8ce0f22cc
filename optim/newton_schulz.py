"""Matrix iterations that approximate the polar factor U V^T of a matrix (pure tensor math, no distribution).

All functions take a batch of same-shaped matrices `(..., m, n)` (a single 2-D matrix works too) and return the
same shape in the iteration's dtype; callers cast back. They work on the wide orientation (p = min(m, n) rows),
so the Gram matrices are p x p.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS5_EPS = 1e-7
_TINY = 1e-30  # guards divisions by a norm that is exactly zero (an all-zero gradient)
# Polar Express (Amsel, Persson, Musco, Gower 2025, Algorithm 1): one degree-5 polynomial per iteration, each the
# minimax-optimal one for the interval of singular values the previous ones leave, so the composition converges to
# the polar factor (Keller's fixed polynomial plateaus near orth_error 0.3). All but the last are divided by a
# safety factor 1.01 (a^1, b^3, c^5) for half precision, and the input is normalized by 1.01 |X|_F; iterations
# past the list repeat its last polynomial.
POLAR_EXPRESS_COEFFICIENTS = tuple(
    (a / 1.01, b / 1.01**3, c / 1.01**5)
    for a, b, c in (
        (8.28721201814563, -23.595886519098837, 17.300387312530933),
        (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
        (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
        (3.3184196573706015, -2.488488024314874, 0.51004894012372),
        (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
        (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
        (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    )
) + ((1.875, -1.25, 0.375),)
NS_COEFFICIENTS = ("keller", "polar_express")
NS_FORMS = ("standard", "gram")


def ns5_schedule(coefficients: str, steps: int) -> tuple[list[tuple[float, float, float]], float]:
    """(the polynomial of each of `steps` iterations, the normalization's factor on |X|_F) of a coefficient set."""
    if coefficients == "keller":
        return [NS5_COEFFICIENTS] * steps, 1.0
    if coefficients == "polar_express":
        table = POLAR_EXPRESS_COEFFICIENTS
        return [table[min(k, len(table) - 1)] for k in range(steps)], 1.01
    raise ValueError(f"ns_coefficients must be one of {', '.join(NS_COEFFICIENTS)}; got {coefficients!r}")


def _wide(x: Tensor) -> tuple[Tensor, bool]:
    """(x or its transpose so that rows <= columns, whether it was transposed), batched as 3-D."""
    x = x.reshape(-1, *x.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    return (x.mT if tall else x), tall


def newton_schulz5(
    g: Tensor,
    steps: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    coefficients: str = "keller",
    form: str = "standard",
) -> Tensor:
    """NS5 (docs/optimizers.md): Frobenius-normalize, then `steps` times X <- aX + (bA + cA^2)X with A = XX^T, with
    Keller Jordan's (a, b, c) every iteration (`keller`) or Polar Express's per-iteration ones (`polar_express`).
    form="gram": the same iterations on the p x p Gram matrix (`_gram_iterations`) for the matrices where that
    costs fewer FLOPs (`gram_is_cheaper`); the others, and form="standard", iterate on X itself.

    The operation order (norm in `dtype`, baddbmm for the fused multiply-adds) is Keller Jordan's / torch's
    Muon, so in bf16 our Muon equals torch.optim.Muon. Cost about steps * (4 p^2 q + 2 p^3) FLOPs per matrix.
    """
    schedule, margin = ns5_schedule(coefficients, steps)
    x, tall = _wide(g.to(dtype))
    x = x / (x.norm(dim=(-2, -1), keepdim=True) * margin + NS5_EPS)  # (* 1.0 is exact: Keller's unchanged)
    if form == "gram" and gram_is_cheaper(x.size(-2), x.size(-1), steps):
        x = _gram_iterations(x, schedule)
    else:
        for a, b, c in schedule:
            gram = x @ x.mT
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return (x.mT if tall else x).reshape(g.shape)


def _gram_iterations(x: Tensor, schedule: list[tuple[float, float, float]]) -> Tensor:
    """NS5's iterations run on the p x p Gram matrix: with R = X X^T each step is X <- Z X, Z = aI + bR + cR^2, so
    X_T = Q X_0 with Q = Z_{T-1} ... Z_0, and since every Z is a polynomial in R_0 they commute with R:
    R <- Z^2 R. Two products with the p x q matrix in all (R_0 and Q X_0) instead of two per step."""
    r = x @ x.mT
    eye = torch.eye(r.size(-1), dtype=r.dtype, device=r.device).expand_as(r)
    q = None
    for k, (a, b, c) in enumerate(schedule):
        z = torch.baddbmm(r, r, r, beta=b, alpha=c) + a * eye
        q = z if q is None else z @ q
        if k + 1 < len(schedule):
            r = z @ (z @ r)
    return x if q is None else q @ x


def gram_is_cheaper(p: int, q: int, steps: int) -> bool:
    """Whether the Gram form's FLOPs are below the standard form's for a wide (p, q) matrix (q >= 1.5 p at 5)."""
    return gram_flops(p, q, steps) < ns5_flops(p, q, steps)


def coupled_inverse_sqrt_polar(g: Tensor, steps: int = 10, dtype: torch.dtype = torch.float32) -> Tensor:
    """SWAN's whitening (G G^T)^{-1/2} G by the coupled Newton-Schulz inverse-square-root iteration.

    With A = G G^T (p x p) and Y0 = A / |A|_F, Z0 = I: T = 3I - ZY; Y <- Y T / 2; Z <- T Z / 2, so that
    Z -> Y0^{-1/2} = sqrt(|A|_F) A^{-1/2}; the result is Z G / sqrt(|A|_F). An all-zero G gives zeros.
    Cost about 4 p^2 q + 6 steps p^3 FLOPs per matrix.
    """
    x, tall = _wide(g.to(dtype))
    gram = x @ x.mT
    norm = gram.norm(dim=(-2, -1), keepdim=True).clamp_min(_TINY)
    eye = torch.eye(gram.size(-1), dtype=dtype, device=gram.device).expand_as(gram)
    y, z = gram / norm, eye.clone()
    for _ in range(steps):
        t = 3 * eye - z @ y
        y, z = 0.5 * (y @ t), 0.5 * (t @ z)
    out = (z @ x) / norm.sqrt()
    return (out.mT if tall else out).reshape(g.shape)


POWER_STEPS = 8  # power iterations of coupled_adaptive's eigenvalue estimate
ADAPTIVE_TOL = 0.03  # coupled_adaptive stops once every matrix's |Z Y - I|_F / sqrt(p) is below this ...
STALL = 0.98  # ... or none of them improved it by more than 2% in the last iteration


def coupled_adaptive(
    g: Tensor, steps: int = 10, dtype: torch.dtype = torch.float32, ran: list[int] | None = None
) -> Tensor:
    """The coupled iteration of `coupled_inverse_sqrt_polar`, started and stopped better.

    Start: A scaled by an estimate of its largest eigenvalue (POWER_STEPS power iterations from a fixed vector,
    the Rayleigh quotient times 1.05) instead of |A|_F, which is up to sqrt(p) times larger and leaves every
    eigenvalue of Y0 that much further from 1. Stop: Z Y is the Gram matrix O O^T of the current output O, so
    |Z Y - I|_F / sqrt(p) is its orthogonality error, free from the iteration's own T = 3I - Z Y; the batch stops
    once every matrix is below ADAPTIVE_TOL or has stalled (SWAN's row-centred gradients of square and tall
    matrices have an exact zero singular value, which floors the error at 1/sqrt(p)), after `steps` at most. Each
    matrix of a batch stops on its own, so a result does not depend on which matrices share its batch.
    Cost 4 p^2 q + 6 k p^3 for the k iterations run (appended to `ran` when given), plus one host
    synchronization per iteration.
    """
    if g.device.type == "meta":  # the memory planner: no values to stop on; the fixed iteration's footprint
        return coupled_inverse_sqrt_polar(g, steps, dtype)
    x, tall = _wide(g.to(dtype))
    gram = x @ x.mT
    p = gram.size(-1)
    v = torch.randn(p, 1, generator=torch.Generator().manual_seed(0), dtype=dtype).to(gram.device)
    v = v.expand(gram.size(0), p, 1)
    for _ in range(POWER_STEPS):
        v = gram @ v
        v = v / v.norm(dim=-2, keepdim=True).clamp_min(_TINY)
    scale = ((v.mT @ gram @ v) * 1.05).clamp_min(_TINY)  # (B, 1, 1)
    eye = torch.eye(p, dtype=dtype, device=gram.device).expand_as(gram)
    y, z = gram / scale, eye.clone()
    previous = torch.full((gram.size(0),), math.inf, dtype=dtype, device=gram.device)
    active = torch.arange(gram.size(0), device=gram.device)  # the matrices still iterating
    done = 0
    for _ in range(steps):
        ya, za = y[active], z[active]
        zy = za @ ya
        error = (zy - eye[: len(active)]).flatten(1).norm(dim=1) / p**0.5
        going = (error >= ADAPTIVE_TOL) & (error <= STALL * previous[active])
        if not bool(going.any()):
            break
        previous[active] = error
        active, zy, ya, za = active[going], zy[going], ya[going], za[going]
        t = 3 * eye[: len(active)] - zy
        y[active], z[active] = 0.5 * (ya @ t), 0.5 * (t @ za)
        done += 1
    if ran is not None:
        ran.append(done)
    out = (z @ x) / scale.sqrt()
    return (out.mT if tall else out).reshape(g.shape)


def ns5_flops(m: int, n: int, steps: int = 1) -> float:
    """Matmul FLOPs of `newton_schulz5` on one (m, n) matrix: steps * (4 p^2 q + 2 p^3)."""
    p, q = min(m, n), max(m, n)
    return steps * (4 * p * p * q + 2 * p**3)


def gram_flops(m: int, n: int, steps: int = 1) -> float:
    """Matmul FLOPs of NS5's Gram form on one (m, n) matrix: 4 p^2 q (R_0, Q X_0) + (8 steps - 6) p^3."""
    p, q = min(m, n), max(m, n)
    return 4 * p * p * q + (8 * steps - 6) * p**3


def ns5_form_flops(m: int, n: int, steps: int = 5, form: str = "standard") -> float:
    """NS5's matmul FLOPs on one (m, n) matrix in `form` (the Gram form only where it is cheaper)."""
    return min(gram_flops(m, n, steps), ns5_flops(m, n, steps)) if form == "gram" else ns5_flops(m, n, steps)


def coupled_flops(m: int, n: int, steps: int = 10) -> float:
    """Matmul FLOPs of `coupled_inverse_sqrt_polar` on one (m, n) matrix: 4 p^2 q + 6 steps p^3."""
    p, q = min(m, n), max(m, n)
    return 4 * p * p * q + 6 * steps * p**3


def orthogonality_error(o: Tensor) -> Tensor:
    """|O O^T - I|_F / sqrt(p) of one matrix in its wide orientation (0 for an exact polar factor), in fp32."""
    x, _ = _wide(o.float())
    x = x[0]
    eye = torch.eye(x.size(0), dtype=x.dtype, device=x.device)
    return torch.linalg.matrix_norm(x @ x.mT - eye) / x.size(0) ** 0.5
