"""Structured width family: ladders, importance, reformation, applier, export round trip."""
import pickle
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raypress import reform as rf
from raypress.compress import width as W
from raypress.compress.width import (WidthApplier, build_width_database, count_params, export_width,
                                     levels_from_database, load_width_model, width_hessians, width_initial,
                                     width_levels, width_target)
from raypress.errors import RayPressError

# SmolLM2-like proportions: 3 query heads per KV head, MLP = 2 x hidden
GQA = dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=2, head_dim=16, intermediate_size=192)


def _tokens(tok, n_rows, seq=64):
    from _tiny import training_text

    ids = np.array(tok(training_text(80_000))["input_ids"], dtype=np.int64)
    assert ids.size >= n_rows * seq
    return ids[: n_rows * seq].reshape(n_rows, seq)


@pytest.fixture(scope="module")
def setup():
    from _tiny import load_tiny
    from raypress.models import get_adapter

    model, tok = load_tiny("llama", **GQA)
    ad = get_adapter(model)
    ids = _tokens(tok, 20)
    calib, ev = ids[:16], ids[16:]
    lv = width_levels(ad, channel_multiple=8)
    H = width_hessians(model, ad, calib)
    db = build_width_database(model, ad, H, lv, progress=False)
    return dict(model=model, tok=tok, ad=ad, calib=calib, ev=ev, lv=lv, H=H, db=db)


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids), use_cache=False).logits


def _kl(logits, ref):
    return F.kl_div(F.log_softmax(logits, -1), F.log_softmax(ref, -1), log_target=True,
                    reduction="batchmean").item()


def _readonly(db):
    for rec in db["units"].values():
        for ent in rec["levels"]:
            if ent:
                for a in ent.values():
                    a.setflags(write=False)
    return db


# ----------------------------------------------------------------------------- reform.py
def _problem(seed=0, n_in=96, out=48, N=1024):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(n_in, n_in, generator=g) / n_in ** 0.5 + 0.3 * torch.eye(n_in)
    X = (A @ torch.randn(n_in, N, generator=g)) * torch.linspace(0.2, 3, n_in)[:, None]
    H = 2 * X @ X.T / N
    Wt = torch.randn(out, n_in, generator=g)
    kept = torch.randperm(n_in, generator=g)[: int(0.6 * n_in)].sort().values
    return Wt, H, kept


def test_reform_lstsq_and_admm_reduce_output_error():
    Wt, H, kept = _problem()
    e_mask = rf.output_error(Wt, rf.mask_columns(Wt, kept), H)
    ls = rf.lstsq_columns(Wt, H, kept, full=True)
    e_ls = rf.output_error(Wt, ls, H)
    assert torch.equal(rf.lstsq_columns(Wt, H, kept), ls[:, kept])
    mask = rf.column_mask(Wt.shape[1], kept)
    ad = rf.admm_reform(Wt, H, mask, rho=1.0, iters=30)
    e_ad = rf.output_error(Wt, ad, H)
    assert bool((ad[:, ~mask] == 0).all())                      # pruned entries exactly zero
    assert e_ls < 0.6 * e_mask and e_ad < 0.6 * e_mask
    assert e_ls <= e_ad * (1 + 1e-9)                             # LS is the optimum for a column mask
    assert (e_ad - e_ls) < 0.15 * (e_mask - e_ls)               # 30 iterations: most of the way
    ad_long = rf.admm_reform(Wt, H, mask, rho=1.0, iters=400)
    assert rf.output_error(Wt, ad_long, H) - e_ls < 0.01 * (e_mask - e_ls)
    assert (ad_long - ls).norm() / ls.norm() < 0.01              # converges to the LS solution
    # all columns kept: LS returns (almost) W itself
    full = rf.lstsq_columns(Wt, H, torch.arange(Wt.shape[1]), percdamp=0.0)
    assert torch.allclose(full, Wt, atol=1e-3)


def test_admm_unstructured_mask_and_inputs_untouched():
    Wt, H, _ = _problem(seed=1)
    W0, H0 = Wt.clone(), H.clone()
    mask = Wt.abs() > Wt.abs().median()                          # 50% unstructured magnitude mask
    e_mask = rf.output_error(Wt, Wt * mask, H)
    out = rf.admm_reform(Wt, H, mask, iters=30)
    assert bool((out[~mask] == 0).all())
    assert rf.output_error(Wt, out, H) < 0.7 * e_mask
    assert torch.equal(Wt, W0) and torch.equal(H, H0)


# ----------------------------------------------------------------------------- ladders / budget
def _meta_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    with torch.device("meta"):
        return LlamaForCausalLM(LlamaConfig(**kw))


SMOLLM2 = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
               intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)


def test_smollm2_ladders_are_exact_and_targets_reachable():
    lv = width_levels(_meta_llama(**SMOLLM2))
    assert lv.attn_mode == "query" and lv.exact and lv.linear
    a, m = lv.units[0], lv.units[1]
    assert a.name == "model.layers.0.self_attn" and m.name == "model.layers.0.mlp"
    assert a.kept == [3, 2, 1] and a.fractions() == [0.0, 0.25, 0.5]
    assert a.n_params == 4 * 576 * 576 - 2 * 576 * 384 and m.n_params == 3 * 576 * 1536
    assert m.kept == [1536, 1344, 1152, 960, 768, 576] and lv.values()[1][-1] == 0.625
    assert lv.total_params() == 30 * (a.n_params + m.n_params)
    for keep in (0.8, 0.7, 0.75):
        t, exact = width_target(lv, 1 - keep)
        assert exact and t == pytest.approx(1 - keep)
        cfg = width_initial(lv, t)
        assert lv.removed_params(cfg) * 1000 == round(t * 1000) * lv.total_params()   # exact budget
    t, exact = width_target(lv, 0.21)                            # off-grid -> nearest reachable
    assert not exact and abs(t - 0.21) < 0.025 and width_target(lv, t) == (t, True)
    with pytest.raises(RayPressError):
        width_target(lv, 0.95)                                   # beyond the ladders


def test_inexact_ladder_warns_and_group_mode_for_mha():
    with pytest.warns(UserWarning, match="not whole"):
        lv = width_levels(_meta_llama(**SMOLLM2), mlp_step=64)
    assert not lv.exact and len(lv.units[1].kept) == 17
    mha = width_levels(_meta_llama(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=4, intermediate_size=128, vocab_size=64),
                       channel_multiple=16)
    assert mha.attn_mode == "group" and mha.units[0].kept == [4, 3, 2, 1]
    with pytest.warns(UserWarning, match="not whole"):
        lv = width_levels(_meta_llama(**SMOLLM2), mlp_keep=[1.0, 0.9, 0.8, 0.7], channel_multiple=64)
    assert lv.units[1].kept == [1536, 1408, 1216, 1088]


def test_width_space_matches_levels(setup):
    pytest.importorskip("raypress.space")
    lv = setup["lv"]
    t, _ = width_target(lv, 0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        space = W.width_space(setup["ad"], 1 - t, levels=lv)
    assert space.layers == lv.names and space.n_params == [u.n_params for u in lv.units]
    assert space.target == pytest.approx(t)
    cfg = width_initial(lv, space.target)
    assert space.is_feasible(cfg)


# ----------------------------------------------------------------------------- importance / database
def test_importance_uniform_subnet_beats_random(setup, monkeypatch):
    m, ad, lv, H, ev = setup["model"], setup["ad"], setup["lv"], setup["H"], setup["ev"]
    ref = _logits(m, ev)
    cfg = {u.name: (1 if u.kind == "attn" else 3) for u in lv.units}   # uniform: 2/3 heads, 5/8 channels
    ap = WidthApplier(setup["db"])
    ap.attach(m, ad)
    ap.apply(cfg)
    kl_imp = _kl(_logits(m, ev), ref)
    ap.reset()
    # the kept sets are the top-k by importance, nested across levels
    rec = setup["db"]["units"]["model.layers.0.mlp"]
    top = np.sort(np.argsort(-rec["importance"])[: rec["kept_counts"][3]])
    assert np.array_equal(rec["levels"][3]["kept"], top)
    assert set(rec["levels"][4]["kept"]) <= set(rec["levels"][3]["kept"])
    att = setup["db"]["units"]["model.layers.0.self_attn"]["levels"][1]
    assert len(att["kept"]) == 4 and list(att["kept_kv"]) == [0, 1]
    assert sorted(set(np.asarray(att["kept"]) // 3)) == [0, 1]   # 2 query heads in each KV group
    orig = W.width_importance
    kls = []
    for seed in range(3):
        rng = np.random.default_rng(seed)
        monkeypatch.setattr(W.database, "width_importance",
                            lambda *a, **k: {n: rng.random(v.shape) for n, v in orig(*a, **k).items()})
        db = build_width_database(m, ad, H, lv, progress=False)
        ap = WidthApplier(db)
        ap.attach(m, ad)
        ap.apply(cfg)
        kls.append(_kl(_logits(m, ev), ref))
        ap.reset()
    assert kl_imp < min(kls)


def test_reformation_lowers_output_error(setup):
    m, ad, lv, H, ev = setup["model"], setup["ad"], setup["lv"], setup["H"], setup["ev"]
    ref = _logits(m, ev)
    cfg = {u.name: len(u.kept) - 2 for u in lv.units}
    res = {}
    for reform in ("none", "lstsq", "admm"):
        db = setup["db"] if reform == "lstsq" else build_width_database(m, ad, H, lv, reform=reform, progress=False)
        # layer-level: ‖(W − Ŵ) X‖² on the calibration Hessian
        name = "model.layers.1.mlp"
        ent = db["units"][name]["levels"][cfg[name]]
        dense = m.get_submodule(name + ".down_proj").weight.detach()
        full = torch.zeros_like(dense)
        full[:, torch.as_tensor(ent["kept"])] = torch.from_numpy(ent["weight"])
        err = rf.output_error(dense, full, H[name + ".down_proj"])
        ap = WidthApplier(db)
        ap.attach(m, ad)
        ap.apply(cfg)
        res[reform] = (err, _kl(_logits(m, ev), ref))
        ap.reset()
    assert res["lstsq"][0] < 0.8 * res["none"][0] and res["admm"][0] < 0.8 * res["none"][0]
    assert res["lstsq"][0] <= res["admm"][0] * (1 + 1e-3)     # LS is optimal for the column mask
    assert res["lstsq"][1] < 0.5 * res["none"][1] and res["admm"][1] < 0.5 * res["none"][1]


def test_database_is_picklable_and_levels_roundtrip(setup):
    db = pickle.loads(pickle.dumps(setup["db"]))
    lv = levels_from_database(db)
    assert lv.names == setup["lv"].names and [u.removed for u in lv.units] == [u.removed for u in setup["lv"].units]
    assert db["units"]["model.layers.0.mlp"]["levels"][0] is None


# ----------------------------------------------------------------------------- applier
def test_applier_level0_is_dense_and_only_changed_units(setup):
    m, ad, lv, ev = setup["model"], setup["ad"], setup["lv"], setup["ev"]
    ref = _logits(m, ev)
    dense = {n: p.detach().clone() for n, p in m.named_parameters()}
    ap = WidthApplier(_readonly(pickle.loads(pickle.dumps(setup["db"]))))   # writes into the db would raise
    ap.attach(m, ad)
    assert ap.apply({}) == 0
    assert torch.equal(_logits(m, ev), ref)
    a0, m1 = "model.layers.0.self_attn", "model.layers.1.mlp"
    assert ap.apply({a0: 2, m1: 1, "_rp_tokens": 512}) == 2
    assert ap.apply({a0: 2, m1: 1}) == 0
    assert ap.apply({a0: 2, m1: 4}) == 1
    o = m.get_submodule(a0 + ".o_proj").weight.detach()
    kept = ap._db["units"][a0]["levels"][2]["kept"]
    assert o.shape == dense[a0 + ".o_proj.weight"].shape
    pruned = [h for h in range(6) if h not in kept]
    assert float(o[:, pruned[0] * 16:(pruned[0] + 1) * 16].abs().sum()) == 0.0
    assert not torch.allclose(_logits(m, ev), ref)
    assert ap.apply({}) == 2
    assert torch.equal(_logits(m, ev), ref)                      # bit-exact dense
    for n, p in m.named_parameters():
        assert torch.equal(p, dense[n]), n
    with pytest.raises(RayPressError):
        ap.apply({"model.layers.9.mlp": 1})
    with pytest.raises(RayPressError):
        ap.apply({m1: 99})
    ap2 = pickle.loads(pickle.dumps(ap))                          # ships without model state
    assert ap2._units == {} and ap2._db is None


def test_applier_from_object_store(setup, ray_session):
    m, ad, ev = setup["model"], setup["ad"], setup["ev"]
    ref = _logits(m, ev)
    ap = WidthApplier(ray_session.put(setup["db"]))
    ap = pickle.loads(pickle.dumps(ap))
    ap.attach(m, ad)                                              # ray.get: read-only arrays
    cfg = {u.name: len(u.kept) - 1 for u in setup["lv"].units}
    ap.apply(cfg)
    ap2 = WidthApplier(setup["db"])
    ap.reset()
    ap2.attach(m, ad)
    ap2.apply(cfg)
    masked = _logits(m, ev)
    ap2.reset()
    ap.apply(cfg)
    assert torch.equal(_logits(m, ev), masked)
    ap.reset()
    assert torch.equal(_logits(m, ev), ref)


# ----------------------------------------------------------------------------- export
def _roundtrip(model, ad, db, cfg, ev, tmp_path, tok=None):
    ap = WidthApplier(db)
    ap.attach(model, ad)
    ap.apply(cfg)
    masked = _logits(model, ev)
    out = export_width(model, ad, cfg, tmp_path / "small", applier=ap, tokenizer=tok)   # live model is masked
    ap.reset()
    small = load_width_model(out)
    assert torch.allclose(_logits(small, ev), masked, atol=1e-4)
    assert count_params(small) < count_params(model)
    return small, out


def test_export_roundtrip_gqa(setup, tmp_path):
    import json

    m, ad, lv, ev = setup["model"], setup["ad"], setup["lv"], setup["ev"]
    cfg = {"model.layers.0.self_attn": 1, "model.layers.0.mlp": 3, "model.layers.1.self_attn": 2,
           "model.layers.1.mlp": 0}
    small, out = _roundtrip(m, ad, setup["db"], cfg, ev, tmp_path, tok=setup["tok"])
    info = json.loads((out / "raypress.json").read_text())
    assert [l["num_attention_heads"] for l in info["layers"]] == [4, 2]
    assert [l["num_key_value_heads"] for l in info["layers"]] == [2, 2]
    assert [l["intermediate_size"] for l in info["layers"]] == [lv.units[1].kept[3], 192]
    assert small.model.layers[1].self_attn.num_key_value_groups == 1
    assert count_params(m) - count_params(small) == lv.removed_params(cfg)
    gen = small.generate(torch.as_tensor(ev[:1, :8]), max_new_tokens=4, do_sample=False)   # KV cache works
    assert gen.shape == (1, 12)
    with pytest.raises(RayPressError):
        export_width(m, ad, {"model.layers.0.mlp": 1}, tmp_path / "x")                 # no database


@pytest.mark.parametrize("kind,over", [("llama", dict(num_key_value_heads=4, num_attention_heads=4,
                                                      intermediate_size=128)),
                                       ("qwen3", dict(num_attention_heads=6, num_key_value_heads=2))])
def test_export_roundtrip_mha_and_qwen3(kind, over, tmp_path):
    from _tiny import load_tiny
    from raypress.models import get_adapter

    model, tok = load_tiny(kind, **over)
    ad = get_adapter(model)
    ids = _tokens(tok, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        lv = width_levels(ad, channel_multiple=16)
    db = build_width_database(model, ad, width_hessians(model, ad, ids[:6]), lv, progress=False,
                              storage_dtype="float16")
    cfg = {u.name: len(u.kept) - 1 - (u.block % 2) for u in lv.units}
    _roundtrip(model, ad, db, cfg, ids[6:], tmp_path)


def test_export_loads_with_transformers_remote_code(setup, tmp_path):
    from transformers import AutoModelForCausalLM

    m, ad, ev = setup["model"], setup["ad"], setup["ev"]
    cfg = {u.name: len(u.kept) - 1 for u in setup["lv"].units}
    small, out = _roundtrip(m, ad, setup["db"], cfg, ev, tmp_path)
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.allclose(_logits(hf, ev), _logits(small, ev), atol=1e-5)
    assert count_params(hf) == count_params(small)
    with pytest.raises(RayPressError, match="exists"):
        export_width(m, ad, cfg, out, database=setup["db"])
    export_width(m, ad, {}, out, database=setup["db"], overwrite=True)          # dense export replaces it
    assert count_params(load_width_model(out)) == count_params(m)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_prepare_width_via_families(setup, tmp_path):
    from _tiny import tiny_llama
    from raypress.config import Config, DatabaseConfig
    from raypress.families import prepare

    pytest.importorskip("raypress.space")
    m, ad, calib = setup["model"], setup["ad"], setup["calib"]
    cfg = Config(model=tiny_llama(**GQA), family="width", method="lstsq", target=0.25,
                 database=DatabaseConfig(cache_dir=str(tmp_path)))
    prep = prepare(cfg, m, ad, calib)
    space, ap = prep.space, prep.applier
    assert space.layers == [u.name for u in prep.context["width_levels"].units]
    for start in (space.uniform(), prep.context["initial"]):
        assert space.is_feasible(start)
    ap = pickle.loads(pickle.dumps(ap))
    ap.attach(m, ad)
    assert ap.apply(space.uniform()) > 0
    ap.reset()
    (db_dir,) = [d for d in (tmp_path / "width").iterdir() if not d.name.startswith(".")]
    assert (db_dir / "meta.json").is_file() and (db_dir / "width.safetensors").is_file()  # the store format
    prep2 = prepare(cfg, m, ad, calib)                     # cache hit
    assert prep2.space.target == space.target
