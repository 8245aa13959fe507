"""Weight reformation: refit the kept weights of a pruned linear layer to the dense outputs.

For a layer y = W x with calibration inputs X (H = X Xᵀ, any positive scale, e.g. the
`2/N Σ x xᵀ` of `raypress.calibrate.collect_hessians`), pruning some weights and leaving the
rest unchanged ("plain masking") is usually far from the best the kept weights can do.
Reformation solves

    min_Ŵ ‖Ŵ X − W X‖²_F   subject to  Ŵ = 0 on the pruned entries

two ways:

* `lstsq_columns` — exact least squares when whole *input columns* are pruned (structured
  width pruning: o_proj / down_proj inputs). Closed form (λ = damping, see the function):
  Ŵ_K = (W H[:, K] + λ W_K) (H[K, K] + λI)⁻¹  (λ → 0: W H[:, K] H[K, K]⁻¹).
* `admm_reform` — ADMM for an arbitrary mask (also unstructured / N:M masks), following
  Boža, "Fast and Optimal Weight Update for Pruned Large Language Models" (2024). For a
  column mask it converges to the `lstsq_columns` solution.

`output_error(W, Ŵ, H)` = trace((W − Ŵ) H (W − Ŵ)ᵀ) = ‖(W − Ŵ) X‖²_F is the quantity both minimize.
All functions take/return torch tensors, compute in float64 internally (small matrices: one
layer's [in, in] Hessian) and never modify their inputs.
"""
from __future__ import annotations

import torch

__all__ = ["lstsq_columns", "admm_reform", "output_error", "mask_columns", "column_mask"]


def _damp(H: torch.Tensor, percdamp: float) -> float:
    d = torch.diagonal(H)
    m = float(d.mean()) if d.numel() else 0.0
    return percdamp * m if m > 0 else percdamp


def output_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """‖(W − Ŵ) X‖²_F with H = X Xᵀ (same scale as H). Shapes [out, in], [out, in], [in, in]."""
    D = (W.double() - W_hat.double())
    return float(torch.einsum("oi,ij,oj->", D, H.double(), D))


def column_mask(n_in: int, kept, device=None) -> torch.Tensor:
    """Boolean [n_in] mask, True at the kept input columns."""
    m = torch.zeros(n_in, dtype=torch.bool, device=device)
    m[torch.as_tensor(kept, dtype=torch.long, device=device)] = True
    return m


def mask_columns(W: torch.Tensor, kept) -> torch.Tensor:
    """Plain masking (no reformation): a copy of W with the non-kept input columns zeroed."""
    out = torch.zeros_like(W)
    k = torch.as_tensor(kept, dtype=torch.long, device=W.device)
    out[:, k] = W[:, k]
    return out


def lstsq_columns(W: torch.Tensor, H: torch.Tensor, kept, percdamp: float = 0.01,
                  full: bool = False) -> torch.Tensor:
    """Exact least-squares refit of W [out, in] restricted to the kept input columns K.

    Minimizes ‖Ŵ_K X_K − W X‖² + λ‖Ŵ_K − W_K‖² (a ridge towards the dense kept weights, so λ
    only ever pulls the answer towards plain masking), i.e.

        Ŵ_K = (W H[:, K] + λ W_K) (H[K, K] + λI)⁻¹,   λ = percdamp · mean(diag H)

    (λ → 0: Ŵ_K = W H[:, K] H[K, K]⁻¹). This is the same objective `admm_reform` minimizes with the
    same `percdamp`, so ADMM with a column mask converges to exactly this. Returns [out, |K|] in
    W's dtype, or the full [out, in] layout with zeros at pruned columns when `full=True`.
    """
    dtype = W.dtype
    Wd, Hd = W.double(), H.double()
    k = torch.as_tensor(kept, dtype=torch.long, device=W.device)
    if k.numel() == 0:
        return W.new_zeros(W.shape) if full else W.new_zeros(W.shape[0], 0)
    lam = _damp(Hd, percdamp)
    Hkk = Hd[k][:, k].clone()
    Hkk.diagonal().add_(lam)
    rhs = Wd @ Hd[:, k] + lam * Wd[:, k]              # [out, |K|]
    # solve S Hkk = rhs  <=>  Hkk Sᵀ = rhsᵀ (Hkk symmetric positive definite)
    L, info = torch.linalg.cholesky_ex(Hkk)
    if int(info) == 0:
        sol = torch.cholesky_solve(rhs.T, L).T
    else:                                            # singular even after damping: least squares
        sol = torch.linalg.lstsq(Hkk, rhs.T).solution.T
    sol = sol.to(dtype)
    if not full:
        return sol.contiguous()
    out = torch.zeros_like(W)
    out[:, k] = sol
    return out


def admm_reform(W: torch.Tensor, H: torch.Tensor, mask: torch.Tensor, rho: float = 1.0,
                iters: int = 30, percdamp: float = 0.01, rho_growth: float = 1.0) -> torch.Tensor:
    """ADMM refit of W [out, in] under a keep-mask ([out, in] or a column mask [in]).

    Solves min ‖(Ŵ − W) X‖² s.t. Ŵ = 0 where mask is False, by splitting Ŵ = Z:
        Ŵ ← (W Ĥ + ρ (Z − U)) (Ĥ + ρI)⁻¹ ;  Z ← mask ⊙ (Ŵ + U) ;  U ← U + Ŵ − Z
    with Ĥ = H / mean(diag H) + percdamp·I (so ρ ≈ 1 is scale-free). One eigendecomposition of Ĥ
    serves every ρ (`rho_growth` > 1 multiplies ρ each iteration, which speeds convergence at
    the end). Returns Z: exactly zero on pruned entries, W's dtype, full [out, in] layout.
    """
    dtype = W.dtype
    Wd = W.double()
    Hd = H.double()
    d = torch.diagonal(Hd)
    scale = float(d.mean()) if float(d.mean()) > 0 else 1.0
    Hn = Hd / scale
    Hn = Hn + percdamp * torch.eye(Hn.shape[0], dtype=Hn.dtype, device=Hn.device)
    evals, Q = torch.linalg.eigh(Hn)
    m = mask.to(device=W.device, dtype=torch.bool)
    if m.dim() == 1:
        m = m.unsqueeze(0).expand_as(Wd)
    mf = m.to(Wd.dtype)
    WH = Wd @ Hn                                      # constant part of the Ŵ update
    Z = Wd * mf
    U = torch.zeros_like(Wd)
    r = float(rho)
    for _ in range(int(iters)):
        rhs = WH + r * (Z - U)
        Wk = ((rhs @ Q) / (evals + r)) @ Q.T         # rhs (Ĥ + ρI)⁻¹
        Z = (Wk + U) * mf
        U = U + Wk - Z
        if rho_growth != 1.0:
            U = U / rho_growth                       # scaled dual: U = y/ρ
            r *= rho_growth
    return Z.to(dtype)
