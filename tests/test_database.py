"""Level database (raypress.database): build, cache, integrity, atomicity, object store."""
import json
import time

import numpy as np
import pytest

from raypress.compress import get_method
from raypress.database import build_database, open_database
from raypress.errors import RayPressError


@pytest.fixture(scope="module")
def tiny():
    from _tiny import load_tiny, tiny_llama

    from raypress.models import get_adapter

    model, _ = load_tiny("llama")
    calib = np.random.default_rng(0).integers(0, 500, size=(4, 32))
    return tiny_llama(), model, get_adapter(model), calib


@pytest.fixture
def built(tiny, tmp_path):
    spec, model, ad, calib = tiny
    db = build_database(spec, model, ad, get_method("sparsegpt"), calib, cache_root=tmp_path, progress=False)
    return db, tmp_path


def _db_dirs(root):
    return sorted(p.name for p in root.iterdir())


def test_build_contents(tiny, built):
    spec, model, ad, calib = tiny
    db, root = built
    linears = ad.linear_layers()
    assert db.layers == list(linears)
    assert db.path == root / db.key and _db_dirs(root) == [db.key]
    assert db.meta["storage_dtype"] == "float16" and db.meta["value_kind"] == "sparsity"
    assert db.meta["method"] == get_method("sparsegpt").params()
    assert db.meta["total_bytes"] == sum(f.stat().st_size for f in db.path.glob("*.safetensors"))
    assert len(db.meta["files"]) == ad.num_blocks()
    for name, mod in linears.items():
        W = mod.weight.detach()
        assert db.n_params[name] == W.numel()
        assert db.level_values[name] == [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
        v0 = db.variant(name, 0)
        assert v0.shape == tuple(W.shape) and v0.dtype == np.float16 and not v0.flags.writeable
        assert np.array_equal(v0, W.half().numpy())  # level 0 = the dense weight
        with pytest.raises(ValueError):
            v0[0, 0] = 1.0  # read-only view
        for k, v in enumerate(db.level_values[name]):
            assert abs(db.actual_sparsity(name, k) - v) <= 0.01
            assert abs(float((db.variant(name, k) == 0).mean()) - db.actual_sparsity(name, k)) < 1e-9
    # stored variants are SparseGPT's output on the dense model's Hessians
    from raypress.calibrate import collect_hessians

    name = "model.layers.1.mlp.down_proj"
    H = collect_hessians(model, ad, calib, layers=[name], progress=False)[name]
    want = get_method("sparsegpt").build(linears[name].weight.detach(), H, 0.6).half().numpy()
    got = db.variant(name, 6)
    assert np.array_equal(got == 0, want == 0)
    assert np.allclose(got.astype(np.float32), want.astype(np.float32), atol=2e-3)
    st = db.stats()
    assert st["layers"] == len(linears) and [l["value"] for l in st["levels"]] == db.level_values[name]
    with pytest.raises(RayPressError):
        db.variant(name, 10)
    with pytest.raises(RayPressError):
        db.variant("model.layers.7.mlp.down_proj", 0)


def test_cache_hit_and_keys(tiny, built, monkeypatch):
    spec, model, ad, calib = tiny
    db, root = built
    mtime = (db.path / "meta.json").stat().st_mtime_ns
    import raypress.database as dbmod

    calls = []
    real = dbmod.build_block
    monkeypatch.setattr(dbmod, "build_block", lambda *a, **k: calls.append(1) or real(*a, **k))
    t = time.perf_counter()
    again = build_database(spec, model, ad, get_method("sparsegpt"), calib, cache_root=root, progress=False)
    assert time.perf_counter() - t < 2.0
    assert again.key == db.key and again.path == db.path and not calls
    assert (db.path / "meta.json").stat().st_mtime_ns == mtime
    assert open_database(db.path).key == db.key
    # anything the variants depend on changes the key
    other = build_database(spec, model, ad, get_method("sparsegpt", percdamp=0.05), calib, cache_root=root,
                           progress=False)
    assert other.key != db.key and calls
    dt32 = build_database(spec, model, ad, get_method("sparsegpt"), calib, cache_root=root, progress=False,
                          storage_dtype="float32")
    assert dt32.key not in (db.key, other.key) and dt32.variant(db.layers[0], 3).dtype == np.float32
    data2 = build_database(spec, model, ad, get_method("magnitude"), calib[:, :16], cache_root=root,
                           progress=False)
    assert data2.key not in (db.key, other.key, dt32.key)
    assert data2.meta["data_hash"] != db.meta["data_hash"]
    assert sorted(_db_dirs(root)) == sorted([db.key, other.key, dt32.key, data2.key])


def test_corrupt_and_missing_files(built):
    db, root = built
    f = db.path / db.meta["blocks"][1]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RayPressError, match="raypress build-db"):
        open_database(db.path)
    f.unlink()
    with pytest.raises(RayPressError, match="delete the folder"):
        open_database(db.path)
    (db.path / "meta.json").write_text("{not json")
    with pytest.raises(RayPressError, match="raypress build-db"):
        open_database(db.path)
    with pytest.raises(RayPressError, match="build-db"):
        open_database(root / "nothing-here")


def test_a_database_is_hashed_once_per_process_until_a_file_changes(built, tmp_path, monkeypatch):
    """A comparison opens its database once per searcher: the files are hashed the first time only,
    and a file changed since is hashed (and caught) again."""
    import shutil

    from raypress import store

    db, _ = built
    copy = tmp_path / "db"
    shutil.copytree(db.path, copy)
    hashed, real = [], store.sha256_file
    monkeypatch.setattr(store, "sha256_file", lambda f, *a: hashed.append(f.name) or real(f, *a))
    n = len(db.meta["files"])
    open_database(copy)
    open_database(copy)
    assert len(hashed) == n
    f = copy / db.meta["blocks"][1]["file"]
    data = bytearray(f.read_bytes())
    data[-3] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(RayPressError, match="sha256 mismatch"):
        open_database(copy)
    assert hashed[n:] == [f.name]


def test_interrupted_build_leaves_nothing(tiny, tmp_path, monkeypatch):
    spec, model, ad, calib = tiny
    method = get_method("sparsegpt")
    real = method.build_levels
    seen = []

    def flaky(*a, **k):
        seen.append(1)
        if len(seen) == 9:  # midway: block 1 already in progress, block 0's file written
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(method, "build_levels", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_database(spec, model, ad, method, calib, cache_root=tmp_path, progress=False)
    assert _db_dirs(tmp_path) == []  # neither the database folder nor its temp folder
    monkeypatch.setattr(method, "build_levels", real)
    db = build_database(spec, model, ad, method, calib, cache_root=tmp_path, progress=False)
    assert _db_dirs(tmp_path) == [db.key]


def test_stale_temp_dir_of_dead_build_is_removed(tiny, tmp_path):
    spec, model, ad, calib = tiny
    import raypress.database as dbmod
    from raypress.models import model_fingerprint

    key = dbmod.database_key(model_fingerprint(spec), calib, get_method("magnitude").params(), "float16",
                             str(next(model.parameters()).dtype))
    stale = tmp_path / f".tmp-{key[:16]}-999999999-deadbeef"
    stale.mkdir()
    (stale / "block_000.safetensors").write_bytes(b"half")
    db = build_database(spec, model, ad, get_method("magnitude"), calib, cache_root=tmp_path, progress=False)
    assert db.key == key and _db_dirs(tmp_path) == [key]


def test_default_cache_root(tiny, tmp_path, monkeypatch):
    spec, model, ad, calib = tiny
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path / "cache"))
    db = build_database(spec, model, ad, get_method("magnitude"), calib, progress=False)
    assert db.path.parent == tmp_path / "cache" / "db"


def test_put_zero_copy_read_only(built, ray_session):
    ray = ray_session
    db, _ = built
    refs = db.put()
    assert list(refs) == db.layers
    for name in db.layers[:3] + db.layers[-2:]:
        arr = ray.get(refs[name])
        assert isinstance(arr, np.ndarray) and not arr.flags.writeable
        assert arr.shape == (10, *db.variant(name, 0).shape)
        for k in (0, 5, 9):
            assert np.array_equal(arr[k], db.variant(name, k))

    @ray.remote
    def zeros_in_task(a, k):
        return float((a[k] == 0).mean()), a.flags.writeable

    name = db.layers[-1]
    frac, writeable = ray.get(zeros_in_task.remote(refs[name], 7))
    assert not writeable and frac == pytest.approx(db.actual_sparsity(name, 7))


def test_parallel_build_equals_sequential(tiny, built, tmp_path_factory, ray_session):
    spec, model, ad, calib = tiny
    db, _ = built
    par = build_database(spec, model, ad, get_method("sparsegpt"), calib, cache_root=tmp_path_factory.mktemp("par"),
                         progress=False, parallel=2)
    assert par.key == db.key and par.meta["files"].keys() == db.meta["files"].keys()
    for name in db.layers:
        a, b = par.array(name).astype(np.float32), db.array(name).astype(np.float32)
        assert np.array_equal(a == 0, b == 0) and np.allclose(a, b, atol=1e-3)


def test_wanda_and_magnitude_databases(tiny, tmp_path):
    spec, model, ad, calib = tiny
    for name in ("wanda", "magnitude"):
        db = build_database(spec, model, ad, get_method(name, levels=[0.0, 0.25, 0.5]), calib, cache_root=tmp_path,
                            progress=False)
        assert db.meta["method_name"] == name and json.loads(json.dumps(db.meta))["level_values_list"] == [0.0, 0.25, 0.5]
        for layer in db.layers:
            assert [round(db.actual_sparsity(layer, k), 2) for k in range(3)] == [0.0, 0.25, 0.5]
    with pytest.raises(RayPressError):
        build_database(spec, model, ad, get_method("magnitude"), calib, cache_root=tmp_path, storage_dtype="int4")


def test_block_files_are_standard_safetensors(built):
    """Block files are streamed layer by layer (store.TensorWriter); the safetensors library reads them."""
    from safetensors import safe_open

    db, _ = built
    for b in db.meta["blocks"]:
        with safe_open(str(db.path / b["file"]), "np") as f:
            assert set(f.keys()) == set(b["layers"])
            for layer in b["layers"]:
                assert np.array_equal(f.get_tensor(layer), db.stored(layer))
