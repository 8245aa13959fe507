"""The Ray environment of a search: joining or starting Ray, and the resources evaluators get."""
from __future__ import annotations

import logging
import os

from .errors import RayPressError

# OpenMP threads that spin while waiting turn a shared CPU into a 10-30x slowdown once two
# processes compute at once (measured: 14.7 s vs 4.3 s for one SmolLM2 forward); passive waiting
# costs little when the machine is quiet.
CPU_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
_STARTED_HERE = False  # this process started (or joined) Ray through ensure_ray: it shuts it down
_OWN_TEMP: str | None = None  # the embedded Ray's private session folder, removed at shutdown


def shutdown_own_ray() -> None:
    """Shut down the Ray this process started (an interrupted or failed command must not leave
    Ray's threads to die at interpreter exit, which dumps a C++ stack); a Ray the caller started is
    left alone."""
    global _STARTED_HERE, _OWN_TEMP
    if _STARTED_HERE:
        import ray

        _STARTED_HERE = False
        if ray.is_initialized():
            _quiet_shutdown(ray)
    if _OWN_TEMP:
        import shutil

        shutil.rmtree(_OWN_TEMP, ignore_errors=True)
        _OWN_TEMP = None


def _quiet_shutdown(ray) -> None:
    """ray.shutdown() without the workers' dying words: shutdown SIGTERMs workers that may be inside
    a task, and their teardown tracebacks reach this process through Ray's log forwarding while it
    waits, ahead of the one line the command ends with. The driver's log thread picks sys.stdout /
    sys.stderr per message, so they are held aside for the shutdown alone."""
    import io
    import sys

    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = io.StringIO(), io.StringIO()
    try:
        ray.shutdown()
    finally:
        sys.stdout, sys.stderr = out, err


def _start_embedded_ray(ray) -> None:
    """A local Ray reachable from this machine only, its files in a private folder.

    Ray binds its gRPC servers and agents to the node's IP address (all interfaces by default on
    Linux); its own switch for a loopback-only node (the one it uses on macOS and Windows) makes the
    node IP 127.0.0.1, so the GCS, raylet, workers and agents listen there only. Its session folders
    (Ray makes its temp folder 0777; by default /tmp/ray, never removed) go below a 0700 temp folder
    of ours, removed at shutdown."""
    import atexit
    import tempfile

    from ray._private import ray_constants

    global _OWN_TEMP
    # embedded default: token auth stays on (Ray's safe default), its warning on every start does not
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    _OWN_TEMP = tempfile.mkdtemp(prefix="raypress-ray-")
    # library callers and jobs that never reach the CLI's cleanup; once, however often Ray restarts
    atexit.unregister(shutdown_own_ray)
    atexit.register(shutdown_own_ray)
    was = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init picks the node IP: loopback
    try:
        # address="local": always a fresh Ray. A bare ray.init() would instead join the cluster named
        # in /tmp/ray/ray_current_cluster, which a killed driver leaves behind (then hangs minutes)
        ray.init(address="local", include_dashboard=False, dashboard_host="127.0.0.1",
                 logging_level=logging.WARNING, runtime_env={"env_vars": CPU_ENV}, _temp_dir=os.path.join(_OWN_TEMP, "ray"))
    except BaseException:
        shutdown_own_ray()  # Ray did not start: only our temp folder to remove
        raise
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = was


def ensure_ray(address: str | None = None):
    import ray

    # per-trial result files are off (TUNE_DISABLE_AUTO_CALLBACK_LOGGERS): MLflow is the record
    logging.getLogger("ray.tune.analysis.experiment_analysis").setLevel(logging.ERROR)

    # read by Tune when a Tuner runs: set them also when the caller started Ray itself
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    if address == "local":
        address = None
    if address:
        _check_ray_address(address)
    try:
        if address:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        else:
            _start_embedded_ray(ray)
        global _STARTED_HERE
        _STARTED_HERE = True
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as e:
        raise RayPressError(
            f"cannot connect to the Ray cluster at '{address}' ({str(e).splitlines()[0][:120]}); "
            "start it with `ray start --head` or unset ray_address/RAY_ADDRESS to use a local Ray"
        ) from None
    return ray


def _check_ray_address(address: str, timeout: float = 2.0) -> None:
    """A TCP connect to host:port first: ray.init on a dead address retries for minutes."""
    import socket

    if address == "auto":
        return
    hostport = address.split("://", 1)[-1].split("/", 1)[0]
    host, _, port = hostport.rpartition(":")
    if not host or not port.isdigit():
        raise RayPressError(
            f"ray_address '{address}' is not host:port (e.g. 127.0.0.1:6379 or ray://head:10001); "
            "fix it or unset ray_address/RAY_ADDRESS to use a local Ray"
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise RayPressError(
            f"cannot reach the Ray cluster at '{address}' ({e.strerror or type(e).__name__}); "
            "start it with `ray start --head` or unset ray_address/RAY_ADDRESS to use a local Ray"
        ) from None


def resources(cfg) -> tuple[int, dict]:
    import ray

    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0))
    cpus = int(total.get("CPU", 1))
    want_gpu = cfg.evaluator.device.startswith("cuda") or (cfg.evaluator.device == "auto" and gpus > 0)
    if cfg.evaluator.device.startswith("cuda") and gpus == 0:
        raise RayPressError(
            "evaluator.device=cuda but the Ray cluster has no GPUs; use evaluator.device=cpu or add GPU nodes"
        )
    k = cfg.evaluator.gpus_per_evaluator if cfg.evaluator.mode == "device_map" else 1
    n = cfg.evaluator.num_evaluators
    if n == "auto":  # one evaluator per k GPUs (device_map spans k each)
        n = max(1, gpus // k) if want_gpu else 1
    n = int(n)
    cpe = cfg.evaluator.cpus_per_evaluator
    cpe = max(1, (cpus // n) if not want_gpu else min(4, max(1, cpus // n))) if cpe == "auto" else int(cpe)
    if cpe > cpus:  # Tune would wait forever for an actor that never fits
        raise RayPressError(
            f"evaluator.cpus_per_evaluator={cpe} but the Ray cluster has {cpus} CPUs; "
            "lower it (or use auto) or add nodes"
        )
    if want_gpu and k > max(gpus, 1):
        raise RayPressError(f"evaluator.gpus_per_evaluator={k} but the Ray cluster has {gpus} GPUs; lower it or add nodes")
    res = {"cpu": cpe, "gpu": k} if want_gpu else {"cpu": cpe}
    return n, res


