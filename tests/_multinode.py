"""A search on a real two-node Ray cluster on one machine (ray.cluster_utils.Cluster: two raylets,
each with its own object store), optionally removing the worker node mid-search. Run by
tests/test_multinode.py in a subprocess (the test session has its own Ray). Prints one JSON line."""
import json
import os
import sys

from ray import tune

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

STATE: dict = {"nodes": [], "removed": [], "copies": {}, "spans": []}  # module-level: Tune pickles its callbacks by reference


class Watch(tune.Callback):
    """Records which node scored each trial; removes the worker node after `remove_after` results."""

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from raypress.trial import DB_COPY, NODE, SPAN

        STATE["nodes"].append(result.get(NODE))
        STATE["spans"].append(result.get(SPAN))
        STATE["copies"].setdefault(result.get(NODE), set()).add(result.get(DB_COPY))
        after = STATE.get("remove_after")
        if after and len(STATE["nodes"]) == after and not STATE["removed"]:
            STATE["cluster"].remove_node(STATE["worker"])  # the evaluator actor there dies mid-search
            STATE["removed"].append(STATE["worker"].node_id)


def most_at_once(spans) -> int:
    """The most evaluations that were running at the same moment."""
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    now = most = 0
    for _, step in events:
        now += step
        most = max(most, now)
    return most


def run(out: str, wikitext: str, remove_after: int) -> None:
    from ray.cluster_utils import Cluster

    from _tiny import tiny_llama
    from raypress.config import load_config
    from raypress.runner import run_search

    model = tiny_llama(hidden_size=256, intermediate_size=1024, num_hidden_layers=4)  # ~0.3 s a candidate
    # two evaluators per node: they must read one shared copy of the database, not one each
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    worker = cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    STATE.update(cluster=cluster, worker=worker, remove_after=remove_after)
    cfg = load_config(None, [
        f"model={model}", f"data.source=text:{wikitext}", "data.seq_len=64", "data.n_calib=32", "data.max_tokens=60000", "data.n_eval=4",
        "searcher.generations=5", "searcher.offspring=5", "searcher.stages=[[2048, 1]]", "target=0.5",
        "method=magnitude", "evaluator.num_evaluators=4", "evaluator.cpus_per_evaluator=1",
        "evaluator.candidates_per_trial=1", f"ray_address={cluster.address}",
        f"database.cache_dir={out}/db", f"output={out}/runs", f"tracking.uri=sqlite:///{out}/mlflow.db"])
    r = run_search(cfg, callbacks=[Watch()])
    print(json.dumps({"best": r.best_config, "fitness": r.best_fitness,
                      "nodes": sorted(set(STATE["nodes"]) - {None}), "removed": STATE["removed"],
                      "evaluations": r.evaluations, "most_at_once": most_at_once(STATE["spans"]),
                      "copies": {n: sorted(c, key=str) for n, c in STATE["copies"].items() if n}}))
    import ray

    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    import _multinode  # the importable module, so Tune pickles Watch by reference

    _multinode.run(sys.argv[1], sys.argv[2], int(sys.argv[3]))
