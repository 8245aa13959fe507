"""One judge of a target (budget.py): every shipped YAML x a grid of targets x every searcher.

For each (YAML, target) the budget's verdict is computed once; then every searcher the family
offers is built (Tune searchers) or run (schedules) on that space *without* consulting the verdict,
and must succeed exactly when the verdict says ok, failing with the verdict's own message
otherwise. `raypress plan --json` must print the same answers.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest

from raypress.budget import Budget, exact_budget, target_text
from raypress.config import load_config
from raypress.errors import RayPressError
from raypress.families import get_family
from raypress.models import get_adapter, meta_model
from raypress.search import SEARCHERS, check
from raypress.search import schedules as S

ROOT = Path(__file__).resolve().parents[1]
YAMLS = sorted((ROOT / "search_spaces").glob("*.yaml"))
GRID = {
    "sparsity": [0.0, 0.25, 0.5, 0.55, 0.6, 0.6005, 0.65, 0.7, 0.9, 0.95, 1.5],
    "quant": [1.0, 2.0, 2.5, 3.0, 3.3, 4.5, 8.0, 9.0],
    "depth": [k / 60 for k in range(61)] + [0.1, 0.33, 0.3333, 0.5, 0.999],
    "width": [0.0, 0.1, 0.2, 0.21, 0.25, 0.5, 0.9],
    "joint": [1.0, 2.0, 2.1, 3.2, 4.0, 4.3, 5.6, 16.0, 17.0],
}


@pytest.fixture(scope="module")
def adapters():
    cache = {}

    def get(spec):
        if spec not in cache:
            cache[spec] = get_adapter(meta_model(spec))
        return cache[spec]

    return get


def _run_directly(name, cfg, space, family):
    """Build / run searcher `name` on `space` the way the runner would, minus the registry check."""
    info = SEARCHERS[name]
    if not info.one_shot:
        return info.build(cfg, space)
    rng = np.random.default_rng(0)
    if name == "uniform":
        return space.uniform()
    if name == "dp":
        return S.dp_schedule(space, {l: np.sort(rng.random(len(v)))[::-1] for l, v in
                                     zip(space.layers, space.level_values)})
    if name in ("owl", "hessian"):  # both snap their per-layer wishes with `project`
        return S.project(space, {l: float(rng.uniform(0, 0.9)) for l in space.layers})
    if name == "shortgpt":
        from raypress.compress.depth import shortgpt_config

        return shortgpt_config(space, {u: float(rng.random()) for u in space.layers})
    raise AssertionError(name)


@pytest.mark.parametrize("yaml_path", YAMLS, ids=[p.stem for p in YAMLS])
def test_every_searcher_agrees_with_the_budget_verdict(yaml_path, adapters):
    base = load_config(yaml_path, ["searcher.generations=1", "searcher.offspring=2"])
    family = get_family(base.family)
    adapter = adapters(base.model)
    offered = [n for n, s in SEARCHERS.items() if not s.one_shot or n in family.schedules]
    for target in GRID[base.family]:
        cfg = copy.deepcopy(base)
        cfg.target = target
        space = family.space(cfg, adapter)
        verdict = space.verdict()
        for name in offered:
            expected = verdict.message
            if verdict.ok and SEARCHERS[name].front and target <= verdict.lo + 1e-9:
                # a front trades size for quality between the cheapest reachable value and the target:
                # at the cheapest value there is nothing to trade (pareto.resolve_budgets' own rule)
                with pytest.raises(RayPressError, match="a front needs at least 2 budgets"):
                    check(cfg, family, space, name)
                continue
            try:
                check(cfg, family, space, name)
                checked = ""
            except RayPressError as e:
                checked = str(e)
            assert checked == expected, (name, target)
            try:
                _run_directly(name, cfg, space, family)
                got = ""
            except RayPressError as e:
                got = str(e)
            assert got == verdict.message, f"{yaml_path.stem} target {target} searcher {name}: {got!r} vs {verdict}"
        if not verdict.ok:
            assert verdict.message and "target" in verdict.message
            for hint in verdict.nearest:  # every target the message suggests is accepted when typed back
                cfg.target = float(hint)
                assert family.space(cfg, adapter).verdict().ok, (yaml_path.stem, target, hint)


def test_depth_whole_unit_targets_are_accepted_everywhere(adapters):
    cfg = load_config(ROOT / "search_spaces/smollm2_depth.yaml")
    family = get_family("depth")
    space0 = family.space(cfg, adapters(cfg.model))
    n = len(space0.layers)
    assert n == 60
    for k in range(n + 1):
        cfg.target = k / n
        space = family.space(cfg, adapters(cfg.model))
        assert space.verdict().ok, k
        for name in ("evopress", "random", "tpe", "cmaes", "nsga2", "uniform", "shortgpt"):
            cfg.searcher.name = name
            check(cfg, family, space, name)
            cfg_out = _run_directly(name, cfg, space, family)
            if SEARCHERS[name].one_shot:
                assert sum(cfg_out.values()) == k
    cfg.target = 0.33  # 19.8 of 60 units
    v = family.space(cfg, adapters(cfg.model)).verdict()
    assert not v.ok and v.nearest == ("0.31667", "0.33333")
    assert "nearest reachable targets: 0.31667 or 0.33333" in v.message


def test_budget_arithmetic_is_exact():
    assert exact_budget(4 / 30, 30) == 4000  # rounded once over the total
    b = Budget([3, 1], [[0.0, 0.5, 1.0], [0.0, 1.0]], 0.25)
    assert b.costs == [[0, 1500, 3000], [0, 1000]] and b.budget == 1000 and b.verdict().ok
    assert b.solve([[0, 1, 2], [5, 0]])[0].tolist() == [0, 1]
    out = Budget([3, 1], [[0.0, 1.0], [0.0, 1.0]], 0.5).verdict()  # 2000 of {0, 1000, 3000, 4000}
    assert not out.ok and out.nearest == ("0.25", "0.75")
    far = Budget([3, 1], [[0.0, 0.5], [0.0, 0.5]], 0.9).verdict()
    assert not far.ok and "outside" in far.message and far.nearest == ("0.5",)
    assert target_text(19000, 60) == "0.31667" and exact_budget(0.31667, 60) == 19000


def test_plan_json_matches_the_checks(capsys):
    from raypress.cli import main

    rc = main(["plan", "--config", str(ROOT / "search_spaces/smollm2_depth.yaml"), "--targets", "0.25,0.33",
               "--searchers", "evopress,tpe,shortgpt,owl", "--json"])
    assert rc == 0
    report = json.loads(capsys.readouterr().out)
    got = {(c["target"], c["searcher"]): c["ok"] for c in report["checks"]}
    assert got == {(0.25, "evopress"): True, (0.25, "tpe"): True, (0.25, "shortgpt"): True, (0.25, "owl"): False,
                   (0.33, "evopress"): False, (0.33, "tpe"): False, (0.33, "shortgpt"): False, (0.33, "owl"): False}
    bad = next(c for c in report["checks"] if c["target"] == 0.33 and c["searcher"] == "tpe")
    assert "0.31667 or 0.33333" in bad["message"] and bad["nearest"] == ["0.31667", "0.33333"]
    owl = next(c for c in report["checks"] if c["target"] == 0.25 and c["searcher"] == "owl")
    assert "not offered by family depth" in owl["message"]


def test_plan_opt66b_offline_from_the_bundled_config(capsys):
    from raypress.cli import main

    rc = main(["plan", "--config", str(ROOT / "search_spaces/opt66b_sparsity.yaml"), "--targets", "0.7,0.75"])
    out = capsys.readouterr().out
    assert rc == 0 and "facebook/opt-66b" in out and "384 units" in out
    assert out.count(" yes ") >= 2 * 7  # evopress, random, tpe, cmaes, nsga2, uniform, owl, hessian, dp at both
    # the schedules that calibrate point at the statistics pass's estimate; uniform has no pass
    hessian = [l for l in out.splitlines() if " hessian " in l]
    assert len(hessian) == 2 and all("the statistics pass in the resources" in l for l in hessian)
    assert not any("statistics pass" in l for l in out.splitlines() if " uniform " in l)


def test_plan_points_only_the_statistics_schedules_at_the_statistics_estimate(capsys):
    """ShortGPT (depth) runs its own pass over the dense model, which `raypress plan` does not estimate:
    it says so instead of pointing at the statistics pass of OWL / Hessian / DP."""
    from raypress.cli import main

    rc = main(["plan", "--config", str(ROOT / "search_spaces/smollm2_depth.yaml"), "--targets", "0.25",
               "--searchers", "uniform,shortgpt"])
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if " shortgpt " in l]
    assert rc == 0 and "not in the time estimates" in line and "statistics pass" not in line


def test_unknown_searcher_in_plan_is_one_line(capsys):
    from raypress.cli import main

    rc = main(["plan", "--config", str(ROOT / "search_spaces/smollm2_depth.yaml"), "--searchers", "annealing"])
    assert rc == 2 and "unknown searcher 'annealing'" in capsys.readouterr().err


def test_plan_resources_for_opt66b_on_a_cluster(capsys):
    from raypress.cli import main

    rc = main(["plan", "--config", str(ROOT / "search_spaces/opt66b_sparsity.yaml"), "--searchers", "evopress",
               "--cluster", "4x8x80", "--json"])
    assert rc == 0
    r = json.loads(capsys.readouterr().out)["resources"]
    for key in ("model_params", "database_bytes", "database_placement", "driver_host_peak_bytes",
                "evaluator_gpu_peak_bytes", "evaluators", "est_build_s", "est_search_s"):
        assert key in r
    assert 65e9 < r["model_params"] < 67e9 and r["evaluators"] == 16  # 32 GPUs, 2 per evaluator (device_map)
    assert r["database_bytes"] == 5 * 2 * 64 * (4 * 9216 * 9216 + 2 * 9216 * 36864)  # 5 fp16 levels of every linear
    rc = main(["plan", "--config", str(ROOT / "search_spaces/opt66b_sparsity.yaml"), "--cluster", "lots"])
    assert rc == 2 and "--cluster takes NODESxGPUS" in capsys.readouterr().err
