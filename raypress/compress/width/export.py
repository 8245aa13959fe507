"""Width export: a physically smaller Hugging Face folder (per-block head counts and MLP widths).

config.json keeps the dense maxima and gains ``raypress_width_layers`` + an ``auto_map`` to a
generated modeling file; `load_width_model(out)` loads it with the stock transformers class (the
per-block Linear sizes are replaced before the weights load), so no remote code is needed.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raypress.errors import RayPressError
from raypress.export import write_export

from .applier import _fresh, _resolve_db
from .database import FORMAT
from .importance import _head_cols
from .levels import _attn_mlp, _geometries, _layout


def count_params(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


def _linear(w: torch.Tensor, b: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
    lin.weight = nn.Parameter(w.detach().clone().contiguous(), requires_grad=False)
    if b is not None:
        lin.bias = nn.Parameter(b.detach().clone().contiguous(), requires_grad=False)
    return lin


def _set_attn_sizes(attn, n_q: int, n_kv: int) -> None:
    attn.num_key_value_groups = n_q // n_kv
    attn.num_heads = n_q
    attn.num_key_value_heads = n_kv


_MODELING_FILE = "modeling_raypress_width.py"
_MODELING_TEMPLATE = '''"""Written by RayPress (width export): {base} whose decoder blocks have their own number of
attention heads / KV heads / MLP channels (config.raypress_width_layers). Loads with
AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True) or, without remote code,
raypress.compress.width.load_width_model(path)."""
from torch import nn

from {module} import {base} as _Base


class RayPressWidthForCausalLM(_Base):
    def __init__(self, config):
        super().__init__(config)
        for blk, s in zip(self.get_submodule("{prefix}"), getattr(config, "raypress_width_layers", None) or []):
            attn, mlp = blk.get_submodule("{attn}"), blk.get_submodule("{mlp}")
            h, d = attn.q_proj.in_features, s["head_dim"]
            nq, nkv, inter = s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]
            for mod, shapes in ((attn, {{"q_proj": (h, nq * d), "k_proj": (h, nkv * d), "v_proj": (h, nkv * d),
                                         "o_proj": (nq * d, h)}}),
                                (mlp, {{"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}})):
                for name, (i, o) in shapes.items():
                    old = getattr(mod, name)
                    setattr(mod, name, nn.Linear(i, o, bias=old.bias is not None, device=old.weight.device,
                                                 dtype=old.weight.dtype))
            attn.num_key_value_groups = nq // nkv
            attn.num_heads, attn.num_key_value_heads = nq, nkv
            mlp.intermediate_size = inter
'''


@torch.no_grad()
def export_width(model, adapter, levels: dict[str, int], out_dir, *, database=None, applier=None,
                 tokenizer=None, overwrite: bool = False, extra_info: dict | None = None,
                 dtype: torch.dtype | None = None) -> Path:
    """Write the config `levels` as a physically smaller HF folder (+ raypress.json).

    Weights come from the dense model (the attached `applier`'s dense tensors if given, so the live
    model may currently hold any config) and the width `database` (default: the applier's).
    Pruned gate/up rows, down columns, q heads (and k/v heads in mode "group") are sliced away and
    o_proj/down_proj get the reformed weights. config.json keeps the dense maxima and gains
    ``raypress_width_layers`` + an ``auto_map`` to a generated modeling file, so the folder loads with
    ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``; `load_width_model(out)`
    loads it without remote code. Written to a temporary sibling and renamed into place.
    """
    if database is None and applier is not None:
        database = applier._db if applier._db is not None else applier.database
    if database is None:
        raise RayPressError("export_width needs the width database (database=...) or the attached WidthApplier")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise RayPressError(f"export folder {out} already exists; choose another folder or pass overwrite=True")
    db = _resolve_db(database)
    lay = _layout(model, adapter)
    geoms = _geometries(model, lay)
    for k, v in levels.items():
        if k.startswith("_"):
            continue
        if k not in db["units"]:
            raise RayPressError(f"'{k}' is not a width unit of this database; units look like "
                                f"'{next(iter(db['units']))}'")
        if not 0 <= int(v) < len(db["units"][k]["levels"]):
            raise RayPressError(f"level {v} of '{k}' is out of range (0..{len(db['units'][k]['levels']) - 1})")
    small = copy.deepcopy(model)
    slay = _layout(small, None if adapter is None else _ShadowAdapter(adapter, small))
    sizes = []
    for i, g in enumerate(geoms):
        s_attn, s_mlp = _attn_mlp(slay.blocks[i], slay)
        a_name, m_name = lay.unit(i, "attn"), lay.unit(i, "mlp")
        live_attn, live_mlp = _attn_mlp(lay.blocks[i], lay)

        def dense(unit, mod, n):
            if applier is not None and unit in applier._units:
                return applier.dense_tensors(unit)[n]
            lin = getattr(mod, n)
            return lin.weight.data, None if lin.bias is None else lin.bias.data

        # attention
        la = int(levels.get(a_name, 0))
        dw = {n: dense(a_name, live_attn, n) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if la == 0:
            q, kv = np.arange(g.n_q), np.arange(g.n_kv)
            o_w = dw["o_proj"][0]
        else:
            ent = db["units"][a_name]["levels"][la]
            q, kv = np.asarray(ent["kept"]), np.asarray(ent["kept_kv"])
            o_w = _fresh(ent["weight"], dw["o_proj"][0])
        qr = torch.as_tensor(_head_cols(q, g.head_dim))
        kvr = torch.as_tensor(_head_cols(kv, g.head_dim))
        for n, rows in (("q_proj", qr), ("k_proj", kvr), ("v_proj", kvr)):
            w, b = dw[n]
            setattr(s_attn, n, _linear(w[rows.to(w.device)], None if b is None else b[rows.to(b.device)]))
        setattr(s_attn, "o_proj", _linear(o_w, dw["o_proj"][1]))
        _set_attn_sizes(s_attn, len(q), len(kv))
        # MLP
        lm = int(levels.get(m_name, 0))
        dw = {n: dense(m_name, live_mlp, n) for n in ("gate_proj", "up_proj", "down_proj")}
        if lm == 0:
            ch = np.arange(g.inter)
            d_w = dw["down_proj"][0]
        else:
            ent = db["units"][m_name]["levels"][lm]
            ch = np.asarray(ent["kept"])
            d_w = _fresh(ent["weight"], dw["down_proj"][0])
        cr = torch.as_tensor(ch.astype(np.int64))
        for n in ("gate_proj", "up_proj"):
            w, b = dw[n]
            setattr(s_mlp, n, _linear(w[cr.to(w.device)], None if b is None else b[cr.to(b.device)]))
        setattr(s_mlp, "down_proj", _linear(d_w, dw["down_proj"][1]))
        s_mlp.intermediate_size = len(ch)
        sizes.append({"num_attention_heads": int(len(q)), "num_key_value_heads": int(len(kv)),
                      "head_dim": g.head_dim, "intermediate_size": int(len(ch))})
    base = type(model)
    small.config.raypress_width_layers = sizes
    small.config.auto_map = {"AutoModelForCausalLM": f"{_MODELING_FILE[:-3]}.RayPressWidthForCausalLM"}
    meta = {"format": FORMAT, "family": "width", "block_prefix": lay.prefix, "attn_name": lay.attn_name, "mlp_name": lay.mlp_name,
            "base_class": f"{base.__module__}.{base.__name__}", "attn_mode": db["attn_mode"],
            "reform": db.get("reform"),
            "levels": {k: int(v) for k, v in levels.items() if not k.startswith("_")},
            "layers": [dict(s, kept_heads=None) for s in sizes],
            "n_params": count_params(small), "dense_n_params": count_params(model)}
    for s_, (i, g) in zip(meta["layers"], enumerate(geoms)):
        a = int(levels.get(lay.unit(i, "attn"), 0))
        m = int(levels.get(lay.unit(i, "mlp"), 0))
        ea, em = db["units"][lay.unit(i, "attn")]["levels"][a], db["units"][lay.unit(i, "mlp")]["levels"][m]
        s_["kept_heads"] = list(range(g.n_q)) if ea is None else [int(x) for x in ea["kept"]]
        s_["kept_kv_heads"] = list(range(g.n_kv)) if ea is None else [int(x) for x in ea["kept_kv"]]
        s_["kept_channels"] = None if em is None else [int(x) for x in em["kept"]]
    if extra_info:
        meta.update(extra_info)
    files = {_MODELING_FILE: _MODELING_TEMPLATE.format(base=base.__name__, module=base.__module__, prefix=lay.prefix,
                                                       attn=lay.attn_name, mlp=lay.mlp_name),
             "raypress.json": json.dumps(meta, indent=1) + "\n"}
    write_export(small, out, tokenizer=tokenizer, files=files, overwrite=overwrite, dtype=dtype)
    return out


class _ShadowAdapter:
    """The adapter's naming applied to another (copied) model."""

    def __init__(self, adapter, model):
        self.block_prefix = adapter.block_prefix
        self.attn_name = getattr(adapter, "attn_name", "self_attn")
        self.mlp_name = getattr(adapter, "mlp_name", "mlp")
        self.family = getattr(adapter, "family", "llama")
        self.model = model

    def blocks(self):
        return list(self.model.get_submodule(self.block_prefix))


def _read_state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {}
        for f in files:
            sd.update(load_file(str(path / f)))
        return sd
    raise RayPressError(f"'{path}' has no model.safetensors; export it with `raypress export` / export_width")


@torch.no_grad()
def load_width_model(path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a folder written by `export_width`: a transformers model whose blocks have their own
    head counts / intermediate sizes (config.json keeps the dense maxima; raypress.json has the
    per-layer sizes). Returns the model in eval mode."""
    from transformers import AutoConfig, AutoModelForCausalLM

    p = Path(path)
    mf = p / "raypress.json"
    if not mf.is_file():
        raise RayPressError(f"'{p}' is not a RayPress width export (no raypress.json); plain HF folders load with "
                            "transformers.AutoModelForCausalLM.from_pretrained")
    meta = json.loads(mf.read_text())
    if meta.get("format") != FORMAT:
        raise RayPressError(f"'{mf}' has format {meta.get('format')!r}, expected {FORMAT!r}; re-export the model")
    config = AutoConfig.from_pretrained(p)
    if hasattr(config, "auto_map"):
        del config.auto_map  # build the stock class; the sizes below do what the modeling file does
    model = AutoModelForCausalLM.from_config(config)
    blocks = list(model.get_submodule(meta["block_prefix"]))
    if len(blocks) != len(meta["layers"]):
        raise RayPressError(f"raypress.json lists {len(meta['layers'])} layers but the config builds {len(blocks)}")
    for blk, s in zip(blocks, meta["layers"]):
        attn, mlp = blk.get_submodule(meta["attn_name"]), blk.get_submodule(meta["mlp_name"])
        d, h = s["head_dim"], attn.q_proj.in_features
        nq, nkv, inter = s["num_attention_heads"], s["num_key_value_heads"], s["intermediate_size"]
        for n, (i, o) in {"q_proj": (h, nq * d), "k_proj": (h, nkv * d), "v_proj": (h, nkv * d),
                          "o_proj": (nq * d, h)}.items():
            setattr(attn, n, nn.Linear(i, o, bias=getattr(attn, n).bias is not None, device="meta"))
        for n, (i, o) in {"gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}.items():
            setattr(mlp, n, nn.Linear(i, o, bias=getattr(mlp, n).bias is not None, device="meta"))
        _set_attn_sizes(attn, nq, nkv)
        mlp.intermediate_size = inter
    sd = _read_state_dict(p)
    missing, unexpected = model.load_state_dict(sd, strict=False, assign=True)
    tied = bool(getattr(config, "tie_word_embeddings", False) or
                getattr(getattr(config, "get_text_config", lambda: config)(), "tie_word_embeddings", False))
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
        missing = [m for m in missing if m not in ("lm_head.weight",)]
    if unexpected or missing:
        bad = (unexpected or missing)[0]
        raise RayPressError(f"width export '{p}' does not match its raypress.json ({bad!r} "
                            f"{'unexpected' if unexpected else 'missing'}); re-export the model")
    model = model.to(device=device, dtype=dtype)
    model.eval()
    return model


