"""Ctrl-C and SIGTERM stop a search resumable, never as if finished (raypress/interrupt.py).

A real `raypress search` process gets the signal after its first generation: it must exit 128 +
signal, print the resume command (one line, no C++ stack dump), write no result.json, leave its
MLflow run KILLED with the resume command, and leave no Ray process behind.
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

from _tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
GENERATIONS = 100  # far more than run before the signal lands: a finished search would pass as a stopped one


@pytest.mark.parametrize("signum,to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)],
                         ids=["ctrl-c-to-the-group", "sigterm-to-the-driver"])
def test_signal_stops_the_search_resumable(tmp_path, store_in_tmp, wikitext_path, signum, to_group):
    import psutil

    ov = [f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32",
          "data.n_eval=8", f"searcher.generations={GENERATIONS}", "searcher.offspring=4", "searcher.stages=[[128, 2], [256, 1]]",
          "target=0.5", f"database.cache_dir={tmp_path / 'db'}", f"output={tmp_path / 'out'}",
          f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd = [sys.executable, "-m", "raypress.cli", "search"] + [a for o in ov for a in ("--set", o)]
    # The state file is written after every trial here (by default at most once a second: a tiny model can
    # finish every generation between two writes, and the first state the test saw was the last one).
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_ADDRESS": "local", "TOKENIZERS_PARALLELISM": "false",
           "RAYPRESS_SAVE_EVERY_S": "0"}
    env.pop("MLFLOW_TRACKING_URI", None)
    err = open(tmp_path / "stderr.log", "w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=err, start_new_session=True)
    state = None
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            f = next((tmp_path / "out").glob("*/raypress_state.json"), None)
            st = json.loads(f.read_text()) if f else None
            if st and st.get("searcher") and st["searcher"]["history"]:
                state = st
                break
            time.sleep(0.2)
        assert state is not None, (tmp_path / "stderr.log").read_text()[-3000:]
        children = psutil.Process(proc.pid).children(recursive=True)
        (os.killpg if to_group else os.kill)(proc.pid, signum)
        rc = proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        err.close()
    text = (tmp_path / "stderr.log").read_text()
    out_dir = f.parent
    assert rc == 128 + signum, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"raypress: interrupted ({signal.Signals(signum).name})") and \
        f"raypress search --resume {out_dir}" in last
    assert "Traceback" not in text and "logging.cc" not in text and "SIGTERM received" not in text
    assert not (out_dir / "result.json").exists()
    assert len(json.loads((out_dir / "raypress_state.json").read_text())["searcher"]["history"]) < GENERATIONS
    run = MlflowClient(state["tracking_uri"]).get_run(state["run_id"])
    assert run.info.status == "KILLED" and f"--resume {out_dir}" in run.data.tags["raypress.error"]
    gone, alive = psutil.wait_procs([c for c in children if c.is_running()], timeout=30)
    assert not alive, [p.name() for p in alive]  # the driver's Ray went with it


@pytest.mark.parametrize("sampler", ["tpe", "cmaes", "nsga2"])  # EvoPress and random: tests/test_faults.py, test_evolution.py
def test_stop_then_resume_spends_the_budget_once_and_reproduces_the_run(tmp_path, ray_session, wikitext_path,
                                                                          sampler):
    """Every Optuna searcher: SIGINT after 3 of 8 trials, then --resume: 8 evaluations in all (not 3 + 8)
    and the same best config and fitness as the same search run without a stop."""
    from ray import tune

    from raypress.config import load_config
    from raypress.interrupt import Interrupted
    from raypress.runner import run_search

    def cfg(name):
        return load_config(None, [
            f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32",
            "data.n_eval=8", "searcher.stages=[[128, 2], [256, 1]]", f"searcher.name={sampler}",
            "searcher.samples=8", "searcher.seed=5", "target=0.5", "method=magnitude",
            f"database.cache_dir={tmp_path / 'db'}", f"output={tmp_path / name}",
            f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}"])

    reference = run_search(cfg("reference"))

    class StopAfter(tune.Callback):  # what Ctrl-C does, from inside the run: the signal to this process
        done = 0

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.done += 1
            if self.done == 3:
                os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted):
        run_search(cfg("stopped"), callbacks=[StopAfter()])
    out_dir = next((tmp_path / "stopped").iterdir())
    assert not (out_dir / "result.json").exists()
    resumed = run_search(cfg("stopped"), resume=out_dir)
    assert resumed.evaluations == reference.evaluations == 8
    assert resumed.best_config == reference.best_config
    assert resumed.best_fitness == pytest.approx(reference.best_fitness, rel=1e-6)


def test_the_state_file_keeps_the_last_scored_trial_at_most_every_second(tmp_path, monkeypatch):
    """tune_loop.state_saver: a snapshot after every scored trial, the file at most every SAVE_EVERY_S
    (a save cost ~5% of a SmolLM2 candidate), the last snapshot on write(); a trial that ends after a
    stop request (not scored) leaves the snapshot as it was."""
    from raypress import interrupt, tune_loop

    class Counting:  # stands for a searcher: its state is how many trials it has taken
        n = 0

        def get_state(self):
            return {"n": self.n}

    searcher, path = Counting(), tmp_path / "state.json"
    saver = tune_loop.state_saver(searcher, path, {"run_name": "r"})
    saved = lambda: json.loads(path.read_text())["searcher"]["n"]  # noqa: E731
    for n in (1, 2, 3):
        searcher.n = n
        saver.on_trial_complete(0, [], None)
    assert saved() == 1  # the first at once, the next two within the same second
    monkeypatch.setattr(interrupt, "_pending", interrupt.Interrupted())
    searcher.n = 4  # re-queued by a stop: not a scored trial
    saver.on_trial_complete(0, [], None)
    saver.write()
    assert saved() == 3
    monkeypatch.setattr(tune_loop, "SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(interrupt, "_pending", None)
    searcher.n = 5
    saver.on_trial_complete(0, [], None)
    assert saved() == 5
