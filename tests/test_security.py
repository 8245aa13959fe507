"""Security defaults: services bound to localhost, no unpickling of untrusted data."""
from __future__ import annotations

import ast
import os
import pickle
from pathlib import Path

import pytest

from raypress.errors import RayPressError

PKG = Path(__file__).resolve().parents[1] / "raypress"
PICKLERS = {"pickle", "cPickle", "cloudpickle", "dill", "joblib", "marshal", "shelve"}


def _calls():
    """(file, line, dotted callee, {keyword: constant value}) of every call in raypress/ (AST: docstrings
    and comments that merely mention a function do not count)."""
    for f in sorted(PKG.rglob("*.py")):
        tree = ast.parse(f.read_text(encoding="utf-8"), str(f))
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            parts, fn = [], node.func
            while isinstance(fn, ast.Attribute):
                parts.append(fn.attr)
                fn = fn.value
            if isinstance(fn, ast.Name):
                parts.append(fn.id)
            kws = {k.arg: getattr(k.value, "value", "<expr>") for k in node.keywords if k.arg}
            yield f.relative_to(PKG.parent), node.lineno, ".".join(reversed(parts)), kws


def test_no_torch_load_without_weights_only():
    bad = [f"{f}:{n}" for f, n, name, kw in _calls()
           if name.endswith("torch.load") and kw.get("weights_only") is not True]
    assert not bad, f"torch.load without weights_only=True: {bad}"


def test_no_unrestricted_unpickling():
    bad = []
    for f, n, name, kw in _calls():
        head, _, last = name.rpartition(".")
        why = None
        if head.split(".")[-1] in PICKLERS and last in ("load", "loads", "open"):
            why = "pickle-style load (use safetensors / JSON, or raypress.safe_pickle.safe_loads)"
        elif last == "Unpickler" and f.name != "safe_pickle.py":
            why = "raw Unpickler"
        elif name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            why = "yaml.load (use yaml.safe_load)"
        elif kw.get("allow_pickle") is True:
            why = "allow_pickle=True"
        elif kw.get("trust_remote_code") is True:
            why = "trust_remote_code=True"
        if why:
            bad.append(f"{f}:{n}: {name}: {why}")
    assert not bad, "\n".join(bad)


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_safe_loads_refuses_code_execution(tmp_path):
    import numpy as np

    from raypress.safe_pickle import safe_loads

    marker = tmp_path / "pwned"
    with pytest.raises(RayPressError, match="refusing to unpickle .*system"):
        safe_loads(pickle.dumps({"ok": np.arange(3), "x": _Evil(marker)}), ("optuna.samplers",), "test data")
    assert not marker.exists()
    ok = safe_loads(pickle.dumps({"a": np.arange(3, dtype=np.float16), "g": np.random.default_rng(1)}, protocol=5))
    assert ok["a"].tolist() == [0, 1, 2]


def test_optuna_state_with_a_malicious_sampler_is_refused(tmp_path):
    import base64

    from raypress.search.optuna import make_optuna_searcher
    from raypress.space import SearchSpace

    space = SearchSpace.from_values([0.0, 0.5, 1.0], 0.5, layers=["a", "b", "c"], n_params=[1, 1, 1])
    s = make_optuna_searcher(space, sampler="tpe", seed=0, n_tokens=64)
    state = s.get_state()
    assert state["sampler"]  # a real state round-trips through the allow-list
    make_optuna_searcher(space, sampler="tpe", seed=0, n_tokens=64, state=state)
    marker = tmp_path / "pwned"
    state["sampler"] = base64.b64encode(pickle.dumps(_Evil(marker))).decode()
    with pytest.raises(RayPressError, match="refusing to unpickle"):
        make_optuna_searcher(space, sampler="tpe", seed=0, n_tokens=64, state=state)
    assert not marker.exists()


_PROBE = """
import json, os, stat, psutil
from raypress.ray_env import ensure_ray, shutdown_own_ray
ray = ensure_ray(None)
ray.get(ray.remote(lambda: 1).remote())  # a worker too
def listening(p):  # a short-lived helper process may exit between the listing and this look
    try:
        return [(p.name(), c.laddr.ip) for c in p.net_connections(kind="inet") if c.status == psutil.CONN_LISTEN]
    except psutil.NoSuchProcess:
        return []
procs = [psutil.Process()] + psutil.Process().children(recursive=True)
listen = sorted({x for p in procs for x in listening(p)})
session = ray._private.worker._global_node.get_session_dir_path()
top = os.path.dirname(os.path.dirname(session))  # Ray makes its own temp folder 0777: ours is above
print(json.dumps({"listen": listen, "session": session, "top_mode": stat.S_IMODE(os.stat(top).st_mode)}))
shutdown_own_ray()
"""


def test_embedded_ray_listens_on_loopback_only_and_removes_its_session_folder():
    """A real embedded Ray (as `raypress search` starts it): every listening socket of its processes
    (GCS, raylet, agents, workers, the driver) is on the loopback interface; its session folder sits in
    a private (0700) folder that is gone after shutdown."""
    import json
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=180, env=env,
                         cwd=PKG.parent)
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(got["listen"]) >= 4, got  # GCS, raylet, agents at least: the probe saw Ray's sockets
    exposed = [(name, ip) for name, ip in got["listen"] if ip not in ("127.0.0.1", "::1", "::ffff:127.0.0.1")]
    assert not exposed, f"listening beyond loopback: {exposed}"
    assert got["top_mode"] == 0o700, oct(got["top_mode"])
    assert not Path(got["session"]).exists() and not Path(got["session"]).parent.parent.exists()


def test_ui_binds_localhost_by_default(monkeypatch, tmp_path):
    import subprocess

    from raypress.cli import main

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).search_experiments()  # creates the store
    seen = []
    monkeypatch.setattr(subprocess, "call", lambda cmd, **kw: seen.append(cmd) or 0)
    assert main(["ui", "--uri", uri, "--port", "0"]) == 0
    cmd = seen[0]
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
