"""Cost of saving an Optuna searcher's resume state (tune_loop.state_saver does it after every trial).

    python bench/optuna_state.py [--trials 1400] [--every 200] [--sampler random]

SmolLM2-sized space (210 layers x 10 levels). At every checkpoint prints the milliseconds one
state save takes (get_state + JSON) as the runner does it now (rows of finished trials reused)
and with every row rebuilt (what it cost before the row cache: it grows with the trial count,
so a long TPE search spent minutes here). The sampler only fills the study: "random" is fast
and gives trials of the same shape as TPE's.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypress.search.optuna import make_optuna_searcher  # noqa: E402
from raypress.space import SearchSpace  # noqa: E402


def _save_ms(searcher, fresh: bool, reps: int = 3) -> float:
    best = float("inf")
    for _ in range(reps):
        if fresh:
            searcher._state_rows.clear()
        t = time.perf_counter()
        json.dumps(searcher.get_state())
        best = min(best, time.perf_counter() - t)
    return 1000 * best


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1400)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--sampler", default="random")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    L = 210  # SmolLM2-135M: 30 blocks x 7 linear layers
    space = SearchSpace.from_values([i / 10 for i in range(10)], 0.7, layers=[f"l{i}" for i in range(L)],
                                    n_params=[576 * 576] * 150 + [576 * 1536] * 60)
    s = make_optuna_searcher(space, sampler=args.sampler, seed=0, n_tokens=512)
    w = np.abs(np.random.default_rng(0).normal(size=L))
    print(f"{'trials':>6} {'save ms (reused rows)':>22} {'save ms (all rebuilt)':>22} {'state MiB':>10}")
    for n in range(1, args.trials + 1):
        c = s.suggest(f"t{n}")
        fit = float(((np.array([c[name] for name in space.layers]) - 7) ** 2 * w).sum())
        s.on_trial_complete(f"t{n}", {"fitness": fit, "tokens": 512})
        s.get_state()  # as the runner: after every trial
        if n % args.every == 0:
            size = len(json.dumps(s.get_state())) / 2**20
            print(f"{n:>6} {_save_ms(s, False):>22.1f} {_save_ms(s, True):>22.1f} {size:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
