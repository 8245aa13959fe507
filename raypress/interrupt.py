"""Stopping a search on Ctrl-C (SIGINT) or SIGTERM: it ends resumable, never as if finished.

Left alone, Ray Tune catches SIGINT and returns from `Tuner.fit()` as if the search were done (the
runner would then write result.json from a partial history and mark the MLflow run FINISHED), and
`ray.init` turns SIGTERM -- what schedulers and `ray job stop` send -- into `sys.exit` in whatever
the driver was doing (a C++ stack dump, exit 134). Inside `interruptible()` both signals raise
`Interrupted` in the main thread instead: the state file (the searcher after its last scored trial)
stays the resume point, `tracking.tracked` marks the run KILLED, and the CLI prints the resume command
and exits 128 + the signal number (130 for Ctrl-C, 143 for SIGTERM).

While Ray Tune runs (`graceful()`), the first signal only *requests* the stop: Tune's stopper ends
every trial (their actors are released, nothing is left running on a shared cluster), the state
file is no longer rewritten (a trial cut short must not count as evaluated, or the resumed search
would differ from an uninterrupted one), and `Interrupted` is raised when `fit()` returns. A second
signal raises at once.
"""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager


class Interrupted(KeyboardInterrupt):
    """The search was stopped by a signal; `resume_dir` is the folder `--resume` continues."""

    def __init__(self, signum: int = signal.SIGINT, resume_dir: str | None = None):
        super().__init__(signum)
        self.signum = int(signum)
        self.resume_dir = resume_dir

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signum).name


_graceful = False
_pending: Interrupted | None = None


def pending() -> Interrupted | None:
    """The stop requested during `graceful()`, if any."""
    return _pending


@contextmanager
def graceful():
    """While Ray Tune runs: a first signal requests the stop (see the module docstring)."""
    global _graceful, _pending
    _graceful, _pending = True, None
    try:
        yield
        if _pending is not None:
            raise _pending
    finally:
        _graceful, _pending = False, None


@contextmanager
def interruptible():
    """SIGINT and SIGTERM raise Interrupted in the main thread while the block runs. Call it after
    ray.init (which installs its own SIGTERM handler). Off the main thread: no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"  # read by Tune when fit() starts

    def handler(signum, frame):
        global _pending
        if _graceful and _pending is None:
            _pending = Interrupted(signum)
            import logging

            logging.getLogger("raypress").warning(
                "%s: stopping the search's trials (send it again to stop at once)", _pending.signal_name)
            return
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def resumable(resume_dir, on_stop=None):
    """`interruptible()`, and any stop of the block re-raised as an Interrupted that names `resume_dir`
    (a plain Ctrl-C counts as SIGINT), after `on_stop(stop)` (e.g. noting it on the MLflow run)."""
    with interruptible():
        try:
            yield
        except KeyboardInterrupt as e:
            stop = Interrupted(e.signum if isinstance(e, Interrupted) else signal.SIGINT, str(resume_dir))
            if on_stop is not None:
                on_stop(stop)
            raise stop from None
