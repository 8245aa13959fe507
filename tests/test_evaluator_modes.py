"""Evaluator modes and Tune batching: streamed (block by block) == resident, several candidates per
trial == one per trial, Gemma-3 adapter (sliding/full blocks get their own kwargs).

On CPU "streamed" still runs the model one block at a time over the whole calibration batch (the
GPU path adds only the host->device copies); the GPU numbers are in bench/throughput.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from ray.tune.search import Searcher

from _tiny import tiny_gemma3, tiny_llama, tiny_opt
from raypress.compress import get_method
from raypress.compress.swap import WeightSwapApplier
from raypress.config import load_config
from raypress.data import make_splits
from raypress.database import build_database
from raypress.errors import RayPressError
from raypress.evaluator import Evaluator, EvaluatorSpec
from raypress.families import dense_levels
from raypress.models import Gemma3Adapter, get_adapter, load_model
from raypress.search.batched import BatchedSearcher, candidates_per_trial
from raypress.trial import BATCH as BATCH_KEY
from raypress.search.evolution import EvoPressSearcher
from raypress.space import SearchSpace

BUILDERS = {"llama": tiny_llama, "opt": tiny_opt, "gemma3": tiny_gemma3}


@pytest.fixture(scope="module", params=list(BUILDERS))
def tiny_db(request, tmp_path_factory):
    torch.set_num_threads(1)
    folder = BUILDERS[request.param]()
    model, _ = load_model(folder)
    adapter = get_adapter(model)
    toks = np.random.default_rng(0).integers(4, 500, 64 * 40)
    splits = make_splits(toks, 64, 24, 8, 0)
    db = build_database(folder, model, adapter, get_method("sparsegpt"), splits.calib,
                        cache_root=tmp_path_factory.mktemp("db"), progress=False)
    arrays = {l: np.asarray(db.array(l)) for l in db.layers}  # no Ray needed: plain arrays
    return folder, db, splits, arrays, SearchSpace.for_database(db, 0.5)


def _spec(folder, db, splits, arrays, **kw):
    return EvaluatorSpec(model=folder, applier=WeightSwapApplier(arrays, dense_levels(db)), calib=splits.calib,
                         eval=splits.eval, batch_size=3, **kw)  # 256 tokens = 4 rows: batches of 3 and 1


def test_streamed_fitness_equals_resident(tiny_db):
    folder, db, splits, arrays, space = tiny_db
    u = space.uniform()
    child = space.mutate(u, np.random.default_rng(1), n_switches=2)
    out = {}
    for mode in ("resident", "streamed"):
        ev = Evaluator(_spec(folder, db, splits, arrays, mode=mode, kl_topk=None))
        out[mode] = [ev.score(u, 256)["fitness"], ev.score(child, 256, generation=1)["fitness"],
                     ev.score(u, 256, generation=1)["fitness"], *ev.heldout(child)]
        assert ev.score({}, 256)["fitness"] < 1e-9
    res, stream = np.array(out["resident"]), np.array(out["streamed"])
    assert (res[:3] > 1e-6).all()
    np.testing.assert_allclose(stream, res, rtol=1e-3)


def test_streamed_topk_teacher_and_only_changed_layers(tiny_db):
    folder, db, splits, arrays, space = tiny_db
    u = space.uniform()
    res = Evaluator(_spec(folder, db, splits, arrays, kl_topk=16))
    st = Evaluator(_spec(folder, db, splits, arrays, kl_topk=16, mode="streamed", teacher_memory="pinned"))
    a, b = res.score(u, 192), st.score(u, 192)
    assert b["changed"] == len(db.layers) and st.score(u, 192)["changed"] == 0
    np.testing.assert_allclose(b["fitness"], a["fitness"], rtol=1e-3)


def test_batch_config_scores_each_candidate(tiny_db):
    folder, db, splits, arrays, space = tiny_db
    ev = Evaluator(_spec(folder, db, splits, arrays))
    rng = np.random.default_rng(2)
    cands = [space.uniform()] + [space.mutate(space.uniform(), rng, n_switches=2) for _ in range(2)]
    meta = {"_rp_tokens": 128, "_rp_generation": 3, "_rp_stage": 0, "_rp_seed": 0}
    single = [ev.score_config({**c, **meta})["fitness"] for c in cands]
    batch = ev.score_config({BATCH_KEY: [{**c, **meta} for c in cands]})
    assert [r["fitness"] for r in batch[BATCH_KEY]] == single
    assert batch["fitness"] == min(single) and batch["candidates"] == 3


def test_unknown_mode_is_a_user_error(tiny_db):
    folder, db, splits, arrays, _ = tiny_db
    with pytest.raises(RayPressError, match="evaluator.mode"):
        Evaluator(_spec(folder, db, splits, arrays, mode="sharded"))
    with pytest.raises(RayPressError, match="device_map"):
        Evaluator(_spec(folder, db, splits, arrays, mode="device_map", device="cpu"))


# ----------------------------------------------------------------------------- batched searcher
def _evo(space, **kw):
    return EvoPressSearcher(space, generations=2, offspring=5, stages=((64, 2), (128, 1)), seed=0, **kw)


def _fake_fitness(cfg) -> float:
    levels = [v for k, v in sorted(cfg.items()) if not k.startswith("_rp_")]
    return float(sum((i + 1) * v for i, v in enumerate(levels)))


def _drive(searcher, batched: bool):
    """Run a searcher to the end by hand, one Tune 'trial' at a time; returns (trials, history)."""
    trials, n = 0, 0
    while True:
        tid = f"t{n}"
        n += 1
        cfg = searcher.suggest(tid)
        if cfg == Searcher.FINISHED:
            break
        assert cfg is not None  # evaluated synchronously: a stage is never left waiting
        trials += 1
        if batched:
            per = [{"fitness": _fake_fitness(c), "tokens": c["_rp_tokens"]} for c in cfg[BATCH_KEY]]
            searcher.on_trial_complete(tid, {"fitness": min(p["fitness"] for p in per), BATCH_KEY: per})
        else:
            searcher.on_trial_complete(tid, {"fitness": _fake_fitness(cfg), "tokens": cfg["_rp_tokens"]})
    return trials, searcher


def test_batched_searcher_same_search_fewer_trials(tiny_db):
    *_, space = tiny_db
    t1, plain = _drive(_evo(space), batched=False)
    inner = _evo(space)
    t2, wrapped = _drive(BatchedSearcher(inner, batch=6), batched=True)
    assert t1 == 2 * (6 + 2) and t2 == 2 * 2  # per generation: 6 then 2 candidates, one trial per stage
    assert wrapped.best_config == plain.best_config and wrapped.best_fitness == plain.best_fitness
    assert [h["best_fitness"] for h in inner.history] == [h["best_fitness"] for h in plain.history]
    assert wrapped.get_state()["evaluations"] == plain.get_state()["evaluations"] == 16


def test_batched_searcher_failed_trial_requeues_its_candidates(tiny_db):
    *_, space = tiny_db
    inner = _evo(space)
    s = BatchedSearcher(inner, batch=4)
    first = s.suggest("a")[BATCH_KEY]
    assert len(first) == 4
    s.on_trial_complete("a", None, error=True)  # e.g. the evaluator actor died
    again = s.suggest("b")[BATCH_KEY]
    key = lambda c: sorted(c.items())  # noqa: E731 - re-queued in another order
    assert sorted(again, key=key) == sorted(first, key=key)
    assert inner.failures == 4


def test_batched_searcher_limit_and_auto_size():
    class Counter(Searcher):
        def __init__(self):
            super().__init__(metric="fitness", mode="min")
            self.n = 0

        def suggest(self, tid):
            self.n += 1
            return {"x": self.n}

        def on_trial_complete(self, tid, result=None, error=False):
            pass

    s = BatchedSearcher(Counter(), batch=4, limit=10)
    sizes = []
    while (cfg := s.suggest(f"t{len(sizes)}")) != Searcher.FINISHED:
        sizes.append(len(cfg[BATCH_KEY]))
    assert sizes == [4, 4, 2]
    assert candidates_per_trial("auto", True, 12, 1) == 13
    assert candidates_per_trial("auto", True, 12, 2) == 7
    assert candidates_per_trial("auto", False, 12, 2) == 1
    assert candidates_per_trial(3, False, 12, 2) == 3


def test_config_keys_validated():
    cfg = load_config(None, ["evaluator.mode=streamed", "evaluator.teacher_memory=pinned",
                             "evaluator.candidates_per_trial=auto"])
    assert cfg.evaluator.mode == "streamed"
    for bad in ("evaluator.mode=sharded", "evaluator.teacher_memory=disk", "evaluator.candidates_per_trial=0",
                "evaluator.gpus_per_evaluator=2"):
        with pytest.raises(RayPressError):
            load_config(None, [bad])


# ----------------------------------------------------------------------------- gemma3 adapter
def test_gemma3_adapter_blockwise_equals_full():
    model, _ = load_model(tiny_gemma3())
    adapter = get_adapter(model)
    assert isinstance(adapter, Gemma3Adapter) and adapter.family == "gemma3"
    assert list(adapter.linear_layers())[:7] == [f"model.layers.0.{n}" for n in adapter.linear_names]
    ids = [torch.randint(4, 500, (2, 40))]  # longer than the 16-token sliding window
    with torch.no_grad():
        ref = model(ids[0], use_cache=False).logits
        torch.testing.assert_close(adapter.blockwise_logits(ids)[0], ref, atol=1e-5, rtol=0)
        _, per_block = adapter.capture_block_inputs(ids, per_block=True)
        # the full-attention block gets other rotary embeddings than the sliding ones
        assert per_block[1]["position_embeddings"] is not per_block[0]["position_embeddings"]
        assert per_block[2]["position_embeddings"] is per_block[0]["position_embeddings"]
