"""MLflow tracking: one parent run per search, metrics per generation, artifacts, plots.

Default store: SQLite `mlflow.db` in the working directory; `MLFLOW_TRACKING_URI` or
`tracking.uri` win. Every run ends FINISHED or FAILED (with the reason as a tag) — never
left RUNNING.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import RayPressError

log = logging.getLogger("raypress")


def tracking_uri(uri: str | None = None) -> str:
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{Path('mlflow.db').resolve()}"


def artifact_location(uri: str, experiment: str) -> str | None:
    """A SQLite store keeps its artifacts next to it (<db dir>/mlartifacts/<experiment>), not in
    ./mlruns of whatever directory the search ran from; other stores use their default."""
    if not uri.startswith("sqlite:///"):
        return None
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in experiment) or "experiment"
    return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts" / safe).as_uri()


def _can_write(d: Path) -> bool:
    """A real probe (os.access says yes to root even on read-only mounts and /proc)."""
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".raypress-probe-"):
            return True
    except OSError:
        return False


def _check_writable(uri: str) -> None:
    """Fail fast, before any run exists: an unwritable SQLite store, a dead tracking server."""
    if uri.startswith("sqlite:///"):
        p = Path(uri[len("sqlite:///") :])
        d = p.parent
        if not d.is_dir():
            raise RayPressError(
                f"MLflow store {uri} is not writable: folder {d} does not exist; create it or set MLFLOW_TRACKING_URI "
                "/ tracking.uri to a writable location"
            )
        if not _can_write(d) or (p.exists() and not os.access(p, os.W_OK)):
            raise RayPressError(
                f"MLflow store {uri} is not writable; set MLFLOW_TRACKING_URI or tracking.uri to a writable location"
            )
    elif uri.startswith(("http://", "https://")):
        import socket
        from urllib.parse import urlparse

        u = urlparse(uri)
        port = u.port or (443 if u.scheme == "https" else 80)
        try:  # MLflow's client would retry with backoff for minutes
            socket.create_connection((u.hostname, port), timeout=3).close()
        except OSError as e:
            raise RayPressError(
                f"MLflow tracking server {uri} is unreachable ({e.strerror or type(e).__name__}); start it "
                "(`mlflow server --host 127.0.0.1`) or use a local store (tracking.uri=sqlite:///mlflow.db)"
            ) from None


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
DRIVER_TAG = "raypress.driver"  # host:pid:start-time of the process that drives the run

# The runs table RayPress opens (`raypress ui` prints its URL): MLflow's shared view state, an
# experiment tag "mlflow.sharedViewState.<key>" holding the table's columns and sort order as JSON,
# opened by ?viewStateShareKey=<key>. The columns are what every run has (runner._report, run tags).
VIEW_KEY = "raypress"
VIEW_COLUMNS = ["metrics.`ppl_best`", "metrics.`ppl_uniform`", "metrics.`ppl_dense`", "metrics.`target`",
                "metrics.`evaluations_total`", "metrics.`wall_seconds`", "metrics.`kl_heldout_best`",
                "tags.`raypress.searcher`", "tags.`raypress.family`", "tags.`raypress.method`",
                "tags.`raypress.model`"]
VIEW_STATE = {"orderByKey": "attributes.start_time", "orderByAsc": False, "selectedColumns": VIEW_COLUMNS,
              "runListHidden": False, "viewMaximized": False}


def compare_view_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table with RayPress's columns (an MLflow UI at `base`)."""
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"


def driver_id(pid: int | None = None) -> str:
    """host:pid:start-time of a process (start time guards against a reused pid)."""
    import socket

    import psutil

    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{int(psutil.Process(pid).create_time())}"


def driver_alive(tag: str | None) -> bool | None:
    """Whether the driver named by a DRIVER_TAG value still runs; None if unknown (other host)."""
    import socket

    import psutil

    try:
        host, pid, started = tag.rsplit(":", 2)
        pid, started = int(pid), int(started)
    except (AttributeError, ValueError):
        return None
    if host != socket.gethostname():
        return None
    try:
        return int(psutil.Process(pid).create_time()) == started
    except psutil.Error:
        return False


def reap_dead_runs(client, experiment_id: str) -> list[str]:
    """Mark RUNNING runs whose driver process died (SIGKILL, OOM kill, power loss) as KILLED,
    with a tag saying how to continue them. Returns their run ids."""
    reaped = []
    try:
        runs = client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=500)
    except Exception:  # noqa: BLE001 - best effort housekeeping
        return reaped
    for run in runs:
        if driver_alive(run.data.tags.get(DRIVER_TAG)) is False:
            where = run.data.tags.get("raypress.output_dir", "<output dir>")
            client.set_tag(run.info.run_id, "raypress.error",
                           f"driver process died; continue with `raypress search --resume {where}`")
            client.set_terminated(run.info.run_id, "KILLED")
            reaped.append(run.info.run_id)
    if reaped:
        log.warning("marked %d MLflow run(s) whose driver died as KILLED: %s", len(reaped), ", ".join(reaped))
    return reaped


def _store_busy(e: BaseException) -> bool:
    """A locked SQLite store (sqlite3.OperationalError "database is locked" / "busy", however wrapped)."""
    text = f"{type(e).__name__}: {e}".lower()
    return "database is locked" in text or "database is busy" in text or "sqlite_busy" in text


class Tracker:
    """Thin wrapper around an MLflow run that is always closed with a status."""

    def __init__(
        self, uri: str | None, experiment: str, run_name: str, parent_run_id: str | None = None, run_id: str | None = None
    ):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = tracking_uri(uri)
        _check_writable(self.uri)
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            if run_id:  # resume: reopen the same run
                self._reopen(run_id)
                return
            exp = self.client.get_experiment_by_name(experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                experiment, artifact_location=artifact_location(self.uri, experiment))
            if not exp or EXPERIMENT_KIND[0] not in exp.tags:  # the UI opens on the runs table, not GenAI traces
                self.client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
            view = json.dumps(VIEW_STATE)
            if not exp or exp.tags.get(f"mlflow.sharedViewState.{VIEW_KEY}") != view:
                self.client.set_experiment_tag(exp_id, f"mlflow.sharedViewState.{VIEW_KEY}", view)
            reap_dead_runs(self.client, exp_id)
            tags = {"mlflow.runName": run_name, DRIVER_TAG: driver_id()}
            if parent_run_id:
                tags["mlflow.parentRunId"] = parent_run_id
            self.run = self.client.create_run(exp_id, tags=tags, run_name=run_name)
        except RayPressError:
            raise
        except Exception as e:  # unreachable server, unwritable store, ...
            raise RayPressError(
                f"cannot open the MLflow store at {self.uri} ({type(e).__name__}: {str(e).splitlines()[0][:160]}); "
                "check MLFLOW_TRACKING_URI / tracking.uri"
            ) from None
        self.run_id = self.run.info.run_id
        self.experiment_id = exp_id
        self.closed = False
        self._unsent: list = []

    def _reopen(self, run_id: str) -> None:
        """Resume: the same run, RUNNING again under this driver (refused while its driver lives)."""
        try:
            run = self.client.get_run(run_id)
        except Exception:  # noqa: BLE001 - MlflowException(RESOURCE_DOES_NOT_EXIST) and friends
            raise RayPressError(
                f"the MLflow run {run_id} of this search is not in {self.uri}; resume with the tracking "
                "store it was started with (MLFLOW_TRACKING_URI / tracking.uri)"
            ) from None
        tags = run.data.tags
        if run.info.status == "RUNNING" and driver_alive(tags.get(DRIVER_TAG)):
            raise RayPressError(
                f"this search is still running (driver {tags.get(DRIVER_TAG)}); wait for it or stop it "
                "before resuming"
            )
        previous = run.info.status if not (run.info.status == "RUNNING") else "RUNNING (driver died)"
        self.client.update_run(run_id, status="RUNNING")
        if "raypress.error" in tags:  # the previous attempt's failure no longer describes the run
            self.client.delete_tag(run_id, "raypress.error")
        self.client.set_tag(run_id, DRIVER_TAG, driver_id())
        self.client.set_tag(run_id, "raypress.resumes", str(int(tags.get("raypress.resumes", "0")) + 1))
        self.client.set_tag(run_id, "raypress.resumed_from", previous)
        self.run = self.client.get_run(run_id)
        self.run_id, self.experiment_id, self.closed = run_id, run.info.experiment_id, False
        self._unsent = []

    # -- logging ---------------------------------------------------------------------------
    # A SQLite store is locked while another process writes it (a second search, `mlflow gc`, the UI's
    # writes); sqlite3 waits 5 s, then MLflow raises. Writes are retried for about a minute; metrics
    # that still cannot be written are kept and sent first by the next write (and by finish()), with
    # one warning line, so a busy store delays metrics but never drops them.
    RETRY_S = (0.5, 1, 2, 4, 8, 15, 30)

    def _write(self, fn, *args, **kw):
        import time

        for wait in (*self.RETRY_S, None):
            try:
                return fn(*args, **kw)
            except Exception as e:  # noqa: BLE001 - MlflowException wrapping sqlite3.OperationalError
                if wait is None or not _store_busy(e):
                    raise
                time.sleep(wait)

    def log_params(self, params: dict) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._write(self.client.log_batch, self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        ms = self._unsent + [Metric(k, float(v), ts, step or 0) for k, v in metrics.items() if v is not None]
        if not ms:
            return
        try:
            for i in range(0, len(ms), 1000):
                self._write(self.client.log_batch, self.run_id, metrics=ms[i : i + 1000])
            self._unsent = []
        except Exception as e:  # noqa: BLE001
            if not _store_busy(e):
                raise
            self._unsent = ms
            logging.getLogger("raypress").warning(
                "MLflow store %s busy for over a minute: %d metric values kept, sent with the next write",
                self.uri, len(ms))

    def set_tags(self, tags: dict) -> None:
        for k, v in tags.items():
            self._write(self.client.set_tag, self.run_id, k, str(v))

    def log_json(self, obj, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            p.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
            self.client.log_artifact(self.run_id, str(p))

    def log_table(self, columns: dict[str, list], name: str) -> None:
        """A table artifact MLflow's UI shows as a table (`columns`: name -> one value per row)."""
        self._write(self.client.log_table, self.run_id, columns, name)

    def log_file(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_figure(self, fig, name: str) -> None:
        with tempfile.TemporaryDirectory() as d:
            p = Path(d) / name
            fig.savefig(p, dpi=110, bbox_inches="tight")
            self.client.log_artifact(self.run_id, str(p))
        import matplotlib.pyplot as plt

        plt.close(fig)  # pyplot keeps every figure it made until closed (a compare makes dozens)

    # -- lifecycle -------------------------------------------------------------------------
    def finish(self) -> None:
        if not self.closed:
            if self._unsent:
                self.log_metrics({})
                if self._unsent:
                    raise RayPressError(f"the MLflow store {self.uri} stayed locked: {len(self._unsent)} metric "
                                        "values could not be written (result.json has the results); retry later")
            self._write(self.client.set_terminated, self.run_id, "FINISHED")
            self.closed = True

    def fail(self, reason: str) -> None:
        if not self.closed:
            try:
                self.client.set_tag(self.run_id, "raypress.error", reason[:5000])
            finally:
                self.client.set_terminated(self.run_id, "FAILED")
                self.closed = True

    def note_interrupt(self, reason: str) -> None:
        """Why a KILLED run stopped and how to resume it (best effort: the run is already ended)."""
        try:
            self.client.set_tag(self.run_id, "raypress.error", reason[:5000])
        except Exception:  # noqa: BLE001 - the store may be what was interrupted
            pass

    def kill(self) -> None:
        if not self.closed:
            self.client.set_terminated(self.run_id, "KILLED")
            self.closed = True


@contextmanager
def tracked(tracker: Tracker):
    """FINISHED on success, FAILED with the reason on any error, KILLED on Ctrl-C."""
    try:
        yield tracker
    except KeyboardInterrupt:
        tracker.kill()
        raise
    except BaseException as e:
        tracker.fail(f"{type(e).__name__}: {e}")
        raise
    else:
        tracker.finish()


def level_heatmap(space, config: dict, title: str = ""):
    """Blocks × linear-layer heatmap of the chosen level values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows: dict[str, dict[str, float]] = {}
    for layer, values in zip(space.layers, space.level_values):
        parts = layer.split(".")
        idx = next((i for i, p in enumerate(parts) if p.isdigit()), None)
        block = parts[idx] if idx is not None else "0"
        sub = ".".join(parts[idx + 1 :]) if idx is not None else layer
        rows.setdefault(sub or "block", {})[block] = values[config[layer]]
    subs = list(rows)
    blocks = sorted({b for r in rows.values() for b in r}, key=int)
    grid = np.full((len(subs), len(blocks)), np.nan)
    for i, s in enumerate(subs):
        for j, b in enumerate(blocks):
            grid[i, j] = rows[s].get(b, np.nan)
    fig, ax = plt.subplots(figsize=(max(6, len(blocks) * 0.3), 1 + 0.4 * len(subs)))
    im = ax.imshow(grid, aspect="auto", cmap="viridis")
    ax.set_yticks(range(len(subs)), subs)
    ax.set_xticks(range(len(blocks)), blocks, fontsize=7)
    ax.set_xlabel("block")
    ax.set_title(title or "level per layer")
    fig.colorbar(im, ax=ax)
    return fig


def fitness_curve(curves: dict, references: dict | None = None, scatter: dict | None = None,
                  title: str = "fitness vs evaluations"):
    """curves: name -> [(evaluations, KL)] drawn as lines; scatter: name -> points drawn faint (noisy
    per-generation values); references: name -> KL drawn as horizontal dashed lines. Linear axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, pts in (scatter or {}).items():
        if pts:
            xs, ys = zip(*pts)
            ax.scatter(xs, ys, s=10, alpha=0.35, label=name)
    for name, pts in curves.items():
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", markersize=3, label=name)
    for i, (name, y) in enumerate((references or {}).items()):
        if y is not None:
            ax.axhline(y, linestyle="--", linewidth=1, color=f"C{(i + 5) % 10}", label=f"{name} ({y:.3g})")
    ax.set_xlabel("candidate evaluations")
    ax.set_ylabel("KL(dense ‖ candidate), nats/token")
    ax.set_ylim(bottom=0)
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig
