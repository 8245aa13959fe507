"""Width importance (OBS / ZipLM-style, one shot on the dense model).

Φᵢⱼ = Wᵢⱼ² / [H⁻¹]ⱼⱼ for the *output* projection (o_proj / down_proj) with its input Hessian
H = 2XXᵀ (+ 1% damping, raypress.hessian). A MLP channel's score is Σ of Φ over its down_proj
column (one shared mask for gate/up rows and down columns); a query head's score is Σ of Φ over its
head_dim o_proj columns. Kept sets are the top-k by score, so masks are nested (level k+1 ⊂ level k).
"""
from __future__ import annotations

import numpy as np
import torch

from raypress.calibrate import collect_hessians
from raypress.errors import RayPressError
from raypress.hessian import damp_, inverse_diagonal

from .levels import BlockGeometry, _attn_mlp, _geometries, _layout


@torch.no_grad()
def width_hessians(model, adapter, calib: np.ndarray, batch_size: int = 8, device: str | None = None,
                   ) -> dict[str, torch.Tensor]:
    """H = 2/N Σ x xᵀ of every o_proj and down_proj input on the dense model.

    Streams the dense model block by block (raypress.calibrate.collect_hessians(layers=...))."""
    if adapter is None:
        from raypress.models import get_adapter

        adapter = get_adapter(model)
    lay = _layout(model, adapter)
    names = []
    for i in range(len(lay.blocks)):
        names += [f"{lay.unit(i, 'attn')}.o_proj", f"{lay.unit(i, 'mlp')}.down_proj"]
    return collect_hessians(model, adapter, calib, batch_size=batch_size, device=device or "cpu", layers=names)


def _hinv_diag(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    Hd = H.double().clone()
    damp_(Hd, percdamp)
    return inverse_diagonal(Hd)


def _column_scores(W: torch.Tensor, H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Φ summed per input column: Σᵢ Wᵢⱼ² / [H⁻¹]ⱼⱼ."""
    return (W.double() ** 2).sum(0) / _hinv_diag(H, percdamp)


@torch.no_grad()
def width_importance(model, adapter, hessians: dict, percdamp: float = 0.01) -> dict[str, np.ndarray]:
    """Per unit: MLP → score per channel [inter]; attention → score per query head [n_q]."""
    lay = _layout(model, adapter)
    geoms = _geometries(model, lay)
    out = {}
    for i, (blk, g) in enumerate(zip(lay.blocks, geoms)):
        attn, mlp = _attn_mlp(blk, lay)
        on, dn = f"{lay.unit(i, 'attn')}.o_proj", f"{lay.unit(i, 'mlp')}.down_proj"
        for n in (on, dn):
            if n not in hessians:
                raise RayPressError(f"no calibration Hessian for '{n}'; compute them with width_hessians()")
        dev = attn.o_proj.weight.device  # compute where the model lives (GPU: fast float64 solves)
        s = _column_scores(attn.o_proj.weight.detach(), hessians[on].to(dev), percdamp)
        out[lay.unit(i, "attn")] = s.view(g.n_q, g.head_dim).sum(1).cpu().numpy()
        out[lay.unit(i, "mlp")] = _column_scores(mlp.down_proj.weight.detach(), hessians[dn].to(dev),
                                                  percdamp).cpu().numpy()
    return out


def _kept_heads(scores: np.ndarray, g: BlockGeometry, mode: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept query heads sorted, kept kv heads sorted) for attention level parameter k."""
    per = scores.reshape(g.n_kv, g.r)
    if mode == "query":
        q = []
        for j in range(g.n_kv):
            top = np.argsort(-per[j], kind="stable")[:k]
            q += sorted(int(j * g.r + t) for t in top)
        return np.array(q, dtype=np.int64), np.arange(g.n_kv, dtype=np.int64)
    grp = np.sort(np.argsort(-per.sum(1), kind="stable")[:k])
    q = np.concatenate([np.arange(j * g.r, (j + 1) * g.r) for j in grp])
    return q.astype(np.int64), grp.astype(np.int64)


def _head_cols(heads: np.ndarray, d: int) -> np.ndarray:
    return (heads[:, None] * d + np.arange(d)[None, :]).reshape(-1).astype(np.int64)


