"""Optuna samplers (TPE, CMA-ES, NSGA-II) through Ray Tune, budget-feasible by construction.

`make_optuna_searcher(space, sampler=...)` returns a `RayPressOptunaSearch`, a thin subclass of
`ray.tune.search.optuna.OptunaSearch` (adds best_config/best_fitness, history/pop_new_history and
JSON get_state, and state= to resume) whose space is a define-by-run function (`FeasibleSpace`). Every suggested Tune config is
`trial.trial_config(levels, tokens=n_tokens, generation=0, stage=0, seed=seed)` and
satisfies `space.is_feasible` exactly — no rejection, no constraints_func (optuna's
constraints_func gives ~5% feasible samples on such budgets), no repair.

How it stays exactly feasible (`BudgetDecoder`):
  * costs are rewritten in reduced integer units (schedules.reduce_costs: per-layer minimum
    subtracted, divided by the gcd), so the budget is an integer B in units;
  * layers are visited in a fixed seeded order l_0..l_{L-1}; `reach[i]` is the exact set of sums
    the layers l_i.. can still make (a Python-int bitset, built once by suffix DP);
  * at layer l_i with remaining budget R the allowed levels are {k : R − c_i[k] ∈ reach[i+1]}.
    Invariant: R ∈ reach[i] (true at i = 0 because the target is reachable), so the allowed set is
    never empty, and since reach[L] = {0} the last layer is forced onto the exact budget. Hence
    every decoded config is exactly feasible (tests check 500 per sampler).

Two encodings of what optuna samples:
  * "shift" (default, all samplers): optuna samples a *nominal* level per layer from a fixed
    IntDistribution(0, n_levels−1); the decoder walks the order and, at each layer, takes the
    allowed level whose cost is nearest to the nominal cost plus this layer's params-share of the
    remaining gap (R − nominal cost of the remaining layers) — i.e. the nominal config shifted
    uniformly in value onto the budget. A feasible nominal config decodes to itself (gap 0 at
    every step), so optuna's own parameters equal the evaluated config whenever its proposal was
    feasible. Fixed distributions keep CMA-ES / NSGA-II / multivariate TPE working on all
    dimensions. The decoded config is what Tune gets (it is returned by the define-by-run function
    and overrides the captured nominal values) and is stored as the optuna trial's user attribute
    "rp_config".
  * "sequential" (TPE only): optuna samples each layer directly from the contiguous range of the
    allowed levels (dynamic IntDistribution bounds), so optuna records the evaluated levels
    themselves; a value falling into a hole of a non-contiguous allowed set (unequal layer sizes)
    is snapped to the nearest allowed level. CMA-ES, NSGA-II and multivariate TPE (optuna 5's
    default) treat dynamic ranges as independent dimensions (TPE warns and falls back to
    univariate), hence "shift" everywhere by default; on a synthetic 28-layer objective "shift"
    also found better configs with TPE than "sequential".

Fallback: when the bitsets would be too large (L x total units > `max_bits`, not the case for
transformer ladders), `reach` degrades to [min, max] intervals and a config that still misses the
budget is fixed by `space.repair` (user attribute "rp_repaired" = True).
"""
from __future__ import annotations

import threading
from typing import Any

import numpy as np
import optuna
from ray.tune.search.optuna import OptunaSearch

from raypress import trial as rp_trial
from raypress.errors import RayPressError
from raypress.search.nsga2 import PicklableNSGAIISampler
from raypress.search.tpe import WindowedTPESampler

__all__ = ["BudgetDecoder", "FeasibleSpace", "make_optuna_searcher", "make_sampler", "SAMPLERS",
           "RayPressOptunaSearch"]

SAMPLERS = ("tpe", "cmaes", "nsga2", "random")
DEFAULT_MAX_BITS = 2_000_000_000  # 250 MB of bitsets


class BudgetDecoder:
    """Maps per-layer proposals onto exactly feasible configs (see module doc)."""

    def __init__(self, space, order_seed: int | None = 0, max_bits: int = DEFAULT_MAX_BITS):
        self.space = space
        self.layers = list(space.layers)
        self.n_levels = [len(v) for v in space.level_values]
        space.require_reachable()
        b = space.budget_model
        self.unit = b.unit
        self.costs = [[int(c) for c in cs] for cs in b.reduced]
        self.budget = (b.budget - b.offset) // b.unit
        total_max = b.total_units
        L = len(self.layers)
        if order_seed is None:
            self.order = list(range(L))
        else:
            self.order = [int(i) for i in np.random.default_rng(order_seed).permutation(L)]
        self.n = [int(space.n_params[i]) for i in self.order]
        self.c = [self.costs[i] for i in self.order]  # costs in visiting order
        maxes = [max(c) for c in self.c]
        self.suffix_max = np.concatenate([np.cumsum(maxes[::-1])[::-1], [0]]).astype(object).tolist()
        self.suffix_n = np.concatenate([np.cumsum(self.n[::-1])[::-1], [0]]).astype(object).tolist()
        self.exact = L * (total_max + 1) <= max_bits
        self.reach: list[int] | None = None
        if self.exact:
            reach = [0] * (L + 1)
            reach[L] = 1
            for i in range(L - 1, -1, -1):
                acc = 0
                nxt = reach[i + 1]
                for c in set(self.c[i]):
                    acc |= nxt << c
                reach[i] = acc
            self.reach = reach  # bit `budget` of reach[0] is set: the space's verdict said reachable

    # -- feasibility -------------------------------------------------------------------------
    def _ok(self, i: int, rest: int) -> bool:
        """Can the layers after position i make exactly `rest` units?"""
        if rest < 0 or rest > self.suffix_max[i + 1]:
            return False
        if self.reach is None:
            return True
        return bool((self.reach[i + 1] >> rest) & 1)

    def allowed(self, i: int, remaining: int) -> list[int]:
        """Levels of the i-th visited layer that keep the rest exactly feasible."""
        return [k for k, c in enumerate(self.c[i]) if self._ok(i, remaining - c)]

    def _pick(self, i: int, remaining: int, desired_cost: float, nominal: int) -> int:
        allowed = self.allowed(i, remaining)
        if not allowed:  # only reachable in the interval fallback
            allowed = [k for k, c in enumerate(self.c[i]) if 0 <= remaining - c] or list(range(len(self.c[i])))
        return min(allowed, key=lambda k: (abs(self.c[i][k] - desired_cost), abs(k - nominal), k))

    # -- decoding ----------------------------------------------------------------------------
    def decode(self, nominal) -> dict[str, int]:
        """'shift' decoding of nominal levels {layer: level} (or a list in space.layers order)."""
        if isinstance(nominal, dict):
            x = [int(nominal[self.layers[j]]) for j in self.order]
        else:
            x = [int(nominal[j]) for j in self.order]
        L = len(x)
        x = [min(max(v, 0), self.n_levels[j] - 1) for v, j in zip(x, self.order)]
        nom_cost = [self.c[i][x[i]] for i in range(L)]
        suffix_nom = [0] * (L + 1)
        for i in range(L - 1, -1, -1):
            suffix_nom[i] = suffix_nom[i + 1] + nom_cost[i]
        R = self.budget
        out = [0] * L
        for i in range(L):
            gap = R - suffix_nom[i]
            desired = nom_cost[i] + gap * self.n[i] / self.suffix_n[i]
            k = self._pick(i, R, desired, x[i])
            out[i] = k
            R -= self.c[i][k]
        return {self.layers[j]: out[i] for i, j in enumerate(self.order)}

    def is_exact(self, config: dict[str, int]) -> bool:
        return sum(self.costs[j][config[l]] for j, l in enumerate(self.layers)) == self.budget


class FeasibleSpace:
    """The define-by-run function handed to OptunaSearch (picklable)."""

    def __init__(self, space, *, n_tokens: int, seed: int = 0, encoding: str = "shift",
                 order_seed: int | None = 0, max_bits: int = DEFAULT_MAX_BITS):
        if encoding not in ("shift", "sequential"):
            raise RayPressError(f"unknown encoding {encoding!r}; use 'shift' or 'sequential'")
        self.space = space
        self.decoder = BudgetDecoder(space, order_seed=order_seed, max_bits=max_bits)
        self.encoding = encoding
        self.constants = rp_trial.trial_config({}, tokens=n_tokens, generation=0, stage=0, seed=seed)
        self.seed = int(seed)

    def _sequential(self, trial) -> dict[str, int]:
        d = self.decoder
        R = d.budget
        cfg = {}
        for i, j in enumerate(d.order):
            name = d.layers[j]
            allowed = d.allowed(i, R)
            if not allowed:  # interval fallback only
                allowed = list(range(d.n_levels[j]))
            if len(allowed) == 1:
                k = allowed[0]  # forced: not an optuna parameter in this trial
            else:
                v = int(trial.suggest_int(name, min(allowed), max(allowed)))
                k = min(allowed, key=lambda a: (abs(a - v), a))
            cfg[name] = k
            R -= d.c[i][k]
        return {l: cfg[l] for l in d.layers}

    def __call__(self, trial) -> dict[str, Any]:
        d = self.decoder
        if self.encoding == "shift":
            nominal = {l: trial.suggest_int(l, 0, n - 1) for l, n in zip(d.layers, d.n_levels)}
            cfg = d.decode(nominal)
        else:
            cfg = self._sequential(trial)
        repaired = False
        if not d.is_exact(cfg):  # only in the interval fallback (huge unit budgets)
            rng = np.random.default_rng([self.seed, int(getattr(trial, "number", 0))])
            cfg = {k: int(v) for k, v in self.space.repair(cfg, rng).items()}
            repaired = True
        if not self.space.is_feasible(cfg):
            raise RayPressError("internal: the Optuna decoder produced an infeasible config; please report")
        trial.set_user_attr("rp_config", cfg)
        if repaired:
            trial.set_user_attr("rp_repaired", True)
        return {**cfg, **self.constants}


def make_sampler(name: str, seed: int = 0, **kw):
    """An Optuna sampler by short name: tpe | cmaes | nsga2 | random (seeded). "tpe" is optuna's TPE with
    its "above" set capped to the newest `max_above` trials (search/tpe.py)."""
    name = name.lower().replace("-", "").replace("_", "")
    if name == "tpe":
        # windowed: flat cost per suggestion over hundreds of layers (see search/tpe.py)
        return WindowedTPESampler(seed=seed, **kw)
    if name in ("cmaes", "cma"):
        try:
            import cmaes  # noqa: F401
        except ImportError as e:
            raise RayPressError("the CMA-ES sampler needs the 'cmaes' package; pip install cmaes") from e
        return optuna.samplers.CmaEsSampler(seed=seed, **kw)
    if name in ("nsga2", "nsgaii"):
        return PicklableNSGAIISampler(seed=seed, **kw)
    if name == "random":
        return optuna.samplers.RandomSampler(seed=seed, **kw)
    raise RayPressError(f"unknown Optuna sampler {name!r}; choose one of {', '.join(SAMPLERS)}")


class RayPressOptunaSearch(OptunaSearch):
    """OptunaSearch + the bookkeeping the RayPress runner reads from every searcher:
    best_config / best_fitness, history + pop_new_history(), get_state() (JSON-serialisable and
    compact: per finished trial its nominal levels as a list, value and sampler attributes; the
    sampler is pickled (base64) into it, so a restored TPE continues with the same suggestions;
    running trials are dropped and re-suggested; the "rp_config" user attribute is not kept).
    Suggestions are FeasibleSpace configs (exactly feasible).

    The study lives in an optuna storage that this class creates and hands to OptunaSearch
    (its public `storage` / `study_name` arguments), so a resume builds the restored study in a
    fresh storage (`state=`) instead of replacing OptunaSearch's private members."""

    def __init__(self, fspace: FeasibleSpace, *, sampler, mode: str = "min", window: int = 16,
                 state: dict | None = None, study_name: str | None = None, points_to_evaluate=None, **kw):
        from optuna.storages import InMemoryStorage

        self.study_name = study_name or "raypress"
        self.storage = InMemoryStorage()
        direction = "minimize" if mode != "max" else "maximize"
        if state is not None:
            sampler = _restore_study(self.storage, self.study_name, direction, fspace, state)
            points_to_evaluate = None  # waiting trials were restored with the study
        self.study = optuna.create_study(storage=self.storage, sampler=sampler, pruner=optuna.pruners.NopPruner(),
                                         study_name=self.study_name, direction=direction, load_if_exists=True)
        super().__init__(fspace, sampler=sampler, mode=mode, storage=self.storage, study_name=self.study_name,
                         points_to_evaluate=points_to_evaluate, **kw)
        self.fspace = fspace
        self.window = int(window)
        self._configs: dict[str, dict[str, int]] = {}
        self._done_ids: set[str] = set()
        self.best_config: dict[str, int] | None = None
        self.best_fitness: float | None = None
        self.history: list[dict] = []
        self._recent: list[float] = []
        self._handed = 0
        self.evaluations = 0
        self.tokens = 0
        self._state_rows: dict[int, dict] = {}  # get_state's row per finished trial number
        if state is not None:
            self.best_config = state["best_config"]
            self.best_fitness = state["best_fitness"]
            self.history = list(state["history"])
            self._handed = int(state["handed"])
            self._recent = list(state["recent"])
            self.evaluations = int(state["evaluations"])
            self.tokens = int(state["tokens"])

    # -- Searcher interface ----------------------------------------------------------
    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        """Tune hands the run's param_space (trial.tune_space); it must be this searcher's space.
        The study already exists (define-by-run space), so only the check is left to do."""
        rp_trial.check_tune_space(self.fspace.space, config)
        return True

    def suggest(self, trial_id: str):
        cfg = super().suggest(trial_id)
        if cfg is not None:
            self._configs[trial_id] = {l: int(cfg[l]) for l in self.fspace.decoder.layers}
        return cfg

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        if trial_id in self._done_ids:
            return
        self._done_ids.add(trial_id)
        super().on_trial_complete(trial_id, result=result, error=error)
        cfg = self._configs.pop(trial_id, None)
        val = None if (error or not result) else result.get(self.metric)
        if val is None or cfg is None or not np.isfinite(float(val)):
            return
        val = float(val)
        self.evaluations += 1
        self.tokens += int(result.get("tokens", self.fspace.constants[rp_trial.TOKENS]))
        better = (self.best_fitness is None or
                  (val < self.best_fitness if self.mode != "max" else val > self.best_fitness))
        if better:
            self.best_fitness, self.best_config = val, dict(cfg)
        self._recent = (self._recent + [val])[-self.window:]
        self.history.append({
            "generation": self.evaluations - 1,
            "best_fitness": self.best_fitness,
            "median_fitness": float(np.median(self._recent)),
            "fitness": val,
            "evaluations": self.evaluations,
            "tokens": self.tokens,
        })

    def pop_new_history(self) -> list[dict]:
        new = self.history[self._handed:]
        self._handed = len(self.history)
        return new

    # -- state -------------------------------------------------------------------------
    def get_state(self) -> dict:
        import base64

        from optuna.trial import TrialState

        layers = self.fspace.decoder.layers
        nlev = self.fspace.decoder.n_levels
        trials = self.study.get_trials(deepcopy=False)
        opt_key = "cma:optimizer"
        last_opt = max((t.number for t in trials if any(k.startswith(opt_key) for k in t.system_attrs)),
                       default=-1)
        # a finished trial never changes: its row is built once (rebuilding all rows after every
        # trial made a 1380-trial TPE search spend minutes here); only which trial carries the
        # newest CMA-ES optimizer snapshot moves, so that is added at write time
        rows = self._state_rows
        done, waiting = [], []
        for t in trials:
            if t.state == TrialState.WAITING:
                waiting.append({l: int(v) for l, v in t.params.items()} or
                               t.system_attrs.get("fixed_params", {}))
                continue
            if t.state not in (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED):
                continue  # running: re-suggested after a resume
            row = rows.get(t.number)
            if row is None:
                row = rows[t.number] = self._state_row(t, layers, nlev, opt_key)
            if t.number == last_opt:
                row = {**row, "system_attrs": {**row["system_attrs"], **{
                    k: v for k, v in t.system_attrs.items() if k.startswith(opt_key)}}}
            done.append(row)
        return {
            "kind": "optuna",
            "version": 1,
            "trials": done,
            "waiting": waiting,
            "sampler": base64.b64encode(_pickle_sampler(self.study.sampler)).decode(),
            "best_config": self.best_config,
            "best_fitness": self.best_fitness,
            "history": self.history,
            "handed": self._handed,
            "recent": self._recent,
            "evaluations": self.evaluations,
            "tokens": self.tokens,
        }

    @staticmethod
    def _state_row(t, layers, nlev, opt_key) -> dict:
        # finished trials need neither TPE's shared relative params (constant liar) nor any
        # but the newest CMA-ES optimizer snapshot (get_state adds that one)
        sysattrs = {k: v for k, v in t.system_attrs.items()
                    if not k.startswith(opt_key) and not k.startswith("tpe:relative_params")}
        bounds = {}
        for j, l in enumerate(layers):
            dist = t.distributions.get(l)
            if dist is not None and (dist.low, dist.high) != (0, nlev[j] - 1):
                bounds[l] = [int(dist.low), int(dist.high)]
        return {
            # nominal values in space.layers order (None: not sampled, e.g. a forced layer)
            "x": [int(t.params[l]) if l in t.params else None for l in layers],
            "bounds": bounds,  # only distributions other than IntDistribution(0, n_levels-1)
            "value": t.value,
            "state": t.state.name,
            "user_attrs": {k: v for k, v in t.user_attrs.items() if k != "rp_config"},
            "system_attrs": sysattrs,
        }

    def save(self, checkpoint_path: str):
        # Tune pickles __dict__ for its experiment checkpoints: the row cache is derived data
        rows = self.__dict__.pop("_state_rows")
        try:
            super().save(checkpoint_path)
        finally:
            self._state_rows = rows

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._state_rows = {}  # rows of the study this replaces


def _pickle_sampler(sampler) -> bytes:
    """The sampler's pickle (NSGA-II's thread locks are dropped by its own class, search/nsga2.py)."""
    import pickle

    return pickle.dumps(sampler)


def _unpickle_sampler(data: bytes):
    from ..safe_pickle import safe_loads  # the state file may come from elsewhere: allow-listed types only

    obj = safe_loads(data, ("optuna.samplers", "optuna.distributions", "optuna.search_space", "raypress.search.tpe",
                            "raypress.search.nsga2"),
                     "the saved Optuna sampler")
    # states written before nsga2.py: (sampler, names of the locks removed before pickling)
    sampler, locks = obj if isinstance(obj, tuple) else (obj, [])
    for k in locks:
        setattr(sampler, k, threading.Lock())
    return sampler


def _restore_study(storage, name: str, direction: str, fspace: FeasibleSpace, state: dict):
    """Rebuild a saved study (finished trials, waiting trials, sampler) inside `storage`; returns
    the restored sampler."""
    import base64

    from optuna.distributions import IntDistribution
    from optuna.trial import TrialState, create_trial

    if not state or state.get("kind") != "optuna":
        raise RayPressError("the saved searcher state is not an Optuna state; resume with the same searcher")
    sampler = _unpickle_sampler(base64.b64decode(state["sampler"]))
    study = optuna.create_study(storage=storage, sampler=sampler, pruner=optuna.pruners.NopPruner(),
                                study_name=name, direction=direction)
    layers = fspace.decoder.layers
    nlev = fspace.decoder.n_levels
    for t in state["trials"]:
        st = TrialState[t["state"]]
        params, dists = {}, {}
        for j, (l, v) in enumerate(zip(layers, t["x"])):
            if v is None:
                continue
            lo, hi = t["bounds"].get(l, (0, nlev[j] - 1))
            params[l], dists[l] = int(v), IntDistribution(int(lo), int(hi))
        study.add_trial(create_trial(
            state=st,
            value=t["value"] if st == TrialState.COMPLETE else None,
            params=params,
            distributions=dists,
            user_attrs=t["user_attrs"],
            system_attrs=t["system_attrs"],
        ))
    for p in state.get("waiting", []):
        study.enqueue_trial(p)
    return sampler


def make_optuna_searcher(space, sampler: str = "tpe", seed: int = 0, *, n_tokens: int,
                         metric: str = rp_trial.METRIC, mode: str = "min", encoding: str | None = None,
                         order_seed: int | None = None, initial: dict | list[dict] | None = None,
                         sampler_kwargs: dict | None = None, study_name: str | None = None,
                         state: dict | None = None):
    """A RayPressOptunaSearch (an OptunaSearch subclass) over budget-feasible configs, ready for
    `tune.Tuner(trainable, tune_config=TuneConfig(search_alg=..., num_samples=N, metric="fitness",
    mode="min"))` with no param_space.

    sampler: "tpe" | "cmaes" | "nsga2" | "random", or an optuna BaseSampler instance.
    encoding: "shift" (default) or "sequential" (TPE only) — see the module doc.
    order_seed: seed of the fixed layer visiting order (default: seed).
    initial: config(s) {layer: level} evaluated first (enqueued; must be feasible), e.g. space.uniform().
    state: a get_state() of an earlier searcher over the same space (resume).
    """
    if isinstance(sampler, str):
        sname = sampler.lower().replace("-", "").replace("_", "")
        smp = make_sampler(sampler, seed=seed, **(sampler_kwargs or {}))
    elif isinstance(sampler, optuna.samplers.BaseSampler):
        sname, smp = type(sampler).__name__.lower(), sampler
    else:
        raise RayPressError(f"sampler must be a name ({', '.join(SAMPLERS)}) or an optuna sampler")
    if encoding is None:
        encoding = "shift"
    if encoding == "sequential" and sname not in ("tpe", "random", "tpesampler", "randomsampler"):
        raise RayPressError(
            f"encoding 'sequential' uses dynamic ranges, which {sampler!r} samples at random; use encoding='shift'"
        )
    fs = FeasibleSpace(space, n_tokens=n_tokens, seed=seed, encoding=encoding,
                       order_seed=seed if order_seed is None else order_seed)
    points = None
    if initial is not None:
        points = []
        for cfg in [initial] if isinstance(initial, dict) else list(initial):
            cfg = {l: int(cfg[l]) for l in space.layers}
            space.check(cfg)
            points.append(cfg)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "Trial N finished" line per trial
    return RayPressOptunaSearch(fs, metric=metric, mode=mode, sampler=smp, points_to_evaluate=points,
                                study_name=study_name, state=state)


def build(name, cfg, space, initial=None, state=None):
    """The registry's builder: an Optuna sampler named by cfg.searcher.name over `space`, with the
    evaluation budget of search/registry.evaluation_budget (its `num_samples` attribute)."""
    from .registry import evaluation_budget

    n, tokens = evaluation_budget(cfg)
    searcher = make_optuna_searcher(space, sampler=name, seed=cfg.searcher.seed, n_tokens=tokens,
                                    initial=(initial if isinstance(initial, list) else [initial]) if initial else None,
                                    state=state)
    # a resume continues the budget: Tune counts the trials it creates, the restored ones are spent
    searcher.num_samples = max(0, n - len(state["trials"])) if state is not None else n
    return searcher
