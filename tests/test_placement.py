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


# ----------------------------------------------------------------------------- holds
GiB = 2**30


def test_auto_hold_takes_the_gpu_then_pinned_host_then_the_shared_copy():
    from raypress.placement import decide_hold

    kw = dict(gpu_total=100 * GiB, host_free=400 * GiB, evaluators_on_node=4)
    assert decide_hold("auto", 50 * GiB, gpu_free=70 * GiB, **kw)[0] == "gpu"
    # 70 free - 15 reserve = 55 to spare: 60 does not fit; 400/2/4 = 50 per evaluator: 60 does not pin either
    assert decide_hold("auto", 60 * GiB, gpu_free=70 * GiB, **kw)[0] == "shared"
    assert decide_hold("auto", 45 * GiB, gpu_free=50 * GiB, **kw)[0] == "host"
    # streamed evaluators keep blocks on the host: variants never go to the GPU
    assert decide_hold("auto", 1 * GiB, gpu_free=70 * GiB, streamed=True, **kw)[0] == "host"
    # no GPU: nothing to pin for; object_store / disk settings read the shared copy
    assert decide_hold("auto", 1 * GiB, gpu_free=None, gpu_total=None, host_free=400 * GiB)[0] == "shared"
    assert decide_hold("disk", 1 * GiB, gpu_free=70 * GiB, **kw)[0] == "shared"


def test_an_explicit_hold_that_does_not_fit_is_an_error_naming_the_alternatives():
    from raypress.errors import RayPressError
    from raypress.placement import decide_hold

    with pytest.raises(RayPressError, match=r"placement=gpu needs 60.0 GiB .* has 55.0 GiB to spare; use "
                                            r"database.placement=host, disk or auto"):
        decide_hold("gpu", 60 * GiB, gpu_free=70 * GiB, gpu_total=100 * GiB, host_free=GiB)
    with pytest.raises(RayPressError, match="this evaluator has no GPU"):
        decide_hold("gpu", 1, gpu_free=None, gpu_total=None, host_free=GiB)
    with pytest.raises(RayPressError, match="placement=host pins 2.0 GiB per evaluator"):
        decide_hold("host", 2 * GiB, gpu_free=None, gpu_total=None, host_free=2 * GiB)


def test_a_held_database_scores_exactly_like_the_shared_copy(db, ray_session):
    """hold=host (on CPU: private copies in the model's dtype) gives the same fitness as reading the
    object store on every swap, and the shared arrays are never aliased by the held copies."""
    from raypress.evaluator import Evaluator, EvaluatorSpec
    from raypress.space import SearchSpace

    spec, database = db
    refs, _ = serve(database, "object_store")
    calib = np.random.default_rng(1).integers(0, 512, size=(8, 32))
    space = SearchSpace.for_database(database, 0.5)
    configs = [space.uniform(), {layer: i % 3 for i, layer in enumerate(database.layers)}]
    fits = {}
    for where in ("object_store", "host"):
        ev = Evaluator(EvaluatorSpec(model=spec, applier=WeightSwapApplier(refs, dense_levels(database)), calib=calib,
                                     eval=calib, device="cpu", db_placement=where))
        assert ev.stats["hold"] == ("shared" if where == "object_store" else "host")
        fits[where] = [ev.score(c, 64)["fitness"] for c in configs]
        if where == "host":
            held = ev.applier._held
            n_dense = len(dense_levels(database))
            assert len(held) == sum(database.n_levels(l) for l in database.layers) - n_dense
            layer = database.layers[0]
            w = ev.applier.variant(layer, 2)
            assert w is held[(layer, 2)] and w.dtype == torch.float32 and w.data_ptr() != \
                ray_session.get(refs[layer]).ctypes.data
    assert fits["host"] == fits["object_store"]
    assert fits["host"][0] > 0
