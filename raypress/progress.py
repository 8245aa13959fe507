"""Progress of a long step: a tqdm bar on a terminal, periodic one-line reports anywhere else.

A tqdm bar redraws itself with carriage returns; in a log file (a `ray job`, nohup, CI) that is one
line of many kilobytes that says nothing until it ends. Off a terminal, `steps` instead logs one
line at most every EVERY_S seconds (and at the end) on the "raypress.progress" logger, which
`--quiet` silences like the search's own progress lines.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time

EVERY_S = 30.0
log = logging.getLogger("raypress.progress")


class _Lines:
    """The tqdm calls RayPress uses (update, set_postfix_str, close), as periodic log lines."""

    def __init__(self, total: int, desc: str, unit: str, every_s: float):
        self.total, self.desc, self.unit, self.every_s = total, desc, unit, every_s
        self.n, self.note, self.t0 = 0, "", time.monotonic()
        self.last = self.t0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.every_s:
            self._line(now)

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        self.note = s

    def close(self) -> None:
        self._line(time.monotonic(), final=True)

    def _line(self, now: float, final: bool = False) -> None:
        self.last = now
        el = now - self.t0
        eta = (self.total - self.n) * el / self.n if self.n and self.total > self.n and not final else 0.0
        log.info("  %s: %d/%d %s%s  %.0fs elapsed%s", self.desc, self.n, self.total, self.unit + "s",
                 f" ({self.note})" if self.note and not final else "", el, f"  ETA {eta:.0f}s" if eta else "")


class _Off:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix_str(self, s: str, refresh: bool = True) -> None:
        pass

    def close(self) -> None:
        pass


def steps(total: int, desc: str, unit: str, enabled: bool = True, every_s: float = EVERY_S):
    """A progress reporter for `total` steps: tqdm on a terminal, log lines otherwise, nothing when off."""
    if not enabled or not log.isEnabledFor(logging.INFO):  # --quiet, or a library caller without logging
        return _Off()
    if sys.stderr.isatty():
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit)
    return _Lines(total, desc, unit, every_s)


@contextlib.contextmanager
def library_bars_off_unless_terminal():
    """transformers' own tqdm bars (e.g. GGUF de-quantizing) ignore TQDM_DISABLE: off while stderr is a log."""
    from transformers.utils import logging as tf_logging

    was = tf_logging.is_progress_bar_enabled()
    if was and not sys.stderr.isatty():
        tf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            tf_logging.enable_progress_bar()
