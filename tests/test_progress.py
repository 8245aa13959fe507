"""A search prints where it is while it runs: one line per EvoPress generation (generation/total,
best and median KL, evaluations, evaluations/s, tokens, elapsed, ETA); --quiet silences them."""
import logging

from raypress.tune_loop import progress_line


def test_progress_line_says_where_how_fast_and_when():
    h = {"generation": 3, "best_fitness": 0.195, "median_fitness": 0.2004, "evaluations": 64, "tokens": 51200}
    line = progress_line(h, 384, 24, 240.0)
    assert "gen 4/24" in line and "gen best KL 0.1950" in line and "offspring median 0.2004" in line
    assert "64/384 evals" in line and "0.27 evals/s" in line and "51,200 tokens" in line
    assert "4m00s elapsed" in line and "ETA 20m00s" in line  # (384 - 64) / (64 / 240 s)
    assert "eval 64/384" in progress_line(h, 384, None, 240.0)  # per-trial searchers
    assert "best KL so far 0.1950" in progress_line(h, 384, None, 240.0)  # same tokens for every candidate
    assert "elite KL (monitor) 0.2100" in progress_line({**h, "elite_kl_monitor": 0.21}, 384, 24, 240.0)


def test_search_prints_a_line_per_generation(tmp_path, ray_session, mlflow_uri, wikitext_path, caplog, monkeypatch):
    """... and lines from inside a generation that runs longer than HEARTBEAT_S (here: 0 s), so a slow
    machine or a big model is never silent for a whole generation."""
    from _tiny import tiny_llama
    from raypress import tune_loop
    from raypress.config import load_config
    from raypress.runner import run_search

    monkeypatch.setattr(tune_loop, "HEARTBEAT_S", 0.0)

    cfg = load_config(None, [
        f"model={tiny_llama()}", f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=16",
        "data.n_eval=4", "searcher.generations=3", "searcher.offspring=3", "searcher.stages=[[128, 1]]",
        f"output={tmp_path / 'runs'}", f"database.cache_dir={tmp_path / 'db'}", "method=magnitude", "target=0.5"])
    with caplog.at_level(logging.INFO, logger="raypress.progress"):
        run_search(cfg)
    lines = [r.getMessage() for r in caplog.records if r.name == "raypress.progress"]
    assert lines[0].startswith("  magnitude database: 14/14 layers"), lines  # the build's final line
    beats = [l for l in lines if " running " in l]
    assert beats and all(l.startswith("  gen ") and "evals/s" in l and "ETA" in l for l in beats), beats
    done = [int(l.split(" running  ")[1].split("/")[0]) for l in beats]
    assert done == sorted(done)  # evaluations so far, never going back
    lines = [l for l in lines if l.startswith("  gen ") and " running " not in l]
    assert [l.split()[1] for l in lines] == ["1/3", "2/3", "3/3"], lines
    assert lines[-1].rstrip().endswith("ETA 0m00s")


def test_long_steps_log_periodic_lines_off_a_terminal(caplog, monkeypatch):
    """Off a TTY a database build or calibration logs short lines, not a carriage-return tqdm bar."""
    import time

    from raypress import progress

    clock = iter(range(0, 1000, 7))  # each monotonic() call advances 7 s
    monkeypatch.setattr(time, "monotonic", lambda: float(next(clock)))
    with caplog.at_level(logging.INFO, logger="raypress.progress"):
        bar = progress.steps(20, "sparsegpt database", "layer", every_s=30)
        for _ in range(20):
            bar.update(1)
        bar.close()
    lines = [r.getMessage() for r in caplog.records]
    assert 3 <= len(lines) <= 6 and all("\r" not in l and len(l) < 120 for l in lines), lines
    assert lines[0].startswith("  sparsegpt database: 5/20 layers") and "ETA" in lines[0]
    assert lines[-1].startswith("  sparsegpt database: 20/20 layers") and "ETA" not in lines[-1]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="raypress.progress"):  # --quiet
        bar = progress.steps(20, "calibration", "block")
        bar.update(20)
        bar.close()
    assert not caplog.records
