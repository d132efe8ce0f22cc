"""Matrix iterations that approximate the polar factor U V^T of a matrix (pure tensor math, no distribution).

All functions take a batch of same-shaped matrices `(..., m, n)` (a single 2-D matrix works too) and return the
same shape in the iteration's dtype; callers cast back. They work on the wide orientation (p = min(m, n) rows),
so the Gram matrices are p x p.
"""

from __future__ import annotations

import torch
from torch import Tensor

NS5_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS5_EPS = 1e-7
_TINY = 1e-30  # guards divisions by a norm that is exactly zero (an all-zero gradient)


def _wide(x: Tensor) -> tuple[Tensor, bool]:
    """(x or its transpose so that rows <= columns, whether it was transposed), batched as 3-D."""
    x = x.reshape(-1, *x.shape[-2:])
    tall = x.size(-2) > x.size(-1)
    return (x.mT if tall else x), tall


def newton_schulz5(g: Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> Tensor:
    """NS5 (docs/optimizers.md): Frobenius-normalize, then `steps` times X <- aX + (bA + cA^2)X with A = XX^T.

    The operation order (norm in `dtype`, baddbmm for the fused multiply-adds) is Keller Jordan's / torch's
    Muon, so in bf16 our Muon equals torch.optim.Muon. Cost about steps * (4 p^2 q + 2 p^3) FLOPs per matrix.
    """
    a, b, c = NS5_COEFFICIENTS
    x, tall = _wide(g.to(dtype))
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + NS5_EPS)
    for _ in range(steps):
        gram = x @ x.mT
        poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.baddbmm(x, poly, x, beta=a)
    return (x.mT if tall else x).reshape(g.shape)


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


def ns5_flops(m: int, n: int, steps: int = 1) -> float:
    """Matmul FLOPs of `newton_schulz5` on one (m, n) matrix: steps * (4 p^2 q + 2 p^3)."""
    p, q = min(m, n), max(m, n)
    return steps * (4 * p * p * q + 2 * p**3)


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
