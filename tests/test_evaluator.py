"""The evaluator: dense fitness ~0, only changed layers swapped, object-store arrays never written."""
import numpy as np
import pytest

from _tiny import tiny_llama
from raypress.compress import get_method
from raypress.compress.swap import WeightSwapApplier
from raypress.data import load_tokens, make_splits
from raypress.database import build_database
from raypress.evaluator import Evaluator, EvaluatorSpec
from raypress.families import dense_levels
from raypress.models import get_adapter, load_model
from raypress.space import SearchSpace


@pytest.fixture(scope="module")
def setup(tmp_path_factory, ray_session, wikitext_path):
    folder = tiny_llama()
    model, tok = load_model(folder)
    adapter = get_adapter(model)
    splits = make_splits(load_tokens(f"text:{wikitext_path}", tok, 60_000), 64, 24, 8, 0)
    db = build_database(folder, model, adapter, get_method("sparsegpt"), splits.calib,
                        cache_root=tmp_path_factory.mktemp("db"), progress=False)
    refs = db.put()
    spec = EvaluatorSpec(model=folder, applier=WeightSwapApplier(refs, dense_levels(db)),
                         calib=ray_session.put(splits.calib), eval=ray_session.put(splits.eval))
    return db, spec, SearchSpace.for_database(db, 0.5)


def test_dense_config_fitness_is_zero_and_uniform_is_not(setup):
    db, spec, space = setup
    ev = Evaluator(spec)
    dense = {l: db.level_values[l].index(0.0) for l in db.layers}
    assert abs(ev.score(dense, 256)["fitness"]) < 1e-6
    assert abs(ev.score({}, 256)["fitness"]) < 1e-6
    assert ev.score(space.uniform(), 256)["fitness"] > 1e-5


def test_only_changed_layers_are_swapped(setup):
    db, spec, space = setup
    ev = Evaluator(spec)
    u = space.uniform()
    assert ev.score(u, 128)["changed"] == len(db.layers)
    assert ev.score(u, 128)["changed"] == 0
    child = space.mutate(u, np.random.default_rng(0), n_switches=1)
    n_diff = sum(child[l] != u[l] for l in u)
    assert ev.score(child, 128)["changed"] == n_diff >= 2


def test_shared_arrays_stay_read_only_and_unchanged(setup, ray_session):
    db, spec, space = setup
    ev = Evaluator(spec)
    layer = db.layers[0]
    arr = ray_session.get(spec.applier.refs[layer])
    before = arr.copy()
    assert not arr.flags.writeable
    ev.score(space.uniform(), 128)
    ev.score({}, 128)
    np.testing.assert_array_equal(arr, before)


def test_same_tokens_same_fitness_and_fresh_tokens_per_stage(setup):
    db, spec, space = setup
    ev = Evaluator(spec)
    u = space.uniform()
    a = ev.score(u, 128, seed=0, generation=1, stage=0)["fitness"]
    b = ev.score(u, 128, seed=0, generation=1, stage=0)["fitness"]
    c = ev.score(u, 128, seed=0, generation=2, stage=0)["fitness"]
    assert a == b and a != c


def test_variant_cache_reuses_copies_within_its_bound(setup):
    """GPU evaluators keep device copies of variants (cache_bytes); here on CPU the fp16 database
    -> fp32 model conversion makes copies too, so the same logic runs."""
    import torch

    db, spec, space = setup
    u = space.uniform()
    ids = torch.as_tensor(np.random.default_rng(0).integers(0, 500, size=(2, 32)))

    def weights_and_logits(cache_bytes):
        model, _ = load_model(spec.model, tokenizer=False)
        lin = get_adapter(model).linear_layers()
        ap = WeightSwapApplier(spec.applier.refs, dense_levels(db))
        ap.attach(model, get_adapter(model))
        ap.cache_bytes = cache_bytes
        ap.apply(u)
        first = {n: lin[n].weight.data_ptr() for n in u}
        ap.apply({})
        ap.apply(u)
        with torch.no_grad():
            out = model(ids).logits
        return ap, first, {n: lin[n].weight.data_ptr() for n in u}, out

    ap0, _, _, plain = weights_and_logits(0)
    assert not ap0._cache  # no cache: a fresh copy on every swap-in
    ap, a, b, cached = weights_and_logits(1 << 40)
    swapped = [n for n in u if dense_levels(db)[n] != u[n]]
    assert a == b and len(ap._cache) == len(swapped) > 0  # the second swap-in reused the first copies
    assert all(ap._modules[n].weight.data_ptr() == ap._cache[(n, u[n])].data_ptr() for n in swapped)
    assert torch.equal(plain, cached)
    one = max(t.numel() * t.element_size() for t in ap._cache.values())
    ap2, _, _, _ = weights_and_logits(2 * one)
    assert 0 < ap2._cached_bytes <= 2 * one and len(ap2._cache) <= 2  # least recently used evicted


def test_teacher_pages_are_computed_once_and_match_a_per_batch_teacher(setup):
    """Stages draw rows from one pool: the teacher of a row is computed once (a page of batch_size rows)
    and later batches only gather it; the KL equals one computed against that batch's own dense forward."""
    import dataclasses

    import torch

    from raypress import data as rp_data
    from raypress.fitness import kl_from_teacher, make_teacher

    db, spec, space = setup
    spec = dataclasses.replace(spec, batch_size=4)
    ev = Evaluator(spec)
    u = space.uniform()
    n_pages = -(-len(ev.calib) // 4)
    fits = [ev.score(u, 256, seed=0, generation=g)["fitness"] for g in range(12)]  # 4 rows of 64 per batch
    assert 0 < ev.stats["teacher_pages"] <= n_pages  # 12 batches of 4 random rows: each page once
    assert ev.stats["teacher_pages"] < 12 * 2
    # the same batch scored against its own dense forward (the per-batch teacher of before)
    rows = rp_data.sample_rows(ev.calib, 256, 0, 11, 0)
    ids = torch.as_tensor(ev.calib[rows])
    with torch.no_grad():
        ev.applier.reset()
        teacher = make_teacher(ev.model(ids).logits)
        ev.applier.apply(u)
        direct = kl_from_teacher(teacher, ev.model(ids).logits)
    assert abs(direct - fits[-1]) < 1e-5 * max(1.0, direct)
    # no cache: every batch computes its pages again, and scores the same
    ev0 = Evaluator(dataclasses.replace(spec, teacher_cache_gb=0))
    again = [ev0.score(u, 256, seed=0, generation=g)["fitness"] for g in range(12)]
    assert ev0.stats["teacher_pages"] >= 12 and ev0.memory()["teacher"] == 0
    np.testing.assert_allclose(again, fits, rtol=1e-6)
