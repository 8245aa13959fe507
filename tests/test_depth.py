"""Depth family: units, search space, DepthApplier, ShortGPT (raypress.compress.depth)."""
import copy
import pickle

import numpy as np
import pytest
import torch

from raypress.compress.depth import (DepthApplier, angular_distance, depth_space, depth_units,
                                     shortgpt_config, shortgpt_scores)
from raypress.errors import RayPressError
from raypress.models import get_adapter

from _tiny import load_tiny


def _llama(n_layers=4):
    return load_tiny("llama", num_hidden_layers=n_layers)[0].eval()


def _opt(n_layers=3, pre_ln=True):
    kw = {} if pre_ln else {"do_layer_norm_before": False}
    return load_tiny("opt", num_hidden_layers=n_layers, **kw)[0].eval()


def _ids(n=2, t=16, seed=0, vocab=512):
    return torch.as_tensor(np.random.default_rng(seed).integers(0, vocab, size=(n, t)), dtype=torch.long)


@torch.no_grad()
def _logits(model, ids, **kw):
    return model(ids, use_cache=False, **kw).logits


def _without_blocks(model, adapter, drop):
    """Deep copy with the given blocks deleted from the ModuleList (layer_idx and config fixed)."""
    m = copy.deepcopy(model)
    layers = m.get_submodule(adapter.block_prefix)
    for i in sorted(drop, reverse=True):
        del layers[i]
    m.config.num_hidden_layers = len(layers)
    for j, block in enumerate(layers):
        block.self_attn.layer_idx = j
    return m


def test_units_and_space():
    model = _llama(n_layers=2)
    ad = get_adapter(model)
    assert depth_units(ad, "block") == ["model.layers.0", "model.layers.1"]
    units = depth_units(ad, "sublayer")
    assert units == ["model.layers.0.self_attn", "model.layers.0.mlp", "model.layers.1.self_attn", "model.layers.1.mlp"]
    sp = depth_space(ad, 0.25, "sublayer")
    assert sp.layers == units and list(sp.n_params) == [1] * 4
    assert [list(v) for v in sp.level_values] == [[0.0, 1.0]] * 4 and sp.target == 0.25
    assert depth_space(ad, 0.5, "block").layers == ["model.layers.0", "model.layers.1"]
    with pytest.raises(RayPressError, match=r"0\.25.*0\.5"):
        depth_space(ad, 0.3, "sublayer")
    with pytest.raises(RayPressError):
        depth_space(ad, 1.5, "block")
    with pytest.raises(RayPressError, match="granularity"):
        depth_units(ad, "heads")


def test_drop_nothing_is_exact():
    model = _llama()
    ad = get_adapter(model)
    ids = _ids()
    dense = _logits(model, ids)
    ap = DepthApplier()
    ap.attach(model, ad)
    assert ap.apply({}) == 0
    assert torch.equal(_logits(model, ids), dense)
    units = depth_units(ad, "sublayer") + depth_units(ad, "block")
    assert ap.apply({u: 0 for u in units}) == 0
    assert torch.equal(_logits(model, ids), dense)
    ap.apply({units[0]: 1, units[-1]: 1})
    assert not torch.equal(_logits(model, ids), dense)
    ap.reset()
    assert torch.equal(_logits(model, ids), dense)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_drop_block_equals_removed_block(family):
    model = _llama() if family == "llama" else _opt(n_layers=4)
    ad = get_adapter(model)
    ids = _ids()
    ap = DepthApplier()
    ap.attach(model, ad)
    for drop in ([1], [0, 2], [3]):
        ap.apply({f"{ad.block_prefix}.{i}": 1 for i in drop})
        ref = _without_blocks(model, ad, drop)
        ref_model_logits = _logits(ref, ids)
        assert torch.allclose(_logits(model, ids), ref_model_logits, atol=1e-6, rtol=0), drop
        # default forward (config.use_cache=True builds a KV cache): same logits
        with torch.no_grad():
            assert torch.allclose(model(ids).logits, ref_model_logits, atol=1e-6, rtol=0)
    ap.reset()


def test_drop_sublayers_equal_zeroed_projections():
    for model, o_name, d_name in ((_llama(), "self_attn.o_proj", "mlp.down_proj"),
                                  (_opt(), "self_attn.out_proj", "fc2")):
        ad = get_adapter(model)
        p = ad.block_prefix
        ids = _ids()
        ap = DepthApplier()
        ap.attach(model, ad)
        ap.apply({f"{p}.0.self_attn": 1, f"{p}.1.mlp": 1})
        got = _logits(model, ids)
        ap.reset()
        ref = copy.deepcopy(model)
        for name in (f"{p}.0.{o_name}", f"{p}.1.{d_name}"):
            lin = ref.get_submodule(name)
            lin.weight.data.zero_()
            if lin.bias is not None:
                lin.bias.data.zero_()
        assert torch.allclose(got, _logits(ref, ids), atol=1e-6, rtol=0)


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_kv_cache_with_dropped_first_attention(family):
    """Incremental decoding with a KV cache must match a full forward even when layer 0's attention
    (whose cache slot defines get_seq_length) is dropped."""
    model = _llama() if family == "llama" else _opt(n_layers=4)
    ad = get_adapter(model)
    p = ad.block_prefix
    ap = DepthApplier()
    ap.attach(model, ad)
    ap.apply({f"{p}.0.self_attn": 1, f"{p}.2": 1})
    ids = _ids(n=1, t=8)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits[:, -1]
        out = model(ids[:, :-1], use_cache=True)
        step = model(ids[:, -1:], cache=out.cache, use_cache=True).logits[:, -1]
        assert torch.allclose(step, full, atol=1e-5, rtol=0)
        cached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0)
        uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)


def test_apply_touches_only_changed_units():
    model = _llama()
    ad = get_adapter(model)
    u = depth_units(ad, "sublayer")
    ap = DepthApplier(units=u)
    ap.attach(model, ad)
    attn0 = model.model.layers[0].self_attn
    mlp0 = model.model.layers[0].mlp
    assert ap.apply({u[0]: 1}) == 1
    assert "forward" in attn0.__dict__ and "forward" not in mlp0.__dict__
    shadow = attn0.__dict__["forward"]
    assert ap.apply({u[0]: 1, "_rp_tokens": 512}) == 0
    assert ap.apply({u[0]: 1, u[1]: 1}) == 1
    assert attn0.__dict__["forward"] is shadow  # untouched
    assert ap.apply({u[1]: 1, u[2]: 1}) == 2
    assert "forward" not in attn0.__dict__
    assert ap.dropped == {u[1], u[2]}
    assert ap.apply({}) == 2
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.raises(RayPressError):
        ap.apply({u[0]: 2})
    with pytest.raises(RayPressError):
        ap.apply({"model.layers.0": 1})  # not a unit of this (sublayer) applier
    state = pickle.loads(pickle.dumps(ap))
    assert state.units == u and state.dropped == set()


def test_opt_units_and_post_ln():
    model = _opt(pre_ln=False)
    ad = get_adapter(model)
    units = depth_units(ad, "sublayer")
    assert units[:2] == ["model.decoder.layers.0.self_attn", "model.decoder.layers.0.mlp"]
    ids = _ids()
    dense = _logits(model, ids)
    ap = DepthApplier()
    ap.attach(model, ad)
    ap.apply({u: 1 for u in units[:3]} | {"model.decoder.layers.2": 1})
    assert torch.isfinite(_logits(model, ids)).all()
    ap.reset()
    assert torch.equal(_logits(model, ids), dense)


@pytest.mark.parametrize("unit", ["block", "sublayer"])
def test_shortgpt(unit):
    model = _llama()
    ad = get_adapter(model)
    calib = _ids(n=3, t=16, seed=1).numpy()
    scores = shortgpt_scores(model, ad, calib, unit=unit)
    units = depth_units(ad, unit)
    assert list(scores) == units
    assert all(0.0 <= s <= 2.0 and np.isfinite(s) for s in scores.values())
    ang = angular_distance(model, ad, calib, unit=unit)
    assert list(ang) == units and all(0.0 <= s <= 1.0 for s in ang.values())
    # monotone relation between 1 - cos and arccos/pi only holds per token; both rank the same here
    frac = 0.5
    sp = depth_space(ad, frac, unit)
    cfg = shortgpt_config(sp, scores)
    k = round(frac * len(units))
    assert sum(cfg.values()) == k and set(cfg) == set(units)
    dropped = [u for u in units if cfg[u]]
    kept = [u for u in units if not cfg[u]]
    assert max(scores[u] for u in dropped) <= min(scores[u] for u in kept)
    if hasattr(sp, "is_feasible"):
        assert sp.is_feasible(cfg)
    with pytest.raises(RayPressError):
        shortgpt_config(sp, {units[0]: 0.1})


def test_shortgpt_block_matches_manual_cosine():
    model = _llama(n_layers=2)
    ad = get_adapter(model)
    ids = _ids(n=2, t=12, seed=3)
    scores = shortgpt_scores(model, ad, ids.numpy(), unit="block")
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    # hidden_states[i] enters block i; the last entry has the final norm applied, so check block 0 only
    cos = torch.nn.functional.cosine_similarity(hs[0], hs[1], dim=-1).mean()
    assert abs(scores["model.layers.0"] - (1 - float(cos))) < 1e-5


def test_opt_shortgpt_sublayer():
    model = _opt()
    ad = get_adapter(model)
    scores = shortgpt_scores(model, ad, _ids(n=2, t=8).numpy(), unit="sublayer")
    assert list(scores) == depth_units(ad, "sublayer")
