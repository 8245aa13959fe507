"""database.placement: evaluators read the level database from the object store or from its own
memory-mapped files on disk, with the same weights and the same search result."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from _tiny import tiny_llama
from raypress.compress import get_method
from raypress.compress.swap import WeightSwapApplier
from raypress.database import build_database
from raypress.families import dense_levels
from raypress.models import get_adapter, load_model
from raypress.placement import OnDisk, choose, serve


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    spec = tiny_llama()
    model, _ = load_model(spec)
    calib = np.random.default_rng(0).integers(0, 512, size=(8, 32))
    return spec, build_database(spec, model, get_adapter(model), get_method("sparsegpt", levels=[0.0, 0.5, 0.7]),
                                calib, cache_root=tmp_path_factory.mktemp("db"), progress=False)


def test_disk_and_object_store_serve_the_same_weights(db, ray_session):
    spec, database = db
    refs_disk, where = serve(database, "disk")
    assert where == "disk" and all(isinstance(r, OnDisk) for r in refs_disk.values())
    refs_store, where = serve(database, "object_store")
    assert where == "object_store"
    layer = database.layers[3]
    got = []
    for refs in (refs_disk, refs_store):
        model, _ = load_model(spec)
        ap = WeightSwapApplier(refs, dense_levels(database))
        ap.attach(model, get_adapter(model))
        ap.apply({layer: 2})
        got.append(get_adapter(model).linear_layers()[layer].weight.detach().clone())
    assert torch.equal(got[0], got[1])
    assert torch.equal(got[0], torch.from_numpy(np.asarray(database.variant(layer, 2))).to(got[0].dtype))


def test_auto_picks_the_object_store_when_it_fits(db, ray_session):
    _, database = db
    assert choose(database, "auto") == "object_store"  # a tiny database, half of any object store


def test_a_search_on_disk_placement_equals_the_object_store_one(tmp_path, ray_session, wikitext_path):
    from raypress.config import load_config
    from raypress.runner import run_search

    results = []
    for where in ("object_store", "disk"):
        cfg = load_config(None, [f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64",
                                 "data.n_calib=16", "data.n_eval=4", "searcher.generations=2", "searcher.offspring=3",
                                 "searcher.stages=[[128, 1]]", "target=0.5", f"database.placement={where}",
                                 f"database.cache_dir={tmp_path / 'db'}", f"output={tmp_path / where}",
                                 f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])
        results.append(run_search(cfg))
    assert results[0].best_config == results[1].best_config and results[0].ppl_best == results[1].ppl_best
