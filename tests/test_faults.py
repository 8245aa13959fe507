"""Fault tolerance on real parts: a SIGKILLed evaluator actor mid-search (its candidate is scored
again once Ray has restarted it), a SIGKILLed driver.

Both disturbed searches must reach the same best configuration (and fitness) as an undisturbed
search with the same seed: CPU evaluation is deterministic given the config and the tokens
(every actor runs the same model, the same `_rp_*` token batch, the same torch thread count), so
equality is exact.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from _actors import pool_members
from _tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
GENERATIONS = 3
PER_GENERATION = 5 + 2  # (parent + 4 offspring) at stage 0, 2 survivors at stage 1


def _overrides(root: Path, wikitext_path, name: str) -> list[str]:
    return [
        f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32",
        "data.n_eval=8", f"searcher.generations={GENERATIONS}", "searcher.offspring=4",
        "searcher.stages=[[128, 2], [256, 1]]", "searcher.seed=7", "target=0.5",
        f"database.cache_dir={root / 'db'}", f"output={root / name}",
        f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
    ]


def _cfg(root, wikitext_path, name):
    from raypress.config import load_config

    return load_config(None, _overrides(root, wikitext_path, name))


@pytest.fixture(scope="module")
def fault_root(tmp_path_factory):
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="module")
def reference(fault_root, ray_session, wikitext_path):
    """The undisturbed search (same seed) both fault tests compare against."""
    from raypress.runner import run_search

    t = time.time()
    r = run_search(_cfg(fault_root, wikitext_path, "reference"))
    r.wall = time.time() - t
    return r


def _evaluators() -> dict:
    """Live evaluator actors of this Ray: {actor id: GCS record}."""
    return pool_members(alive_only=True)


def _kill_evaluator_callback(after: int):
    """Tune callback: SIGKILLs the process of the search's evaluator actor, once, when `after` trials
    have completed (the next candidate meets a dead evaluator, or is on it when it dies)."""
    from ray import tune

    class KillOnce(tune.Callback):
        def __init__(self):
            self.completed, self.killed_pid, self.actor_id = 0, None, None

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.completed += 1
            if self.killed_pid is None and self.completed >= after:
                (self.actor_id, rec), = _evaluators().items()  # one evaluator on this CPU-only Ray
                os.kill(int(rec["Pid"]), signal.SIGKILL)
                self.killed_pid, self.killed_at = int(rec["Pid"]), self.completed

    return KillOnce()


def _assert_same_search(r, ref):
    assert r.best_config == ref.best_config
    assert r.best_fitness == ref.best_fitness  # bit-exact: deterministic CPU evaluation
    assert r.evaluations == ref.evaluations == GENERATIONS * PER_GENERATION
    assert [h["generation"] for h in r.history] == list(range(GENERATIONS))
    assert [h["best_fitness"] for h in r.history] == [h["best_fitness"] for h in ref.history]


def test_killed_evaluator_actor_is_retried_without_losing_a_generation(fault_root, reference, wikitext_path):
    import psutil

    from raypress.runner import run_search

    import ray._private.state as state

    kill = _kill_evaluator_callback(after=PER_GENERATION + 3)  # mid generation 1
    t = time.time()
    r = run_search(_cfg(fault_root, wikitext_path, "actor_kill"), callbacks=[kill])
    wall = time.time() - t
    assert kill.killed_pid is not None, "the evaluator actor was never killed"
    assert not psutil.pid_exists(kill.killed_pid) or psutil.Process(kill.killed_pid).status() == "zombie"
    # Ray restarted it (a new process loaded the model) and its candidate was scored again there
    assert state.actors(actor_id=kill.actor_id)["NumRestarts"] == 1
    _assert_same_search(r, reference)
    run = MlflowClient(r.tracking_uri).get_run(r.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["evaluations_total"] == GENERATIONS * PER_GENERATION
    print(f"\nevaluator kill: pid {kill.killed_pid} killed after {kill.killed_at} trials; best fitness "
          f"{r.best_fitness:.6g} (reference {reference.best_fitness:.6g}); {wall:.1f}s vs {reference.wall:.1f}s")


def _state(out_root: Path) -> dict | None:
    files = list(out_root.glob("*/raypress_state.json"))
    if not files:
        return None
    try:
        return json.loads(files[0].read_text())
    except ValueError:
        return None


def _kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL the driver's process group and every process it started (Ray's GCS, raylet, workers);
    returns the pids that were still alive."""
    import psutil

    try:
        tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = [proc.pid]
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)
    for pid in tree:  # Ray daemons may have left the group: end them by their id
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    gone, alive = psutil.wait_procs([p for p in map(_proc, tree) if p is not None], timeout=20)
    return [p.pid for p in alive]


def _proc(pid):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def test_killed_driver_resumes_to_the_same_best_config(fault_root, reference, wikitext_path, capsys):
    from raypress.cli import main
    from raypress.tracking import reap_dead_runs

    out_root = fault_root / "driver_kill"
    # the state after every trial (not every second): the kill lands after the first generation of a
    # search that takes about a second
    env = {**os.environ, "RAY_ADDRESS": "local", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false",
           "RAYPRESS_SAVE_EVERY_S": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, "-m", "raypress.cli", "search"]
    for o in _overrides(fault_root, wikitext_path, "driver_kill"):
        cmd += ["--set", o]
    log = open(fault_root / "driver.log", "w")
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=fault_root, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)  # own process group: its Ray goes with it
    killed_at = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            st = _state(out_root)
            if st and st.get("searcher") and len(st["searcher"]["history"]) >= 1:
                killed_at = st["searcher"]
                break
            time.sleep(0.1)
    finally:
        leftovers = _kill_tree(proc)
        log.close()
    assert killed_at is not None, (fault_root / "driver.log").read_text()[-3000:]
    assert leftovers == []
    gens_done, evals_done = len(killed_at["history"]), killed_at["evaluations"]
    assert gens_done < GENERATIONS, "the search finished before the driver could be killed"

    st = _state(out_root)
    out_dir = next(out_root.glob("*/raypress_state.json")).parent
    client = MlflowClient(st["tracking_uri"])
    assert client.get_run(st["run_id"]).info.status == "RUNNING"  # what the SIGKILL left behind
    exp_id = client.get_run(st["run_id"]).info.experiment_id
    assert reap_dead_runs(client, exp_id) == [st["run_id"]]  # any later search marks it KILLED
    killed = client.get_run(st["run_id"])
    assert killed.info.status == "KILLED" and "--resume" in killed.data.tags["raypress.error"]

    t1 = time.time()
    assert main(["search", "--resume", str(out_dir)]) == 0
    resume_s = time.time() - t1
    out = capsys.readouterr().out
    res = json.loads((out_dir / "result.json").read_text())
    assert res["run_id"] == st["run_id"] and "held-out perplexity" in out

    class R:  # the fields _assert_same_search reads
        best_config, best_fitness = res["best_config"], res["best_fitness"]
        evaluations, history = res["evaluations"], res["history"]

    _assert_same_search(R, reference)
    run = client.get_run(st["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["raypress.resumes"] == "1" and "raypress.error" not in run.data.tags
    steps = {m.step for m in client.get_metric_history(st["run_id"], "gen_best_kl")}
    assert steps == set(range(GENERATIONS))
    print(f"\ndriver kill: SIGKILL after {gens_done} generation(s) / {evals_done} evaluations "
          f"({t1 - t0:.1f}s incl. the kill); resume {resume_s:.1f}s; best fitness {res['best_fitness']:.6g} "
          f"(reference {reference.best_fitness:.6g}), same best config")


def test_stale_running_runs_are_reaped_and_live_ones_protected(tmp_path):
    """A RUNNING run whose driver process is gone is marked KILLED (with how to resume); a resume of a
    run whose driver still lives is refused."""
    import socket

    from raypress.errors import RayPressError
    from raypress.tracking import DRIVER_TAG, Tracker, reap_dead_runs

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    live = Tracker(uri, "exp", "live")  # this process: alive
    dead = Tracker(uri, "exp", "dead")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()  # a pid whose process has exited
    dead.client.set_tag(dead.run_id, DRIVER_TAG, f"{socket.gethostname()}:{p.pid}:0")
    dead.client.set_tag(dead.run_id, "raypress.output_dir", "/runs/x")
    assert reap_dead_runs(live.client, live.experiment_id) == [dead.run_id]
    run = live.client.get_run(dead.run_id)
    assert run.info.status == "KILLED" and "raypress search --resume /runs/x" in run.data.tags["raypress.error"]
    assert live.client.get_run(live.run_id).info.status == "RUNNING"
    with pytest.raises(RayPressError, match="still running"):
        Tracker(uri, "exp", "live", run_id=live.run_id)
    again = Tracker(uri, "exp", "dead", run_id=dead.run_id)  # resuming the dead one is fine
    assert again.client.get_run(dead.run_id).data.tags["raypress.resumed_from"] == "KILLED"
    again.finish()
    live.finish()
