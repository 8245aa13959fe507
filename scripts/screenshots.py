"""README screenshots from a real browser: the runs table and a run's fitness curve, as `raypress ui` serves them.

    .venv/bin/python scripts/screenshots.py [--uri sqlite:///mlflow.db] [--experiment raypress] [--out docs/img]

Starts `raypress ui` on a free port, opens the runs-table URL it prints (RayPress's columns) and the
newest finished run's fitness_curve.png artifact page in headless chromium (Debian package
`chromium`), and writes mlflow_experiment.png and mlflow_fitness_curve.png. tests/test_ui.py uses the
same browser helpers.
"""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WINDOW = (1800, 950)
_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync",
          "--disable-dev-shm-usage", "--virtual-time-budget=10000", "--hide-scrollbars"]


def screenshot(chromium: str, url: str, out: Path, profile: Path, window=WINDOW) -> subprocess.CompletedProcess:
    cmd = [chromium, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
           f"--screenshot={out}", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=150, start_new_session=True)


def dump_dom(chromium: str, url: str, profile: Path, width: int = 3000) -> subprocess.CompletedProcess:
    """The rendered page (wide: the runs grid renders only the columns that fit the window)."""
    cmd = [chromium, *_FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{WINDOW[1]}", "--dump-dom", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=150, start_new_session=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ui(uri: str, log_path: Path, cwd: Path, timeout: float = 120.0):
    """`raypress ui` on a free port: (process, base URL, what it printed once the page answers)."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "-m", "raypress.cli", "ui", "--uri", uri, "--port", str(port)],
                            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(base + "/", timeout=5) as r:  # noqa: S310 - localhost
                if b"<html" in r.read().lower():
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            stop_ui(proc)
            raise RuntimeError(f"`raypress ui` did not come up: {log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    return proc, base, log_path.read_text()


def stop_ui(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)


def main(argv=None) -> int:
    import shutil
    import tempfile

    from mlflow.tracking import MlflowClient

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--uri", default="sqlite:///mlflow.db")
    p.add_argument("--experiment", default="raypress")
    p.add_argument("--out", default=str(ROOT / "docs" / "img"))
    args = p.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not chromium:
        sys.exit("screenshots: no chromium on PATH (Debian: apt-get install chromium)")
    exp = MlflowClient(args.uri).get_experiment_by_name(args.experiment)
    if exp is None:
        sys.exit(f"screenshots: no experiment {args.experiment!r} in {args.uri}")
    runs = MlflowClient(args.uri).search_runs([exp.experiment_id], "attributes.status = 'FINISHED'",
                                              order_by=["attributes.start_time DESC"])
    run = next((r for r in runs if r.data.metrics.get("evaluations_total")), None)
    if run is None:
        sys.exit(f"screenshots: no finished search in {args.experiment!r}")
    tmp = Path(tempfile.mkdtemp(prefix="raypress-shots-"))
    proc, base, printed = start_ui(args.uri, tmp / "ui.log", Path.cwd())
    try:
        table = re.search(rf"{re.escape(args.experiment)}: (http://\S+)", printed).group(1)
        pages = {"mlflow_experiment.png": table.replace("localhost", "127.0.0.1"),
                 "mlflow_fitness_curve.png": f"{base}/#/experiments/{exp.experiment_id}/runs/{run.info.run_id}"
                                             f"/artifactPath/fitness_curve.png?workflowType=machine_learning"}
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, url in pages.items():
            screenshot(chromium, url, out / name, tmp / f"profile-{name}")
            print(f"{out / name}  <- {url}")
    finally:
        stop_ui(proc)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
