"""The evaluator pool (raypress/pool.py): several evaluators score candidates at the same time, Tune's
thin trial actors live across generations, and an evaluator that cannot load is one clear error."""
from __future__ import annotations

import pytest
from ray import tune

from _multinode import most_at_once
from _tiny import tiny_llama


class Record(tune.Callback):
    def __init__(self):
        self.spans, self.trial_pids = [], set()

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from raypress.trial import SPAN

        self.spans.append(result[SPAN])
        self.trial_pids.add(result["pid"])  # Tune's own key: the trial actor's process


def test_two_evaluators_score_at_once_and_trial_actors_stay_warm(ray_session, tmp_path, wikitext_path):
    from raypress.config import load_config
    from raypress.runner import run_search

    rec = Record()
    cfg = load_config(None, [
        f"model={tiny_llama(hidden_size=128, intermediate_size=512, num_hidden_layers=2)}",
        f"data.source=text:{wikitext_path}", "data.seq_len=64", "data.n_calib=32", "data.n_eval=4",
        "searcher.generations=3", "searcher.offspring=6", "searcher.stages=[[1024, 1]]", "target=0.5",
        "method=magnitude", "evaluator.num_evaluators=2", "evaluator.cpus_per_evaluator=1",
        "evaluator.candidates_per_trial=1", f"database.cache_dir={tmp_path}/db", f"output={tmp_path}/runs",
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    r = run_search(cfg, callbacks=[rec])
    assert r.evaluations == 3 * (6 + 1)  # offspring + the parent, every generation
    assert len(rec.spans) >= r.evaluations  # (+ the elite's scores on the monitor batch)
    assert most_at_once(rec.spans) == 2  # both evaluators worked at the same moment
    # two thin trial actors served every trial: Tune did not start them again each generation
    assert len(rec.trial_pids) == 2, rec.trial_pids


def test_an_evaluator_that_cannot_load_is_one_line(ray_session):
    """A user error while an evaluator loads (here an unknown mode; on a GPU, out of memory) stops the
    pool's start with that one line, instead of Ray restarting the actor into the same error."""
    import numpy as np

    from raypress.errors import RayPressError
    from raypress.evaluator import EvaluatorSpec
    from raypress.pool import EvaluatorPool

    rows = np.zeros((2, 8), dtype=np.int64)
    bad = EvaluatorSpec(model=tiny_llama(), applier=None, calib=rows, eval=rows, mode="sharded")
    with pytest.raises(RayPressError) as e:
        with EvaluatorPool(bad, 2, {"cpu": 1}):
            pass
    assert str(e.value) == "unknown evaluator.mode 'sharded'; use resident, streamed, device_map"


def test_a_measuring_pool_answers_calls_without_a_dispatcher(ray_session):
    """A one-shot schedule's final numbers on a GPU or multi-node cluster come from a one-evaluator
    pool without a dispatcher (runner.final_evaluator): same numbers as an in-process evaluator, and a
    measurement asked twice (each search of a comparison asks for dense and uniform) is made once."""
    import numpy as np
    import ray

    from raypress.compress.depth import DepthApplier
    from raypress.evaluator import Evaluator, EvaluatorSpec
    from raypress.pool import EvaluatorPool

    rows = np.random.default_rng(0).integers(0, 512, (4, 32))
    spec = EvaluatorSpec(model=tiny_llama(), applier=DepthApplier(), calib=rows, eval=rows, device="cpu",
                         dtype="float32")
    with EvaluatorPool(spec, 1, {"cpu": 1}, dispatch=False) as pool:
        assert pool.dispatcher is None
        member = pool.members[0]
        ppl = pool.call("perplexity", {})
        ray.kill(member)  # a repeated measurement is answered from memory, not by the evaluator
        assert pool.call("perplexity", {}) == ppl
    assert ppl == pytest.approx(Evaluator(spec).perplexity({}), rel=1e-5)
    with pytest.raises(ray.exceptions.RayActorError):  # closed with the pool
        ray.get(member.ping.remote())
