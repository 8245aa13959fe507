"""Optuna's NSGA-II sampler, picklable.

Optuna 5's NSGAIISampler holds a threading.Lock, which pickle refuses; Ray Tune pickles its search
algorithm (the Tuner's state file) before the first trial, so `searcher.name: nsga2` failed there.
This subclass pickles without its locks and gets fresh ones when unpickled (nothing is held across
a pickle: Tune pickles between suggestions).
"""
from __future__ import annotations

import threading

import optuna

_LOCK_TYPE = type(threading.Lock())


class PicklableNSGAIISampler(optuna.samplers.NSGAIISampler):
    def __getstate__(self):
        state = dict(vars(self))
        locks = sorted(k for k, v in state.items() if isinstance(v, _LOCK_TYPE))
        for k in locks:
            del state[k]
        state["_raypress_locks"] = locks
        return state

    def __setstate__(self, state):
        state = dict(state)
        locks = state.pop("_raypress_locks", [])
        self.__dict__.update(state)
        for k in locks:
            setattr(self, k, threading.Lock())
