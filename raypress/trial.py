"""The trial contract: what a Ray Tune trial receives and what it reports. Every key is defined here.

A trial config is ``{layer: level, ..., TOKENS: n, GENERATION: g, STAGE: s, SEED: seed}``: the
levels of one candidate plus the calibration batch it is scored on (every candidate of a stage
carries the same (seed, generation, stage), so they see the same tokens). A batched trial
(search/batched.py) is ``{BATCH: [trial config, ...]}``.

A trial reports ``{"fitness": KL, "tokens": n, ...}``; a batched one adds ``BATCH: [{"fitness",
"tokens"}, ...]`` (one per candidate, in order); a user error (GPU out of memory, ...) is reported
as ``{RESULT_KEY: message}`` instead of raised, so Tune does not retry a deterministic mistake.

`tune_space(space)` is the Ray Tune search space of a SearchSpace (one ``tune.randint`` per layer):
the runner hands it to the Tuner as ``param_space``, and every searcher checks it against the
space it was built on (`check_tune_space`).
"""
from __future__ import annotations

import numbers

from .errors import RayPressError

META_PREFIX = "_rp_"  #: keys with this prefix are not layers
TOKENS = "_rp_tokens"  #: calibration tokens the candidate is scored on
GENERATION = "_rp_generation"
STAGE = "_rp_stage"
SEED = "_rp_seed"
META_KEYS = (TOKENS, GENERATION, STAGE, SEED)
MONITOR_GENERATION = 2**31 - 1  #: the generation key of EvoPress's fixed monitoring batch (never a real generation)
BATCH = "_rp_batch"  #: several candidates in one trial
RESULT_KEY = "raypress_error"  #: a trial result with this key is a user error: stop, do not retry
METRIC = "fitness"  #: what every trial reports and every searcher minimizes
NODE = "raypress_node"  #: the Ray node id that scored the trial (reported next to the metric)
DB_COPY = "raypress_db_copy"  #: which shared copy of the level database the evaluator reads (mapped file+offset)
SPAN = "raypress_span"  #: (start, end) wall-clock seconds of the evaluation: shows evaluators working at once


def user_error_result(message: str) -> dict:
    """What a trial reports instead of raising a user error (RESULT_KEY: the runner stops, Tune does not retry)."""
    return {METRIC: float("nan"), "tokens": 0, RESULT_KEY: str(message)}


def trial_config(levels: dict, *, tokens: int, generation: int, stage: int, seed: int) -> dict:
    """A candidate's trial config: its levels plus the batch it is scored on."""
    return {**levels, TOKENS: int(tokens), GENERATION: int(generation), STAGE: int(stage), SEED: int(seed)}


def split(config: dict) -> tuple[dict[str, int], dict]:
    """(levels, meta) of a trial config. A config without TOKENS is a caller's bug: it says so
    instead of scoring on a made-up token count."""
    levels, meta = {}, {}
    for k, v in config.items():
        if str(k).startswith(META_PREFIX):
            meta[k] = v
        elif isinstance(v, numbers.Integral) and not isinstance(v, bool):
            levels[k] = int(v)
        else:
            raise RayPressError(f"trial config gives layer '{k}' the level {v!r}; a searcher must suggest an "
                                "integer level for every layer")
    if TOKENS not in meta:
        raise RayPressError(f"trial config has no '{TOKENS}' (calibration tokens per candidate); build trial "
                            "configs with raypress.trial.trial_config")
    return levels, meta


def tune_space(space) -> dict:
    """The Ray Tune search space of a SearchSpace: {layer: tune.randint(0, n_levels)}."""
    from ray import tune

    return {l: tune.randint(0, n) for l, n in zip(space.layers, space.n_levels)}


def check_tune_space(space, config: dict | None) -> None:
    """The param_space Tune hands a searcher must be the space the searcher was built on."""
    if not config:
        return
    layers = [k for k in config if not str(k).startswith(META_PREFIX)]
    if layers != list(space.layers):
        raise RayPressError("the Ray Tune param_space names other layers than the searcher's search space; "
                            "build both from the same SearchSpace (raypress.trial.tune_space)")
    for l, n in zip(space.layers, space.n_levels):
        dom = config[l]
        lo, hi = getattr(dom, "lower", None), getattr(dom, "upper", None)
        if (lo, hi) != (0, n):
            raise RayPressError(f"the Ray Tune param_space gives layer '{l}' levels {lo}..{hi} but the search space "
                                f"has 0..{n}; build both from the same SearchSpace")
