"""Weight quantization: GPTQ and round-to-nearest (RTN), per-group min-max grids.

Level values are bitwidths, kept in the order given (ascending bits by default), so for this
family a *higher value means less compression* (the opposite of sparsity). The search space only
needs exact integer costs — ``cost = n_params * round(bits * 1000)`` and
``budget = round(target_bits * 1000) * sum(n_params)`` — so the direction does not matter to it.

Grid (as in IST-DASLab/gptq ``Quantizer``, per output row and per group of ``group_size`` input
columns)::

    maxq  = 2**bits - 1
    xmin  = min(min(w_group), 0); xmax = max(max(w_group), 0)    # the grid always contains 0
    sym:    xmax = max(|xmin|, xmax); xmin = -xmax (where xmin < 0); zero = (maxq + 1) / 2
    scale = (xmax - xmin) / maxq;  zero = round(-xmin / scale)     (asym)
    q     = clamp(round(w / scale) + zero, 0, maxq);   ŵ = scale * (q - zero)

One deviation from the reference, for exact packed storage: ``scale`` is rounded *up* to the next
float16 value before use (``zero`` is an integer ≤ 255, exact in float16). Hence
``dequantize(*quantize_packed(W, H, b)) == build(W, H, b)`` bit for bit, and the packed form
(uint8 codes ``[out, in]`` + float16 scales/zeros ``[out, ceil(in/group_size)]``) is half the
size of float16 weights for any bits ≤ 8. Rounding up keeps every value of the group inside the
grid's range (no extra clipping).

``effective_bits(bits, group_size) = bits + 32 / group_size`` (one fp16 scale + one fp16 zero per
group) is for reports; it is not what the search budget counts.
"""
from __future__ import annotations

import math
import warnings

import torch

from raypress.compress.base import CompressionMethod
from raypress.errors import RayPressError
from raypress.hessian import damp_, inverse_cholesky_upper

_FP16_TINY = 2.0**-24  # smallest positive float16 (subnormal)


def effective_bits(bits: float, group_size: int | None) -> float:
    """Storage bits per weight including one float16 scale and one float16 zero per group."""
    if not group_size or group_size <= 0:
        return float(bits)
    return float(bits) + 32.0 / group_size


def _check_bits(bits) -> int:
    b = float(bits)
    if b != int(b) or not 1 <= b <= 8:
        raise RayPressError(f"quantization bits must be an integer in 1..8, got {bits}; "
                            "use levels like [2, 3, 4, 8]")
    return int(b)


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    """Smallest float16 value >= x (elementwise), returned as float32; at least 2**-24."""
    x = x.float().clamp(min=_FP16_TINY, max=65504.0)
    h = x.half()
    low = h.float() < x
    if bool(low.any()):
        h = torch.where(low, torch.nextafter(h.float(), torch.full_like(x, math.inf)).half(), h)
        # nextafter in float32 may still round back down in fp16: step in fp16 bits instead
        still = h.float() < x
        if bool(still.any()):
            bits16 = h.view(torch.int16)
            h = torch.where(still, (bits16 + 1).view(torch.float16), h)
    return h.float()


def find_params(w: torch.Tensor, bits: int, sym: bool, maxq: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero [rows, 1] (float32, scale float16-representable) for block `w`.
    maxq: per-row grid sizes [rows] instead of 2**bits - 1 (joint levels stack rows of several bitwidths)."""
    maxq = 2**bits - 1 if maxq is None else maxq
    w = w.float()
    zeros_ = torch.zeros(w.shape[0], device=w.device)
    xmin = torch.minimum(w.min(dim=1).values, zeros_)
    xmax = torch.maximum(w.max(dim=1).values, zeros_)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    dead = (xmin == 0) & (xmax == 0)
    xmin = torch.where(dead, torch.full_like(xmin, -1.0), xmin)
    xmax = torch.where(dead, torch.full_like(xmax, 1.0), xmax)
    scale = _round_up_fp16((xmax - xmin) / maxq)
    if sym:
        zero = torch.ones_like(scale) * ((maxq + 1) / 2)  # maxq is odd: a whole number
    else:
        zero = torch.minimum(torch.round(-xmin / scale).clamp(min=0), torch.as_tensor(maxq, dtype=scale.dtype,
                                                                                      device=scale.device))
    return scale.unsqueeze(1), zero.unsqueeze(1)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes (float tensor) of `w` on the grid (scale, zero)."""
    maxq = 2**bits - 1
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Fake-quantize `w` (round to the grid and back)."""
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


def _n_groups(columns: int, group_size: int | None) -> tuple[int, int]:
    gs = group_size if group_size and group_size > 0 else columns
    return gs, math.ceil(columns / gs)


def _tensor(x) -> torch.Tensor:
    """torch view of an array; read-only numpy (object store, memory maps) is only ever read here."""
    if isinstance(x, torch.Tensor):
        return x
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "The given NumPy array is not writable"
        return torch.as_tensor(x)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               group_size: int | None) -> torch.Tensor:
    """Dense float32 [out, in] weight from uint8 codes [out, in] and fp16 scales/zeros [out, G].

    Column j uses group j // group_size (group_size None/<=0: one group per row)."""
    codes, scales, zeros = (_tensor(x) for x in (codes, scales, zeros))
    cols = codes.shape[1]
    gs, ng = _n_groups(cols, group_size)
    if scales.shape[1] != ng or zeros.shape[1] != ng:
        raise RayPressError(f"packed weight has {scales.shape[1]} groups but {cols} columns with group size "
                            f"{gs} need {ng}; pass the group_size the weight was quantized with")
    s = scales.float().repeat_interleave(gs, dim=1)[:, :cols]
    z = zeros.float().repeat_interleave(gs, dim=1)[:, :cols]
    return s * (codes.float() - z)


def decode_packed(stored: dict, level: int, group_size: int | None = None):
    """float32 numpy [out, in] of one level of a packed dict {"codes", "scales", "zeros",
    "group_size"} (== the method's build output, bit for bit)."""
    gs = stored.get("group_size", group_size or -1)
    return dequantize(stored["codes"][level], stored["scales"][level], stored["zeros"][level],
                      None if gs in (None, -1) else int(gs)).numpy()


class _QuantBase(CompressionMethod):
    value_kind = "bits"
    #: storage hint for the database: variants can be stored as uint8 codes + fp16 scales/zeros
    packed = True

    def __init__(self, bits=(2, 3, 4, 5, 6, 8), group_size: int | None = 128, sym: bool = False):
        if not bits:
            raise RayPressError("quantization needs at least one bitwidth; e.g. bits=[2, 3, 4, 8]")
        self.bits = [_check_bits(b) for b in bits]
        if len(set(self.bits)) != len(self.bits):
            raise RayPressError(f"duplicate bitwidths in {list(bits)}; list each bitwidth once")
        if group_size is not None and group_size != -1 and group_size <= 0:
            raise RayPressError(f"group_size must be positive or -1 (per row), got {group_size}")
        self.group_size = None if group_size in (None, -1) else int(group_size)
        self.sym = bool(sym)

    def level_values(self) -> list[float]:
        """Bitwidths in the given order (ascending bits = *descending* compression)."""
        return [float(b) for b in self.bits]

    def params(self) -> dict:
        return {"name": self.name, "levels": self.level_values(), "group_size": self.group_size or -1,
                "sym": self.sym}

    def effective_bits(self, bits: float) -> float:
        return effective_bits(bits, self.group_size)

    # --- implemented by subclasses: codes (float) + per-group scale/zero [out, G] ---------------
    def _quantize(self, weight, hessian, bits: int):
        raise NotImplementedError

    def build(self, weight: torch.Tensor, hessian: torch.Tensor | None, value: float) -> torch.Tensor:
        codes, scales, zeros = self._quantize(weight, hessian, _check_bits(value))
        return dequantize(codes, scales, zeros, self.group_size)

    def quantize_packed(self, weight: torch.Tensor, hessian: torch.Tensor | None, bits: float):
        """(codes uint8 [out, in], scales float16 [out, G], zeros float16 [out, G]), G = ceil(in/group).

        ``self.dequantize(*quantize_packed(W, H, b))`` equals ``build(W, H, b)`` exactly."""
        codes, scales, zeros = self._quantize(weight, hessian, _check_bits(bits))
        return codes.to(torch.uint8), scales.half(), zeros.half()

    def dequantize(self, codes, scales, zeros) -> torch.Tensor:
        return dequantize(codes, scales, zeros, self.group_size)

    # --- packed storage of a whole level ladder (for the level database / object store) --------
    def _quantize_levels(self, weight, hessian, bits_list):
        """(codes, scales, zeros) for each bitwidth in turn; subclasses may share work across
        bitwidths (GPTQ factorizes the Hessian once)."""
        for b in bits_list:
            yield self._quantize(weight, hessian, b)

    def pack_levels(self, weight: torch.Tensor, hessian: torch.Tensor | None, values=None) -> dict:
        """All levels of one layer, packed: {"codes": uint8 [L, out, in], "scales": float16 [L, out, G],
        "zeros": float16 [L, out, G], "group_size": int} as numpy arrays (L = number of levels).

        Level k equals ``quantize_packed(weight, hessian, values[k])`` (so its dequantization equals
        ``build``) bit for bit; GPTQ shares one Hessian factorization across all levels."""
        import numpy as np

        values = self.level_values() if values is None else values
        bits = [_check_bits(v) for v in values]
        rows, cols = weight.shape
        _, ng = _n_groups(cols, self.group_size)
        out = {"codes": np.empty((len(bits), rows, cols), dtype=np.uint8),
               "scales": np.empty((len(bits), rows, ng), dtype=np.float16),
               "zeros": np.empty((len(bits), rows, ng), dtype=np.float16),
               "group_size": self.group_size or -1}
        for k, (codes, scales, zeros) in enumerate(self._quantize_levels(weight, hessian, bits)):
            out["codes"][k] = codes.to(torch.uint8).cpu().numpy()
            out["scales"][k] = scales.half().cpu().numpy()
            out["zeros"][k] = zeros.half().cpu().numpy()
        return out

    def decode_stored(self, stored, level: int):
        """float32 numpy [out, in] of `level` from what the database stored for a layer: either a
        dense stack [L, out, in] (returned as a view) or a :meth:`pack_levels` dict."""
        if isinstance(stored, dict):
            return decode_packed(stored, level, self.group_size)
        return stored[level]


class RTN(_QuantBase):
    """Round-to-nearest per-group min-max quantization (no calibration data)."""

    name = "rtn"
    needs_hessian = False

    def _quantize(self, weight, hessian, bits):
        W = weight.detach().float()
        rows, cols = W.shape
        gs, ng = _n_groups(cols, self.group_size)
        codes = torch.empty_like(W)
        scales = torch.empty(rows, ng, device=W.device)
        zeros = torch.empty(rows, ng, device=W.device)
        for g in range(ng):
            sl = slice(g * gs, min((g + 1) * gs, cols))
            s, z = find_params(W[:, sl], bits, self.sym)
            codes[:, sl] = quantize_codes(W[:, sl], s, z, bits)
            scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        return codes, scales, zeros


class GPTQ(_QuantBase):
    """GPTQ (Frantar et al. 2022), following IST-DASLab/gptq ``fasterquant``.

    Cholesky factor of the inverse (damped) Hessian, lazy batch updates over blocks of
    `blocksize` columns, per-group grids recomputed at each group start from the already
    error-corrected weights, dead columns (H_jj = 0) zeroed. ``act_order=True`` processes columns
    by descending H_jj with *static* groups (grids from the original weights in natural column
    order — the reference's ``static_groups``), so the packed layout needs no column permutation.
    """

    name = "gptq"
    needs_hessian = True

    def __init__(self, bits=(2, 3, 4, 5, 6, 8), group_size: int | None = 128, sym: bool = False,
                 percdamp: float = 0.01, act_order: bool = False, blocksize: int = 128):
        super().__init__(bits, group_size, sym)
        if not 0 <= percdamp < 1:
            raise RayPressError(f"percdamp must be in [0, 1), got {percdamp}; the usual value is 0.01")
        self.percdamp = float(percdamp)
        self.act_order = bool(act_order)
        self.blocksize = int(blocksize)

    def params(self) -> dict:
        return {**super().params(), "percdamp": self.percdamp, "act_order": self.act_order,
                "blocksize": self.blocksize}

    def _prepare(self, weight, hessian):
        """Shared by all bitwidths: (W natural order with dead columns zeroed, W in processing order,
        upper Cholesky factor of the damped inverse Hessian, column permutation or None)."""
        if hessian is None:
            raise RayPressError("GPTQ needs the layer's input Hessian; collect it with "
                                "raypress.calibrate.collect_hessians (or use RTN)")
        W = weight.detach().clone().float()
        cols = W.shape[1]
        H = hessian.detach().clone().float().to(W.device)
        if H.shape != (cols, cols):
            raise RayPressError(f"Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}; "
                                "pass H = 2 X Xᵀ of this layer's input ([in, in])")
        dead = damp_(H, self.percdamp)
        W[:, dead] = 0
        W_nat = W
        perm = None
        if self.act_order:  # the damping is a constant diagonal shift: permuting after it is the same
            perm = torch.argsort(torch.diag(H), descending=True)
            W = W[:, perm]
            H = H[perm][:, perm]
        Hinv = inverse_cholesky_upper(H, "GPTQ", self.percdamp)
        return W_nat, W, Hinv, perm

    def _quantize(self, weight, hessian, bits):
        return self._run(self._prepare(weight, hessian), bits)

    def _quantize_levels(self, weight, hessian, bits_list):
        prep = self._prepare(weight, hessian)
        for b in bits_list:
            yield self._run(prep, b)

    def build_levels(self, weight, hessian, values, **_) -> list[torch.Tensor]:
        """build() for every value, factorizing the Hessian once (used by the level database)."""
        prep = self._prepare(weight, hessian)
        return [dequantize(*self._run(prep, _check_bits(v)), self.group_size) for v in values]

    def _run(self, prep, bits):
        W_nat, W, Hinv, perm = prep
        W = W.clone()
        rows, cols = W.shape
        gs, ng = _n_groups(cols, self.group_size)
        static = None
        if perm is not None and self.group_size:
            static = [find_params(W_nat[:, g * gs:min((g + 1) * gs, cols)], bits, self.sym) for g in range(ng)]

        Q = torch.zeros_like(W)  # codes, in processing order
        scales = torch.zeros(rows, ng, device=W.device)
        zeros = torch.zeros(rows, ng, device=W.device)
        if static is not None:
            for g, (s, z) in enumerate(static):
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
        scale = zero = None
        if not self.group_size:  # one grid per row (row min/max do not depend on column order)
            scale, zero = find_params(W, bits, self.sym)
            scales[:, 0], zeros[:, 0] = scale[:, 0], zero[:, 0]

        bs = self.blocksize
        for i1 in range(0, cols, bs):
            i2 = min(i1 + bs, cols)
            count = i2 - i1
            W1 = W[:, i1:i2].clone()
            Q1 = torch.zeros_like(W1)
            Err1 = torch.zeros_like(W1)
            Hinv1 = Hinv[i1:i2, i1:i2]
            for i in range(count):
                col = i1 + i
                w = W1[:, i]
                d = Hinv1[i, i]
                if self.group_size:
                    if static is not None:
                        g = int(perm[col]) // gs
                        scale, zero = static[g]
                    elif col % gs == 0:
                        g = col // gs
                        end = min(col + gs, cols)
                        if end <= i2:
                            blk = W1[:, i:end - i1]
                        else:  # group spills past this block: those columns only have earlier updates
                            blk = torch.cat([W1[:, i:], W[:, i2:end]], dim=1)
                        scale, zero = find_params(blk, bits, self.sym)
                        scales[:, g], zeros[:, g] = scale[:, 0], zero[:, 0]
                c = quantize_codes(w.unsqueeze(1), scale, zero, bits)
                q = (scale * (c - zero)).flatten()
                Q1[:, i] = c.flatten()
                err1 = (w - q) / d
                W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
                Err1[:, i] = err1
            Q[:, i1:i2] = Q1
            W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

        if perm is not None:
            Q = Q[:, torch.argsort(perm)]
        return Q, scales, zeros
