"""The budget: the one place that turns level values into costs and decides whether a target is reachable.

Every layer (or sub-block) ``l`` has ``n_params[l]`` parameters and a ladder of level values
(sparsity, bits, removed fraction, 0/1 dropped). Costs are exact integers on a 1/SCALE grid::

    cost[l][k] = n_params[l] * round(value[l][k] * SCALE)
    budget     = round(target * SCALE * sum(n_params))

A config (one level per layer) is feasible iff its costs add up to the budget exactly. The budget
is rounded once over the total, so targets such as 4/30 of the blocks dropped are expressible.

`Budget.verdict()` is the only judge of a target: every searcher, schedule, the config check,
`raypress plan` and every error message ask it (and quote its `message` and `nearest` targets),
so no two parts of RayPress can disagree about a target. `Budget.solve(objective)` is the one
exact solver (a DP over reduced units, or a Lagrangian relaxation when the table would be too
large): uniform mixes, repairs and the DP / OWL / Hessian schedules all use it.

Reduced units: subtract each layer's cheapest level and divide everything by the gcd of what is
left. For transformer shapes and 0.1-step ladders the gcd is huge, so the exact reachable set (a
Python-int bitset over the reduced budget) is small (SmolLM2-135M: 210 layers x ~9k units).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import reduce

import numpy as np

from .errors import RayPressError

#: level values are compared on a 1/SCALE grid (0.001: 0.1% sparsity, 1/1000 bit)
SCALE = 1000
#: largest reachable-set bitset we build (bits); beyond it reachability is checked by range and gcd only
MAX_REACH_BITS = 2_000_000_000
#: largest exact DP table (layers x reduced budget cells); beyond it `solve` is Lagrangian
MAX_DP_CELLS = 50_000_000


def level_cost(n_params: int, value: float) -> int:
    """Exact integer cost of one layer at one level value."""
    return int(n_params) * int(round(float(value) * SCALE))


def exact_budget(target: float, total_params: int) -> int:
    """The integer budget of a target over `total_params` parameters (rounded once over the total)."""
    v = float(target) * SCALE * int(total_params)
    if not math.isfinite(v):  # a finite target too large for a float product (1e308): exact, then the verdict says no
        from fractions import Fraction

        return int(round(Fraction(float(target)) * SCALE * int(total_params)))
    return int(round(v))


def target_text(units: int, total_params: int) -> str:
    """The shortest decimal text of a target whose exact budget is `units` (so a printed hint is
    always accepted when typed back)."""
    exact = units / (SCALE * total_params)
    for digits in range(3, 18):
        s = f"{exact:.{digits}g}"
        if exact_budget(float(s), total_params) == units:
            return s
    return repr(exact)


def _fmt_ladder(values) -> str:
    return "[" + ", ".join(f"{v:g}" for v in values) + "]"


@dataclass(frozen=True)
class Verdict:
    """Whether a target can be hit exactly, and if not what to pick instead."""

    ok: bool
    message: str  # one line: what is wrong and how to fix it ("" when ok)
    budget: int  # the exact integer budget of the target
    nearest: tuple[str, ...] = ()  # reachable targets next to the requested one (as text)
    lo: float = 0.0  # the reachable range of targets
    hi: float = 0.0


class Budget:
    """Costs of every (layer, level) and the exact budget of one target.

    n_params: per layer (positive ints). level_values: per layer, a list of values. target: float.
    """

    def __init__(self, n_params, level_values, target: float, *, layer_names=None):
        self.n_params = [int(n) for n in n_params]
        self.level_values = [[float(v) for v in vals] for vals in level_values]
        self.target = float(target)
        self.layer_names = list(layer_names) if layer_names is not None else None
        self.total = int(sum(self.n_params))
        self.costs = [[level_cost(n, v) for v in vals] for n, vals in zip(self.n_params, self.level_values)]
        self.budget = exact_budget(self.target, self.total) if math.isfinite(self.target) else 0
        self.min_cost = sum(min(c) for c in self.costs)
        self.max_cost = sum(max(c) for c in self.costs)
        mins = [min(c) for c in self.costs]
        shifted = [[c - m for c in cs] for cs, m in zip(self.costs, mins)]
        self.offset = sum(mins)
        self.unit = reduce(math.gcd, (c for cs in shifted for c in cs), 0) or 1
        self.reduced = [np.asarray([c // self.unit for c in cs], dtype=np.int64) for cs in shifted]
        self.total_units = sum(int(r.max()) for r in self.reduced)
        self._reach: int | None | bool = False  # False: not computed yet; None: too big

    # ------------------------------------------------------------------ reachability
    def reach(self) -> int | None:
        """Bitset (Python int) of every reachable total in reduced units; None when too large."""
        if self._reach is False:
            if len(self.reduced) * (self.total_units + 1) > MAX_REACH_BITS:
                self._reach = None
            else:
                acc = 1
                for r in self.reduced:
                    nxt = 0
                    for c in set(int(x) for x in r):
                        nxt |= acc << c
                    acc = nxt
                self._reach = acc
        return self._reach

    def _reachable_units(self, units: int) -> bool | None:
        rest = units - self.offset
        if rest < 0 or rest > self.total_units * self.unit or rest % self.unit:
            return False
        bits = self.reach()
        if bits is None:
            return None  # range and gcd allow it; the exact set is too large to build
        return bool((bits >> (rest // self.unit)) & 1)

    def _neighbours(self, units: int) -> list[int]:
        """Reachable budgets (original units) just below and just above `units`."""
        bits = self.reach()
        out = []
        rest = units - self.offset
        if bits is None:
            g = self.unit
            below = self.offset + max(0, min(rest // g, self.total_units)) * g
            above = self.offset + min(self.total_units, max(0, -(-rest // g))) * g
            return sorted({below, above} - {units})
        r = rest // self.unit if rest >= 0 else -1
        if r >= 0:
            low = bits & ((1 << (min(r, self.total_units) + 1)) - 1)
            if low:
                b = low.bit_length() - 1
                if b != rest / self.unit:
                    out.append(self.offset + b * self.unit)
        hi_from = max(r + 1, 0)
        high = bits >> hi_from
        if high:
            out.append(self.offset + (hi_from + ((high & -high).bit_length() - 1)) * self.unit)
        return out

    def _ladder_text(self) -> str:
        first = self.level_values[0]
        if all(v == first for v in self.level_values):
            return _fmt_ladder(first)
        where = f" (layer '{self.layer_names[0]}'; ladders differ per layer)" if self.layer_names else \
            " (first layer; ladders differ per layer)"
        return _fmt_ladder(first) + where

    def verdict(self) -> Verdict:
        """The one judgement of this target: ok, or a one-line message with the nearest reachable targets."""
        lo, hi = self.min_cost / (SCALE * self.total), self.max_cost / (SCALE * self.total)
        t = self.target
        if not math.isfinite(t):
            return Verdict(False, f"target {t!r} is not a finite number; give e.g. 0.6 (sparsity) or 3.0 (bits)",
                           0, (), lo, hi)
        ok = self._reachable_units(self.budget)
        if ok or ok is None:
            return Verdict(True, "", self.budget, (), lo, hi)
        if self.budget < self.min_cost or self.budget > self.max_cost:
            nearest = (target_text(self.min_cost if self.budget < self.min_cost else self.max_cost, self.total),)
            msg = (f"target {t:g} is outside what levels {self._ladder_text()} can reach "
                   f"({target_text(self.min_cost, self.total)}..{target_text(self.max_cost, self.total)}); "
                   f"pick a target in that range")
        else:
            nearest = tuple(target_text(u, self.total) for u in self._neighbours(self.budget))
            msg = (f"target {t:g} is not reachable exactly with levels {self._ladder_text()} "
                   f"over {len(self.costs)} units; nearest reachable targets: {' or '.join(nearest)}")
        return Verdict(False, msg, self.budget, nearest, lo, hi)

    def require(self) -> None:
        """Raise the verdict's message when the target is not reachable."""
        v = self.verdict()
        if not v.ok:
            raise RayPressError(v.message)

    # ------------------------------------------------------------------ exact solver
    def solve(self, objective, *, max_cells: int = MAX_DP_CELLS) -> tuple[np.ndarray | None, str]:
        """argmin Σ_l objective[l][k_l] subject to Σ_l cost[l][k_l] == budget exactly.

        objective: per layer a sequence of per-level values (finite). Returns (levels, method) with
        method "dp" (exact), "lagrangian" (relaxation + greedy fix-up; may miss the budget: the
        caller repairs) or "unreachable" (levels None).
        """
        rest = self.budget - self.offset
        if rest < 0 or rest > self.total_units * self.unit or rest % self.unit:
            return None, "unreachable"
        B = rest // self.unit
        err = [np.asarray(e, dtype=np.float64).reshape(-1) for e in objective]
        width = min(B, self.total_units - B) + 1
        if len(err) * width <= max_cells:
            levels = _dp_exact(self.reduced, B, self.total_units, err)
            return levels, "dp" if levels is not None else "unreachable"
        return _lagrangian(self.reduced, B, err), "lagrangian"

    def cost_of(self, levels) -> int:
        return sum(self.costs[i][int(k)] for i, k in enumerate(levels))


def _dp_exact(costs: list[np.ndarray], B: int, S: int, err: list[np.ndarray]) -> np.ndarray | None:
    """Exact knapsack over reduced units; runs on the complement when the budget is past the middle
    (smaller table). Ties go to the lower level of each layer."""
    flip = B > S - B
    if flip:  # track the complement: Σ (max_l − c_l) == S − B
        costs = [c.max() - c for c in costs]
        W = S - B
    else:
        W = B
    L = len(costs)
    n_lv = max(len(c) for c in costs)
    choice = np.full((L, W + 1), -1, dtype=np.int8 if n_lv < 127 else np.int16)
    dp = np.full(W + 1, np.inf)
    dp[0] = 0.0
    for l in range(L):
        new = np.full(W + 1, np.inf)
        ch = choice[l]
        for k in range(len(costs[l])):
            c = int(costs[l][k])
            if c > W:
                continue
            cand = dp[: W + 1 - c] + err[l][k]
            tgt = new[c:]
            better = cand < tgt
            tgt[better] = cand[better]
            ch[c:][better] = k
        dp = new
    if not np.isfinite(dp[W]):
        return None
    levels = np.zeros(L, dtype=np.int64)
    b = W
    for l in range(L - 1, -1, -1):
        k = int(choice[l, b])
        levels[l] = k
        b -= int(costs[l][k])
    return levels


def _lagrangian(costs: list[np.ndarray], B: int, err: list[np.ndarray]) -> np.ndarray:
    """Bisection on the price of one cost unit (each layer picks argmin err − λ·cost), then a greedy
    move-by-move fix-up toward the budget that never overshoots."""
    L = len(err)
    K = max(len(e) for e in err)
    C = np.full((L, K), np.iinfo(np.int64).max // 4, dtype=np.int64)
    E = np.full((L, K), np.inf)
    for i, (c, e) in enumerate(zip(costs, err)):
        C[i, : len(c)] = c
        E[i, : len(e)] = e
    Cf = np.where(np.isfinite(E), C, 0).astype(np.float64)
    rows = np.arange(L)

    def pick(lam):
        obj = np.where(np.isfinite(E), E - lam * Cf, np.inf)
        best = obj.min(axis=1, keepdims=True)
        tie = np.where(obj <= best + 1e-15 * np.abs(best), Cf, np.inf)  # ties -> the cheaper level
        ks = tie.argmin(axis=1)
        return ks, int(C[rows, ks].sum())

    finite = E[np.isfinite(E)]
    scale = max(1e-12, float(finite.max() - finite.min())) + 1.0
    lo, hi = -scale, scale
    while pick(hi)[1] < B:
        hi *= 2
    while pick(lo)[1] > B:
        lo *= 2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if pick(mid)[1] >= B:
            hi = mid
        else:
            lo = mid
    ks, cost = pick(hi)
    for _ in range(20 * L + 100):
        gap = B - cost
        if gap == 0:
            break
        dc = C - C[rows, ks][:, None]
        ok = np.isfinite(E) & (dc != 0) & (np.sign(dc) == np.sign(gap)) & (np.abs(dc) <= abs(gap))
        if not ok.any():
            break
        score = np.where(ok, (E - E[rows, ks][:, None]) / np.maximum(np.abs(dc), 1), np.inf)
        i, k2 = np.unravel_index(int(np.argmin(score)), score.shape)
        cost += int(dc[i, k2])
        ks[i] = k2
    return ks.astype(np.int64)
