"""Packed quantization databases: uint8 codes + float16 scales/zeros on disk and in the object store,
dequantized on swap-in (raypress.database + compress.quant + compress.swap)."""
import numpy as np
import pytest
import torch

from raypress.compress import get_method
from raypress.compress.base import torch_threads
from raypress.compress.quant import GPTQ, RTN
from raypress.compress.swap import WeightSwapApplier
from raypress.database import build_database, database_key, open_database, packed_nbytes
from raypress.store import map_safetensors as _map_safetensors
from raypress.errors import RayPressError
from raypress.families import dense_levels

BITS = [2, 3, 4, 5, 6, 8]
GS = 32  # tiny llama: in = 64 or 128 columns -> 2 or 4 groups per row


def _gptq():
    return GPTQ(bits=BITS, group_size=GS)


@pytest.fixture(scope="module")
def tiny():
    from _tiny import load_tiny, tiny_llama

    from raypress.models import get_adapter

    model, _ = load_tiny("llama")
    calib = np.random.default_rng(0).integers(0, 500, size=(4, 32))
    return tiny_llama(), model, get_adapter(model), calib


@pytest.fixture(scope="module")
def built(tiny, tmp_path_factory):
    """(packed GPTQ db, the same levels as float16 stacks, {layer: (W, H) the build used}, root)."""
    spec, model, ad, calib = tiny
    root = tmp_path_factory.mktemp("qdb")
    m = _gptq()
    seen = []
    real = m.pack_levels

    def recording(W, H, values):
        seen.append((W.detach().clone(), H.detach().clone()))
        return real(W, H, values)

    m.pack_levels = recording  # instance attribute: the sequential build calls it once per layer
    db = build_database(spec, model, ad, m, calib, cache_root=root, fingerprint="tiny-llama", progress=False)
    dense = build_database(spec, model, ad, _gptq(), calib, cache_root=root, fingerprint="tiny-llama",
                           progress=False, pack=False)
    assert len(seen) == len(db.layers)
    inputs = dict(zip(db.layers, seen))
    linears = ad.linear_layers()
    for name, (W, _) in inputs.items():
        assert torch.equal(W, linears[name].weight.detach())
    return db, dense, inputs, root


def test_packed_layout_and_size(tiny, built):
    spec, model, ad, calib = tiny
    db, dense, _, root = built
    assert db.meta["storage"] == "packed" and db.storage == "packed" and db.meta["group_size"] == GS
    assert set(db.meta["layer_storage"].values()) == {"packed"}
    assert dense.meta["storage"] == "dense" and set(dense.meta["layer_storage"].values()) == {"dense"}
    assert db.key != dense.key  # storage format is part of the content hash
    assert db.key == database_key("tiny-llama", calib, _gptq().params(), "float16",
                                  str(next(model.parameters()).dtype), storage_format="packed")
    assert dense.key == database_key("tiny-llama", calib, _gptq().params(), "float16",
                                     str(next(model.parameters()).dtype))
    # safetensors: <layer>::codes uint8 [L, out, in], ::scales / ::zeros float16 [L, out, G]
    for b in db.meta["blocks"]:
        maps = _map_safetensors(db.path / b["file"])
        assert sorted(maps) == sorted(f"{n}::{p}" for n in b["layers"] for p in ("codes", "scales", "zeros"))
        for n in b["layers"]:
            out, cols = db.shapes[n]
            assert maps[f"{n}::codes"].shape == (len(BITS), out, cols) and maps[f"{n}::codes"].dtype == np.uint8
            for p in ("scales", "zeros"):
                assert maps[f"{n}::{p}"].shape == (len(BITS), out, cols // GS)
                assert maps[f"{n}::{p}"].dtype == np.float16
    # sizes: total_bytes is what is on disk, about half of the float16 stacks of the same levels
    assert db.total_bytes == sum(f.stat().st_size for f in db.path.glob("*.safetensors"))
    assert dense.total_bytes == sum(f.stat().st_size for f in dense.path.glob("*.safetensors"))
    raw_packed = sum(packed_nbytes(len(BITS), db.shapes[n], GS) for n in db.layers)
    raw_dense = sum(len(BITS) * db.n_params[n] * 2 for n in db.layers)
    assert db.meta["unpacked_bytes"] == raw_dense and dense.meta["unpacked_bytes"] == raw_dense
    assert raw_packed < db.total_bytes < raw_packed + 8192  # + safetensors headers
    assert 0.5 < db.total_bytes / dense.total_bytes < 0.6, (db.total_bytes, dense.total_bytes)
    st = db.stats()
    assert st["storage"] == "packed" and st["total_bytes"] == db.total_bytes
    assert st["unpacked_bytes"] == raw_dense


def test_variants_equal_build_exactly(built):
    db, dense, inputs, _ = built
    m = _gptq()
    # the database compresses with one torch thread (build_block): GPTQ's matmuls round differently
    # with another thread count, so the reference build() runs with one thread too
    with torch_threads(1):
        _check_variants(db, dense, inputs, m)
    with pytest.raises(RayPressError):
        db.variant(db.layers[0], len(BITS))


def _check_variants(db, dense, inputs, m):
    for name, (W, H) in inputs.items():
        stored = db.stored(name)
        assert set(stored) == {"codes", "scales", "zeros", "group_size"} and stored["group_size"] == GS
        assert all(not stored[p].flags.writeable for p in ("codes", "scales", "zeros"))
        packs = m.pack_levels(W, H, BITS)  # fresh, unrecorded
        for p in ("codes", "scales", "zeros"):
            assert np.array_equal(stored[p], packs[p])
        stack = db.array(name)
        assert stack.dtype == np.float32 and stack.shape == (len(BITS), *W.shape) and not stack.flags.writeable
        for k, bits in enumerate(BITS):
            want = m.build(W, H, bits)
            got = db.variant(name, k)
            assert got.dtype == np.float32 and not got.flags.writeable
            assert torch.equal(torch.from_numpy(np.array(got)), want), (name, bits)
            assert np.array_equal(stack[k], got)
            assert np.array_equal(m.decode_stored(stored, k), got)
            # the float16 stack holds the same variant, rounded to float16
            assert np.array_equal(dense.variant(name, k), want.half().numpy())
            zf = float((want == 0).float().mean())
            assert db.actual_sparsity(name, k) == pytest.approx(zf, abs=1e-12)
        assert int(stored["codes"][0].max()) <= 3  # level 0 = 2 bits


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.as_tensor(ids)).logits


def test_swap_from_object_store_matches_variant_weights(tiny, built, ray_session):
    ray = ray_session
    spec, _, _, calib = tiny
    db, _, _, _ = built
    from raypress.models import get_adapter, load_model

    refs = db.put()
    assert list(refs) == db.layers
    # one object per layer: a dict of read-only arrays living in the object store (not copies)
    a, b = ray.get(refs[db.layers[0]]), ray.get(refs[db.layers[0]])
    assert isinstance(a, dict) and a["group_size"] == GS
    for p in ("codes", "scales", "zeros"):
        arr = a[p]
        assert isinstance(arr, np.ndarray) and not arr.flags.writeable and not arr.flags.owndata
        assert arr.base is not None and np.shares_memory(arr, b[p])  # both gets map the same buffer
        assert np.array_equal(arr, db.stored(db.layers[0])[p])

    cfg = {n: i % len(BITS) for i, n in enumerate(db.layers)}
    ids = np.random.default_rng(3).integers(0, 500, size=(2, 24))

    # reference: a fresh model whose weights are set from db.variant
    ref_model, _ = load_model(spec)
    lin = get_adapter(ref_model).linear_layers()
    with torch.no_grad():
        for n, k in cfg.items():
            lin[n].weight.copy_(torch.from_numpy(np.array(db.variant(n, k))))
    want = _logits(ref_model, ids)

    m = _gptq()
    applier = WeightSwapApplier(refs, dense_levels(db), decode=m.decode_stored)
    assert dense_levels(db) == {}

    @ray.remote
    def evaluate(applier, spec, cfg, ids):  # an evaluator process: pickled applier, object-store refs
        from raypress.models import get_adapter, load_model

        model, _ = load_model(spec)
        ad = get_adapter(model)
        applier.attach(model, ad)
        dense0 = model(torch.as_tensor(ids)).logits.detach()
        changed = applier.apply(cfg)
        with torch.no_grad():
            out = model(torch.as_tensor(ids)).logits
        again = applier.apply(cfg)
        applier.apply({})
        with torch.no_grad():
            back = model(torch.as_tensor(ids)).logits
        stored = applier._stored(next(iter(cfg)))
        return out, changed, again, torch.equal(back, dense0), stored["codes"].flags.writeable

    out, changed, again, restored, writeable = ray.get(evaluate.remote(applier, spec, cfg, ids))
    assert changed == len(cfg) and again == 0 and restored and not writeable
    assert torch.equal(out, want)

    # in-process too, also without an explicit decoder (generic packed dequantization)
    for dec in (m.decode_stored, None):
        model, _ = load_model(spec)
        ap = WeightSwapApplier(refs, {}, decode=dec)
        ap.attach(model, get_adapter(model))
        ap.apply(cfg)
        assert torch.equal(_logits(model, ids), want)


def test_cache_hit(tiny, built, monkeypatch):
    spec, model, ad, calib = tiny
    db, _, _, root = built
    import raypress.database as dbmod

    calls = []
    real = dbmod.build_block
    monkeypatch.setattr(dbmod, "build_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    again = build_database(spec, model, ad, _gptq(), calib, cache_root=root, fingerprint="tiny-llama",
                           progress=False)
    assert not calls and again.key == db.key and again.path == db.path
    assert again.storage == "packed" and again.total_bytes == db.total_bytes
    opened = open_database(db.path)
    name = db.layers[-1]
    for k in range(len(BITS)):
        assert np.array_equal(opened.variant(name, k), db.variant(name, k))
    # the export path reads db.variant: dense float32 weights
    assert opened.variant(name, 2).shape == tuple(db.shapes[name])


def test_rtn_packed_and_dense_fallback(tiny, tmp_path):
    spec, model, ad, calib = tiny
    linears = ad.linear_layers()
    rtn = RTN(bits=[3, 4], group_size=64)
    db = build_database(spec, model, ad, rtn, calib, cache_root=tmp_path, fingerprint="tiny-llama", progress=False)
    assert db.storage == "packed"
    for n in db.layers[:4]:
        W = linears[n].weight.detach()
        assert np.array_equal(db.variant(n, 1), rtn.build(W, None, 4).numpy())
    # group size 2: 1 + 4/2 bytes per weight > float16's 2 -> every layer falls back to float16 stacks
    tiny_groups = RTN(bits=[4], group_size=2)
    fb = build_database(spec, model, ad, tiny_groups, calib, cache_root=tmp_path, fingerprint="tiny-llama",
                        progress=False)
    assert fb.storage == "dense" and set(fb.layer_storage.values()) == {"dense"}
    n = fb.layers[0]
    assert fb.variant(n, 0).dtype == np.float16
    assert np.array_equal(fb.variant(n, 0), tiny_groups.build(linears[n].weight.detach(), None, 4).half().numpy())
    with pytest.raises(RayPressError, match="pack=False"):
        build_database(spec, model, ad, get_method("magnitude"), calib, cache_root=tmp_path,
                       fingerprint="tiny-llama", progress=False, pack=True)


def test_dp_statistics_are_computed_once_for_every_bits_target(tiny, built, monkeypatch):
    """A pareto search warm-started from DP (and a comparison over targets) asks the StatsCache at
    every budget: for a bits ladder the statistics do not depend on the target, so the calibration
    pass runs once; for a sparsity target (the OBS error at it) it runs per target."""
    import raypress.calibrate as cal
    from raypress.space import SearchSpace

    spec, model, ad, calib = tiny
    db = built[0]
    calls = []
    real = cal.schedule_inputs
    monkeypatch.setattr(cal, "schedule_inputs", lambda *a, **k: calls.append(a[3].target) or real(*a, **k))
    cache = cal.StatsCache()
    first = None
    for target in (3.0, 4.0, 5.0):
        got = cache.get(spec, model, ad, calib, SearchSpace.for_database(db, target), db)
        assert first is None or got is first
        first = got
    assert calls == [3.0]
    for target in (0.5, 0.6):  # sparsity: per target
        cache.get(spec, model, ad, calib, SearchSpace.from_values([0.0, 0.5, 0.7], target, layers=db.layers,
                                                                 n_params=[1] * len(db.layers)), None)
    assert calls == [3.0, 0.5, 0.6]


@pytest.fixture
def passes(tiny, built, monkeypatch):
    """(the 4-bit space of the built database, a list that gets one entry per statistics pass: whether
    it computed DP's level errors)."""
    import raypress.calibrate as cal
    from raypress.space import SearchSpace

    seen = []
    real = cal.schedule_inputs
    monkeypatch.setattr(cal, "schedule_inputs", lambda *a, **k: seen.append(a[4] is not None) or real(*a, **k))
    return SearchSpace.for_database(built[0], 4.0), seen


def test_level_errors_only_for_schedules_that_take_them(tiny, built, passes):
    """DP's level errors read every variant of the database: a cache asked for OWL or the Hessian
    scheduler skips them; asked for DP next it runs a pass with them; a cache told the comparison's
    schedules up front computes them in its first pass and answers DP from it."""
    import raypress.calibrate as cal

    spec, model, ad, calib = tiny
    db = built[0]
    space, passes = passes
    cache = cal.StatsCache()
    assert "errors" not in cache.get(spec, model, ad, calib, space, db, schedule="owl")
    assert "errors" in cache.get(spec, model, ad, calib, space, db, schedule="dp")
    assert cache.get(spec, model, ad, calib, space, db, schedule="owl") is cache.get(spec, model, ad, calib, space, db)
    assert passes == [False, True]
    ahead = cal.StatsCache(schedules=["evopress", "owl", "dp"])
    first = ahead.get(spec, model, ad, calib, space, db, schedule="owl")
    assert "errors" in first and ahead.get(spec, model, ad, calib, space, db, schedule="dp") is first
    assert passes == [False, True, True]


def test_statistics_are_kept_on_disk_for_the_next_job(tiny, built, passes, monkeypatch, tmp_path, caplog):
    """The statistics pass costs ~22 min on OPT-66B (one H100): a cache with a folder writes its answers there,
    and a new cache (the next job, or the same job run again after a crash) reads them instead of
    passing over the model; a file without DP's level errors is computed again when DP asks; a
    damaged file is said and computed again; other weights (another fingerprint) miss."""
    import raypress.calibrate as cal
    import raypress.models as models

    spec, model, ad, calib = tiny
    db = built[0]
    space, passes = passes
    first = cal.StatsCache(folder=tmp_path).get(spec, model, ad, calib, space, db, schedule="owl")
    assert passes == [False] and len(list(tmp_path.glob("*.json"))) == 1
    again = cal.StatsCache(folder=tmp_path).get(spec, model, ad, calib, space, db, schedule="owl")
    assert passes == [False] and again.keys() == first.keys()
    with_dp = cal.StatsCache(folder=tmp_path).get(spec, model, ad, calib, space, db, schedule="dp")
    assert passes == [False, True] and "errors" in with_dp
    read = cal.StatsCache(folder=tmp_path).get(spec, model, ad, calib, space, db, schedule="dp")
    assert passes == [False, True]
    assert read["errors"] == {k: [float(x) for x in v] for k, v in with_dp["errors"].items()}  # JSON round-trips floats
    (path,) = tmp_path.glob("*.json")
    path.write_text("{not json")
    cal.StatsCache(folder=tmp_path).get(spec, model, ad, calib, space, db, schedule="owl")
    assert passes == [False, True, False] and "unreadable" in caplog.text
    real_fp = models.model_fingerprint
    monkeypatch.setattr(models, "model_fingerprint", lambda s: real_fp(s) + "|retrained")
    cal.StatsCache(folder=tmp_path).get(spec, model, ad, calib, space, db, schedule="owl")
    assert passes == [False, True, False, False] and len(list(tmp_path.glob("*.json"))) == 2
