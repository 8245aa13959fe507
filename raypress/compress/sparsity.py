"""Unstructured sparsity: SparseGPT, Wanda and magnitude pruning.

Levels
------
The level ladder is a FIXED SPARSITY STEP ladder, by default ``[0.0, 0.1, ..., 0.9]`` (level
index = position, ascending sparsity; any ascending list of distinct values in [0, 1) may be
given). Level value 0.0 returns the weight unchanged (a copy, dead columns included). The search
budget is exact: the search space (space.py) turns values into integer costs
``n_params * round(value * 1000)`` with ``budget = round(target * 1000) * sum(n_params)``, and its
mutations are budget-preserving level switches, so every candidate has exactly the target's
parameter-weighted mean sparsity. The *actual* zero fraction of a variant matches its level value
to within one weight per mask group (see ``LevelDatabase.actual_sparsity``).

SparseGPT (Frantar & Alistarh 2023), following IST-DASLab/sparsegpt ``fasterprune``
------------------------------------------------------------------------------------
::

    dead = diag(H) == 0;  H[dead, dead] = 1;  W[:, dead] = 0
    H += percdamp * mean(diag(H)) * I                      (percdamp = 0.01)
    Hinv = cholesky(cholesky_inverse(cholesky(H)), upper=True)
    for each block of `blocksize` (128) columns [i1, i2):
        mask1 = the k = round(rows * count * sparsity) smallest  W1² / diag(Hinv1)²   (in the block)
        for column i:  q = w with mask1[:, i] zeroed;  err = (w - q) / Hinv1[i, i]
                       W1[:, i:] -= err ⊗ Hinv1[i, i:]       (OBS update inside the block)
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]                 (lazy batch update)

Two deliberate differences from the reference, neither changing the algorithm: the mask takes
exactly k entries per block (the reference's ``tmp <= sorted[k]`` keeps one more and all ties),
and ``build_levels`` runs all levels of a layer in ONE pass: SparseGPT is row-independent except
for the per-block mask choice, so the levels are stacked along the row axis
(``[n_levels * rows, cols]``), masks are chosen per level slice, and the damped inverse-Hessian
Cholesky factor (which does not depend on the level) is computed once per Hessian — layers sharing
an input (q/k/v, gate/up) share the Hessian object from calibrate.py, so they share it too.
``build(W, H, s) == build_levels(W, H, [s])[0]``. Inside a 128-column block the rank-1 OBS updates
are themselves lazily batched in sub-blocks of 16 columns (same arithmetic, reordered into GEMMs),
the per-block mask uses an O(n) selection (``np.argpartition``; ``topk`` on GPU) instead of a
sort, and the column loop runs with one torch thread on CPU (``cpu_threads``): its ops are small
and OpenMP threads mostly wait on each other. SmolLM2-135M (210 linears, 10 levels): ~1 s/block.

Wanda (Sun et al. 2023): per output row, drop the ``round(in * s)`` weights with the smallest
``|W_ij| · ‖X_j‖₂`` (``needs_norms``; without norms it uses ``sqrt(diag(H))``, the same up to a
constant). Magnitude: drop the ``round(numel * s)`` smallest ``|W_ij|`` of the whole layer.
"""
from __future__ import annotations

import math

import torch

from raypress.compress.base import CompressionMethod, torch_threads
from raypress.errors import RayPressError
from raypress.hessian import damp_, inverse_cholesky_upper

DEFAULT_LEVELS = tuple(round(0.1 * i, 10) for i in range(10))


def _check_levels(levels) -> list[float]:
    if levels is None:
        levels = DEFAULT_LEVELS
    try:
        vals = [float(v) for v in levels]
    except (TypeError, ValueError):
        raise RayPressError(f"sparsity levels must be numbers, got {levels!r}; e.g. [0.0, 0.1, ..., 0.9]") from None
    if not vals:
        raise RayPressError("sparsity needs at least one level; e.g. levels=[0.0, 0.1, ..., 0.9]")
    if any(not (0.0 <= v < 1.0) or math.isnan(v) for v in vals):
        raise RayPressError(f"sparsity levels must be in [0, 1), got {vals}; e.g. [0.0, 0.1, ..., 0.9]")
    if any(b <= a for a, b in zip(vals, vals[1:])):
        raise RayPressError(f"sparsity levels must be strictly ascending, got {vals}; sort them and drop duplicates")
    return vals


def _check_value(value) -> float:
    v = float(value)
    if not 0.0 <= v < 1.0:
        raise RayPressError(f"sparsity must be in [0, 1), got {value}")
    return v


def _n_prune(n: int, value: float) -> int:
    return min(n, int(round(n * value)))


def _smallest_mask(score: torch.Tensor, ks: list[int]) -> torch.Tensor:
    """Boolean [L, n]: row l marks exactly ks[l] entries with the smallest score (ties arbitrary)."""
    L, n = score.shape
    mask = torch.zeros(L, n, dtype=torch.bool, device=score.device)
    if score.device.type == "cpu":
        import numpy as np

        a = score.numpy()
        m = mask.numpy()
        for l, k in enumerate(ks):
            if k >= n:
                m[l] = True
            elif k > 0:
                m[l, np.argpartition(a[l], k - 1)[:k]] = True  # O(n) selection, much faster than a sort
    else:
        for l, k in enumerate(ks):
            if k > 0:
                mask[l, torch.topk(score[l], k, largest=False, sorted=False).indices] = True
    return mask


class _SparsityBase(CompressionMethod):
    value_kind = "sparsity"

    def __init__(self, levels=None):
        self.levels = _check_levels(levels)

    def level_values(self) -> list[float]:
        return list(self.levels)


class Magnitude(_SparsityBase):
    """Layer-wise magnitude pruning (no calibration data)."""

    name = "magnitude"
    needs_hessian = False

    def params(self) -> dict:
        # "order": the smallest |W| go first, ties in index order (one stable sort serves every level)
        return {**super().params(), "order": "stable"}

    def build(self, weight, hessian=None, value=0.0, **_):
        return next(iter(self.build_levels(weight, hessian, [value])))

    def build_levels(self, weight, hessian, values, **_):
        """One stable sort of |W| for all levels (9 large-k top-k selections cost more time and
        memory); level s zeroes the round(numel * s) smallest. A generator: one variant at a time."""
        vals = [_check_value(v) for v in values]
        W = weight.detach().float()
        order = None
        for v in vals:
            out = W.clone()
            k = _n_prune(W.numel(), v)
            if k:
                if order is None:
                    order = torch.argsort(W.abs().flatten(), stable=True)
                out.view(-1)[order[:k]] = 0
            yield out


class Wanda(_SparsityBase):
    """Wanda: per-row pruning by |W_ij| · ‖X_j‖₂."""

    name = "wanda"
    needs_hessian = False
    needs_norms = True

    def build(self, weight, hessian=None, value=0.0, norms=None, **_):
        v = _check_value(value)
        W = weight.detach().float().clone()
        rows, cols = W.shape
        k = _n_prune(cols, v)
        if not k:
            return W
        if norms is None:
            if hessian is None:
                raise RayPressError("Wanda needs the input norms of each layer; collect them with "
                                    "raypress.calibrate.collect_input_norms (or use magnitude)")
            norms = torch.sqrt(torch.diagonal(hessian).clamp(min=0))
        norms = norms.detach().float().to(W.device).reshape(1, -1)
        if norms.shape[1] != cols:
            raise RayPressError(f"input norms have {norms.shape[1]} entries but the weight has {cols} columns; "
                                "collect norms for this layer's input")
        metric = W.abs() * norms
        idx = torch.topk(metric, k, dim=1, largest=False, sorted=False).indices
        W.scatter_(1, idx, 0.0)
        return W


class SparseGPT(_SparsityBase):
    """SparseGPT unstructured pruning (IST-DASLab/sparsegpt fasterprune, blockwise masks)."""

    name = "sparsegpt"
    needs_hessian = True

    def __init__(self, levels=None, blocksize: int = 128, percdamp: float = 0.01,
                 max_batch_bytes: int = 512 * 2**20, subblock: int = 16, cpu_threads: int | None = 1):
        super().__init__(levels)
        if int(blocksize) <= 0:
            raise RayPressError(f"blocksize must be positive, got {blocksize}; the usual value is 128")
        if not 0 <= percdamp < 1:
            raise RayPressError(f"percdamp must be in [0, 1), got {percdamp}; the usual value is 0.01")
        self.blocksize = int(blocksize)
        self.percdamp = float(percdamp)
        self.max_batch_bytes = int(max_batch_bytes)  # speed/memory only: not in params()
        self.subblock = int(subblock)  # speed only (nested lazy batching): not in params()
        # torch intra-op threads for the column loop on CPU (None: leave as is). Its ops are small:
        # with 2+ OpenMP threads they mostly wait on each other (10-40x slower on a busy 2-core box)
        self.cpu_threads = cpu_threads
        self._prep = None

    def params(self) -> dict:
        return {**super().params(), "blocksize": self.blocksize, "percdamp": self.percdamp}

    def __getstate__(self):
        s = self.__dict__.copy()
        s["_prep"] = None
        return s

    # --- the level-independent part: damped inverse-Hessian Cholesky factor ---------------------
    def prepare(self, hessian: torch.Tensor, cols: int, device=None):
        """(Hinv upper Cholesky factor [cols, cols], dead-column mask [cols]); memoized per Hessian."""
        if hessian is None:
            raise RayPressError("SparseGPT needs the layer's input Hessian; collect it with "
                                "raypress.calibrate.collect_hessians (or use magnitude)")
        if tuple(hessian.shape) != (cols, cols):
            raise RayPressError(f"Hessian shape {tuple(hessian.shape)} does not match the weight's {cols} "
                                "input columns; pass H = 2 X Xᵀ of this layer's input ([in, in])")
        device = hessian.device if device is None else torch.device(device)
        p = self._prep
        if p is not None and p[0] is hessian and p[1] == hessian._version and p[2] == device:
            return p[3], p[4]
        H = hessian.detach().to(device=device, dtype=torch.float32, copy=True)
        dead = damp_(H, self.percdamp)
        Hinv = inverse_cholesky_upper(H, "SparseGPT", self.percdamp)
        self._prep = (hessian, hessian._version, device, Hinv, dead)
        return Hinv, dead

    def build(self, weight, hessian, value, **_):
        return self.build_levels(weight, hessian, [value])[0]

    def build_levels(self, weight, hessian, values, **_) -> list[torch.Tensor]:
        vals = [_check_value(v) for v in values]
        W0 = weight.detach().float()
        rows, cols = W0.shape
        out: list[torch.Tensor | None] = [W0.clone() if v == 0.0 else None for v in vals]
        todo = [i for i, v in enumerate(vals) if v > 0.0]
        if not todo:
            return out
        Hinv, dead = self.prepare(hessian, cols, W0.device)
        per = max(1, self.max_batch_bytes // max(1, rows * cols * 4))
        with torch_threads(self.cpu_threads if W0.device.type == "cpu" else None):
            for c in range(0, len(todo), per):
                chunk = todo[c:c + per]
                res = self._prune([vals[i] for i in chunk], W0, Hinv, dead)
                for j, i in enumerate(chunk):
                    out[i] = res[j]
        return out

    def _prune(self, values: list[float], W0: torch.Tensor, Hinv: torch.Tensor, dead: torch.Tensor):
        # Works on the transpose Wt = [cols, L*rows] so that every per-column step touches
        # contiguous memory; level l occupies rows l*rows .. (l+1)*rows of W (columns of Wt).
        L = len(values)
        rows, cols = W0.shape
        W = W0.clone()
        W[:, dead] = 0
        Wt = W.t().repeat(1, L).contiguous()  # [cols, L*rows]
        del W
        bs = self.blocksize
        sub = max(1, min(self.subblock, bs))
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            count = i2 - i1
            W1 = Wt[i1:i2]  # a view: updated in place
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1)
            # mask: per level, the k smallest w² / diag(Hinv1)² of this block of columns
            score = (W1.square() / d.square().unsqueeze(1)).view(count, L, rows).transpose(0, 1).reshape(L, -1)
            mask = _smallest_mask(score, [_n_prune(rows * count, v) for v in values])  # [L, count*rows]
            prune1 = mask.view(L, count, rows).transpose(0, 1).reshape(count, L * rows).float()
            Err1 = torch.empty_like(W1)
            # OBS updates column by column, themselves lazily batched in sub-blocks of `sub` columns
            # (same arithmetic as the reference's full-block rank-1 updates, reordered into GEMMs)
            for j1 in range(0, count, sub):
                j2 = min(j1 + sub, count)
                for i in range(j1, j2):
                    # q = w with pruned entries zeroed; err = (w - q) / d (only pruned entries have error)
                    err = Err1[i]
                    torch.mul(W1[i], prune1[i], out=err)
                    err.div_(d[i])
                    W1[i:j2].addr_(Hinv1[i, i:j2], err, alpha=-1.0)
                if j2 < count:
                    W1[j2:].addmm_(Hinv1[j1:j2, j2:].t(), Err1[j1:j2], alpha=-1.0)
            # after its update row i of W1 equals q up to rounding; set the pruned entries to 0 exactly
            W1.mul_(1.0 - prune1)
            if i2 < cols:
                Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
        return list(Wt.t().reshape(L, rows, cols).contiguous().unbind(0))
