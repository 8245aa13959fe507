"""Multi-node behaviour without a cluster: ray.cluster_utils.Cluster gives two raylets (two object
stores) on this machine. Evaluators run on both nodes (two each, reading one copy of the database per node), and losing a node mid-search ends on the
same best configuration as an undisturbed run (its trial is retried on the surviving node)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _run(tmp_path, wikitext_path, remove_after: int) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(HERE.parent)])
    p = subprocess.run([sys.executable, str(HERE / "_multinode.py"), str(tmp_path), str(wikitext_path),
                        str(remove_after)], capture_output=True, text=True, timeout=600, env=env)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.slow  # two Ray clusters of two raylets each: ~2 min on 2 cores (`pytest -m slow`)
def test_two_nodes_and_losing_one_mid_search(tmp_path, wikitext_path):
    calm = _run(tmp_path / "calm", wikitext_path, 0)
    assert len(calm["nodes"]) == 2  # evaluators scored candidates on both raylets
    assert calm["most_at_once"] >= 3, calm["most_at_once"]  # ... at the same time (4 evaluators, 5 offspring)
    # the database reached each node once: both evaluators of a node read the same mapped copy
    # (that raylet's plasma file, same offset), and the two nodes' copies are different memory
    copies = calm["copies"]
    assert all(len(c) == 1 and c[0] for c in copies.values()), copies
    assert len({c[0] for c in copies.values()}) == 2, copies
    hit = _run(tmp_path / "hit", wikitext_path, 8)
    assert len(hit["removed"]) == 1
    assert hit["best"] == calm["best"] and hit["fitness"] == calm["fitness"]
    assert hit["evaluations"] == calm["evaluations"] == 5 * 6
