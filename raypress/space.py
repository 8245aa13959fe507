"""SearchSpace: layers × levels with exact integer costs and one budget.

A config is a mapping ``{layer_name: level_index}`` (Tune trial configs may carry extra
``_rp_*`` keys, which are ignored here). Level values (sparsity, bits, kept ratio, 0/1 dropped)
become exact integer costs (budget.py: the one place that defines costs, the budget and
whether a target is reachable), and a config is feasible iff every level is in range and its
cost equals the budget exactly. A SearchSpace owns one `Budget`; `verdict()` is its judgement.

Internally configs are int64 numpy arrays in ``layers`` order (``config_to_array`` /
``array_to_config``); ``mutate``/``repair`` accept either form and return the form they got.
A SearchSpace is treated as immutable after construction (derived tables are built once).
"""
from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from .budget import SCALE, Budget, Verdict
from .errors import RayPressError
from .trial import META_PREFIX


def _as_rng(rng) -> np.random.Generator:
    if isinstance(rng, np.random.Generator):
        return rng
    return np.random.default_rng(rng)


@dataclass
class SearchSpace:
    layers: list[str]
    n_params: list[int]  # weight of each layer in the budget (params; 1 for sub-blocks)
    level_values: list[list[float]]  # per layer, ascending compression (index = level)
    target: float  # params-weighted mean level value

    # ------------------------------------------------------------------ construction
    def __post_init__(self):
        layers = [str(l) for l in self.layers]
        if not layers:
            raise RayPressError("search space has no layers; check the model/family (nothing to compress)")
        if len(set(layers)) != len(layers):
            dup = next(l for l in layers if layers.count(l) > 1)
            raise RayPressError(f"search space lists layer '{dup}' twice; layer names must be unique")
        if len(self.n_params) != len(layers) or len(self.level_values) != len(layers):
            raise RayPressError(
                f"search space has {len(layers)} layers but {len(self.n_params)} n_params and "
                f"{len(self.level_values)} level ladders; give one of each per layer"
            )
        n_params = []
        for l, n in zip(layers, self.n_params):
            if isinstance(n, bool) or int(n) != n or int(n) <= 0:
                raise RayPressError(f"layer '{l}' has n_params={n!r}; it must be a positive integer")
            n_params.append(int(n))
        values = []
        for l, vals in zip(layers, self.level_values):
            vals = [float(v) for v in vals]
            if not vals:
                raise RayPressError(f"layer '{l}' has no levels; give at least one level value")
            if not all(math.isfinite(v) for v in vals):
                raise RayPressError(f"layer '{l}' has a non-finite level value in {vals}; use finite numbers")
            values.append(vals)
        target = float(self.target)
        if not math.isfinite(target):
            raise RayPressError(f"target {self.target!r} is not a finite number; give e.g. 0.6 (sparsity) or 3.0 (bits)")
        self.layers, self.n_params, self.level_values, self.target = layers, n_params, values, target

        L = len(layers)
        self.n_levels = [len(v) for v in values]
        K = max(self.n_levels)
        self._budget = Budget(n_params, values, target, layer_names=layers)
        self._index = {l: i for i, l in enumerate(layers)}
        self._rows = np.arange(L)
        self._nl = np.asarray(self.n_levels, dtype=np.int64)
        self._n = np.asarray(n_params, dtype=np.int64)
        self._vals = np.full((L, K), np.nan)
        self._cost = np.zeros((L, K), dtype=np.int64)
        self._valid = np.zeros((L, K), dtype=bool)
        for i, vals in enumerate(values):
            self._vals[i, : len(vals)] = vals
            self._cost[i, : len(vals)] = self._budget.costs[i]
            self._valid[i, : len(vals)] = True
        # pad invalid slots with the last valid cost (never used: validity is always checked)
        for i, nl in enumerate(self.n_levels):
            self._cost[i, nl:] = self._cost[i, nl - 1]
        self._total = int(sum(n_params))
        masked = np.where(self._valid, self._cost, np.iinfo(np.int64).max)
        self._min_cost = int(masked.min(axis=1).sum())
        masked = np.where(self._valid, self._cost, np.iinfo(np.int64).min)
        self._max_cost = int(masked.max(axis=1).sum())
        self._uniform_cache: np.ndarray | None = None
        self._pair_orders: dict[int, np.ndarray] = {}

    @classmethod
    def from_values(cls, values, target: float, *, layers=None, n_params=None) -> "SearchSpace":
        """Build from ladders given per layer or shared.

        values: {layer: [v0, v1, ...]} (layers = its keys, in order), or one list shared by all
        `layers`. n_params: {layer: n}, a list aligned with layers, or None (every layer weighs 1).
        """
        if isinstance(values, Mapping):
            layers = list(values) if layers is None else list(layers)
            try:
                ladders = [list(values[l]) for l in layers]
            except KeyError as e:
                raise RayPressError(f"no level values for layer {e}; give one ladder per layer") from None
        else:
            if layers is None:
                raise RayPressError("from_values with one shared ladder needs layers=[...]; pass the layer names")
            layers = list(layers)
            ladders = [list(values) for _ in layers]
        if n_params is None:
            sizes = [1] * len(layers)
        elif isinstance(n_params, Mapping):
            try:
                sizes = [n_params[l] for l in layers]
            except KeyError as e:
                raise RayPressError(f"no n_params for layer {e}; give one size per layer") from None
        else:
            sizes = list(n_params)
        return cls(layers=layers, n_params=sizes, level_values=ladders, target=target)

    @classmethod
    def for_database(cls, db, target: float, layers=None) -> "SearchSpace":
        """Build from a LevelDatabase (duck-typed: .layers, .n_params{}, .level_values{})."""
        layers = list(db.layers if layers is None else layers)
        missing = [l for l in layers if l not in db.n_params or l not in db.level_values]
        if missing:
            raise RayPressError(
                f"database has no entry for layer '{missing[0]}' ({len(missing)} missing); rebuild the database"
            )
        return cls(
            layers=layers,
            n_params=[int(db.n_params[l]) for l in layers],
            level_values=[[float(v) for v in db.level_values[l]] for l in layers],
            target=float(target),
        )

    def to_dict(self) -> dict:
        return {"layers": list(self.layers), "n_params": list(self.n_params),
                "level_values": [list(v) for v in self.level_values], "target": self.target}

    @classmethod
    def from_dict(cls, d: Mapping) -> "SearchSpace":
        return cls(layers=d["layers"], n_params=d["n_params"], level_values=d["level_values"], target=d["target"])

    def fingerprint(self) -> str:
        """Stable hash of layers, costs and budget (to check saved searcher states against a space)."""
        h = hashlib.sha256(json.dumps([self.layers, self.n_params,
                                       [[int(c) for c in self._cost[i, :nl]] for i, nl in enumerate(self.n_levels)],
                                       self.budget]).encode())
        return h.hexdigest()[:16]

    # ------------------------------------------------------------------ derived
    @property
    def budget(self) -> int:
        return self._budget.budget

    @property
    def budget_model(self) -> Budget:
        """The Budget (budget.py) of this space: costs, reduced units, reachability, exact solver."""
        return self._budget

    def verdict(self) -> Verdict:
        """Whether the target is reachable exactly (budget.py's judgement, with the nearest targets)."""
        return self._budget.verdict()

    def require_reachable(self) -> None:
        """RayPressError quoting the verdict when the target cannot be hit exactly."""
        self._budget.require()

    @property
    def total_params(self) -> int:
        return self._total

    @property
    def costs(self) -> list[list[int]]:
        """cost[l][k] as Python ints (a fresh copy)."""
        return [[int(c) for c in self._cost[i, :nl]] for i, nl in enumerate(self.n_levels)]

    def __len__(self) -> int:
        return len(self.layers)

    # ------------------------------------------------------------------ config <-> array
    def _parse(self, config) -> tuple[np.ndarray, list[str]]:
        """-> (levels array, out-of-range descriptions). Raises on unknown/missing/non-integer."""
        L = len(self.layers)
        if isinstance(config, np.ndarray):
            if config.shape != (L,):
                raise RayPressError(f"config array has shape {config.shape}; expected ({L},) in space.layers order")
            if not np.issubdtype(config.dtype, np.integer):
                if not np.all(np.isfinite(config)) or np.any(config != np.round(config)):
                    raise RayPressError("config array has non-integer levels; levels are integer indices")
            arr = config.astype(np.int64)
        elif isinstance(config, Mapping):
            arr = np.full(L, -1, dtype=np.int64)
            seen = np.zeros(L, dtype=bool)
            unknown = []
            for k, v in config.items():
                if isinstance(k, str) and k.startswith(META_PREFIX):
                    continue
                i = self._index.get(k)
                if i is None:
                    unknown.append(k)
                    continue
                if isinstance(v, (bool, np.bool_)):
                    raise RayPressError(f"level of layer '{k}' is {v!r}; levels are integer indices")
                if isinstance(v, (int, np.integer)):
                    iv = int(v)
                elif isinstance(v, (float, np.floating)) and math.isfinite(v) and float(v).is_integer():
                    iv = int(v)
                else:
                    raise RayPressError(f"level of layer '{k}' is {v!r}; levels are integer indices")
                arr[i] = iv
                seen[i] = True
            if unknown:
                more = f" (+{len(unknown) - 1} more)" if len(unknown) > 1 else ""
                raise RayPressError(
                    f"config names unknown layer '{unknown[0]}'{more}; use the space's layer names "
                    f"(e.g. '{self.layers[0]}')"
                )
            if not seen.all():
                missing = [self.layers[i] for i in np.flatnonzero(~seen)]
                more = f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""
                raise RayPressError(f"config has no level for layer '{missing[0]}'{more}; give every layer a level")
        else:
            raise RayPressError(f"config must be a mapping {{layer: level}}, got {type(config).__name__}")
        bad = np.flatnonzero((arr < 0) | (arr >= self._nl))
        problems = [
            f"level {int(arr[i])} of layer '{self.layers[i]}' is out of range (0..{self.n_levels[i] - 1})" for i in bad
        ]
        return arr, problems

    def config_to_array(self, config) -> np.ndarray:
        """{layer: level} (or an array) -> validated int64 array in `layers` order (a copy)."""
        arr, problems = self._parse(config)
        if problems:
            more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
            raise RayPressError(f"{problems[0]}{more}; levels must be in range for every layer")
        return arr.copy()

    def array_to_config(self, arr) -> dict[str, int]:
        arr = np.asarray(arr)
        if arr.shape != (len(self.layers),):
            raise RayPressError(f"config array has shape {arr.shape}; expected ({len(self.layers)},)")
        return {l: int(k) for l, k in zip(self.layers, arr.tolist())}

    def _out(self, arr: np.ndarray, like):
        return arr.copy() if isinstance(like, np.ndarray) else self.array_to_config(arr)

    # ------------------------------------------------------------------ budget
    def _cost_arr(self, arr: np.ndarray) -> int:
        return int(self._cost[self._rows, arr].sum())

    def cost(self, config) -> int:
        return self._cost_arr(self.config_to_array(config))

    def is_feasible(self, config) -> bool:
        """True iff every level is in range and cost == budget (unknown/missing layers raise)."""
        arr, problems = self._parse(config)
        return not problems and self._cost_arr(arr) == self.budget

    def check(self, config) -> None:
        arr = self.config_to_array(config)
        c = self._cost_arr(arr)
        if c != self.budget:
            raise RayPressError(
                f"config is off budget: params-weighted mean value {self._mean_arr(arr):.6g} vs target "
                f"{self.target:g} (cost {c} != budget {self.budget}); use space.repair(config) or a "
                "budget-preserving searcher"
            )

    def _mean_arr(self, arr: np.ndarray) -> float:
        return float((self._vals[self._rows, arr] * self._n).sum() / self._total)

    def mean_value(self, config) -> float:
        """Params-weighted mean level value (actual values, not the rounded cost grid)."""
        return self._mean_arr(self.config_to_array(config))

    def values(self, config) -> dict[str, float]:
        arr = self.config_to_array(config)
        return {l: float(v) for l, v in zip(self.layers, self._vals[self._rows, arr].tolist())}

    def describe(self, config) -> dict:
        """Report-friendly summary: mean value, per-layer values/levels, per-kind means, budget."""
        arr = self.config_to_array(config)
        v = self._vals[self._rows, arr]
        kinds: dict[str, list[float]] = {}
        for i, layer in enumerate(self.layers):
            parts = layer.split(".")
            idx = next((j for j, p in enumerate(parts) if p.isdigit()), None)
            kind = ".".join(parts[idx + 1:]) if idx is not None else layer
            kinds.setdefault(kind or "block", [0.0, 0.0])
            kinds[kind or "block"][0] += float(v[i]) * self.n_params[i]
            kinds[kind or "block"][1] += self.n_params[i]
        c = self._cost_arr(arr)
        return {
            "mean_value": self._mean_arr(arr),
            "target": self.target,
            "feasible": c == self.budget,
            "cost": c,
            "budget": self.budget,
            "min_value": float(v.min()),
            "max_value": float(v.max()),
            "values": {l: float(x) for l, x in zip(self.layers, v.tolist())},
            "levels": self.array_to_config(arr),
            "by_kind": {k: s / n for k, (s, n) in kinds.items()},
        }

    # ------------------------------------------------------------------ uniform
    def _unreachable_msg(self) -> str:
        return self.verdict().message or (f"target {self.target:g} cannot be hit exactly by these ladders; "
                                          "pick another target")

    def _uniform_arr(self) -> np.ndarray:
        if self._uniform_cache is not None:
            return self._uniform_cache.copy()
        tol = 1e-6 * max(1.0, abs(self.target))
        hit = np.abs(np.where(self._valid, self._vals, np.inf) - self.target) <= tol
        arr = None
        if hit.any(axis=1).all():
            arr = np.argmax(hit, axis=1).astype(np.int64)
            if self._cost_arr(arr) != self.budget:
                arr = None
        if arr is None:
            # no single level equals the target: the feasible mix closest to it, layer by layer
            share = self._n * int(round(self.target * SCALE))
            obj = np.abs(self._cost - share[:, None]).astype(np.float64) / self._n[:, None]
            arr, method = self._budget.solve(obj)
            if method == "lagrangian" and self._cost_arr(arr) != self.budget:
                arr = self._repair_arr(arr, np.random.default_rng(0), allow_dp=False)
            if arr is None:
                raise RayPressError(self._unreachable_msg())
        self._uniform_cache = arr
        return arr.copy()

    def uniform(self) -> dict[str, int]:
        """Every layer at the level whose value equals the target; if no single level does,
        the feasible mix closest to it (each layer at a ladder value next to the target).
        RayPressError if the budget cannot be hit exactly."""
        return self.array_to_config(self._uniform_arr())

    def reachable(self) -> bool:
        """Whether any feasible config exists (the budget's verdict)."""
        return self.verdict().ok

    # ------------------------------------------------------------------ level switches
    def _pair_order(self, S: int) -> np.ndarray:
        """Flat (a-1)*S+(b-1) indices of step pairs, smallest first: by max(a,b), a+b, a."""
        o = self._pair_orders.get(S)
        if o is None:
            pairs = [(a, b) for a in range(1, S + 1) for b in range(1, S + 1)]
            pairs.sort(key=lambda p: (max(p), p[0] + p[1], p[0]))
            o = np.array([(a - 1) * S + (b - 1) for a, b in pairs], dtype=np.int64)
            self._pair_orders[S] = o
        return o

    def _step_tables(self, arr: np.ndarray, S: int):
        """U[l,a-1]: cost increase of layer l going up a levels; D[l,b-1]: cost decrease going down b."""
        steps = np.arange(1, S + 1)
        K = self._cost.shape[1]
        cur = self._cost[self._rows, arr]
        up = arr[:, None] + steps
        up_ok = up < self._nl[:, None]
        U = self._cost[self._rows[:, None], np.minimum(up, K - 1)] - cur[:, None]
        dn = arr[:, None] - steps
        dn_ok = dn >= 0
        D = cur[:, None] - self._cost[self._rows[:, None], np.maximum(dn, 0)]
        return U, up_ok, D, dn_ok

    def _switch(self, arr: np.ndarray, rng: np.random.Generator, max_step: int = 4, three_way: float = 0.0) -> None:
        """One budget-preserving level switch, in place: layer i up a levels, layer j down b levels
        with exactly equal cost change; (a, b) the smallest pair ≤ max_step (a=b=1 for equal sizes).
        With probability `three_way`, first try i up/down a against two layers moving the other way."""
        L = len(self.layers)
        S = max(1, int(max_step))
        if L < 2:
            raise RayPressError("a level switch needs at least two layers; this space has one (nothing to search)")
        U, up_ok, D, dn_ok = self._step_tables(arr, S)
        if three_way > 0 and rng.random() < three_way and L >= 3:
            if self._three_way(arr, rng, U, up_ok, D, dn_ok):
                return
        order = self._pair_order(S)
        for i in rng.permutation(L):
            ok = up_ok[i]
            if not ok.any():
                continue
            m = (U[i][None, :, None] == D[:, None, :]) & ok[None, :, None] & dn_ok[:, None, :]
            m[i] = False
            flat = m.reshape(L, S * S)[:, order]
            js = np.flatnonzero(flat.any(axis=1))
            if js.size == 0:
                continue
            j = int(js[rng.integers(js.size)])
            p = int(order[np.argmax(flat[j])])
            a, b = p // S + 1, p % S + 1
            arr[i] += a
            arr[j] -= b
            return
        raise RayPressError(
            f"no budget-preserving level switch exists from this config (no two layers have equal cost "
            f"steps within max_step={S}, or all layers sit at the ends of their ladders); use a finer "
            "ladder or a larger max_step"
        )

    def _three_way(self, arr, rng, U, up_ok, D, dn_ok, tries: int = 8) -> bool:
        L, S = U.shape
        for _ in range(tries):
            up = rng.random() < 0.5  # the single layer goes up (partners down) or down (partners up)
            X, Xok, Y, Yok = (U, up_ok, D, dn_ok) if up else (D, dn_ok, U, up_ok)
            i = int(rng.integers(L))
            a_opts = np.flatnonzero(Xok[i])
            if a_opts.size == 0:
                continue
            a = int(a_opts[rng.integers(a_opts.size)])
            need = int(X[i, a])
            if need == 0:
                continue
            sgn = 1 if need > 0 else -1
            c1 = Yok & (Y * sgn > 0) & (Y * sgn < need * sgn)
            c1[i] = False
            idx = np.flatnonzero(c1.ravel())
            if idx.size == 0:
                continue
            for p in rng.permutation(idx)[:4]:
                j, b = divmod(int(p), S)
                rest = need - int(Y[j, b])
                c2 = Yok & (Y == rest)
                c2[i] = False
                c2[j] = False
                ms = np.flatnonzero(c2.any(axis=1))
                if ms.size == 0:
                    continue
                m = int(ms[rng.integers(ms.size)])
                c = int(np.argmax(c2[m]))
                s = 1 if up else -1
                arr[i] += s * (a + 1)
                arr[j] -= s * (b + 1)
                arr[m] -= s * (c + 1)
                return True
        return False

    def switch_(self, arr: np.ndarray, rng, max_step: int = 4, three_way: float = 0.0) -> None:
        """One budget-preserving level switch on a config array, in place (searchers' hot path);
        RayPressError when no switch exists from `arr`."""
        self._switch(arr, _as_rng(rng), max_step, three_way)

    def mutate(self, config, rng, n_switches: int = 1, max_step: int = 4, three_way: float = 0.0):
        """Apply `n_switches` budget-preserving level switches (returns a new config; the same
        form as given: dict or array). three_way: probability of a 1-vs-2 layer switch per step
        (lets budget flow between layer sizes that no (a, b) ≤ max_step pair can match)."""
        arr = self.config_to_array(config)
        rng = _as_rng(rng)
        for _ in range(int(n_switches)):
            self._switch(arr, rng, max_step, three_way)
        return self._out(arr, config)

    def random_feasible(self, rng, n_steps: int | None = None, max_step: int = 4,
                        three_way: float = 0.0, as_array: bool = False):
        """A random walk of `n_steps` level switches from uniform() (default 5 × n_layers)."""
        rng = _as_rng(rng)
        arr = self._uniform_arr()
        n = 5 * len(self.layers) if n_steps is None else int(n_steps)
        if len(self.layers) >= 2:
            for _ in range(n):
                try:
                    self._switch(arr, rng, max_step, three_way)
                except RayPressError:
                    break  # no move exists from here: the walk ends (still feasible)
        return arr if as_array else self.array_to_config(arr)

    # ------------------------------------------------------------------ repair
    def _greedy(self, arr: np.ndarray, rng: np.random.Generator) -> None:
        """Single-level moves, each the one whose cost change best matches the remaining gap
        (random among ties), while |gap| strictly shrinks. In place."""
        K = self._cost.shape[1]
        budget = self.budget
        for _ in range(int(self._nl.sum()) * 2 + 10):
            gap = budget - self._cost_arr(arr)
            if gap == 0:
                return
            cur = self._cost[self._rows, arr]
            up_ok = arr + 1 < self._nl
            dn_ok = arr >= 1
            du = self._cost[self._rows, np.minimum(arr + 1, K - 1)] - cur
            dd = self._cost[self._rows, np.maximum(arr - 1, 0)] - cur
            su = np.where(up_ok, np.abs(gap - du), np.iinfo(np.int64).max)
            sd = np.where(dn_ok, np.abs(gap - dd), np.iinfo(np.int64).max)
            score = np.concatenate([su, sd])
            m = score.min()
            if m >= abs(gap):
                return
            ties = np.flatnonzero(score == m)
            t = int(ties[rng.integers(ties.size)])
            L = len(arr)
            arr[t % L] += 1 if t < L else -1

    def _fixup(self, arr: np.ndarray, rng: np.random.Generator, max_step: int = 4) -> bool:
        """Close the remaining gap exactly with one or two layer moves of ≤ max_step levels. In place."""
        gap = self.budget - self._cost_arr(arr)
        if gap == 0:
            return True
        L = len(arr)
        U, up_ok, D, dn_ok = self._step_tables(arr, max_step)
        S = U.shape[1]
        # moves: (layer, signed steps, cost change)
        lay = np.concatenate([np.repeat(self._rows, S), np.repeat(self._rows, S)])
        st = np.concatenate([np.tile(np.arange(1, S + 1), L), -np.tile(np.arange(1, S + 1), L)])
        dc = np.concatenate([U.ravel(), -D.ravel()])
        ok = np.concatenate([up_ok.ravel(), dn_ok.ravel()])
        lay, st, dc = lay[ok], st[ok], dc[ok]
        single = np.flatnonzero(dc == gap)
        if single.size:
            best = single[np.abs(st[single]) == np.abs(st[single]).min()]
            p = int(best[rng.integers(best.size)])
            arr[lay[p]] += st[p]
            return True
        order = np.argsort(dc, kind="stable")
        sdc = dc[order]
        want = gap - dc
        lo = np.searchsorted(sdc, want, "left")
        hi = np.searchsorted(sdc, want, "right")
        counts = hi - lo
        total = int(counts.sum())
        if total == 0:
            return False
        P = np.repeat(np.arange(len(dc)), counts)
        first = np.cumsum(counts) - counts
        Q = order[lo[P] + (np.arange(total) - first[P])]
        keep = lay[P] != lay[Q]
        if not keep.any():
            return False
        P, Q = P[keep], Q[keep]
        size = np.abs(st[P]) + np.abs(st[Q])
        best = np.flatnonzero(size == size.min())
        t = int(best[rng.integers(best.size)])
        arr[lay[P[t]]] += st[P[t]]
        arr[lay[Q[t]]] += st[Q[t]]
        return True

    def _repair_arr(self, arr: np.ndarray, rng: np.random.Generator, allow_dp: bool = True) -> np.ndarray | None:
        arr = arr.copy()
        start = arr.copy()
        if self._cost_arr(arr) == self.budget:
            return arr
        self._greedy(arr, rng)
        if self._fixup(arr, rng):
            return arr
        # a couple of random nudges, then greedy + fix-up again
        for _ in range(3):
            k = int(rng.integers(len(arr)))
            arr[k] = int(rng.integers(self.n_levels[k]))
            self._greedy(arr, rng)
            if self._fixup(arr, rng):
                return arr
        if not allow_dp:
            return None
        # exact fallback: the feasible config with the fewest level steps away from the input
        obj = np.abs(np.arange(self._cost.shape[1])[None, :] - start[:, None]).astype(np.float64)
        obj = [o[:nl] for o, nl in zip(obj, self.n_levels)]
        res, method = self._budget.solve(obj)
        return res if res is not None and self._cost_arr(res) == self.budget else None

    def repair(self, config, rng=None):
        """Nearest feasible config: greedy single-level moves on the layers whose cost steps best
        match the gap, then an exact fix-up with one or two layer moves (exact DP as a last resort).
        Returns the same form as given. RayPressError if the budget is not reachable at all."""
        arr = self.config_to_array(config)
        rng = _as_rng(0 if rng is None else rng)
        res = self._repair_arr(arr, rng)
        if res is None:
            raise RayPressError(
                "cannot repair the config: " + self._unreachable_msg()
                if not self.reachable()
                else "cannot repair the config exactly (the exact solver's table is too large for this "
                "ladder/target); pick a target on the ladder grid or a coarser ladder"
            )
        return self._out(res, config)
