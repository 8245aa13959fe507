"""The bad-input catalogue: every user mistake is one line `raypress: error: <what>; <fix>`, exit 2,
and leaves no half-written level database and no RUNNING MLflow run behind.

Most cases run the real CLI in-process (`raypress.cli.main`, the session's local Ray); the two that
need a fresh Ray (unreachable ray_address, GPU out of memory inside an evaluator actor) run
`python -m ...` in a subprocess. `CATALOGUE` collects every message; the last test writes it to
docs/bad_inputs.md (the table in the issue's closing note).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _tiny import tiny_gpt2, tiny_llama

ROOT = Path(__file__).resolve().parents[1]
CATALOGUE: dict[str, tuple[str, str, float]] = {}  # case -> (input, message, seconds)


def _base(tmp: Path, wikitext_path, **extra) -> list[str]:
    kv = {
        "model": tiny_llama(), "data.source": f"text:{wikitext_path}", "data.seq_len": 64, "data.n_calib": 32,
        "data.n_eval": 8, "searcher.generations": 1, "searcher.offspring": 2, "searcher.stages": "[[128, 1]]",
        "target": 0.5, "database.cache_dir": tmp / "db", "output": tmp / "runs",
        "tracking.uri": f"sqlite:///{tmp / 'mlflow.db'}",
    }
    kv.update(extra)
    out = []
    for k, v in kv.items():
        out += ["--set", f"{k}={v}"]
    return out


def _check_leftovers(tmp: Path, uri: str | None = None) -> None:
    """No half-written database (temp build folders) and no RUNNING MLflow run."""
    db = tmp / "db"
    if db.exists():
        for d in db.iterdir():
            assert not d.name.startswith(".tmp-"), f"half-written database {d}"
            if d.is_dir():
                assert (d / "meta.json").is_file(), f"database folder without meta.json: {d}"
    uri = uri or f"sqlite:///{tmp / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and Path(uri[len("sqlite:///"):]).is_file():
        from mlflow.tracking import MlflowClient

        c = MlflowClient(uri)
        exps = [e.experiment_id for e in c.search_experiments()]
        running = c.search_runs(exps, filter_string="attributes.status = 'RUNNING'") if exps else []
        assert not running, f"RUNNING MLflow run left behind: {[r.info.run_id for r in running]}"


def _one_line(err: str) -> str:
    lines = [l for l in err.strip().splitlines() if l.strip()]
    assert len(lines) == 1, f"expected one stderr line, got:\n{err}"
    assert lines[0].startswith("raypress: error: "), lines[0]
    return lines[0]


def _cli(capsys, argv) -> str:
    from raypress.cli import main

    capsys.readouterr()
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    assert rc == 2, f"exit {rc}\nstdout: {cap.out[-2000:]}\nstderr: {cap.err[-2000:]}"
    assert "Traceback" not in cap.err
    return _one_line(cap.err)


def _record(case: str, what: str, line: str, needle: str, t0: float) -> None:
    assert needle in line, f"{needle!r} not in {line!r}"
    msg = re.sub(r"/tmp/pytest-of-[^/]+/pytest-\d+/[^/ ']+", "<tmp>", line[len("raypress: error: "):])
    CATALOGUE[case] = (what, re.sub(r"\b[0-9a-f]{64}\b", "<key>", msg), time.time() - t0)


# ------------------------------------------------------------------ config / CLI (no model needed)
CONFIG_CASES = [
    # case, yaml text or None, --set overrides, what, needle
    ("malformed YAML", "model: [unclosed\n", [], "YAML with a syntax error", "is not valid YAML at line"),
    ("unknown key", "modle: smollm2-135m\n", [], "`modle:` (typo)", "unknown config key 'modle'"),
    ("unknown nested key", "searcher:\n  generatons: 3\n", [], "`searcher.generatons` (typo)",
     "unknown config key 'searcher.generatons'"),
    ("YAML not a mapping", "- a\n- list\n", [], "a YAML list instead of a mapping", "must be a YAML mapping"),
    ("wrong type", None, ["target=high"], "--set target=high", "config key 'target'"),
    ("wrong type (section)", "data: 5\n", [], "`data: 5`", "must be a mapping"),
    ("unknown family", None, ["family=pruning"], "--set family=pruning", "unknown family 'pruning'"),
    ("unknown searcher", None, ["searcher.name=annealing"], "--set searcher.name=annealing",
     "unknown searcher 'annealing'"),
    ("unknown warm start", None, ["searcher.init=best"], "--set searcher.init=best",
     "unknown searcher.init 'best'"),
    ("warm start listed twice", None, ["searcher.init=[dp, dp]"], "--set 'searcher.init=[dp, dp]'",
     "give one schedule or a list of distinct ones"),
    ("several starts for random search", None, ["searcher.name=random", "searcher.init=[uniform, dp]"],
     "--set searcher.name=random --set 'searcher.init=[uniform, dp]'", "random takes at most one; give one schedule or use one of evopress, pareto, tpe"),
    ("bad override syntax", None, ["searcher.generations"], "--set searcher.generations (no =)",
     "must look like key.sub=value"),
    ("bad stages", None, ["searcher.stages=[[512, 4], [2048, 2]]"], "last stage keeps 2 survivors",
     "exactly 1 survivor"),
    ("stage larger than calibration set", None, ["searcher.stages=[[100000, 1]]"],
     "a stage of 100000 tokens with 64 x 256-token calibration sequences", "raise data.n_calib to 391"),
    ("bad evaluator dtype", None, ["evaluator.dtype=fp8"], "--set evaluator.dtype=fp8", "evaluator.dtype must be"),
    ("bad evaluator count", None, ["evaluator.num_evaluators=many"], "--set evaluator.num_evaluators=many",
     "evaluator.num_evaluators must be auto"),
    ("negative target", None, ["target=-0.5"], "--set target=-0.5", "target must be a finite number >= 0"),
    ("unknown database placement", None, ["database.placement=ram"], "--set database.placement=ram",
     "database.placement must be one of auto, gpu, host, object_store, disk"),
    ("bad evaluator GPU memory cap", None, ["evaluator.max_gpu_memory=0"], "--set evaluator.max_gpu_memory=0",
     "evaluator.max_gpu_memory is GiB per evaluator"),
    ("another family's key", None, ["database.granularity=block"], "--set database.granularity=block (sparsity)",
     "is not used by family sparsity"),
    ("duplicate YAML key", "target: 0.5\nsearcher:\n  generations: 3\ntarget: 0.7\n", [], "`target:` given twice",
     "sets duplicate key 'target' at line 4"),
    ("a whole section set", None, ["searcher=uniform"], "--set searcher=uniform",
     "e.g. searcher.name=uniform"),
    ("negative sample budget", None, ["searcher.samples=-1"], "--set searcher.samples=-1", "searcher.samples must be >= 1"),
    ("seed out of range", None, ["searcher.seed=-1"], "--set searcher.seed=-1", "searcher.seed must be in [0, 2^32)"),
    ("bad fused-units setting", None, ["units=qkv"], "--set units=qkv", "units must be one of linear, fused"),
    ("binary config file", "\x89PNG\r\n\x1a\n\xff\xfe\x00\x01" * 20, [], "a binary file as --config",
     "is not UTF-8 text"),
    ("no selection stages", None, ["searcher.stages=[]"], "--set searcher.stages=[]",
     "searcher.stages must list at least one"),
    ("negative monitor interval", None, ["searcher.monitor_every=-1"], "--set searcher.monitor_every=-1",
     "searcher.monitor_every must be >= 0"),
    ("joint levels not pairs", None, ["family=joint", "method=magnitude-rtn", "levels=[0.5, 4]"],
     "--set family=joint --set levels=[0.5, 4]", "joint levels must be [sparsity, bits] pairs"),
    ("joint level with 12 bits", None, ["family=joint", "method=magnitude-rtn", "levels=[[0.5, 12]]"],
     "--set family=joint --set levels=[[0.5, 12]]", "bits must be an integer in 1..8, or 16"),
    ("budgets for a single-budget searcher", None, ["searcher.budgets=[0.5, 0.6]"],
     "--set searcher.budgets=[0.5, 0.6] (searcher evopress)", "read by the pareto searcher only"),
    ("one budget for a front", None, ["searcher.name=pareto", "searcher.budgets=[0.5]"],
     "--set searcher.name=pareto --set searcher.budgets=[0.5]", "searcher.budgets must list at least two numbers"),
]


@pytest.mark.parametrize("case, text, sets, what, needle", CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(tmp_path, capsys, case, text, sets, what, needle):
    t0 = time.time()
    argv = ["search"]
    if text is not None:
        (tmp_path / "space.yaml").write_bytes(text.encode("latin-1"))
        argv += ["--config", tmp_path / "space.yaml"]
    for s in sets:
        argv += ["--set", s]
    line = _cli(capsys, argv)
    _record(case, what, line, needle, t0)
    _check_leftovers(tmp_path)


def test_missing_config_file(tmp_path, capsys):
    t0 = time.time()
    line = _cli(capsys, ["search", "--config", tmp_path / "nope.yaml"])
    _record("missing config file", "--config nope.yaml", line, "not found; see search_spaces/", t0)


# ------------------------------------------------------------------ model / data / budget
def _bad_corpus(tmp: Path, text: str) -> str:
    f = tmp / "corpus.txt"
    f.write_text(text)
    return f"text:{f}"


def _binary(f: Path) -> str:
    f.write_bytes(bytes(range(256)) * 400)
    return f"text:{f}"


def _file(f: Path) -> Path:
    f.write_text("a file, not a folder")
    return f


def _truncated_model(tmp: Path) -> Path:
    folder = tmp / "truncated-model"
    shutil.copytree(tiny_llama(), folder)
    w = folder / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    return folder


def _corrupt_gguf(tmp: Path) -> Path:
    """A file that starts like a GGUF (magic, version 3) and then holds noise: a damaged download."""
    f = tmp / "damaged.gguf"
    f.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (5).to_bytes(8, "little") + (99999).to_bytes(8, "little")
                  + bytes(range(256)) * 8)
    return f


RUN_CASES = [
    # case, overrides (callable of tmp -> dict), env, what, needle
    ("unknown model", lambda t: {"model": t / "no-such-model"}, {}, "model=<missing folder>",
     "does not exist; check the path"),
    ("hub needed while offline (model)", lambda t: {"model": "raypress-tests/not-cached-llm"},
     {"HF_HUB_OFFLINE": "1"}, "a Hugging Face id that is not cached, HF_HUB_OFFLINE=1",
     "is not cached locally and the Hugging Face hub is unreachable"),
    ("unsupported architecture", lambda t: {"model": tiny_gpt2()}, {}, "a GPT-2 model folder",
     "unsupported architecture 'gpt2'"),
    ("unknown method", lambda t: {"method": "obs"}, {}, "--set method=obs", "unknown method 'obs'"),
    ("bad level ladder", lambda t: {"levels": "[0.5, 0.2]"}, {}, "levels=[0.5, 0.2]", "strictly ascending"),
    ("infeasible budget", lambda t: {"target": 0.95}, {}, "target=0.95, levels up to 0.9",
     "is outside what levels"),
    ("unreachable budget of a front", lambda t: {"searcher.name": "pareto", "searcher.budgets": "[0.5, 0.95]"}, {},
     "searcher.name=pareto, searcher.budgets=[0.5, 0.95]", "searcher.budgets: target 0.95 is outside"),
    ("ladder cannot reach the budget", lambda t: {"target": 0.55, "levels": "[0.0, 0.4, 0.8]"}, {},
     "target=0.55 with levels [0, 0.4, 0.8]", "is not reachable exactly with levels"),
    ("empty corpus", lambda t: {"data.source": _bad_corpus(t, "")}, {}, "an empty text file",
     "produced only 0 tokens"),
    ("too-short corpus", lambda t: {"data.source": _bad_corpus(t, "A few words only. " * 20)}, {},
     "a 20-sentence text file", "lower data.n_calib / data.n_eval / data.seq_len"),
    ("binary corpus", lambda t: {"data.source": _binary(t / "corpus.bin")}, {}, "text:<a binary file>",
     "is not UTF-8 text"),
    ("corrupt model weights", lambda t: {"model": _truncated_model(t)}, {}, "a model folder whose safetensors "
     "file is truncated", "is corrupt or truncated"),
    ("corrupt GGUF model", lambda t: {"model": _corrupt_gguf(t)}, {}, "model=<a damaged .gguf file>",
     "is not readable"),
    ("huge target", lambda t: {"target": "1e308"}, {}, "--set target=1e308", "is outside what levels"),
    ("output folder under a file", lambda t: {"output": _file(t / "taken") / "runs"}, {},
     "output=<a path under an existing file>", "lies under the file"),
    ("unwritable database cache", lambda t: {"database.cache_dir": "/proc/raypress-db"}, {},
     "database.cache_dir=/proc/raypress-db", "cannot be written"),
    ("missing data file", lambda t: {"data.source": f"text:{t / 'nope.txt'}"}, {}, "text:<missing file>",
     "does not exist"),
    ("unknown data source", lambda t: {"data.source": "imagenet"}, {}, "data.source=imagenet",
     "unknown data source 'imagenet'"),
    ("hub needed while offline (data)", lambda t: {"data.source": "wikitext2"}, {"HF_DATASETS_OFFLINE": "1"},
     "data.source=wikitext2 without `datasets`/hub", "wikitext2"),
    ("GPU requested but absent", lambda t: {"evaluator.device": "cuda"}, {}, "evaluator.device=cuda on a CPU cluster",
     "use evaluator.device=cpu"),
    ("more CPUs than the cluster", lambda t: {"evaluator.cpus_per_evaluator": 64}, {},
     "evaluator.cpus_per_evaluator=64 on a 2-CPU Ray", "but the Ray cluster has"),
    ("MLflow store unwritable", lambda t: {"tracking.uri": "sqlite:////proc/self/raypress/mlflow.db"}, {},
     "tracking.uri in a folder that does not exist", "is not writable"),
    ("MLflow store read-only", lambda t: {"tracking.uri": "sqlite:////proc/self/mlflow.db"}, {},
     "tracking.uri in a read-only folder (even for root)", "is not writable"),
    ("MLflow server unreachable", lambda t: {"tracking.uri": "http://127.0.0.1:1"}, {},
     "tracking.uri=http://127.0.0.1:1", "is unreachable"),
]


@pytest.mark.parametrize("case, over, env, what, needle", RUN_CASES, ids=[c[0] for c in RUN_CASES])
def test_run_errors(tmp_path, capsys, monkeypatch, ray_session, wikitext_path, case, over, env, what, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    t0 = time.time()
    o = over(tmp_path)
    line = _cli(capsys, ["search", *_base(tmp_path, wikitext_path, **o)])
    _record(case, what, line, needle, t0)
    _check_leftovers(tmp_path)
    assert time.time() - t0 < 30, "a bad input must fail fast"


# ------------------------------------------------------------------ level database
@pytest.fixture(scope="module")
def built_db(tmp_path_factory, ray_session, wikitext_path):
    """A real level database built once with `raypress build-db`."""
    from raypress.cli import main

    tmp = tmp_path_factory.mktemp("db")
    assert main(["build-db", *_base(tmp, wikitext_path)]) == 0
    (db,) = [d for d in (tmp / "db").iterdir() if d.is_dir()]
    return db


def _damage_truncate(db: Path):
    f = sorted(db.glob("*.safetensors"))[0]
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _damage_flip(db: Path):
    f = sorted(db.glob("*.safetensors"))[-1]
    b = bytearray(f.read_bytes())
    b[-10] ^= 0xFF
    f.write_bytes(bytes(b))


def _damage_delete(db: Path):
    sorted(db.glob("*.safetensors"))[0].unlink()


def _edit_levels(db: Path):  # a "0.25" search must never run silently on the 0.5 variants
    meta = json.loads((db / "meta.json").read_text())
    meta["level_values_list"][1] = meta["level_values_list"][1] + 0.05
    (db / "meta.json").write_text(json.dumps(meta))


def _damage_meta(db: Path):
    (db / "meta.json").write_text("{not json")


DB_CASES = [
    ("database file truncated", _damage_truncate, "a block file cut in half", "bytes, expected"),
    ("database file corrupt (hash mismatch)", _damage_flip, "one flipped byte in a block file", "sha256 mismatch"),
    ("database file missing", _damage_delete, "a deleted block file", ".safetensors missing"),
    ("database meta.json corrupt", _damage_meta, "meta.json overwritten with garbage", "unreadable meta.json"),
    ("database meta.json edited", _edit_levels, "a level value edited in meta.json", "its own checksum"),
]


@pytest.mark.parametrize("case, damage, what, needle", DB_CASES, ids=[c[0] for c in DB_CASES])
def test_damaged_database_cache_is_rebuilt(tmp_path, capsys, caplog, wikitext_path, built_db, case, damage, what,
                                          needle):
    """A damaged cached database is not a dead end: the search says what was wrong, rebuilds it and runs."""
    import logging

    from raypress.database import open_database

    shutil.copytree(built_db, tmp_path / "db" / built_db.name)
    damage(tmp_path / "db" / built_db.name)
    with caplog.at_level(logging.WARNING, logger="raypress"):
        from raypress.cli import main

        assert main(["search", *_base(tmp_path, wikitext_path)]) == 0
    warned = [r.getMessage() for r in caplog.records if "rebuilding it" in r.getMessage()]
    assert len(warned) == 1 and needle in warned[0], caplog.text[-2000:]
    open_database(tmp_path / "db" / built_db.name, verify=True)  # the rebuilt folder passes every check
    assert not [p for p in (tmp_path / "db").iterdir() if p.name.startswith(".tmp-")]


# ------------------------------------------------------------------ resume
def test_resume_errors(tmp_path, capsys):
    t0 = time.time()
    line = _cli(capsys, ["search", "--resume", tmp_path / "never-ran"])
    _record("resume folder missing", "--resume <missing folder>", line, "does not exist; pass the output folder", t0)

    t0 = time.time()
    (tmp_path / "empty").mkdir()
    line = _cli(capsys, ["search", "--resume", tmp_path / "empty"])
    _record("resume folder without state", "--resume <folder without raypress_state.json>", line,
            "nothing to resume", t0)

    t0 = time.time()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "raypress_state.json").write_text('{"run_name": "x", "config": {"mod')
    line = _cli(capsys, ["search", "--resume", tmp_path / "broken"])
    _record("resume state corrupt", "--resume <folder with a truncated raypress_state.json>", line, "is unreadable", t0)

    t0 = time.time()
    (tmp_path / "done").mkdir()
    (tmp_path / "done" / "raypress_state.json").write_text(json.dumps({"run_name": "x", "config": {}}))
    (tmp_path / "done" / "result.json").write_text("{}")
    line = _cli(capsys, ["search", "--resume", tmp_path / "done"])
    _record("resume a finished search", "--resume <finished run folder>", line, "has finished", t0)

    (tmp_path / "done" / "result.json").write_text(json.dumps({"best_config": {}}))
    t0 = time.time()
    line = _cli(capsys, ["export", tmp_path / "done", "--out", tmp_path / "done", "--overwrite"])
    _record("export over its own search folder", "export RUN --out RUN --overwrite", line,
            "would overwrite or sit inside the search folder", t0)
    assert (tmp_path / "done" / "result.json").is_file()

    t0 = time.time()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    line = _cli(capsys, ["export", tmp_path / "done", "--out", tmp_path / "mine", "--overwrite"])
    _record("export --overwrite onto a folder that is not an export", "export RUN --out <user folder> --overwrite",
            line, "replaces only a previous RayPress export", t0)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"

    t0 = time.time()
    (tmp_path / "done" / "result.json").write_text('{"best_conf')
    line = _cli(capsys, ["export", tmp_path / "done", "--out", tmp_path / "exp"])
    _record("corrupt result.json", "export RUN with a truncated result.json", line, "result.json is unreadable", t0)
    (tmp_path / "done" / "result.json").write_text("{}")

    t0 = time.time()
    line = _cli(capsys, ["eval", tmp_path / "done", "--n-eval", "0"])
    _record("eval on no tokens", "raypress eval DIR --n-eval 0", line, "--n-eval must be >= 1", t0)

    t0 = time.time()
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "raypress_state.json").write_text(json.dumps({"run_name": "x", "config": {}}))
    line = _cli(capsys, ["search", "--resume", tmp_path / "ok", "--set", "target=0.3"])
    _record("resume changes the search", "--resume ... --set target=0.3", line, "cannot change on --resume", t0)


# ------------------------------------------------------------------ raypress ui
def test_ui_errors(tmp_path, capsys, monkeypatch):
    import socket
    import subprocess as sp

    monkeypatch.setattr(sp, "call", lambda *a, **k: pytest.fail("the MLflow server must not start"))
    t0 = time.time()
    line = _cli(capsys, ["ui", "--uri", f"sqlite:///{tmp_path / 'none.db'}"])
    _record("ui without a store", "raypress ui --uri sqlite:///<missing file>", line, "no MLflow store at", t0)
    assert not (tmp_path / "none.db").exists()  # not silently created empty

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'm.db'}"
    MlflowClient(uri).search_experiments()
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        t0 = time.time()
        line = _cli(capsys, ["ui", "--uri", uri, "--port", busy.getsockname()[1]])
    _record("ui port in use", "raypress ui --port <a port in use>", line, "pick another --port", t0)
    t0 = time.time()
    line = _cli(capsys, ["ui", "--uri", uri, "--port", 99999])
    _record("ui port out of range", "raypress ui --port 99999", line, "--port must be a TCP port in 1..65535", t0)


# ------------------------------------------------------------------ fresh-Ray cases (subprocess)
def _subprocess(tmp: Path, hook: str | None, argv: list, timeout: float):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "RAY_ADDRESS": "local",
           "RAYPRESS_FAULT_LOG": str(tmp / "faults.log")}
    env.pop("MLFLOW_TRACKING_URI", None)
    cmd = [sys.executable, str(ROOT / "tests" / "_faultinject.py"), hook or "-", *map(str, argv)]
    p = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=timeout,
                       start_new_session=True)
    return p


def test_ray_address_unreachable_fails_fast(tmp_path, wikitext_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "raypress.cli", "search",
                        *_base(tmp_path, wikitext_path, ray_address="127.0.0.1:1")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    dt = time.time() - t0
    assert p.returncode == 2, p.stderr[-3000:]
    errs = [l for l in p.stderr.splitlines() if l.startswith("raypress: error: ")]
    assert len(errs) == 1 and p.stderr.strip().splitlines()[-1] == errs[0] and "Traceback" not in p.stderr
    _record("Ray address unreachable", "ray_address=127.0.0.1:1", errs[0], "cannot reach the Ray cluster", t0)
    assert dt < 60, f"took {dt:.0f}s"
    _check_leftovers(tmp_path)


def test_gpu_out_of_memory_in_an_evaluator_actor(tmp_path, store_in_tmp, wikitext_path):
    """torch.cuda.OutOfMemoryError inside the evaluator actor (injected in every Ray worker) comes back
    as one line naming evaluator.batch_size / kl_topk, is not retried, and fails the MLflow run."""
    t0 = time.time()
    p = _subprocess(tmp_path, "gpu_oom", ["search", *_base(tmp_path, wikitext_path, **{"evaluator.batch_size": 16})],
                    timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    errs = [l for l in p.stderr.splitlines() if l.startswith("raypress: error: ")]
    assert len(errs) == 1 and p.stderr.strip().splitlines()[-1] == errs[0] and "Traceback" not in p.stderr, p.stderr
    _record("GPU out of memory", "torch.cuda.OutOfMemoryError in the evaluator (batch_size 16)", errs[0],
            "lower evaluator.batch_size or set evaluator.kl_topk", t0)
    _check_leftovers(tmp_path)
    from mlflow.tracking import MlflowClient

    (run,) = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert run.info.status == "FAILED" and "out of memory" in run.data.tags["raypress.error"]
    # reported once, not retried by Tune's FailureConfig; the candidate stays queued for a resume
    # (`raypress search --resume <dir> --set evaluator.batch_size=4`)
    state = json.loads(next((tmp_path / "runs").glob("*/raypress_state.json")).read_text())["searcher"]
    assert state["failures"] == 1 and state["evaluations"] == 0 and state["pending"][0] == 0
    # one forward attempt in all: Tune's FailureConfig retries (max_failures=3) would make it 4
    assert (tmp_path / "faults.log").read_text().count("oom") == 1


def test_gpu_out_of_memory_while_an_evaluator_loads(tmp_path, store_in_tmp, wikitext_path):
    """An evaluator that runs out of GPU memory while loading the model and its variants (Ray would
    restart it into the same error) is one line with what the GPU has free and the knobs that help."""
    t0 = time.time()
    p = _subprocess(tmp_path, "gpu_oom_at_load", ["search", *_base(tmp_path, wikitext_path)], timeout=300)
    assert p.returncode == 2, p.stderr[-3000:]
    errs = [l for l in p.stderr.splitlines() if l.startswith("raypress: error: ")]
    assert len(errs) == 1 and p.stderr.strip().splitlines()[-1] == errs[0] and "Traceback" not in p.stderr, p.stderr
    _record("GPU out of memory while an evaluator loads", "torch.cuda.OutOfMemoryError while the evaluator loads",
            errs[0], "21.5 of 79.1 GiB free now", t0)
    assert "database.placement=host" in errs[0] and "evaluator.mode=streamed" in errs[0]
    _check_leftovers(tmp_path)


def test_trials_that_fail_every_time_end_the_search_with_one_line(tmp_path, store_in_tmp, wikitext_path):
    """A failure that is not a user error and repeats for every trial (here: every trial raises) would
    be retried forever (a failed trial's candidate is queued again); after tune_loop.CRASH_LOOP failed
    trials in a row the search ends with the last failure's first line, the state kept for a resume."""
    from raypress.tune_loop import CRASH_LOOP

    t0 = time.time()
    p = _subprocess(tmp_path, "trial_crash", ["search", *_base(tmp_path, wikitext_path)], timeout=400)
    assert p.returncode == 2, p.stderr[-3000:]
    errs = [l for l in p.stderr.splitlines() if l.startswith("raypress: error: ")]
    assert len(errs) == 1 and p.stderr.strip().splitlines()[-1] == errs[0], p.stderr[-3000:]
    assert f"{CRASH_LOOP} trials in a row failed" in errs[0] and "RuntimeError: injected: this trial worker" in errs[0], errs[0]
    _record("trials fail every time", "every Tune trial raises (not a user error)", errs[0],
            "then continue with `raypress search --resume`", t0)
    _check_leftovers(tmp_path)
    assert next((tmp_path / "runs").glob("*/raypress_state.json")).exists()


def test_a_failed_trials_error_is_quoted_from_the_text_tune_just_wrote(tmp_path):
    """The crash-loop line quotes what the failed trial raised. On CI it was read from the storage copy of
    Tune's pickled error, which a background sync left empty: the `EOFError` raised inside Tune's
    callback ended the search with a traceback. It is read from the driver-side text Tune appends (as
    Tune writes it: a header per failure, then str() of the Ray error), and an absent file never raises."""
    from types import SimpleNamespace

    from ray.exceptions import RayTaskError

    from raypress.tune_loop import _trial_error

    def failure(i, exc):
        return f"Failure # {i} (occurred at 2026-12-07_09-27-52)\n{exc}\n"

    first = RayTaskError("train", "Traceback ...\nValueError: an earlier one", ValueError("an earlier one"))
    last = RayTaskError("train", 'Traceback (most recent call last):\n  File "x.py", line 1, in step\n'
                        "RuntimeError: injected: no score\nsecond line", RuntimeError("injected: no score"))
    text = tmp_path / "error.txt"
    text.write_text(failure(1, first.as_instanceof_cause()) + failure(2, last.as_instanceof_cause()))
    trial = SimpleNamespace(error_file=str(text))
    assert _trial_error(trial) == "RuntimeError: injected: no score"
    text.write_text(failure(1, "The actor died unexpectedly before finishing this task.\n\tclass_name: X"))
    assert _trial_error(trial) == "The actor died unexpectedly before finishing this task."
    text.write_text("")  # written but empty
    assert _trial_error(trial) is None
    text.unlink()
    assert _trial_error(trial) is None
    assert _trial_error(SimpleNamespace(error_file=None)) is None


_FULL_DISK = """
import json, resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead of killing
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
from raypress.cli import main
sys.exit(main(json.loads(sys.argv[1])))
"""


def test_a_write_that_fails_for_space_is_one_line_and_leaves_no_half_database(tmp_path, store_in_tmp, wikitext_path):
    """`raypress build-db` whose database writes fail mid-build (a 64 KiB file-size limit: the write
    fails as it would on a full disk, deep inside safetensors): one line naming the file and the fix,
    no traceback, no half-written database folder."""
    import json
    import subprocess
    import sys

    args = ["build-db", *_base(tmp_path, wikitext_path, **{"database.parallel": "false"})]
    out = subprocess.run([sys.executable, "-c", _FULL_DISK, json.dumps(args)], capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    err = [x for x in out.stderr.splitlines() if x.startswith("raypress: error")]
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    assert len(err) == 1 and "no space left" in err[0] and "database.cache_dir" in err[0], out.stderr[-2000:]
    _record("disk full during the database build", "build-db whose writes fail for space (a 64 KiB file-size limit)",
            err[0], "no space left", time.time())
    _check_leftovers(tmp_path)


def test_resume_of_a_copied_run_folder_leaves_the_original_run_alone(tmp_path, capsys):
    """A copy of an interrupted search folder names the original's MLflow run: its resume is refused
    before anything is touched, and the original run keeps its status and metrics."""
    import shutil

    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("raypress"))
    orig = tmp_path / "runs" / "orig"
    orig.mkdir(parents=True)
    client.set_tag(run.info.run_id, "raypress.output_dir", str(orig))
    client.log_metric(run.info.run_id, "best_kl", 0.5, step=3)
    client.set_terminated(run.info.run_id, "KILLED")  # interrupted: resumable
    (orig / "raypress_state.json").write_text(json.dumps(
        {"run_name": "orig", "config": {}, "tracking_uri": uri, "run_id": run.info.run_id}))
    copy = tmp_path / "copy"
    shutil.copytree(orig, copy)
    t0 = time.time()
    line = _cli(capsys, ["search", "--resume", copy])
    _record("resume of a copied run folder", "--resume <a copy of another search's folder>", line,
            "is a copy of the search folder", t0)
    after = client.get_run(run.info.run_id)
    assert after.info.status == "KILLED"
    assert [m.value for m in client.get_metric_history(run.info.run_id, "best_kl")] == [0.5]


def test_export_never_replaces_the_model_it_reads(tmp_path, capsys):
    """`export --overwrite --out <the model folder>` (or a folder inside it) is refused before
    anything is written; the model's files are untouched."""
    model = tmp_path / "my-model"
    shutil.copytree(tiny_llama(), model)
    before = sorted((p.name, p.stat().st_size) for p in model.iterdir())
    run = tmp_path / "run"
    run.mkdir()
    (run / "raypress_state.json").write_text(json.dumps({"run_name": "x", "config": {"model": str(model)}}))
    (run / "result.json").write_text(json.dumps({"best_config": {}}))
    for out in (model, model / "sub"):
        t0 = time.time()
        line = _cli(capsys, ["export", run, "--out", out, "--overwrite"])
        if out == model:
            _record("export over the model it reads", "export RUN --out <the model folder> --overwrite", line,
                    "would overwrite or sit inside the model being read", t0)
        else:
            assert "would overwrite or sit inside the model being read" in line
    assert sorted((p.name, p.stat().st_size) for p in model.iterdir()) == before


# ------------------------------------------------------------------ the catalogue itself
def test_catalogue_doc_lists_every_case():
    """docs/bad_inputs.md has a row for every case this file declares (regenerate it with
    RAYPRESS_WRITE_CATALOGUE=1 pytest tests/test_bad_input.py after adding one); prints the catalogue
    of this session's cases (pytest -s)."""
    src = Path(__file__).read_text()
    declared = {c[0] for c in CONFIG_CASES + RUN_CASES} | set(re.findall(r'_record\(\s*"([^"]+)"', src))
    assert len(declared) >= 40
    lines = ["# Bad-input catalogue", "",
             "Generated by `tests/test_bad_input.py` (each case: exit code 2, one stderr line, no half-written "
             "database, no RUNNING MLflow run).", "",
             "| # | case | input | message (after `raypress: error: `) | s |", "|---|---|---|---|---|"]
    for i, (case, (what, msg, s)) in enumerate(CATALOGUE.items(), 1):
        esc = lambda x: x.replace("|", "\\|")
        lines.append(f"| {i} | {case} | {esc(what)} | {esc(msg)} | {s:.1f} |")
    print("\n" + "\n".join(lines))
    if os.environ.get("RAYPRESS_WRITE_CATALOGUE") == "1" and set(CATALOGUE) >= declared:
        (ROOT / "docs" / "bad_inputs.md").write_text("\n".join(lines) + "\n")
    documented = set(re.findall(r"^\| \d+ \| ([^|]+?) \|", (ROOT / "docs" / "bad_inputs.md").read_text(), re.M))
    missing = sorted(declared - documented)
    assert not missing, f"docs/bad_inputs.md lacks {missing}; regenerate it (RAYPRESS_WRITE_CATALOGUE=1)"
