"""The evaluator: holds the base model once, applies configs, scores them.

One `Evaluator` per GPU (or one per CPU host). It is used three ways: as an actor of a search's
pool (`PoolMember`, raypress.pool: Tune's trials borrow it), as a plain Ray actor
(`ray.remote(Evaluator)`, raw pool for benchmarks), and in-process for final evaluations.

Modes (`EvaluatorSpec.mode`, config `evaluator.mode`):
  * ``resident``   the whole model on the evaluator's device (one GPU);
  * ``streamed``   blocks stay in (pinned) host memory and go through the GPU one at a time: the
                   whole calibration batch is forwarded through block i before block i+1 is
                   copied in (the copy of the next block overlaps the current block's compute);
                   embeddings, final norm and LM head stay on the GPU. Candidate weights are
                   swapped on the host copies. For models bigger than one GPU.
  * ``device_map`` one model spread over the evaluator's k GPUs (``from_pretrained(device_map=
                   "auto", max_memory=...)``; the actor asks Ray for num_gpus=k).
The teacher (dense logits, full or top-k) is cached per page of `batch_size` calibration rows: the
stages draw rows from one pool, so after the first generations every batch's teacher is a lookup, not
a dense forward (EvoPress recomputes it each generation). Pages live on the device, or in pinned host
memory (``teacher_memory="pinned"``), up to ``teacher_cache_bytes`` (least recently used go first).
"""
from __future__ import annotations

import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch

from . import data as rp_data
from . import trial
from .errors import RayPressError
from .fitness import Teacher, kl_from_teacher, make_teacher, nll_sum, teacher_rows
MODES = ("resident", "streamed", "device_map")
# where a candidate's time goes (Evaluator.stats; exact only with EvaluatorSpec.profile, which
# synchronizes the GPU at each boundary): swapping variants in, the dense teacher (a forward for the
# pages not cached yet, a gather otherwise), the candidate's forward pass, and the KL against the teacher
PHASES = ("swap_s", "teacher_s", "forward_s", "kl_s")
TEACHER_MEMORY = ("device", "pinned")


def resolve_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RayPressError(
            f"device '{device}' requested but no CUDA GPU is visible; use evaluator.device=cpu "
            "or run on a GPU node"
        )
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise RayPressError(f"unknown dtype '{dtype}'; use auto, float32, bfloat16 or float16") from None


_OOM = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)


def _oom_guard(fn):
    """Out of (GPU) memory -> RayPressError naming the knobs that shrink the working set."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        try:
            return fn(self, *args, **kwargs)
        except _OOM:
            pass  # answered below, outside the except block: its traceback still holds the batch's tensors
        from .calibrate import release_gpu_cache

        self._drop_teachers()
        release_gpu_cache(self.device)  # what the failed batch took, for the held-out evaluation that may follow
        topk = self.spec.kl_topk
        raise RayPressError(
            f"out of memory on {self.device} evaluating batches of {self.spec.batch_size} sequences"
            f"{'' if topk is None else f' (kl_topk {topk})'}; lower evaluator.batch_size"
            f"{' or set evaluator.kl_topk=64 (keeps only the top-k teacher logits)' if topk is None else ''}"
            f"{'' if self.spec.teacher_cache_gb == 0 else ', lower evaluator.teacher_cache_gb (cached teacher rows)'}"
            ", or use a larger GPU")

    return wrapper


@dataclass
class EvaluatorSpec:
    """Everything an evaluator needs; picklable (object refs, no tensors)."""

    model: str
    applier: object  # compress.base.Applier
    calib: object  # ObjectRef or ndarray [n, seq_len]
    eval: object  # ObjectRef or ndarray [m, seq_len]
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    kl_topk: int | None = None
    teacher_cache_gb: float | None = None  # cached teacher pages (None: auto, see _teacher_budget)
    extra: dict = field(default_factory=dict)
    mode: str = "resident"  # resident | streamed | device_map (see module docstring)
    teacher_memory: str = "device"  # device | pinned (host)
    max_memory: dict | None = None  # device_map: {gpu index: "70GiB"}; default: what each GPU has free
    variant_cache: float = 0.5  # GPU: share of free memory for device copies of swapped-in variants
    db_placement: str = "auto"  # database.placement: where the variants are held (placement.decide_hold)
    max_gpu_memory: float | None = None  # GiB this evaluator may allocate on its GPU (None: all of it)
    profile: bool = False  # synchronize the GPU between phases so stats split time exactly (benchmarks)


def _get(x):
    if isinstance(x, np.ndarray):
        return x
    import ray

    return ray.get(x)


TEACHER_CACHE_MAX = 16 * 2**30  # auto budget's ceiling: more pages than a search draws rows for is waste


def teacher_cache_budget(teacher_cache_gb: float | None, gpu_free: int | None = None,
                         host_total: int | None = None) -> int:
    """Bytes of teacher pages an evaluator keeps: evaluator.teacher_cache_gb when set, else a quarter
    of the free GPU memory (device teachers) or 15% of host RAM (pinned / CPU), at most 16 GiB (the
    ceiling itself when neither is known, as in `raypress plan` without a GPU size)."""
    if teacher_cache_gb is not None:
        return int(teacher_cache_gb * 2**30)
    if gpu_free is not None:
        return min(gpu_free // 4, TEACHER_CACHE_MAX)
    return min(host_total * 15 // 100, TEACHER_CACHE_MAX) if host_total is not None else TEACHER_CACHE_MAX


class Evaluator:
    def __init__(self, spec: EvaluatorSpec, model=None):
        from .models import get_adapter, load_model

        self.spec = spec
        self.mode = spec.mode
        if self.mode not in MODES:
            raise RayPressError(f"unknown evaluator.mode '{self.mode}'; use {', '.join(MODES)}")
        if spec.teacher_memory not in TEACHER_MEMORY:
            raise RayPressError(f"unknown evaluator.teacher_memory '{spec.teacher_memory}'; use device or pinned")
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        self._limit_gpu_memory()
        if self.mode == "device_map":
            if model is None:
                model = self._load_device_map(load_model)
            self.device = str(model.get_input_embeddings().weight.device)
        elif model is None:
            model, _ = load_model(spec.model, dtype=self.dtype, device="cpu" if self.mode == "streamed" else self.device,
                                  tokenizer=False)
        self.model = model.eval()
        self.adapter = get_adapter(self.model)
        self._copy_stream = None
        if self.mode == "streamed":
            self._setup_streaming()
        self.applier = spec.applier
        self.applier.attach(self.model, self.adapter)
        self.hold = self._hold_variants()
        self.teacher_cache_bytes = self._teacher_budget()
        copy = getattr(self.applier, "shared_copy", None)
        self.db_copy = copy() if copy else None
        if getattr(self.applier, "cache_bytes", None) is not None and self.device.startswith("cuda") \
                and self.mode != "streamed" and self.hold != "gpu":
            # reuse device copies of variants: a swap is then a pointer change, not a host->device copy
            free = self._gpu_free() - (self.teacher_cache_bytes if spec.teacher_memory == "device" else 0)
            self.applier.cache_bytes = int(max(free, 0) * spec.variant_cache)
        self.calib = _get(spec.calib)
        self.eval_tokens = _get(spec.eval)
        self._pages: OrderedDict = OrderedDict()  # (split, page) -> Teacher of batch_size rows
        self._page_bytes = 0
        self._gathered = None  # (split, rows) -> the last batch's teachers, gathered from pages
        self.stats = {"evaluations": 0, "tokens": 0, "changed_units": 0, "seconds": 0.0, "teacher_forwards": 0,
                      "teacher_pages": 0,
                      "hold": self.hold, **{k: 0.0 for k in PHASES}}

    # -- memory ------------------------------------------------------------------------------
    def _limit_gpu_memory(self):
        """evaluator.max_gpu_memory: cap this process's allocations (a model bigger than the cap must stream)."""
        self._gpu_limit = None
        if self.spec.max_gpu_memory is None or not self.device.startswith("cuda"):
            return
        # "cuda" names no index, which set_per_process_memory_fraction refuses: the current device
        index = torch.device(self.device).index
        index = torch.cuda.current_device() if index is None else index
        total = torch.cuda.get_device_properties(index).total_memory
        self._gpu_limit = int(float(self.spec.max_gpu_memory) * 2**30)
        torch.cuda.set_per_process_memory_fraction(min(1.0, self._gpu_limit / total), index)

    def _gpu_free(self) -> int:
        free = torch.cuda.mem_get_info(self.device)[0]
        if self._gpu_limit is not None:
            free = min(free, self._gpu_limit - torch.cuda.memory_reserved(self.device))
        return max(int(free), 0)

    def _hold_variants(self) -> str:
        """Where the applier keeps the level variants (placement.decide_hold, from what this node has)."""
        if not hasattr(self.applier, "hold"):
            return "none"  # depth / width appliers have no per-weight variants
        import logging

        import psutil

        from .placement import decide_hold

        cuda = self.device.startswith("cuda")
        total = (self._gpu_limit or torch.cuda.get_device_properties(self.device).total_memory) if cuda else None
        where, why = decide_hold(self.spec.db_placement, self.applier.variant_bytes(torch.finfo(self.dtype).bits // 8),
                                 gpu_free=self._gpu_free() if cuda else None, gpu_total=total,
                                 host_free=psutil.virtual_memory().available,
                                 evaluators_on_node=_evaluators_on_node(), streamed=self.mode == "streamed")
        t0 = time.perf_counter()
        self.applier.hold(where, self.device)
        logging.getLogger("raypress").info("evaluator on %s holds the level variants: %s (%s; %.1f s)",
                                           self.device, where, why, time.perf_counter() - t0)
        return where

    def _tick(self) -> float:
        if self.spec.profile and self.device.startswith("cuda"):
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    # -- loading / streaming set-up ----------------------------------------------------------
    def _load_device_map(self, load_model):
        if not self.device.startswith("cuda"):
            raise RayPressError("evaluator.mode=device_map spreads the model over GPUs but none is visible; "
                                "use mode=resident (or streamed) on CPU machines")
        n = torch.cuda.device_count()
        max_memory = self.spec.max_memory or {
            i: f"{int(torch.cuda.mem_get_info(i)[0] * 0.85 / 2**20)}MiB" for i in range(n)}
        max_memory = {int(k) if str(k).isdigit() else k: v for k, v in max_memory.items()}
        try:
            import accelerate  # noqa: F401
        except ImportError:
            raise RayPressError("evaluator.mode=device_map needs accelerate: pip install accelerate") from None
        model, _ = load_model(self.spec.model, dtype=self.dtype, device=None, tokenizer=False,
                              device_map="auto", max_memory=max_memory)
        placed = set(getattr(model, "hf_device_map", {}).values())
        if placed & {"cpu", "disk"}:
            raise RayPressError(f"the model does not fit the evaluator's {n} GPU(s) ({sorted(map(str, placed))}); "
                                "raise evaluator.gpus_per_evaluator or use evaluator.mode=streamed")
        return model

    def _setup_streaming(self):
        """Blocks in (pinned) host memory; everything else (embeddings, norm, head) on the device."""
        from torch import nn

        parent_name, attr = self.adapter.block_prefix.rsplit(".", 1)
        parent = self.model.get_submodule(parent_name)
        blocks = getattr(parent, attr)
        blocks.to("cpu")
        setattr(parent, attr, nn.ModuleList())  # move all but the blocks
        try:
            self.model.to(self.device)
        finally:
            setattr(parent, attr, blocks)
        cuda = self.device.startswith("cuda")
        # every tensor of a block, as (owner module, kind, name): swapped to a device copy while
        # that block runs, then pointed back at the host tensor (nothing is copied back)
        self._block_tensors = []
        for block in blocks:
            items = []
            for mod in block.modules():
                for name, prm in mod.named_parameters(recurse=False):
                    if cuda:
                        prm.data = prm.data.pin_memory()
                    items.append((mod, "param", name))
                for name, buf in mod.named_buffers(recurse=False):
                    if buf is not None:
                        if cuda:
                            mod._buffers[name] = buf.pin_memory()
                        items.append((mod, "buffer", name))
            self._block_tensors.append(items)
        if cuda:
            self._copy_stream = torch.cuda.Stream(device=self.device)

    @staticmethod
    def _get(mod, kind, name):
        return mod._parameters[name].data if kind == "param" else mod._buffers[name]

    @staticmethod
    def _set(mod, kind, name, t):
        if kind == "param":
            mod._parameters[name].data = t
        else:
            mod._buffers[name] = t

    def _fetch(self, i: int):
        """Start copying block i's current tensors (dense or swapped-in variants) to the device."""
        if self._copy_stream is None:
            return None
        with torch.cuda.stream(self._copy_stream):
            gpu = [self._get(*it).to(self.device, non_blocking=True) for it in self._block_tensors[i]]
            event = torch.cuda.Event()
            event.record(self._copy_stream)
        return gpu, event

    def _stream_hidden(self, batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Last block's output for every micro-batch, the model streamed through the device block by
        block (each block's weights cross the bus once per call, not once per micro-batch)."""
        groups: dict[tuple, list[int]] = {}
        for j, b in enumerate(batches):
            groups.setdefault(tuple(b.shape), []).append(j)
        hs: list = [None] * len(batches)
        kws: list = [None] * len(batches)
        for idx in groups.values():  # kwargs (masks, rotary embeddings) depend on the batch shape
            h, per_block = self.adapter.capture_block_inputs([batches[j] for j in idx], per_block=True)
            for j, hj in zip(idx, h):
                hs[j], kws[j] = hj, per_block
        blocks = self.adapter.blocks()
        nxt = self._fetch(0)
        for i, block in enumerate(blocks):
            cur, nxt = nxt, (self._fetch(i + 1) if i + 1 < len(blocks) else None)
            host = None
            if cur is not None:
                gpu, event = cur
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(event)
                host = [self._get(*it) for it in self._block_tensors[i]]
                for it, t in zip(self._block_tensors[i], gpu):
                    t.record_stream(compute)
                    self._set(*it, t)
            try:
                hs = [self.adapter.run_block(block, h, kw[i]) for h, kw in zip(hs, kws)]
            finally:
                if host is not None:
                    for it, t in zip(self._block_tensors[i], host):
                        self._set(*it, t)
        return hs

    # -- internals -------------------------------------------------------------------------
    def _forward(self, ids: np.ndarray):
        """Yield (batch_ids, logits) in micro-batches."""
        bs = self.spec.batch_size
        t = torch.from_numpy(np.array(ids, dtype=np.int64))  # own copy: ids may be object-store memory
        if self.mode == "streamed":
            batches = [t[i : i + bs].to(self.device) for i in range(0, t.shape[0], bs)]
            hs = self._stream_hidden(batches)
            for j, batch in enumerate(batches):
                h, hs[j] = hs[j], None
                yield batch, self.adapter.final_logits(h)
            return
        for i in range(0, t.shape[0], bs):
            batch = t[i : i + bs].to(self.device)
            yield batch, self.model(batch, use_cache=False).logits

    def _keep(self, teacher: Teacher) -> Teacher:
        """Teacher tensors where spec.teacher_memory says: on the device, or in pinned host memory."""
        if self.spec.teacher_memory != "pinned" or not self.device.startswith("cuda"):
            return teacher
        for k in ("logp", "topk_logp", "topk_idx", "rest_mass"):
            v = getattr(teacher, k)
            if v is not None:
                setattr(teacher, k, v.cpu().pin_memory())
        return teacher

    def _teacher_budget(self) -> int:
        """Bytes of teacher pages to keep (teacher_cache_budget), from the GPU memory left once the
        model and its variants are placed, or host RAM for pinned or CPU teachers."""
        on_gpu = self.device.startswith("cuda") and self.spec.teacher_memory == "device"
        if on_gpu and self.spec.teacher_cache_gb is None:
            return teacher_cache_budget(None, gpu_free=self._gpu_free())
        import psutil

        return teacher_cache_budget(self.spec.teacher_cache_gb, host_total=psutil.virtual_memory().total)

    def _drop_teachers(self):
        self._pages.clear()
        self._page_bytes = 0
        self._gathered = None

    def _teachers(self, split: str, tokens: np.ndarray, rows: np.ndarray) -> list[Teacher]:
        """The teacher of each forward micro-batch of tokens[rows]. Pages (batch_size consecutive rows of
        the split) are computed whole, so a row's teacher does not depend on which batch asked first."""
        key = (split, tuple(int(r) for r in rows))
        if self._gathered is not None and self._gathered[0] == key:  # every candidate of a stage: same rows
            return self._gathered[1]
        bs, seq = self.spec.batch_size, tokens.shape[1]
        need = sorted({int(r) // bs for r in rows})
        have = {}
        for p in need:
            if (split, p) in self._pages:
                self._pages.move_to_end((split, p))
                have[p] = self._pages[(split, p)]
        missing = [p for p in need if p not in have]
        if missing:  # one forward pass over the missing pages (one stream of the model in streamed mode)
            self.applier.reset()
            # only the split's last page can be short, and it sorts last: micro-batches stay pages
            ids = np.concatenate([tokens[p * bs:(p + 1) * bs] for p in missing])
            for p, (_, logits) in zip(missing, self._forward(ids)):
                have[p] = self._pages[(split, p)] = self._keep(make_teacher(logits, self.spec.kl_topk))
                self._page_bytes += have[p].nbytes
            self.stats["teacher_forwards"] += 1
            self.stats["teacher_pages"] += len(missing)
            while self._page_bytes > self.teacher_cache_bytes and self._pages:  # this call keeps its own in `have`
                self._page_bytes -= self._pages.popitem(last=False)[1].nbytes
        n = seq - 1  # next-token rows per sequence
        teachers = [teacher_rows([(have[int(r) // bs], int(r) % bs * n, (int(r) % bs + 1) * n) for r in rows[i:i + bs]])
                    for i in range(0, len(rows), bs)]
        self._gathered = (key, teachers)
        return teachers

    # -- API -------------------------------------------------------------------------------
    @_oom_guard
    @torch.no_grad()
    def score(self, levels: dict[str, int], n_tokens: int, seed: int = 0, generation: int = 0, stage: int = 0) -> dict:
        """KL(dense ‖ config) on the (seed, generation, stage) calibration batch."""
        st = self.stats
        t0 = self._tick()
        rows = rp_data.sample_rows(self.calib, n_tokens, seed, generation, stage)
        ids = np.ascontiguousarray(self.calib[rows], dtype=np.int64)
        teachers = self._teachers("calib", self.calib, rows)
        t1 = self._tick()
        changed = self.applier.apply(levels)
        t = self._tick()
        st["teacher_s"] += t1 - t0
        st["swap_s"] += t - t1
        total, count = 0.0, 0
        for (batch, logits), teacher in zip(self._forward(ids), teachers):
            tf = self._tick()
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += kl_from_teacher(teacher, logits) * n
            count += n
            tk = self._tick()
            st["forward_s"] += tf - t
            st["kl_s"] += tk - tf
            t = tk
        dt = time.perf_counter() - t0
        self.stats["evaluations"] += 1
        self.stats["tokens"] += int(ids.size)
        self.stats["changed_units"] += changed
        self.stats["seconds"] += dt
        return {"fitness": total / count, "tokens": int(ids.size), "changed": changed, "seconds": dt}

    def score_config(self, config: dict) -> dict:
        """Score a Tune trial config (raypress.trial: layers + meta keys); a batch config (trial.BATCH:
        several candidates) is scored candidate by candidate into one result."""
        if trial.BATCH in config:
            results = [self.score_config(c) for c in config[trial.BATCH]]
            return {"fitness": min(r["fitness"] for r in results), "tokens": sum(r["tokens"] for r in results),
                    "changed": sum(r["changed"] for r in results), "seconds": sum(r["seconds"] for r in results),
                    "candidates": len(results),
                    trial.BATCH: [{"fitness": r["fitness"], "tokens": r["tokens"]} for r in results]}
        levels, meta = trial.split(config)
        return self.score(levels, int(meta[trial.TOKENS]), int(meta.get(trial.SEED, 0)),
                          int(meta.get(trial.GENERATION, 0)), int(meta.get(trial.STAGE, 0)))

    @_oom_guard
    @torch.no_grad()
    def perplexity(self, levels: dict[str, int], split: str = "eval") -> float:
        """Perplexity of the config on the held-out split (or 'calib')."""
        ids = self.eval_tokens if split == "eval" else self.calib
        self.applier.apply(levels)
        total, count = 0.0, 0
        for batch, logits in self._forward(ids):
            s, n = nll_sum(logits, batch)
            total, count = total + s, count + n
        return float(np.exp(total / count))

    @_oom_guard
    @torch.no_grad()
    def heldout(self, levels: dict[str, int]) -> tuple[float, float]:
        """(perplexity, KL from dense) of the config on the held-out split."""
        teachers = self._teachers("eval", self.eval_tokens, np.arange(len(self.eval_tokens)))
        self.applier.apply(levels)
        nll, kl, count = 0.0, 0.0, 0
        for (batch, logits), teacher in zip(self._forward(self.eval_tokens), teachers):
            s, n = nll_sum(logits, batch)
            nll, count = nll + s, count + n
            kl += kl_from_teacher(teacher, logits) * n
        return float(np.exp(nll / count)), kl / count

    def get_stats(self) -> dict:
        return dict(self.stats)

    def ping(self) -> str:
        return self.device

    def memory(self) -> dict:
        """Bytes held: model parameters by device, teacher cache, peak CUDA allocation."""
        by_dev: dict[str, int] = {}
        for prm in self.model.parameters():
            d = str(prm.device)
            by_dev[d] = by_dev.get(d, 0) + prm.numel() * prm.element_size()
        teach = self._page_bytes
        import resource

        peak = torch.cuda.max_memory_allocated(self.device) if self.device.startswith("cuda") else 0
        held = sum(t.numel() * t.element_size() for t in getattr(self.applier, "_held", {}).values())
        return {"params": by_dev, "teacher": teach, "cuda_peak": int(peak), "hold": self.hold, "held_bytes": held,
                "host_rss_peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _evaluators_on_node() -> int:
    """GPUs of this Ray node (an evaluator per GPU), 1 outside Ray or on CPU nodes."""
    try:
        import ray

        if not ray.is_initialized():
            return 1
        me = ray.get_runtime_context().get_node_id()
        node = next((n for n in ray.nodes() if n.get("NodeID") == me), {})
        return max(1, int(node.get("Resources", {}).get("GPU", 1)))
    except Exception:  # noqa: BLE001 - a count for a memory estimate, never a reason to fail
        return 1


def _node_id() -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


def _load_oom_message(spec: EvaluatorSpec) -> str:
    """The one line for an evaluator that ran out of GPU memory while loading, with what the GPU had."""
    from .calibrate import release_gpu_cache

    device = resolve_device(spec.device)
    release_gpu_cache(device)
    free, total = torch.cuda.mem_get_info(device)
    return (f"out of GPU memory on {device} while an evaluator loaded the model and its level variants "
            f"({free / 2**30:.1f} of {total / 2**30:.1f} GiB free now, after giving back what it had taken: "
            "see nvidia-smi for other processes on this GPU); free the GPU, keep the variants in host "
            "memory (database.placement=host), or stream the model (evaluator.mode=streamed)")


class PoolMember(Evaluator):
    """An evaluator actor of a search's pool (raypress.pool). It is created empty and loads with
    `load(spec)`, which reports a user error (out of memory, bad device) as its answer instead of
    raising it: raised from __init__, Ray would restart the actor into the same error. (Created empty
    also because Ray warns about every restartable actor whose constructor arguments live in the object
    store, and a spec holds object refs: the pool's dispatcher calls `load` again after a restart.)"""

    def __init__(self):
        self.error = "not loaded"

    def load(self, spec: EvaluatorSpec) -> str | None:
        if self.error is None:  # loaded already (the dispatcher's call reached a live evaluator)
            return None
        self.error = "not loaded"  # stays so if loading fails unexpectedly (that exception is raised)
        try:
            super().__init__(spec)
            self.error = None
        except RayPressError as e:
            self.error = str(e)
        except _OOM:
            self.error = _load_oom_message(spec)
        return self.error

    def score_trial(self, config: dict) -> dict:
        """score_config's result, plus where it was scored; a user error as a result (trial.RESULT_KEY)."""
        t0 = time.time()
        try:
            result = self.score_config(config)
        except RayPressError as e:
            return trial.user_error_result(e)
        result[trial.SPAN] = (t0, time.time())
        result[trial.NODE] = _node_id()  # which Ray node scored it (multi-node runs, tests)
        result[trial.DB_COPY] = self.db_copy  # one copy per node, shared by its evaluators
        return result
