"""Export of compressed models (raypress.export): round trips through transformers."""
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from raypress.compress.depth import DepthApplier, depth_space
from raypress.compress.quant import RTN
from raypress.compress.swap import WeightSwapApplier
from raypress.errors import RayPressError
from raypress.export import load_exported, read_export_info
from raypress.families import export_model
from raypress.fitness import perplexity
from raypress.models import get_adapter
from raypress.space import SearchSpace

from _tiny import load_tiny, tiny_tokenizer_dir

VOCAB = 512


def _llama(n_layers=4):
    return load_tiny("llama", num_hidden_layers=n_layers)[0].eval()


def _opt(n_layers=4):
    return load_tiny("opt", num_hidden_layers=n_layers)[0].eval()


def _tokens(n=4, t=32, seed=0):
    return np.random.default_rng(seed).integers(0, VOCAB, size=(n, t)).astype(np.int64)


def _tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


def _rel(a, b):
    return abs(a - b) / abs(b)


def _n_params(m):
    return sum(p.numel() for p in m.parameters())


class FakeDB:
    """LevelDatabase stand-in: variants built on the fly (magnitude pruning or RTN)."""

    def __init__(self, model, adapter, values, kind="sparsity"):
        self.layers = list(adapter.linear_layers())
        self.level_values = {l: list(values) for l in self.layers}
        self.n_params = {l: m.weight.numel() for l, m in adapter.linear_layers().items()}
        self.meta = {"method": {"name": "magnitude" if kind == "sparsity" else "rtn", "levels": list(values),
                                "group_size": 32}}
        self._stack = {}
        rtn = RTN(bits=[int(v) for v in values], group_size=32) if kind == "quant" else None
        for l, m in adapter.linear_layers().items():
            W = m.weight.detach().float()
            out = []
            for v in values:
                if kind == "sparsity":
                    k = int(round(v * W.numel()))
                    w = W.clone()
                    if k:
                        w.view(-1)[W.abs().view(-1).argsort()[:k]] = 0
                else:
                    w = rtn.build(W, None, v)
                out.append(w.numpy())
            self._stack[l] = np.stack(out)
            self._stack[l].setflags(write=False)

    def variant(self, layer, level):
        return self._stack[layer][level]

    def refs(self):
        return dict(self._stack)


def _space_for(db, target):
    layers = db.layers
    return SearchSpace(layers=layers, n_params=[db.n_params[l] for l in layers],
                       level_values=[db.level_values[l] for l in layers], target=target)


def _pair_config(db, mid, lo, hi):
    """All layers at level `mid`; layer-0 and layer-1 q_proj (equal sizes) moved to `lo` / `hi`."""
    cfg = {l: mid for l in db.layers}
    qs = [l for l in db.layers if l.endswith("q_proj")]
    cfg[qs[0]], cfg[qs[1]] = lo, hi
    return cfg


def test_depth_roundtrip_llama(tmp_path):
    model = _llama()
    ad = get_adapter(model)
    toks = _tokens()
    space = depth_space(ad, 0.5, "sublayer")
    drop = ["model.layers.1.self_attn", "model.layers.1.mlp", "model.layers.2.mlp", "model.layers.0.self_attn"]
    cfg = {u: int(u in drop) for u in space.layers}
    ap = DepthApplier()
    ap.attach(model, ad)
    ap.apply(cfg)
    ppl_mem = perplexity(model, toks)
    ap.reset()
    dense_ppl = perplexity(model, toks)

    out = export_model(model, tmp_path / "exp", family="depth", levels=cfg | {"_rp_tokens": 512}, space=space,
                       tokenizer=_tokenizer())
    assert perplexity(model, toks) == dense_ppl  # the given model is not modified
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left

    info = json.loads((out / "raypress.json").read_text())
    assert info["family"] == "depth" and info["mean_value"] == 0.5 and info["raypress_version"]
    assert info["depth"]["dropped_blocks"] == [1]  # attention + MLP both dropped -> block removed
    assert sorted(info["depth"]["dropped_sublayers"]) == ["model.layers.0.self_attn", "model.layers.1.mlp"]
    assert info["layers"]["model.layers.2.mlp"] == {"level": 1, "value": 1.0}

    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_hidden_layers == 3 and len(hf.model.layers) == 3
    assert [b.self_attn.layer_idx for b in hf.model.layers] == [0, 1, 2]
    assert _n_params(hf) < _n_params(model)
    assert _rel(perplexity(hf, toks), ppl_mem) < 1e-4

    fast, tok = load_exported(out)
    assert tok is not None and fast.raypress_info["family"] == "depth"
    assert "forward" in fast.model.layers[0].self_attn.__dict__  # skipped, not just zero-weighted
    assert _rel(perplexity(fast, toks), ppl_mem) < 1e-4

    ids = torch.as_tensor(toks[:1, :6])
    with torch.no_grad():
        g1 = hf.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
        g2 = fast.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert g1.shape == (1, 11) and torch.equal(g1, g2)
    text = tok.decode(g1[0])
    assert isinstance(text, str) and text


@pytest.mark.parametrize("family", ["llama", "opt", "qwen3"])
def test_depth_block_export_smaller(tmp_path, family):
    model = {"llama": _llama, "opt": _opt, "qwen3": lambda: load_tiny("qwen3", num_hidden_layers=4)[0].eval()}[family]()
    ad = get_adapter(model)
    toks = _tokens(seed=1)
    space = depth_space(ad, 0.25, "block")
    cfg = {u: int(u.endswith(".2")) for u in space.layers}
    ap = DepthApplier()
    ap.attach(model, ad)
    ap.apply(cfg)
    ppl_mem = perplexity(model, toks)
    ap.reset()
    out = export_model(model, tmp_path / "blk", family="depth", levels=cfg, space=space)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert hf.config.num_hidden_layers == 3
    if getattr(hf.config, "layer_types", None) is not None:
        assert len(hf.config.layer_types) == 3
    assert _n_params(hf) < _n_params(model)
    assert _rel(perplexity(hf, toks), ppl_mem) < 1e-4
    with torch.no_grad():
        assert hf.generate(torch.as_tensor(toks[:1, :4]), max_new_tokens=3, do_sample=False,
                           pad_token_id=0).shape == (1, 7)


def test_opt_sublayer_export(tmp_path):
    model = _opt()
    ad = get_adapter(model)
    toks = _tokens(seed=2)
    space = depth_space(ad, 0.25, "sublayer")
    drop = {"model.decoder.layers.0.self_attn", "model.decoder.layers.3.mlp"}
    cfg = {u: int(u in drop) for u in space.layers}
    ap = DepthApplier()
    ap.attach(model, ad)
    ap.apply(cfg)
    ppl_mem = perplexity(model, toks)
    out = export_model(model, tmp_path / "o", family="depth", levels=cfg, space=space)
    assert sorted(read_export_info(out)["depth"]["dropped_sublayers"]) == sorted(drop)
    assert _rel(perplexity(AutoModelForCausalLM.from_pretrained(out).eval(), toks), ppl_mem) < 1e-4
    assert _rel(perplexity(load_exported(out)[0], toks), ppl_mem) < 1e-4


def test_sparsity_roundtrip(tmp_path):
    model = _llama(n_layers=2)
    ad = get_adapter(model)
    toks = _tokens(seed=3)
    db = FakeDB(model, ad, [0.0, 0.25, 0.5, 0.75])
    space = _space_for(db, 0.5)
    cfg = _pair_config(db, 2, 0, 3)  # q0 -> 0.0 (dense), q1 -> 0.75, o0 -> 0.75 (same size as q)
    cfg["model.layers.0.self_attn.o_proj"] = 3
    ap = WeightSwapApplier(db.refs(), {l: 0 for l in db.layers})
    ap.attach(model, ad)
    ap.apply(cfg)
    ppl_mem = perplexity(model, toks)
    ap.reset()

    out = export_model(model, tmp_path / "sp", family="sparsegpt", levels=cfg, space=space, db=db)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _rel(perplexity(hf, toks), ppl_mem) < 1e-4
    w = hf.model.layers[1].mlp.down_proj.weight
    assert abs(float((w == 0).float().mean()) - 0.5) < 0.01
    assert torch.equal(hf.model.layers[0].self_attn.q_proj.weight, model.model.layers[0].self_attn.q_proj.weight)
    info = read_export_info(out)
    assert info["family"] == "sparsity" and abs(info["mean_value"] - 0.5) < 1e-12
    assert info["method"]["name"] == "magnitude"
    assert info["layers"]["model.layers.1.self_attn.q_proj"] == {"level": 3, "value": 0.75}
    with torch.no_grad():
        hf.generate(torch.as_tensor(toks[:1, :4]), max_new_tokens=3, do_sample=False, pad_token_id=0)


def test_quant_roundtrip(tmp_path):
    model = _llama(n_layers=2)
    ad = get_adapter(model)
    toks = _tokens(seed=4)
    db = FakeDB(model, ad, [2.0, 3.0, 4.0, 5.0], kind="quant")
    space = _space_for(db, 4.0)
    cfg = _pair_config(db, 2, 1, 3)
    ap = WeightSwapApplier(db.refs())
    ap.attach(model, ad)
    ap.apply(cfg)
    ppl_mem = perplexity(model, toks)
    ap.reset()
    out = export_model(model, tmp_path / "q", family="quant", levels=cfg, space=space, db=db)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _rel(perplexity(hf, toks), ppl_mem) < 1e-4
    info = read_export_info(out)
    assert info["bits"]["model.layers.0.self_attn.q_proj"] == 3.0
    assert info["bits"]["model.layers.1.self_attn.q_proj"] == 5.0
    assert info["mean_value"] == 4.0 and info["effective_bits_mean"] == 4.0 + 32 / 32


def test_export_errors_and_atomicity(tmp_path):
    model = _llama(n_layers=2)
    ad = get_adapter(model)
    space = depth_space(ad, 0.5, "block")
    cfg = {"model.layers.0": 1, "model.layers.1": 0}
    out = export_model(model, tmp_path / "e", family="depth", levels=cfg, space=space)
    with pytest.raises(RayPressError, match="exists"):
        export_model(model, out, family="depth", levels=cfg, space=space)
    export_model(model, out, family="depth", levels={"model.layers.0": 0, "model.layers.1": 1}, space=space,
                 overwrite=True)
    assert read_export_info(out)["depth"]["dropped_blocks"] == [1]
    with pytest.raises(RayPressError):
        export_model(model, tmp_path / "x", family="width", levels=cfg, space=space)
    with pytest.raises(RayPressError):
        export_model(model, tmp_path / "x", family="sparsity", levels=cfg, space=space)  # no db / bad layers
    with pytest.raises(RayPressError):
        export_model(model, tmp_path / "x", family="depth", levels={"model.layers.0": 1}, space=space)
    if hasattr(space, "check"):
        with pytest.raises(RayPressError):  # infeasible: drops both blocks (also: would leave none)
            export_model(model, tmp_path / "x", family="depth", levels={u: 1 for u in space.layers}, space=space)

    class BadTokenizer:
        def save_pretrained(self, path):
            raise OSError("disk full")

    with pytest.raises(OSError):
        export_model(model, tmp_path / "half", family="depth", levels=cfg, space=space, tokenizer=BadTokenizer())
    assert not (tmp_path / "half").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_export_from_spec_carries_tokenizer(tmp_path):
    from _tiny import tiny_llama

    spec = tiny_llama(num_hidden_layers=4)
    model = _llama()
    space = depth_space(get_adapter(model), 0.5, "block")
    cfg = {u: int(u.endswith((".0", ".3"))) for u in space.layers}
    out = export_model(spec, tmp_path / "s", family="depth", levels=cfg, space=space)
    info = read_export_info(out)
    assert info["source_model"] == spec and info["depth"]["dropped_blocks"] == [0, 3]
    assert info["depth"]["block_map"] == {"1": 0, "2": 1}
    m, tok = load_exported(out)
    assert tok is not None and m.config.num_hidden_layers == 2
    ids = tok("the quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        gen = m.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=tok.pad_token_id)
    assert isinstance(tok.decode(gen[0]), str)


@pytest.mark.parametrize("method,target", [("gptq", 4.0), ("magnitude", 0.5)])
def test_real_database_roundtrip(tmp_path, method, target):
    """With raypress.database (float16 storage): export == evaluator-style weight swap."""
    from raypress.compress import get_method
    from raypress.database import build_database
    from raypress.families import dense_levels

    model, tok = load_tiny("llama")
    ad = get_adapter(model)
    m = get_method(method, **({"bits": [2, 3, 4, 5, 6, 8], "group_size": 32} if method == "gptq" else {}))
    db = build_database("tiny", model, ad, m, _tokens(n=4, seed=5), cache_root=tmp_path / "db",
                        fingerprint="tiny-llama", progress=False)
    space = SearchSpace.for_database(db, target)
    cfg = space.uniform()
    ap = WeightSwapApplier({l: db.array(l) for l in db.layers}, dense_levels(db),
                           decode=getattr(m, "decode_stored", None))
    ap.attach(model, ad)
    ap.apply(cfg)
    toks = _tokens(seed=6)
    ppl_mem = perplexity(model, toks)
    ap.reset()
    out = export_model(model, tmp_path / "exp", family=method, levels=cfg, space=space, db=db, tokenizer=tok)
    assert _rel(perplexity(AutoModelForCausalLM.from_pretrained(out).eval(), toks), ppl_mem) < 1e-4
    info = read_export_info(out)
    assert info["method"]["name"] == method and abs(info["mean_value"] - target) < 1e-9
