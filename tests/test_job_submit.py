"""`ray job submit -- python jobs/prune_opt66b.py` against a real local head node (token auth).

A second Ray cluster on its own ports, started with `ray start --head --block` in a subprocess so
that ending that process stops this cluster only (`ray stop` would also end the session's Ray).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def _free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def head(tmp_path):
    gcs, dash, agent, client = _free_ports(4)
    # `python` in the job's entrypoint is the one on the head's PATH: this venv's
    env = {**os.environ, "RAY_AUTH_MODE": "token", "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    # the job must pick its own store ($RAYPRESS_HOME); mlflow.set_tracking_uri in earlier tests
    # leaves MLFLOW_TRACKING_URI in this process's environment
    for k in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    log = open(tmp_path / "head.log", "w")
    proc = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(gcs),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--dashboard-agent-listen-port", str(agent),
         "--ray-client-server-port", str(client), "--include-dashboard", "true", "--num-cpus", "2",
         "--disable-usage-stats"], env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    import urllib.error
    import urllib.request

    while True:  # the dashboard answers (401 without the token: it is up and requires auth)
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2).read()
            break
        except urllib.error.HTTPError:
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"ray head did not start: {(tmp_path / 'head.log').read_text()[-2000:]}")
            time.sleep(1)
    yield url, env
    os.killpg(proc.pid, signal.SIGTERM)  # --block: the CLI stops the processes it started
    try:  # its graceful stop takes ~30 s; the job has finished, so the rest of the group is killed after 8
        proc.wait(8)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
    log.close()


def test_ray_job_submit_prune_opt66b_small_override(head, tmp_path, wikitext_path):
    url, env = head
    home = tmp_path / "home"
    runtime_env = json.dumps({"env_vars": {"RAYPRESS_HOME": str(home), "RAYPRESS_CACHE": str(tmp_path / "cache")}})
    cmd = [RAY, "job", "submit", "--address", url, "--working-dir", str(ROOT), "--runtime-env-json", runtime_env,
           "--", "python", "jobs/prune_opt66b.py", "--local", "--set", f"model={tiny_llama()}",
           "--set", f"data.source=text:{wikitext_path}", "--set", "data.seq_len=64", "--set", "data.n_calib=16",
           "--set", "data.n_eval=4", "--set", "searcher.generations=2", "--set", "searcher.offspring=3",
           "--set", "searcher.stages=[[64, 2], [128, 1]]"]
    deadline = time.time() + 90
    while True:  # "No available agent" for a few seconds after the API is up
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in out.stderr + out.stdout or time.time() > deadline:
            break
        time.sleep(3)
    text = out.stdout + out.stderr
    assert out.returncode == 0 and "succeeded" in text, text[-3000:]

    # the MLflow store outlives the job's temporary working dir: one parent, three finished children
    c = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = c.get_experiment_by_name("raypress-opt66b")
    runs = c.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.info.run_name.startswith("compare ")]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    names = sorted(r.data.tags["raypress.searcher"] for r in children)
    assert names == ["evopress", "hessian", "tpe"]
    assert all(r.info.run_name.startswith(f"0.7 {r.data.tags['raypress.searcher']} ") for r in children)
    for r in children:
        assert r.info.status == "FINISHED" and r.data.params["target"] == "0.7"
        assert r.data.metrics["mean_value_best"] == pytest.approx(0.7, abs=1e-9)
        assert {"ppl_best", "ppl_uniform", "ppl_dense"} <= set(r.data.metrics)
    assert {a.path for a in c.list_artifacts(parents[0].info.run_id)} >= {"comparison.json", "comparison.txt"}
    assert list((home / "runs").glob("*-evopress-*/result.json"))


def test_opt66b_search_space_is_valid_and_cluster_sized():
    from raypress.config import load_config

    cfg = load_config(ROOT / "search_spaces/opt66b_sparsity.yaml")
    assert cfg.model == "facebook/opt-66b" and cfg.target == 0.7 and cfg.evaluator.mode == "device_map"
    assert cfg.levels[0] < cfg.target < cfg.levels[-1]
    # --local's overrides make the same file a SmolLM2 search
    sys.path.insert(0, str(ROOT / "jobs"))
    from prune_opt66b import LOCAL

    small = load_config(ROOT / "search_spaces/opt66b_sparsity.yaml", LOCAL)
    assert small.model == "smollm2-135m" and small.evaluator.mode == "resident" and small.target == 0.7
