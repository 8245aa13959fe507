"""Small JSON files written whole or not at all (resume state, result.json, a searcher's checkpoint, the
kept dense-model statistics). A leaf module: the search, the runner and calibration all write through it,
so it imports nothing of RayPress."""
from __future__ import annotations

import json
import os
from pathlib import Path


def atomic_write(path, obj, default=str) -> None:
    """`obj` as JSON at `path`, written beside it and renamed over it: a process killed mid-write leaves
    the old file or the new one, never half of one; the temp name holds the pid, so two processes
    writing the same file (two jobs keeping the same statistics) never share a temp file."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, default=default))
    os.replace(tmp, path)
