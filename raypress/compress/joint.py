"""Joint sparsity + quantization: a level is a (sparsity, bits) pair, its value the bits it stores per weight.

Users budget in bytes ("fit in 24 GB"), so the joint family's level value is what a layer takes on
disk per weight of the dense layer, counting everything a sparse, quantized layer stores::

    bits_per_weight(s, b) = (1 - s) * b        the kept values, b bits each (b = 16: not quantized)
                          + (1 if s > 0)       a bitmask of the kept positions
                          + 32 / group_size    one float16 scale + zero per group (b < 16)

e.g. dense fp16 = 16, 4-bit groups of 128 = 4.25, 50% sparse + 4 bit = 3.25, 75% + 3 bit = 2.0.
The search's budget is the parameter-weighted mean of this value (bits per weight), so a byte
budget B over the compressed layers is ``8 * B / sum(n_params)``; `bytes_budget_to_target` converts.

The ladder is a list of pairs, sorted by descending bits per weight (level index = ascending
compression, as for every family). The default, sparsity {0, 1/4, 1/2, 5/8, 3/4} x bits {3, 4, 8}
plus dense fp16, puts every value on a 1/8-bit grid, so budget-preserving level switches between
equal-sized layers are plentiful (space.py needs equal cost steps).

SparseGPT with quantization in the loop (`sparsegpt-gptq`), as in the SparseGPT paper's joint
50% + 4-bit experiments: per block of 128 columns, choose the mask (the k smallest w² / Hinv_jj²),
then column by column set the pruned entries to zero, round the kept ones to the group's grid
(min-max, computed at each group start from the error-corrected weights with the pruned entries
already zero, so zero stays exactly representable), and spread the error over the remaining columns
by the OBS update. All levels of a layer run in one pass: stacked along the rows like SparseGPT's
levels, each row with its own grid size (2**b - 1), the inverse-Hessian factor computed once.
`magnitude-rtn` (no calibration data, for tests and throughput runs) zeroes the smallest |W| of the
layer, then rounds the kept weights to the nearest grid point.
"""
from __future__ import annotations

import math

import torch

from raypress.compress.base import CompressionMethod, torch_threads
from raypress.compress.quant import find_params
from raypress.compress.sparsity import SparseGPT, _n_prune, _smallest_mask
from raypress.errors import RayPressError

#: bits value of a level that is not quantized (stored in float16)
FLOAT = 16
DEFAULT_SPARSITY = (0.0, 0.25, 0.5, 0.625, 0.75)
DEFAULT_BITS = (3, 4, 8)


def bits_per_weight(sparsity: float, bits: int, group_size: int | None) -> float:
    """What a layer at this level stores per weight of the dense layer (see the module docstring)."""
    mask = 1.0 if sparsity > 0 else 0.0
    scales = 32.0 / group_size if bits < FLOAT and group_size else 0.0
    return (1.0 - sparsity) * bits + mask + scales


def default_pairs() -> list[tuple[float, int]]:
    return [(0.0, FLOAT)] + [(s, b) for s in DEFAULT_SPARSITY for b in DEFAULT_BITS]


def check_pairs(levels, group_size: int | None) -> list[tuple[float, int]]:
    """The ladder as (sparsity, bits) pairs sorted by descending bits per weight (one-line errors)."""
    if levels is None:
        levels = default_pairs()
    hint = "give pairs [sparsity, bits], e.g. levels=[[0, 16], [0, 4], [0.5, 4], [0.75, 3]]"
    pairs = []
    try:
        for p in levels:
            s, b = p
            s, b = float(s), float(b)
            pairs.append((s, b))
    except (TypeError, ValueError):
        raise RayPressError(f"joint levels must be [sparsity, bits] pairs, got {levels!r}; {hint}") from None
    if not pairs:
        raise RayPressError(f"the joint family needs at least one level; {hint}")
    for s, b in pairs:
        if not 0.0 <= s < 1.0 or math.isnan(s):
            raise RayPressError(f"joint level [{s:g}, {b:g}]: sparsity must be in [0, 1); {hint}")
        if b != int(b) or not (1 <= b <= 8 or b == FLOAT):
            raise RayPressError(f"joint level [{s:g}, {b:g}]: bits must be an integer in 1..8, or 16 for "
                                f"not quantized; {hint}")
    pairs = [(s, int(b)) for s, b in pairs]
    if len(set(pairs)) != len(pairs):
        dup = next(p for p in pairs if pairs.count(p) > 1)
        raise RayPressError(f"joint level [{dup[0]:g}, {dup[1]}] is listed twice; list each pair once")
    return sorted(pairs, key=lambda p: (-bits_per_weight(p[0], p[1], group_size), p[0], p[1]))


def _grid(blk: torch.Tensor, maxq: torch.Tensor, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-column scale and zero [R] of `blk` [group, R] (columns = stacked rows of the weight), each
    with its own grid size maxq [R]: quant.find_params on the transpose."""
    scale, zero = find_params(blk.t(), 0, sym, maxq=maxq)
    return scale[:, 0], zero[:, 0]


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: torch.Tensor) -> torch.Tensor:
    """w (any shape ending in R) rounded to its grid and back; 0 stays exactly 0 (zero is an integer)."""
    return scale * (torch.minimum(torch.clamp(torch.round(w / scale) + zero, min=0), maxq) - zero)


class _JointBase(CompressionMethod):
    value_kind = "bits_per_weight"

    def __init__(self, levels=None, group_size: int | None = 128, sym: bool = False):
        if group_size is not None and group_size != -1 and int(group_size) <= 0:
            raise RayPressError(f"group_size must be positive or -1 (per row), got {group_size}")
        self.group_size = None if group_size in (None, -1) else int(group_size)
        self.sym = bool(sym)
        self.pairs = check_pairs(levels, self.group_size)

    def level_values(self) -> list[float]:
        return [bits_per_weight(s, b, self.group_size) for s, b in self.pairs]

    def params(self) -> dict:
        return {"name": self.name, "levels": [[s, b] for s, b in self.pairs], "group_size": self.group_size or -1,
                "sym": self.sym}

    def _pairs_of(self, values) -> list[tuple[float, int]]:
        """The pairs of level values (the database passes the values of level_values())."""
        by_value = {}
        for p, v in zip(self.pairs, self.level_values()):
            by_value.setdefault(round(v, 9), []).append(p)
        out, taken = [], {}
        for v in values:
            options = by_value.get(round(float(v), 9))
            if not options:
                raise RayPressError(f"{float(v):g} bits per weight is not a level of this ladder "
                                    f"({', '.join(f'{x:g}' for x in self.level_values())})")
            i = taken.get(round(float(v), 9), 0)  # equal values (4.25 = [0, 4] = [0.25, 4] ...) in ladder order
            out.append(options[min(i, len(options) - 1)])
            taken[round(float(v), 9)] = i + 1
        return out

    def build(self, weight, hessian, value, **kw):
        return self.build_levels(weight, hessian, [value], **kw)[0]


class MagnitudeRTN(_JointBase):
    """Magnitude pruning of the whole layer, then round-to-nearest of the kept weights (no data)."""

    name = "magnitude-rtn"
    needs_hessian = False

    def build_levels(self, weight, hessian, values, **_) -> list[torch.Tensor]:
        W = weight.detach().float()
        rows, cols = W.shape
        gs = self.group_size or cols
        order = torch.argsort(W.abs().flatten(), stable=True)
        out = []
        for s, b in self._pairs_of(values):
            Q = W.clone()
            k = _n_prune(W.numel(), s)
            if k:
                Q.view(-1)[order[:k]] = 0
            if b < FLOAT:
                maxq = torch.full((rows,), float(2**b - 1))
                for g0 in range(0, cols, gs):
                    blk = Q[:, g0:g0 + gs].t()
                    scale, zero = _grid(blk, maxq, self.sym)
                    Q[:, g0:g0 + gs] = _round_to_grid(blk, scale, zero, maxq).t()
            out.append(Q)
        return out


class SparseGPTQ(_JointBase):
    """SparseGPT with GPTQ-style quantization inside the column loop (one OBS pass per level)."""

    name = "sparsegpt-gptq"
    needs_hessian = True

    def __init__(self, levels=None, group_size: int | None = 128, sym: bool = False, blocksize: int = 128,
                 percdamp: float = 0.01, max_batch_bytes: int = 512 * 2**20, cpu_threads: int | None = 1):
        super().__init__(levels, group_size, sym)
        self._sgpt = SparseGPT(levels=[0.0], blocksize=blocksize, percdamp=percdamp)  # its Hessian factor
        self.blocksize, self.percdamp = self._sgpt.blocksize, self._sgpt.percdamp
        self.max_batch_bytes, self.cpu_threads = int(max_batch_bytes), cpu_threads

    def params(self) -> dict:
        return {**super().params(), "blocksize": self.blocksize, "percdamp": self.percdamp}

    def build_levels(self, weight, hessian, values, **_) -> list[torch.Tensor]:
        pairs = self._pairs_of(values)
        W0 = weight.detach().float()
        rows, cols = W0.shape
        out: list[torch.Tensor | None] = [W0.clone() if p == (0.0, FLOAT) else None for p in pairs]
        todo = [i for i, p in enumerate(pairs) if out[i] is None]
        if not todo:
            return out
        Hinv, dead = self._sgpt.prepare(hessian, cols, W0.device)
        per = max(1, self.max_batch_bytes // max(1, rows * cols * 4))
        with torch_threads(self.cpu_threads if W0.device.type == "cpu" else None):
            for c in range(0, len(todo), per):
                chunk = todo[c:c + per]
                for i, Q in zip(chunk, self._run([pairs[i] for i in chunk], W0, Hinv, dead)):
                    out[i] = Q
        return out

    def _run(self, pairs, W0, Hinv, dead):
        # the transpose Wt = [cols, L*rows], level l in columns l*rows .. (l+1)*rows (as SparseGPT._prune)
        L = len(pairs)
        rows, cols = W0.shape
        W = W0.clone()
        W[:, dead] = 0
        Wt = W.t().repeat(1, L).contiguous()
        del W
        dev = Wt.device
        bits = torch.tensor([b for _, b in pairs], device=dev).repeat_interleave(rows)
        quant = bits < FLOAT  # [L*rows]: rows of quantized levels
        maxq = (2.0 ** bits.clamp(max=8) - 1).float()
        gs = self.group_size or cols
        bs = self.blocksize
        scale = zero = None
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            count = i2 - i1
            W1 = Wt[i1:i2]  # a view, updated in place
            Hinv1 = Hinv[i1:i2, i1:i2]
            d = torch.diagonal(Hinv1)
            score = (W1.square() / d.square().unsqueeze(1)).view(count, L, rows).transpose(0, 1).reshape(L, -1)
            mask = _smallest_mask(score, [_n_prune(rows * count, s) for s, _ in pairs])
            keep1 = 1.0 - mask.view(L, count, rows).transpose(0, 1).reshape(count, L * rows).float()
            Err1 = torch.empty_like(W1)
            for i in range(count):
                col = i1 + i
                if col % gs == 0 and bool(quant.any()):
                    # the group's grid from the error-corrected weights, pruned entries already zero
                    # (a group reaching past this block sees the later columns with earlier updates only)
                    end = min(col + gs, cols)
                    blk = W1[i:min(end, i2) - i1] * keep1[i:min(end, i2) - i1]
                    if end > i2:
                        blk = torch.cat([blk, Wt[i2:end]])
                    scale, zero = _grid(blk, maxq, self.sym)
                w = W1[i]
                q = w * keep1[i]
                if scale is not None:
                    q = torch.where(quant, _round_to_grid(q, scale, zero, maxq), q)
                err = Err1[i]
                torch.sub(w, q, out=err)
                err.div_(d[i])
                W1[i:].addr_(Hinv1[i, i:], err, alpha=-1.0)
                W1[i] = q  # exact: pruned entries 0, kept ones on the grid
            if i2 < cols:
                Wt[i2:].addmm_(Hinv[i1:i2, i2:].t(), Err1, alpha=-1.0)
        return list(Wt.t().reshape(L, rows, cols).contiguous().unbind(0))
