"""OPT-66B at 70% unstructured sparsity: EvoPress vs Optuna TPE vs the Hessian scheduler.

On a cluster (head node started with `ray start --head`, token auth on):
    RAY_AUTH_MODE=token ray job submit --working-dir . -- python jobs/prune_opt66b.py
Same job, SmolLM2-sized, on this machine or through a local `ray job submit`:
    python jobs/prune_opt66b.py --local [--set searcher.generations=3 ...]

Every size comes from search_spaces/opt66b_sparsity.yaml and can be overridden with --set;
--local applies the SmolLM2 overrides below first. A submitted job runs in a temporary copy of
the working dir, so the MLflow store and the run folders default to $RAYPRESS_HOME (default
~/raypress) instead of the working dir: nothing is lost when the job's sandbox is deleted.
"""
import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from raypress.cli import main as cli_main  # noqa: E402
from raypress.data import offline_source  # noqa: E402

SEARCHERS = "evopress,tpe,hessian"

LOCAL = [  # the cluster YAML shrunk to SmolLM2-135M on one machine (CPU or one GPU)
    "model=smollm2-135m", "levels=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]",
    "data.seq_len=256", "data.n_calib=64", "data.n_eval=16",
    "searcher.generations=10", "searcher.offspring=8", "searcher.stages=[[256, 4], [1024, 1]]",
    "evaluator.device=auto", "evaluator.dtype=auto", "evaluator.mode=resident", "evaluator.gpus_per_evaluator=1",
    "evaluator.batch_size=8", "evaluator.kl_topk=null", "evaluator.teacher_memory=device",
    "database.parallel=false", "database.device=auto",
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--local", action="store_true", help="SmolLM2-135M sizes (see LOCAL)")
    ap.add_argument("--searchers", default=SEARCHERS)
    ap.add_argument("--targets", default=None, help="comma list (default: the YAML's 0.7)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)

    sets = (LOCAL if args.local else []) + args.set
    keys = {s.split("=", 1)[0].strip() for s in sets}
    if args.local and "data.source" not in keys:
        sets.append(f"data.source={offline_source(ROOT)}")
    home = Path(os.environ.get("RAYPRESS_HOME", Path.home() / "raypress")).expanduser().resolve()
    if "output" not in keys:
        sets.append(f"output={home / 'runs'}")
    if "tracking.uri" not in keys and not os.environ.get("MLFLOW_TRACKING_URI"):
        home.mkdir(parents=True, exist_ok=True)
        sets.append(f"tracking.uri=sqlite:///{home / 'mlflow.db'}")
    common = ["--config", str(ROOT / "search_spaces/opt66b_sparsity.yaml"), "--searchers", args.searchers]
    if args.targets:
        common += ["--targets", args.targets]
    for s in sets:
        common += ["--set", s]
    # what will start (and why not), from config.json alone, before the first GPU-hour is spent
    rc = cli_main(["plan", *common])
    if rc:
        return rc
    print("  for reference: the Hessian-scheduler paper prunes OPT-66B in a few hours on one A100 (one-shot, "
          "no search); the estimates above include the search\n", flush=True)
    return cli_main(["compare", *common])


if __name__ == "__main__":
    sys.exit(main())
