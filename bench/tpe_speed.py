"""Cost of Optuna TPE suggestions over a SmolLM2-sized space (210 layers x 10 levels), no model.

    python bench/tpe_speed.py [--trials 1400] [--every 200]

Prints seconds spent by the sampler (plus the budget decoder) for optuna's TPESampler and
RayPress's WindowedTPESampler (search/tpe.py) on the same synthetic objective, and the best value
each reached, so a change of window can be checked for both speed and search quality.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import optuna

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from raypress.search.optuna import FeasibleSpace  # noqa: E402
from raypress.search.tpe import WindowedTPESampler  # noqa: E402
from raypress.space import SearchSpace  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=1400)
    ap.add_argument("--every", type=int, default=200)
    ap.add_argument("--window", type=int, default=256)
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    L = 210  # SmolLM2-135M: 30 blocks x 7 linear layers
    space = SearchSpace.from_values([i / 10 for i in range(10)], 0.7, layers=[f"l{i}" for i in range(L)],
                                    n_params=[576 * 576] * 150 + [576 * 1536] * 60)
    fs = FeasibleSpace(space, n_tokens=512)
    w = np.abs(np.random.default_rng(0).normal(size=L))

    def objective(trial):  # a separable stand-in for KL: each layer prefers its own level
        cfg = fs(trial)
        return float(((np.array([cfg[name] for name in space.layers]) - 7) ** 2 * w).sum())

    samplers = {"optuna TPE": lambda: optuna.samplers.TPESampler(seed=0),
                f"windowed TPE ({args.window})": lambda: WindowedTPESampler(seed=0, max_above=args.window)}
    print(f"{'sampler':<22} {'trials':>6} {'seconds':>8} {'ms/trial (last block)':>22} {'best':>8}")
    for name, make in samplers.items():
        study = optuna.create_study(sampler=make())
        t0 = last = time.perf_counter()
        for n in range(1, args.trials + 1):
            study.optimize(objective, n_trials=1)
            if n % args.every == 0:
                now = time.perf_counter()
                print(f"{name:<22} {n:>6} {now - t0:>8.1f} {1000 * (now - last) / args.every:>22.0f} "
                      f"{study.best_value:>8.1f}", flush=True)
                last = now
    return 0


if __name__ == "__main__":
    sys.exit(main())
