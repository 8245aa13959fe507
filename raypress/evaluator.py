"""The evaluator: holds the base model once, applies configs, scores them.

One `Evaluator` per GPU (or one per CPU host). It is used three ways: inside the Ray Tune
trainable (`EvaluatorTrainable`, reused across trials), as a plain Ray actor
(`ray.remote(Evaluator)`, raw pool for benchmarks), and in-process for final evaluations.
"""
from __future__ import annotations

import functools
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import torch
from ray import tune

from . import data as rp_data
from .errors import RESULT_KEY, RayPressError
from .fitness import Teacher, kl_from_teacher, make_teacher, nll_sum

META_KEYS = ("_rp_tokens", "_rp_generation", "_rp_stage", "_rp_seed")


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
            self._teachers.clear()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            topk = self.spec.kl_topk
            raise RayPressError(
                f"out of memory on {self.device} evaluating batches of {self.spec.batch_size} sequences"
                f"{'' if topk is None else f' (kl_topk {topk})'}; lower evaluator.batch_size"
                f"{' or set evaluator.kl_topk=64 (keeps only the top-k teacher logits)' if topk is None else ''}"
                ", or use a larger GPU"
            ) from None

    return wrapper


def split_config(config: dict) -> tuple[dict[str, int], dict]:
    """Tune trial config -> ({layer: level}, {meta})."""
    levels = {k: int(v) for k, v in config.items() if not k.startswith("_rp_")}
    meta = {k: config[k] for k in META_KEYS if k in config}
    return levels, meta


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
    teacher_cache: int = 4
    extra: dict = field(default_factory=dict)


def _get(x):
    if isinstance(x, np.ndarray):
        return x
    import ray

    return ray.get(x)


class Evaluator:
    def __init__(self, spec: EvaluatorSpec, model=None):
        from .models import get_adapter, load_model

        self.spec = spec
        self.device = resolve_device(spec.device)
        self.dtype = resolve_dtype(spec.dtype, self.device)
        if model is None:
            model, _ = load_model(spec.model, dtype=self.dtype, device=self.device)
        self.model = model.eval()
        self.adapter = get_adapter(self.model)
        self.applier = spec.applier
        self.applier.attach(self.model, self.adapter)
        self.calib = _get(spec.calib)
        self.eval_tokens = _get(spec.eval)
        self._teachers: OrderedDict = OrderedDict()
        self.stats = {"evaluations": 0, "tokens": 0, "changed_units": 0, "seconds": 0.0, "teacher_forwards": 0}

    # -- internals -------------------------------------------------------------------------
    def _forward(self, ids: np.ndarray):
        """Yield (batch_ids, logits) in micro-batches."""
        bs = self.spec.batch_size
        t = torch.from_numpy(np.array(ids, dtype=np.int64))  # own copy: ids may be object-store memory
        for i in range(0, t.shape[0], bs):
            batch = t[i : i + bs].to(self.device)
            yield batch, self.model(batch, use_cache=False).logits

    def _teacher(self, key, ids: np.ndarray) -> list[Teacher]:
        if key in self._teachers:
            self._teachers.move_to_end(key)
            return self._teachers[key]
        self.applier.reset()
        teachers = [make_teacher(logits, self.spec.kl_topk) for _, logits in self._forward(ids)]
        self.stats["teacher_forwards"] += 1
        self._teachers[key] = teachers
        while len(self._teachers) > self.spec.teacher_cache:
            self._teachers.popitem(last=False)
        return teachers

    # -- API -------------------------------------------------------------------------------
    @_oom_guard
    @torch.no_grad()
    def score(self, levels: dict[str, int], n_tokens: int, seed: int = 0, generation: int = 0, stage: int = 0) -> dict:
        """KL(dense ‖ config) on the (seed, generation, stage) calibration batch."""
        t0 = time.perf_counter()
        ids = rp_data.sample_batch(self.calib, n_tokens, seed, generation, stage)
        teachers = self._teacher((n_tokens, seed, generation, stage), ids)
        changed = self.applier.apply(levels)
        total, count = 0.0, 0
        for (batch, logits), teacher in zip(self._forward(ids), teachers):
            n = batch.shape[0] * (batch.shape[1] - 1)
            total += kl_from_teacher(teacher, logits) * n
            count += n
        dt = time.perf_counter() - t0
        self.stats["evaluations"] += 1
        self.stats["tokens"] += int(ids.size)
        self.stats["changed_units"] += changed
        self.stats["seconds"] += dt
        return {"fitness": total / count, "tokens": int(ids.size), "changed": changed, "seconds": dt}

    def score_config(self, config: dict) -> dict:
        """Score a Tune trial config (layers + _rp_* meta keys)."""
        levels, meta = split_config(config)
        return self.score(
            levels,
            int(meta.get("_rp_tokens", 2048)),
            int(meta.get("_rp_seed", 0)),
            int(meta.get("_rp_generation", 0)),
            int(meta.get("_rp_stage", 0)),
        )

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
        teachers = self._teacher("heldout", self.eval_tokens)
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


class EvaluatorTrainable(tune.Trainable):
    """A Tune trial = one candidate evaluation on a reused, model-holding actor."""

    # A user error (RayPressError: out of GPU memory, bad device, ...) is reported as a result
    # carrying RESULT_KEY instead of raised: Tune would retry an exception (max_failures) although
    # it fails the same way every time; the runner's stopper ends the search and raises it.
    # Crashes (a killed actor, a segfault) still raise and are retried.

    def setup(self, config, spec: EvaluatorSpec = None):
        self._cfg = config
        self._error = None
        try:
            self.evaluator = Evaluator(spec)
        except RayPressError as e:
            self._error = str(e)

    def reset_config(self, new_config):
        self._cfg = new_config
        return True

    def step(self):
        if self._error is None:
            try:
                result = self.evaluator.score_config(self._cfg)
            except RayPressError as e:
                self._error = str(e)
        if self._error is not None:
            return {"fitness": float("nan"), "tokens": 0, RESULT_KEY: self._error, "done": True}
        result["done"] = True
        return result

    # a trial is one stateless evaluation: a retried trial re-runs it, nothing to checkpoint
    def save_checkpoint(self, checkpoint_dir):
        return {}

    def load_checkpoint(self, checkpoint):
        return None


def make_trainable(spec: EvaluatorSpec, resources: dict):
    """Tune trainable with the spec in the object store and per-trial resources."""
    return tune.with_resources(tune.with_parameters(EvaluatorTrainable, spec=spec), resources)
