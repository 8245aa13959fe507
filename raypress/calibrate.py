"""Per-layer input statistics of the DENSE model, collected block by block.

For every linear layer with input X (all calibration tokens stacked, shape [N, in]):

* ``hessian``: H = 2/N · Xᵀ X, float32 [in, in] (the layer-wise OBS/SparseGPT/GPTQ Hessian);
* ``norms``:   ‖X_j‖₂ = sqrt(Σ_t x_tj²), float32 [in] (Wanda / OWL).

How: ``adapter.capture_block_inputs`` runs the embeddings only and returns the hidden states
entering block 0 (plus the kwargs block 0 receives); then blocks run one at a time over all
calibration batches with forward pre-hooks on that block's linears, and each block's dense output
becomes the next block's input. Only one block (and its statistics) is live at a time, so a model
bigger than the accelerator can be streamed (``device`` != the model's device moves one block at
a time there and back).

Linears that read the *same input tensor* in a forward (llama: q/k/v, gate/up) are detected by
tensor identity and share one accumulator: their dict entries are the same tensor object (saves
time and memory; callers must not modify returned tensors in place).

``iter_block_stats`` yields the statistics one block at a time (what the database builder uses to
keep memory at one block); ``collect_stats`` gathers everything; ``collect_hessians`` /
``collect_input_norms`` are the thin wrappers named in docs/INTERFACES.md.
"""
from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from .progress import steps

from .data import calib_hash
from .errors import RayPressError
from .weight_source import block_turn

log = logging.getLogger("raypress")

STATS = ("hessian", "norms")


def _to(obj, device):
    """Move tensors inside (nested tuples/lists/dicts of) obj to device."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def block_layers(adapter, layers: Sequence[str] | None = None) -> list[tuple[int, dict[str, torch.nn.Module]]]:
    """[(block_index, {full_linear_name: module})] in forward order, restricted to `layers`."""
    linears = adapter.linear_layers()
    if layers is not None:
        unknown = [l for l in layers if l not in linears]
        if unknown:
            raise RayPressError(f"unknown linear layer '{unknown[0]}'; valid names look like "
                                f"'{next(iter(linears))}'")
        wanted = set(layers)
    else:
        wanted = None
    out = []
    for i, _ in enumerate(adapter.blocks()):
        prefix = f"{adapter.block_prefix}.{i}."
        mods = {n: m for n, m in linears.items() if n.startswith(prefix) and (wanted is None or n in wanted)}
        if mods:
            out.append((i, mods))
    return out


def _batches(calib: np.ndarray, batch_size: int) -> list[torch.Tensor]:
    calib = np.asarray(calib)
    if calib.ndim != 2 or calib.shape[0] == 0:
        raise RayPressError(f"calibration tokens must be a non-empty [n_seq, seq_len] array, got shape "
                            f"{calib.shape}; build them with raypress.data.make_splits")
    bs = max(1, int(batch_size))
    return [torch.from_numpy(np.ascontiguousarray(calib[i:i + bs], dtype=np.int64))
            for i in range(0, calib.shape[0], bs)]


def _capture(adapter, batches: list[torch.Tensor], dev) -> list[tuple[torch.Tensor, dict]]:
    """Hidden states entering block 0 and the kwargs each block gets (a list per block), per batch.

    capture_block_inputs returns one kwargs dict for all batches it is given; masks / position
    tensors may carry the batch size, so batches of different sizes are captured separately."""
    out: list = [None] * len(batches)
    by_size: dict[int, list[int]] = {}
    for i, b in enumerate(batches):
        by_size.setdefault(b.shape[0], []).append(i)
    for idx in by_size.values():
        hs, kwargs = adapter.capture_block_inputs([batches[i].to(dev) for i in idx], per_block=True)
        for i, h in zip(idx, hs):
            out[i] = (h, kwargs)
    return out


class _Accumulator:
    """Forward pre-hooks on one block's linears; shares accumulators between same-input layers."""

    def __init__(self, mods: dict[str, torch.nn.Module], want: tuple[str, ...], device, share_inputs=True):
        self.mods = mods
        self.want = want
        self.device = device
        self.share = share_inputs
        self.leader: dict[str, str] = {}  # layer -> layer whose accumulator it uses (grouping of batch 0)
        self.H: dict[str, torch.Tensor] = {}
        self.sq: dict[str, torch.Tensor] = {}
        self.n: dict[str, int] = {}
        self._seen: list[tuple[torch.Tensor, str]] = []  # inputs of the current forward (strong refs)
        self._batch = 0
        self._handles = []

    def __enter__(self):
        for name, m in self.mods.items():
            self._handles.append(m.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._seen.clear()

    def next_batch(self):
        self._seen.clear()
        self._batch += 1

    def _hook(self, name):
        def hook(module, args):
            x = args[0]
            lead = name
            if self.share:
                for t, owner in self._seen:
                    if t is x:
                        lead = owner
                        break
                else:
                    self._seen.append((x, name))
            if self._batch == 0:
                self.leader[name] = lead
            elif self.leader.get(name) != lead:
                raise RuntimeError(f"calibration: input sharing of {name} changed between batches; "
                                   "call with share_inputs=False")
            if lead != name:
                return None
            x2 = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
            self.n[name] = self.n.get(name, 0) + x2.shape[0]
            if "hessian" in self.want:
                H = self.H.get(name)
                if H is None:
                    H = self.H[name] = torch.zeros(x2.shape[1], x2.shape[1], device=self.device)
                H.addmm_(x2.T, x2)
            elif "norms" in self.want:
                sq = self.sq.get(name)
                if sq is None:
                    sq = self.sq[name] = torch.zeros(x2.shape[1], dtype=torch.float64, device=self.device)
                sq.add_((x2 * x2).sum(0, dtype=torch.float64))
            return None

        return hook

    def result(self, out_device) -> dict[str, dict[str, torch.Tensor]]:
        res: dict[str, dict[str, torch.Tensor]] = {w: {} for w in self.want}
        done: dict[str, dict[str, torch.Tensor]] = {}
        for name in self.mods:
            lead = self.leader.get(name)
            if lead is None:
                raise RayPressError(f"calibration: layer {name} never ran in the forward pass; "
                                    "this architecture is not supported by its adapter")
            if lead not in done:
                d = {}
                n = self.n[lead]
                if "hessian" in self.want:
                    Hs = self.H.pop(lead)
                    if "norms" in self.want:
                        d["norms"] = torch.sqrt(torch.diagonal(Hs).clamp(min=0)).to(out_device)
                    Hs.mul_(2.0 / n)
                    d["hessian"] = Hs.to(out_device)
                else:
                    d["norms"] = torch.sqrt(self.sq.pop(lead)).float().to(out_device)
                done[lead] = d
            for w in self.want:
                res[w][name] = done[lead][w]
        return res


def iter_block_stats(model, adapter, calib: np.ndarray, want: Sequence[str] = ("hessian",), batch_size: int = 8,
                     device="cpu", layers: Sequence[str] | None = None, progress: bool = True,
                     out_device="cpu", share_inputs: bool = True,
                     ) -> Iterator[tuple[int, dict[str, dict[str, torch.Tensor]]]]:
    """Yield (block_index, {stat: {layer: tensor}}) for each block holding requested layers,
    in forward order, running the dense model one block at a time (a streamed model's blocks are
    materialized for their turn and freed after it: load_model(..., streamed=True))."""
    want = tuple(dict.fromkeys(want))
    bad = [w for w in want if w not in STATS]
    if bad or not want:
        raise RayPressError(f"unknown statistic {bad[0] if bad else '(none)'}; choose from {STATS}")
    plan = block_layers(adapter, layers)
    if not plan:
        return
    device = torch.device(device)
    mdev = _model_device(model)
    blocks = adapter.blocks()
    last = plan[-1][0]
    wanted = dict(plan)
    with torch.no_grad():
        states = _capture(adapter, _batches(calib, batch_size), mdev)
        hs = [h.to(device) for h, _ in states]
        kws = [_to(kw, device) for _, kw in states]
        del states
    bar = steps(last + 1, "calibration", "block", enabled=progress)
    try:
        for i in range(last + 1):
            with block_turn(model, i):  # streamed models: one block materialized at a time
                block = blocks[i]
                bdev = _model_device(block)
                acc = _Accumulator(wanted.get(i, {}), want, device, share_inputs)
                # (no_grad only around the compute: a generator must not leak grad mode to its caller)
                with torch.no_grad():
                    if bdev != device:
                        block.to(device)
                    try:
                        with acc:
                            for b, (h, kw) in enumerate(zip(hs, kws)):
                                out = block(h, **kw[i])  # per-block kwargs (gemma3: sliding vs full layers)
                                hs[b] = out[0] if isinstance(out, (tuple, list)) else out
                                acc.next_batch()
                    finally:
                        if bdev != device:
                            block.to(bdev)
                    result = acc.result(out_device) if i in wanted else None
                bar.update(1)
                if result is not None:
                    yield i, result  # the caller compresses block i now: it stays materialized until it resumes
    finally:
        bar.close()


def collect_stats(model, adapter, calib: np.ndarray, want: Sequence[str] = ("hessian", "norms"), batch_size: int = 8,
                  device="cpu", layers: Sequence[str] | None = None, progress: bool = True, out_device="cpu",
                  share_inputs: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """{stat: {layer: tensor}} for stat in `want` ("hessian", "norms"), all in one dense pass."""
    want = tuple(dict.fromkeys(want))
    res: dict[str, dict[str, torch.Tensor]] = {w: {} for w in want}
    for _, st in iter_block_stats(model, adapter, calib, want, batch_size, device, layers, progress,
                                  out_device, share_inputs):
        for w in want:
            res[w].update(st[w])
    return res


def collect_hessians(model, adapter, calib: np.ndarray, batch_size=8, device="cpu",
                     layers: list[str] | None = None, **kw) -> dict[str, torch.Tensor]:
    """H = 2/N Σ x xᵀ (float32 [in, in]) of every linear layer's input on the dense model."""
    return collect_stats(model, adapter, calib, ("hessian",), batch_size, device, layers, **kw)["hessian"]


def collect_input_norms(model, adapter, calib: np.ndarray, batch_size=8, device="cpu",
                        layers: list[str] | None = None, **kw) -> dict[str, torch.Tensor]:
    """‖X_j‖₂ per input column (float32 [in]) of every linear layer's input on the dense model."""
    return collect_stats(model, adapter, calib, ("norms",), batch_size, device, layers, **kw)["norms"]


def for_sparsity(space) -> bool:
    """OWL and the Hessian scheduler are for sparsity ladders (a target in [0, 1)): only then do the
    statistics depend on the target (each layer's OBS error at it)."""
    return 0.0 <= float(space.target) < 1.0


def release_gpu_cache(device) -> None:
    """Hand the memory this process's CUDA allocator keeps cached back to the GPU after a driver-side
    GPU phase (a database build, a statistics pass). The evaluators that start next on the same GPU
    would otherwise find it taken: on an 80 GB H100, OPT-66B@8's Hessian-scheduler pass left the
    evaluator too little to load (it ran out of memory while loading)."""
    if str(device).startswith("cuda") and torch.cuda.is_initialized():
        import gc

        gc.collect()
        torch.cuda.empty_cache()


def schedule_inputs(model, adapter, calib: np.ndarray, space, db=None, device="cpu",
                    progress: bool = True, layers: Sequence[str] | None = None) -> dict:
    """What the statistics-driven schedules need, in one streamed pass over the dense model: block by
    block, while the block's weights and its layers' Hessians exist, reduce them to a few numbers
    and drop them — OWL's outlier ratio of the block (`ratios`), each layer's OBS error at the target
    (`obs_errors`, the Hessian scheduler) and its error at every level of the database (`errors`,
    the DP). Memory: one block's Hessians on `device`, never the model's (OPT-66B's would be 350 GB).
    layers: the linear layers (default: the space's; a space of fused units passes their layers)."""
    from .search.schedules import LayerStats, block_of, block_outlier_ratio, level_errors, obs_error

    sparsity = for_sparsity(space)
    lin = adapter.linear_layers()
    ratios: dict[str, float] = {}
    obs: dict[str, float] = {}
    errors: dict[str, list[float]] = {}
    for _, st in iter_block_stats(model, adapter, calib, ("hessian", "norms"), device=device,
                                  layers=list(layers or space.layers), progress=progress, out_device=device):
        groups: dict[str, list] = {}
        for layer, H in st["hessian"].items():
            W = lin[layer].weight  # materialized for this block's turn (streamed models)
            if sparsity:
                obs[layer] = obs_error(W, H, float(space.target))
                groups.setdefault(block_of(layer), []).append(LayerStats(W, st["norms"][layer]))
            if db is not None:
                errors[layer] = level_errors(db, layer, W, H)
        for b, sts in groups.items():
            ratios[b] = block_outlier_ratio(sts)
        del st, groups
    H = W = None  # noqa: F841 - the last layer's, on the device: free before releasing the cache
    release_gpu_cache(device)
    out: dict = {"errors": errors} if db is not None else {}
    if sparsity:
        out.update(ratios=ratios, obs_errors=obs)
    return out


class StatsCache:
    """`schedule_inputs` computed once per (model, calibration tokens, database, and the target where
    they depend on it): a comparison hands one cache to every search it runs, and a pareto search
    warm-starting every budget from DP uses one, so their schedules calibrate once.

    The level errors (DP's input) read every variant of the database (607 GB for OPT-66B at 5 levels)
    and cost 3 matmuls per layer and level: they are computed only for a schedule that takes them
    (search.schedules.takes_level_errors) or when `schedules`, the names a comparison will ask for,
    include one (then the first pass computes them, and no second pass is needed).

    folder: where the answers are also kept on disk (the runner passes `stats_folder()`), one small
    JSON file per key: the pass costs ~21 s per OPT-66B block on an H100 (~22 min for the model), and a job that
    dies after it, or the next job on the same model and tokens, should not pay it again. The key
    holds the model's fingerprint (config + weight files), so changed weights miss."""

    def __init__(self, schedules: Sequence[str] = (), folder=None):
        self._key = None
        self._inputs: dict | None = None
        self.schedules = tuple(schedules)
        self.folder = folder

    def get(self, model_id: str, model, adapter, calib: np.ndarray, space, db=None, device="cpu",
            layers: Sequence[str] | None = None, schedule: str | None = None) -> dict:
        """{"ratios": {block: D_b}, "obs_errors": {layer: e}, "errors": {layer: [e_k]}} (see
        schedule_inputs; the first two only for sparsity targets, the last only with a database and
        when `schedule` (None: any) or one of the anticipated schedules takes them)."""
        from .search.schedules import takes_level_errors

        key = (model_id, calib_hash(calib), getattr(db, "key", None),
               float(space.target) if for_sparsity(space) else None, None if layers is None else tuple(layers))
        errors = db is not None and (schedule is None or any(map(takes_level_errors, (schedule, *self.schedules))))
        if key != self._key or (errors and "errors" not in self._inputs):
            path = self._path(key)
            kept = _read_stats(path)
            if kept is not None and (not errors or "errors" in kept):
                log.info("dense-model statistics: read from %s (no pass over the model)", path)
                self._key, self._inputs = key, kept
                return self._inputs
            self._key, self._inputs = key, schedule_inputs(model, adapter, calib, space, db if errors else None,
                                                           device, layers=layers)
            _write_stats(path, self._inputs)
        return self._inputs

    def _path(self, key):
        """The file for `key`, or None (no folder, or a model without a fingerprint: tests' in-memory models)."""
        if self.folder is None:
            return None
        import hashlib
        import json
        from pathlib import Path

        from .models import model_fingerprint
        try:
            fingerprint = model_fingerprint(key[0])
        except Exception:  # not a resolvable model spec: keep the answers in memory only
            return None
        digest = hashlib.sha256(json.dumps([fingerprint, *key[1:]]).encode()).hexdigest()[:32]
        return Path(self.folder) / f"{digest}.json"


def stats_folder():
    """``models.cache_dir() / "stats"``: the dense-model statistics StatsCache keeps on disk."""
    from .models import cache_dir

    return cache_dir() / "stats"


def _read_stats(path) -> dict | None:
    """The answers kept at `path`, or None (no file; an unreadable one is said and computed again)."""
    import json

    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["inputs"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("dense-model statistics at %s unreadable (%s): computing them again", path, e)
        return None


def _write_stats(path, inputs: dict) -> None:
    """Write atomically (a job killed mid-write leaves no half file); a full or read-only disk costs
    only the next job's pass, so it is said, not raised."""
    from .atomic import atomic_write

    if path is None:
        return
    plain = {name: {k: ([float(x) for x in v] if isinstance(v, (list, tuple)) else float(v)) for k, v in d.items()}
             for name, d in inputs.items()}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, {"inputs": plain}, default=None)
    except OSError as e:
        log.warning("dense-model statistics not kept at %s (%s): the next job computes them again", path, e)
