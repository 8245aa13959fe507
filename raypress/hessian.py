"""The damped inverse Hessian that SparseGPT, GPTQ, the Hessian scheduler and width importance share.

Every OBS-style method works with H = 2/N Σ x xᵀ of a layer's input. Columns that never see
input (H_jj = 0, "dead") get H_jj = 1 (their weights are zeroed by the callers), then
`percdamp` x mean(diag H) is added to the diagonal so the Cholesky factorization exists. One
operation order, here, so the four users cannot drift apart.
"""
from __future__ import annotations

import torch

from .errors import RayPressError


def damp_(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """In place: dead columns to 1, then + percdamp·mean(diag H) on the diagonal. Returns the dead mask."""
    d = torch.diagonal(H)
    dead = d == 0
    H[dead, dead] = 1
    d.add_(percdamp * torch.mean(d))
    return dead


def inverse_cholesky_upper(H: torch.Tensor, who: str = "OBS", percdamp: float = 0.01) -> torch.Tensor:
    """Upper Cholesky factor of H⁻¹ (SparseGPT / GPTQ's `Hinv`) of an H damped with `percdamp`;
    RayPressError naming `who` when H is not positive definite."""
    try:
        L = torch.linalg.cholesky(H)
        return torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
    except RuntimeError as e:  # torch.linalg.LinAlgError subclasses RuntimeError
        raise RayPressError(f"{who}: Hessian is not positive definite even after {percdamp} damping "
                            f"({e.__class__.__name__}); raise percdamp (e.g. 0.05) or use more "
                            "calibration tokens") from None


def inverse_diagonal(H: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """diag(H⁻¹) of an already damped H: Σ_i (L⁻¹)_ij² with H = L Lᵀ (much faster than a full
    inverse on CPU); the pseudo-inverse when H is not positive definite.

    L⁻¹ is built `chunk` columns at a time, and column block [a, b) of the lower-triangular L⁻¹ is
    (L[a:, a:])⁻¹'s first columns: memory n x chunk beyond L instead of three n x n copies (an
    OPT-66B fc2 Hessian is 36864 wide: 11 GB each in float64), and a third of the solve's FLOPs."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        return torch.diagonal(torch.linalg.pinv(H))
    n = H.shape[0]
    out = torch.empty(n, dtype=H.dtype, device=H.device)
    for a in range(0, n, chunk):
        b = min(a + chunk, n)
        rhs = torch.zeros(n - a, b - a, dtype=H.dtype, device=H.device)
        rhs[: b - a].fill_diagonal_(1.0)
        cols = torch.linalg.solve_triangular(L[a:, a:], rhs, upper=False)  # L⁻¹[a:, a:b]
        out[a:b] = (cols * cols).sum(0)
        del rhs, cols
    return out
