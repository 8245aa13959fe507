"""Search configuration: YAML in search_spaces/, validated against a schema, CLI overrides.

The schema is the dataclasses below: unknown keys and wrong types are one-line errors that
name the valid keys, so a typo never silently falls back to a default. Which families, methods
and searchers exist, and which family-specific keys a family reads, is declared by the registries
(raypress/families, raypress/search/registry.py), never listed here.
"""
from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .errors import RayPressError
from .families import get_family
from .search.registry import ONE_SHOT, SEARCHERS, get_searcher

DTYPES = ("auto", "float32", "bfloat16", "float16")


@dataclass
class DataConfig:
    source: str = "default"  # data.describe_source: WikiText-2 beside the checkout, else the Brown corpus
    seq_len: int = 256
    n_calib: int = 64  # sequences for the database and the search (stages sample from these)
    n_eval: int = 16  # held-out sequences for final perplexities
    max_tokens: int | None = None
    seed: int = 0


@dataclass
class SearcherConfig:
    name: str = "evopress"
    generations: int = 20
    offspring: int = 16
    stages: list = field(default_factory=lambda: [[512, 4], [2048, 1]])  # [tokens, survivors]
    max_mutations: int = 3
    # share of level switches that move budget 1-against-2 layers: lets compression flow between
    # layers whose sizes have no small common multiple (e.g. attention vs MLP in SmolLM2)
    three_way: float = 0.25
    # random / Optuna: candidate evaluations (default: as many as the evolution of this config spends,
    # each on the evolution's mean tokens per evaluation: search/registry.evaluation_budget)
    samples: int | None = None
    # the start: uniform or a schedule (owl, hessian, dp, ...), or a list of them ([uniform, dp]): the
    # evolution's first generation scores them all and keeps the best (Optuna enqueues them all)
    init: str | list = "uniform"
    # EvoPress: score the elite on one fixed batch (the last stage's size) every N generations, the
    # curve that shows progress (`elite_kl_monitor`); 0: never
    monitor_every: int = 5
    # pareto: the budgets (targets) of the front; null: 8 evenly spaced up to `target`
    budgets: list | None = None
    seed: int = 0


@dataclass
class EvaluatorConfig:
    num_evaluators: int | str = "auto"  # auto: one per GPU, else one
    device: str = "auto"
    dtype: str = "auto"
    batch_size: int = 8
    kl_topk: int | None = None
    cpus_per_evaluator: int | str = "auto"
    # resident: whole model on one GPU | streamed: blocks stream through the GPU from pinned host
    # memory (models bigger than one GPU) | device_map: one model over gpus_per_evaluator GPUs
    mode: str = "resident"
    gpus_per_evaluator: int = 1  # device_map: GPUs each evaluator spans (Ray num_gpus)
    teacher_memory: str = "device"  # where cached teacher logits live: device | pinned (host)
    # GiB of cached teacher pages per evaluator (null: a quarter of the GPU memory the model leaves,
    # on CPU 15% of RAM; at most 16); beyond it the least recently used pages are recomputed
    teacher_cache_gb: float | None = None
    # GiB each evaluator may allocate on its GPU (null: all of it); a model bigger than this needs mode=streamed
    max_gpu_memory: float | None = None
    # candidates scored per Ray Tune trial (amortizes Tune's per-trial cost); auto: a stage's
    # candidates spread over the evaluators (EvoPress / random), 1 for Optuna samplers
    candidates_per_trial: int | str = 1


@dataclass
class TrackingConfig:
    uri: str | None = None  # MLFLOW_TRACKING_URI, else sqlite:///mlflow.db
    experiment: str = "raypress"
    run_name: str | None = None


@dataclass
class DatabaseConfig:
    storage_dtype: str = "float16"
    cache_dir: str | None = None
    group_size: int = 128  # quantization groups
    symmetric: bool = False  # quantization grid: symmetric (no zero points; what vLLM's Marlin kernels serve) or min-max
    granularity: str = "sublayer"  # depth: sublayer | block
    # build blocks as parallel Ray tasks (False: in the driver; an int: tasks in flight), each on a
    # GPU when `device` is cuda (auto: cuda if the Ray cluster has GPUs)
    parallel: bool | int = False
    device: str = "cpu"  # cpu | cuda | auto: where SparseGPT/GPTQ runs while building
    # where the database lives during a search (raypress/placement.py): gpu (every variant on each
    # evaluator's GPU) | host (pinned host memory) | object_store | disk (memory-mapped files shared
    # through the page cache) | auto (gpu, else host, else the node's shared copy, by size)
    placement: str = "auto"
    # the driver's copy of the model while building: streamed one block at a time from the checkpoint
    # (true), whole (false), or auto: streamed when the model's float32 size exceeds a quarter of the
    # host's memory (random:<arch> models are always streamed)
    stream: bool | str = "auto"


@dataclass
class Config:
    model: str = "smollm2-135m"
    family: str = "sparsity"
    method: str = "sparsegpt"
    levels: list | None = None  # level ladder (values); None = the method's default
    units: str = "linear"  # weight families: linear (every layer its own level) | fused (q/k/v, gate/up share one)
    target: float = 0.6
    # joint: the budget as bytes of the compressed layers ("55MB", 55000000) or a share of their fp16
    # size ("25%"); it sets `target` (bits per weight), and string entries of searcher.budgets likewise
    target_bytes: str | int | None = None
    data: DataConfig = field(default_factory=DataConfig)
    searcher: SearcherConfig = field(default_factory=SearcherConfig)
    evaluator: EvaluatorConfig = field(default_factory=EvaluatorConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray_address: str | None = None
    output: str = "raypress_runs"
    #: dotted keys the user set (YAML or --set): family-specific keys are checked against the family,
    #: and a family's searcher hints never override them. Not part of to_dict().
    explicit: frozenset = field(default_factory=frozenset, repr=False, compare=False)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("explicit", None)
        return d

    def flat(self) -> dict:
        """Flattened 'a.b' -> value (MLflow params)."""
        out = {}

        def walk(prefix, d):
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(f"{prefix}{k}.", v)
                else:
                    out[f"{prefix}{k}"] = v

        walk("", self.to_dict())
        return out


def _check_type(path: str, value, tp):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check_type(path, value, arg)
            except RayPressError:
                pass
        raise RayPressError(f"config key '{path}' has value {value!r} of the wrong type; expected {tp}")
    if tp is type(None):
        if value is None:
            return None
        raise RayPressError(f"config key '{path}' must be null")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if origin is list or tp is list:
        if isinstance(value, (list, tuple)):
            return list(value)
        raise RayPressError(f"config key '{path}' must be a list, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
        raise RayPressError(f"config key '{path}' must be {tp.__name__}, got {value!r}")
    return value


def _build(cls, data: dict, prefix: str = ""):
    if not isinstance(data, dict):
        raise RayPressError(f"config section '{prefix.rstrip('.') or '<top>'}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.name != "explicit"}
    unknown = sorted(set(data) - names)
    if unknown:
        raise RayPressError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys here: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for k, v in data.items():
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v if v is not None else {}, f"{prefix}{k}.")
        else:
            kwargs[k] = _check_type(prefix + k, v, tp)
    return cls(**kwargs)


def _parse_override(item: str) -> tuple[list[str], object]:
    if "=" not in item:
        raise RayPressError(f"override '{item}' must look like key.sub=value (e.g. searcher.generations=5)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw)
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def _dotted(data: dict, prefix: str = "") -> set[str]:
    out = set()
    for k, v in data.items():
        out.add(prefix + str(k))
        if isinstance(v, dict):
            out |= _dotted(v, f"{prefix}{k}.")
    return out


def init_names(cfg: Config) -> list:
    """searcher.init as a list of schedule names (one name or a list)."""
    init = cfg.searcher.init
    return [init] if isinstance(init, str) else list(init) if isinstance(init, (list, tuple)) else [init]


def validate(cfg: Config) -> Config:
    family = get_family(cfg.family)
    get_searcher(cfg.searcher.name)
    family.check_config(cfg, set(cfg.explicit))
    inits = init_names(cfg)
    for name in inits:
        if name not in ONE_SHOT:
            raise RayPressError(f"unknown searcher.init '{name}'; warm-start from one of {', '.join(ONE_SHOT)} "
                                "(or a list of them)")
    if not inits or len(set(inits)) != len(inits):
        raise RayPressError(f"searcher.init lists {cfg.searcher.init!r}; give one schedule or a list of distinct ones, "
                            "e.g. [uniform, dp]")
    if len(inits) > 1 and not get_searcher(cfg.searcher.name).many_starts:
        takes = ", ".join(n for n, s in SEARCHERS.items() if s.many_starts)
        raise RayPressError(f"searcher.init lists several starts, but {cfg.searcher.name} takes at most one; give one "
                            f"schedule or use one of {takes}")
    for i, st in enumerate(cfg.searcher.stages):
        if not (isinstance(st, (list, tuple)) and len(st) == 2 and all(isinstance(x, int) and x > 0 for x in st)):
            raise RayPressError(f"searcher.stages[{i}] must be [tokens, survivors] with positive integers, got {st!r}")
    if not cfg.searcher.stages:
        raise RayPressError("searcher.stages must list at least one [tokens, survivors] stage, e.g. [[512, 4], [2048, 1]]")
    if cfg.searcher.stages[-1][1] != 1:
        raise RayPressError("the last searcher stage must keep exactly 1 survivor (the next parent), e.g. [2048, 1]")
    if cfg.data.seq_len < 8:
        raise RayPressError("data.seq_len must be at least 8 tokens")
    if cfg.data.n_calib < 1 or cfg.data.n_eval < 1:
        raise RayPressError("data.n_calib and data.n_eval must be >= 1 (calibration / held-out sequences)")
    for tokens, _ in cfg.searcher.stages:  # every stage samples ceil(tokens / seq_len) calibration rows
        rows = -(-tokens // cfg.data.seq_len)
        if rows > cfg.data.n_calib:
            raise RayPressError(
                f"a searcher stage of {tokens} tokens needs {rows} calibration sequences of {cfg.data.seq_len} but "
                f"data.n_calib is {cfg.data.n_calib}; raise data.n_calib to {rows} or lower the stage token counts"
            )
    if cfg.searcher.generations < 1 or cfg.searcher.offspring < 1:
        raise RayPressError("searcher.generations and searcher.offspring must be >= 1")
    if cfg.searcher.samples is not None and cfg.searcher.samples < 1:
        raise RayPressError(f"searcher.samples must be >= 1 (candidate evaluations) or null for the evolution's "
                            f"budget, got {cfg.searcher.samples}")
    if cfg.searcher.monitor_every < 0:
        raise RayPressError(f"searcher.monitor_every must be >= 0 (generations between monitor scores; 0: never), "
                            f"got {cfg.searcher.monitor_every}")
    b = cfg.searcher.budgets
    if b is not None:
        if not (isinstance(b, list) and len(b) >= 2 and all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            and math.isfinite(x) for x in b)):
            raise RayPressError(f"searcher.budgets must list at least two numbers (the targets of a pareto front), "
                                f"got {b!r}; e.g. [3.2, 4.0, 5.6]")
        if not get_searcher(cfg.searcher.name).front:
            raise RayPressError(f"searcher.budgets is read by the pareto searcher only; set searcher.name=pareto "
                                f"or remove it")
    for key, seed in (("searcher.seed", cfg.searcher.seed), ("data.seed", cfg.data.seed)):
        if not 0 <= seed < 2**32:
            raise RayPressError(f"{key} must be in [0, 2^32), got {seed}")
    ev = cfg.evaluator
    for key in ("num_evaluators", "cpus_per_evaluator"):
        v = getattr(ev, key)
        if v != "auto" and not (isinstance(v, int) and v >= 1):
            raise RayPressError(f"evaluator.{key} must be auto or an integer >= 1, got {v!r}")
    if ev.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", ev.device):
        raise RayPressError(f"evaluator.device must be auto, cpu, cuda or cuda:N, got {ev.device!r}")
    if ev.dtype not in DTYPES:
        raise RayPressError(f"evaluator.dtype must be one of {', '.join(DTYPES)}, got {ev.dtype!r}")
    if ev.mode not in ("resident", "streamed", "device_map"):
        raise RayPressError(f"evaluator.mode must be resident, streamed or device_map, got {ev.mode!r}")
    if ev.teacher_memory not in ("device", "pinned"):
        raise RayPressError(f"evaluator.teacher_memory must be device or pinned, got {ev.teacher_memory!r}")
    if ev.gpus_per_evaluator < 1 or (ev.gpus_per_evaluator > 1 and ev.mode != "device_map"):
        raise RayPressError("evaluator.gpus_per_evaluator must be >= 1, and > 1 only with evaluator.mode=device_map")
    mgm = ev.max_gpu_memory
    if mgm is not None and (isinstance(mgm, bool) or not isinstance(mgm, (int, float)) or not mgm > 0):
        raise RayPressError(f"evaluator.max_gpu_memory is GiB per evaluator (e.g. 40) or null for the whole GPU, "
                            f"got {mgm!r}")
    tc = ev.teacher_cache_gb
    if tc is not None and (isinstance(tc, bool) or not isinstance(tc, (int, float)) or not 0 <= tc < 2**20):
        raise RayPressError(f"evaluator.teacher_cache_gb is GiB of cached teacher logits per evaluator (e.g. 8, 0 "
                            f"to recompute them for every batch) or null for auto, got {tc!r}")
    cpt = ev.candidates_per_trial
    if cpt != "auto" and not (isinstance(cpt, int) and not isinstance(cpt, bool) and cpt >= 1):
        raise RayPressError(f"evaluator.candidates_per_trial must be auto or an integer >= 1, got {cpt!r}")
    if cfg.database.device not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", cfg.database.device):
        raise RayPressError(f"database.device must be auto, cpu or cuda, got {cfg.database.device!r}")
    if ev.batch_size < 1 or (ev.kl_topk is not None and ev.kl_topk < 1):
        raise RayPressError("evaluator.batch_size and evaluator.kl_topk must be >= 1 (kl_topk: or null for the full KL)")
    if not math.isfinite(cfg.target) or cfg.target < 0:
        raise RayPressError(f"target must be a finite number >= 0 (e.g. 0.6 sparsity, 3.0 bits), got {cfg.target!r}")
    return cfg


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a mapping key given twice (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _safe_load_unique(text: str):
    """yaml.safe_load that refuses duplicate keys (a SafeLoader subclass: no Python objects)."""
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def load_config(path: str | Path | None = None, overrides: list[str] | None = None, base: dict | None = None,
                base_explicit=None) -> Config:
    """Load a YAML search space (or defaults, or the `base` mapping, whose user-set keys are
    `base_explicit` when it is a saved full config) and apply `key.sub=value` overrides."""
    import copy

    data: dict = copy.deepcopy(base) if base is not None else {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise RayPressError(f"config file '{p}' not found; see search_spaces/ for examples")
        try:
            data = _safe_load_unique(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise RayPressError(f"config file '{p}' is not UTF-8 text (a binary file?); pass a YAML search space "
                                "such as search_spaces/smollm2_sparsity.yaml") from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            problem = getattr(e, "problem", None) or ""
            if "duplicate key" in problem:
                raise RayPressError(f"config file '{p}' sets {problem}{where}; keep one (a second one would silently "
                                    "replace the first)") from None
            raise RayPressError(f"config file '{p}' is not valid YAML{where}; fix the syntax") from None
        if not isinstance(data, dict):
            raise RayPressError(f"config file '{p}' must be a YAML mapping of keys (model:, family:, ...)")
    for item in overrides or []:
        keys, value = _parse_override(item)
        section = typing.get_type_hints(Config).get(keys[0]) if len(keys) == 1 else None
        if section is not None and dataclasses.is_dataclass(section):
            first = dataclasses.fields(section)[0].name
            raise RayPressError(f"override '{item}' would replace the whole '{keys[0]}' section; set one of its keys, "
                                f"e.g. {keys[0]}.{first}={value if value not in (None, '') else '...'}")
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise RayPressError(f"override '{item}': '{k}' is not a section")
        node[keys[-1]] = value
    explicit = None
    if base_explicit is not None:
        explicit = set(base_explicit) | {".".join(_parse_override(i)[0][:n + 1]) for i in overrides or []
                                         for n in range(len(_parse_override(i)[0]))}
    return config_from_dict(data, explicit)


def config_from_dict(data: dict, explicit=None) -> Config:
    """A validated Config from a mapping (a YAML's, or the full `config` saved in a run folder, whose
    user-set keys are saved beside it: pass them as `explicit`)."""
    cfg = _build(Config, data)
    cfg.explicit = frozenset(_dotted(data) if explicit is None else explicit)
    return validate(cfg)
