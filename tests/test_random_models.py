"""random:<arch>[@N] models: real architectures with deterministic random weights, built block by block.

Their time and memory are real, their quality numbers are not (every output says so). The streamed
database build materializes one block at a time and must produce exactly the database a build on
the whole model produces.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from raypress.models import RANDOM_NOTE, get_adapter, load_model, meta_model, resolve_model

TINY = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "intermediate_size": 128,
        "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 3, "vocab_size": 512,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
        "initializer_range": 0.02}


@pytest.fixture(scope="module")
def tiny_cfg(tmp_path_factory):
    p = tmp_path_factory.mktemp("arch") / "config.json"
    p.write_text(json.dumps(TINY))
    return p


def test_bundled_architectures_at_true_width_on_the_meta_device():
    for spec, blocks, hidden in (("random:llama-3-8b@4", 4, 4096), ("random:llama-3.1-70b@16", 16, 8192),
                                 ("random:opt-66b@8", 8, 9216), ("random:mistral-7b", 32, 4096),
                                 ("random:smollm2-135m", 30, 576)):
        m = meta_model(spec)
        assert m.config.num_hidden_layers == blocks and m.config.hidden_size == hidden
        assert len(get_adapter(m).blocks()) == blocks


def test_random_weights_are_deterministic_and_folded_into_the_vocabulary(tiny_cfg):
    spec = f"random:{tiny_cfg}@2"
    a, tok = load_model(spec)
    b, _ = load_model(spec)
    assert a.config.num_hidden_layers == 2
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    w = get_adapter(a).linear_layers()["model.layers.1.mlp.down_proj"].weight
    assert abs(float(w.std()) - 0.02) < 0.002  # config.initializer_range
    assert getattr(tok, "raypress_fold_vocab", None) == 512  # the default tokenizer's ids fit the vocabulary
    from raypress.data import load_tokens

    toks = load_tokens("text:" + str(tiny_cfg), tok)
    assert toks.max() < 512
    assert "raypress_random" in json.loads((__import__("pathlib").Path(resolve_model(spec)) / "config.json").read_text())


def test_streamed_model_materializes_one_block_at_a_time(tiny_cfg):
    spec = f"random:{tiny_cfg}"
    full, _ = load_model(spec)
    streamed, _ = load_model(spec, streamed=True)
    blocks = get_adapter(streamed).blocks()
    assert all(p.device.type == "meta" for b in blocks for p in b.parameters())
    assert streamed.model.embed_tokens.weight.device.type == "cpu"
    streamed.raypress_blocks.load(1)
    ref = get_adapter(full).blocks()[1]
    for (n, p), (_, q) in zip(blocks[1].named_parameters(), ref.named_parameters()):
        assert torch.equal(p, q), n
    streamed.raypress_blocks.release(1)
    assert all(p.device.type == "meta" for p in blocks[1].parameters())


@pytest.mark.parametrize("method", ["sparsegpt", "magnitude"])
def test_streamed_database_equals_the_whole_model_build(tiny_cfg, tmp_path, method):
    from raypress.compress import get_method
    from raypress.database import build_database

    spec = f"random:{tiny_cfg}"
    calib = np.random.default_rng(0).integers(0, 512, size=(8, 32))
    full, _ = load_model(spec)
    streamed, _ = load_model(spec, streamed=True)
    m = get_method(method, levels=[0.0, 0.5, 0.7])
    a = build_database(spec, full, get_adapter(full), m, calib, cache_root=tmp_path / "a", progress=False)
    b = build_database(spec, streamed, get_adapter(streamed), m, calib, cache_root=tmp_path / "b", progress=False)
    assert a.layers == b.layers
    for layer in a.layers:
        assert np.array_equal(a.stored(layer), b.stored(layer)), layer
    assert all(p.device.type == "meta" for blk in get_adapter(streamed).blocks() for p in blk.parameters())


def test_a_search_on_a_random_model_says_its_quality_is_meaningless(tiny_cfg, tmp_path, ray_session, wikitext_path):
    from mlflow.tracking import MlflowClient

    from raypress.config import load_config
    from raypress.runner import run_search

    cfg = load_config(None, [f"model=random:{tiny_cfg}", "method=magnitude", "target=0.5",
                             f"data.source=text:{wikitext_path}", "data.seq_len=32", "data.n_calib=16",
                             "data.n_eval=4", "searcher.generations=2", "searcher.offspring=3",
                             "searcher.stages=[[64, 1]]", f"database.cache_dir={tmp_path / 'db'}",
                             f"output={tmp_path / 'runs'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    r = run_search(cfg)
    assert r.summary().startswith(f"[{RANDOM_NOTE}]")
    (run,) = MlflowClient(r.tracking_uri).search_runs(["1"])
    assert run.data.tags["raypress.random_weights"] == RANDOM_NOTE
    best = json.loads((tmp_path / "runs").glob("*/result.json").__next__().read_text())
    assert best["note"] == RANDOM_NOTE


def test_a_streamed_checkpoint_builds_the_same_database(tmp_path):
    """database.stream=true on a real (safetensors) checkpoint: the driver reads one block at a time and
    the database is identical to the whole-model build."""
    from _tiny import tiny_llama

    from raypress.compress import get_method
    from raypress.config import load_config
    from raypress.database import build_database
    from raypress.families import get_family

    spec = tiny_llama()
    cfg = load_config(None, [f"model={spec}", "database.stream=true"])
    kw = get_family("sparsity").driver_model(cfg)
    assert kw == {"streamed": True}
    assert get_family("sparsity").driver_model(load_config(None, [f"model={spec}"])) == {}  # auto: small model
    calib = np.random.default_rng(1).integers(0, 512, size=(8, 32))
    full, _ = load_model(spec)
    streamed, _ = load_model(spec, **kw)
    m = get_method("sparsegpt", levels=[0.0, 0.5, 0.7])
    a = build_database(spec, full, get_adapter(full), m, calib, cache_root=tmp_path / "a", progress=False)
    b = build_database(spec, streamed, get_adapter(streamed), m, calib, cache_root=tmp_path / "b", progress=False)
    assert a.key == b.key
    for layer in a.layers:
        assert np.array_equal(a.stored(layer), b.stored(layer)), layer
