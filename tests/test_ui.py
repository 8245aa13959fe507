"""`raypress ui` in a real headless browser (Debian chromium): the experiment page and a run's
fitness-curve artifact page render the search a tiny EvoPress run logged.

RAYPRESS_SAVE_SCREENSHOTS=1 also copies the two screenshots to docs/img/ (used by the README).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from _tiny import tiny_llama

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from screenshots import WINDOW, dump_dom, screenshot, start_ui, stop_ui  # noqa: E402  (the README's screenshot tool)


@pytest.fixture(scope="session")
def chromium():
    """The chromium binary; installed with apt-get (Debian package `chromium`) only if missing."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe:
        return exe
    if not shutil.which("apt-get") or os.geteuid() != 0:
        pytest.skip("chromium is not installed and cannot be installed here (needs root + apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=True, capture_output=True, timeout=600)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], env=env, check=True, capture_output=True,
                       timeout=900)
    except (subprocess.SubprocessError, OSError) as e:
        pytest.skip(f"chromium missing and `apt-get install chromium` failed ({type(e).__name__}); install it to run "
                    "the browser test")
    exe = shutil.which("chromium")
    if not exe:
        pytest.skip("apt-get installed no chromium binary")
    return exe


def _get(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - localhost test server
        return r.read()


@pytest.fixture(scope="module")
def ui(tmp_path_factory, ray_session, wikitext_path):
    """A tiny EvoPress search logged to a fresh store, and `raypress ui` serving it on a free port."""
    from raypress.config import load_config
    from raypress.runner import run_search

    tmp = tmp_path_factory.mktemp("ui")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    cfg_args = [
        f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32",
        "data.n_eval=8", "searcher.generations=4", "searcher.offspring=4", "searcher.stages=[[128, 2], [256, 1]]",
        "searcher.monitor_every=2", "target=0.5", f"database.cache_dir={tmp / 'db'}", f"output={tmp / 'runs'}",
        f"tracking.uri={uri}", "tracking.experiment=raypress-ui-test",
    ]
    cfg = load_config(None, cfg_args)
    r = run_search(cfg)
    run_search(load_config(None, [*cfg_args, "searcher.name=uniform"]))  # a second row for the table
    proc, base, printed = start_ui(uri, tmp / "ui.log", tmp)
    port = int(base.rsplit(":", 1)[1])
    try:
        yield {"base": base, "port": port, "run": r, "proc": proc, "tmp": tmp, "printed": printed}
    finally:
        stop_ui(proc)


def _screenshot(chromium: str, url: str, out: Path, profile: Path) -> None:
    p = screenshot(chromium, url, out, profile)
    assert out.is_file(), f"no screenshot of {url}: rc {p.returncode}\n{p.stderr[-2000:]}"


def _dump_dom(chromium: str, url: str, profile: Path) -> str:
    p = dump_dom(chromium, url, profile)
    assert "<html" in p.stdout.lower(), f"no DOM from {url}: rc {p.returncode}\n{p.stderr[-2000:]}"
    return p.stdout


def _check_not_blank(png: Path) -> dict:
    import matplotlib.image as mpimg

    assert png.stat().st_size > 20_000, f"{png} is only {png.stat().st_size} bytes"
    img = mpimg.imread(png)[..., :3]
    q = (img * 31).round().astype(np.uint8).reshape(-1, 3)  # 5-bit colors: antialiasing noise folded
    colors = len(np.unique(q, axis=0))
    bg = np.bincount(np.ravel_multi_index(q.T, (32, 32, 32))).max() / len(q)
    assert img.shape[:2] == (WINDOW[1], WINDOW[0])
    assert colors > 40, f"{png}: only {colors} colors (blank page?)"
    assert bg < 0.97, f"{png}: {bg:.1%} of the pixels have the background color"
    return {"colors": colors, "background": bg, "bytes": png.stat().st_size}


def test_ui_is_local_only_and_serves_the_run(ui):
    import psutil

    listening = [c for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == ui["port"]]
    assert listening and {c.laddr.ip for c in listening} == {"127.0.0.1"}
    r = ui["run"]
    runs = _get(f"{ui['base']}/ajax-api/2.0/mlflow/runs/get?run_id={r.run_id}")
    assert r.run_name.encode() in runs and b"FINISHED" in runs
    png = _get(f"{ui['base']}/get-artifact?path=fitness_curve.png&run_uuid={r.run_id}")
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_experiment_and_artifact_pages_in_headless_chromium(ui, chromium, tmp_path):
    from mlflow.tracking import MlflowClient

    r = ui["run"]
    exp = MlflowClient(r.tracking_uri).get_run(r.run_id).info.experiment_id
    ml = "?workflowType=machine_learning"  # MLflow 3 opens on its GenAI (traces) view otherwise
    # `raypress ui` prints the runs table with RayPress's columns, one line per experiment
    table = re.search(r"raypress-ui-test: (http://\S+)", ui["printed"]).group(1)
    assert f"/#/experiments/{exp}/runs?viewStateShareKey=" in table
    dom = _dump_dom(chromium, table.replace("localhost", "127.0.0.1"), tmp_path / "profile-dom")
    for column in ("ppl_best", "ppl_uniform", "ppl_dense", "target", "evaluations_total", "wall_seconds"):
        assert f'col-id="metrics.`{column}`"' in dom, f"the runs table lacks the {column} column"
    assert "0.5 evopress llama sparsegpt" in dom and "0.5 uniform llama sparsegpt" in dom
    pages = {
        "mlflow_experiment.png": table.replace("localhost", "127.0.0.1"),
        "mlflow_fitness_curve.png":
            f"{ui['base']}/#/experiments/{exp}/runs/{r.run_id}/artifactPath/fitness_curve.png{ml}",
    }
    stats = {}
    for name, url in pages.items():
        t = time.time()
        _screenshot(chromium, url, tmp_path / name, tmp_path / f"profile-{name}")
        stats[name] = {**_check_not_blank(tmp_path / name), "seconds": round(time.time() - t, 1)}
    print(f"\nscreenshots: {stats}")
    if os.environ.get("RAYPRESS_SAVE_SCREENSHOTS") == "1":
        (ROOT / "docs" / "img").mkdir(parents=True, exist_ok=True)
        for name in pages:
            shutil.copy(tmp_path / name, ROOT / "docs" / "img" / name)
    else:  # for a look: pytest -s prints where they are
        print(f"screenshots in {tmp_path}")
