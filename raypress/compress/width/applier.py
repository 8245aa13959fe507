"""WidthApplier: applies {unit: level} of the width database to a live Llama-family model, in place."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from raypress.compress.base import Applier
from raypress.errors import RayPressError

from .importance import _head_cols
from .levels import _geometries, _layout


def _resolve_db(db):
    if isinstance(db, dict):
        return db
    if type(db).__name__ == "ObjectRef":
        import ray

        return ray.get(db)
    raise RayPressError("WidthApplier needs the dict from build_width_database (or its ray ObjectRef)")


def _fresh(arr: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    """A private tensor copy of a (possibly read-only, object-store) array, in `like`'s dtype/device."""
    return torch.from_numpy(np.array(arr, copy=True)).to(device=like.device, dtype=like.dtype)


class WidthApplier(Applier):
    """Applies {unit: level} to a live Llama-family model, in place, touching only changed units.

    Level k > 0 of a MLP: gate/up rows of pruned channels zeroed, down_proj = reformed weight on the
    kept columns (zeros elsewhere). Attention: q rows of pruned query heads (and k/v rows of pruned
    KV heads, mode "group") zeroed, o_proj = reformed weight on the kept head columns. Every change
    assigns fresh tensors (`.data = new`); level 0 points the Linear back at the tensors the model
    was loaded with, so dense is bit-exact. Database arrays are only ever read.
    """

    def __init__(self, database):
        self.database = database  # dict or ray ObjectRef (resolved on attach)
        self._db = None
        self._units: dict = {}
        self._current: dict[str, int] = {}
        self._idx_cache: dict = {}

    def __getstate__(self):
        s = self.__dict__.copy()
        s["_db"], s["_units"], s["_current"], s["_idx_cache"] = None, {}, {}, {}
        return s

    # -- setup -----------------------------------------------------------------------------
    def attach(self, model, adapter=None) -> None:
        db = _resolve_db(self.database)
        lay = _layout(model, adapter)
        geoms = _geometries(model, lay)
        if [g.__dict__ for g in geoms] != db["geometry"]:
            raise RayPressError("the width database was built for a different model (block sizes differ); "
                                "rebuild it for this model")
        self._db = db
        self._units, self._current, self._idx_cache = {}, {}, {}
        for name, rec in db["units"].items():
            mod = model.get_submodule(name)
            names = ("q_proj", "k_proj", "v_proj", "o_proj") if rec["kind"] == "attn" else \
                ("gate_proj", "up_proj", "down_proj")
            lins = {n: getattr(mod, n) for n in names}
            dense = {n: (l.weight.data, None if l.bias is None else l.bias.data) for n, l in lins.items()}
            self._units[name] = (rec, lins, dense, geoms[rec["block"]])
            self._current[name] = 0

    @property
    def units(self) -> list[str]:
        return list(self._units)

    @property
    def current(self) -> dict[str, int]:
        return dict(self._current)

    def dense_tensors(self, unit: str) -> dict:
        """{linear name: (weight, bias)} as loaded (read these, never write)."""
        return self._units[unit][2]

    # -- hot path --------------------------------------------------------------------------
    def apply(self, levels: dict[str, int]) -> int:
        if not self._units:
            raise RayPressError("WidthApplier.apply called before attach(model, adapter)")
        want = {}
        for k, v in levels.items():
            if k.startswith("_"):
                continue
            if k not in self._units:
                raise RayPressError(f"'{k}' is not a width unit of this database; units look like "
                                    f"'{next(iter(self._units))}'")
            v = int(v)
            n = len(self._units[k][0]["levels"])
            if not 0 <= v < n:
                raise RayPressError(f"level {v} of '{k}' is out of range (0..{n - 1})")
            want[k] = v
        changed = 0
        with torch.no_grad():
            for name in self._units:
                lvl = want.get(name, 0)
                if self._current[name] != lvl:
                    self._set(name, lvl)
                    self._current[name] = lvl
                    changed += 1
        return changed

    def _indices(self, name: str, lvl: int, device):
        key = (name, lvl, str(device))
        hit = self._idx_cache.get(key)
        if hit is not None:
            return hit
        rec, lins, dense, g = self._units[name]
        ent = rec["levels"][lvl]
        kept = np.asarray(ent["kept"])
        if rec["kind"] == "mlp":
            row = torch.zeros(g.inter, dtype=torch.bool)
            row[torch.from_numpy(kept.copy())] = True
            res = {"rows": row.to(device), "cols": torch.from_numpy(kept.copy()).to(device)}
        else:
            cols = torch.from_numpy(_head_cols(kept, g.head_dim))
            qrow = torch.zeros(g.n_q * g.head_dim, dtype=torch.bool)
            qrow[cols] = True
            kvrow = torch.zeros(g.n_kv * g.head_dim, dtype=torch.bool)
            kvrow[torch.from_numpy(_head_cols(np.asarray(ent["kept_kv"]), g.head_dim))] = True
            res = {"qrows": qrow.to(device), "kvrows": kvrow.to(device), "cols": cols.to(device),
                   "all_kv": bool(kvrow.all())}
        self._idx_cache[key] = res
        return res

    @staticmethod
    def _mask_rows(lin: nn.Linear, dense: tuple, rows: torch.Tensor) -> None:
        w, b = dense
        lin.weight.data = w * rows.to(w.dtype).unsqueeze(1)
        if b is not None:
            lin.bias.data = b * rows.to(b.dtype)

    def _set(self, name: str, lvl: int) -> None:
        rec, lins, dense, g = self._units[name]
        if lvl == 0:
            for n, lin in lins.items():
                w, b = dense[n]
                lin.weight.data = w
                if b is not None:
                    lin.bias.data = b
            return
        ent = rec["levels"][lvl]
        out_name = "down_proj" if rec["kind"] == "mlp" else "o_proj"
        w_out = dense[out_name][0]
        idx = self._indices(name, lvl, w_out.device)
        new = torch.zeros_like(w_out)
        new[:, idx["cols"]] = _fresh(ent["weight"], w_out)
        lins[out_name].weight.data = new
        b = dense[out_name][1]
        if b is not None:
            lins[out_name].bias.data = b
        if rec["kind"] == "mlp":
            self._mask_rows(lins["gate_proj"], dense["gate_proj"], idx["rows"])
            self._mask_rows(lins["up_proj"], dense["up_proj"], idx["rows"])
        else:
            self._mask_rows(lins["q_proj"], dense["q_proj"], idx["qrows"])
            for n in ("k_proj", "v_proj"):
                if idx["all_kv"]:
                    w, b = dense[n]
                    lins[n].weight.data = w
                    if b is not None:
                        lins[n].bias.data = b
                else:
                    self._mask_rows(lins[n], dense[n], idx["kvrows"])


