"""The evaluators of a search: long-lived Ray actors that hold the base model, started once, in
parallel, before the first trial, and lent to Ray Tune's trials one candidate at a time.

Why not let Tune's trial actors be the evaluators (as RayPress first did): Tune starts an actor for
each pending trial and, with reuse_actors, gives the trial to whichever cached actor frees up first,
killing the actor it was starting for it; between two generations it keeps one cached actor. An
evaluator takes ~100 s to start at 8B width and scores a candidate in ~0.07 s, so the actors being
started never finished: one evaluator scored every candidate, whatever the number of GPUs (a
two-node test saw one node). Here a Tune trial is a thin client: it holds no CPU or GPU
(`TRIAL_RESOURCES`), and hands its candidate to the `Dispatcher`, which gives it to an idle
evaluator. The evaluators keep the resources (GPUs, CPU threads) and live as long as the search.

A crashed evaluator (killed process, lost node) costs its candidate a retry on another evaluator;
Ray restarts the crashed one (`max_restarts`), and it rejoins once it has loaded the model again.

This module imports no torch: Tune's trial actors import it, and they should start in a second.
"""
from __future__ import annotations

import asyncio
import logging
import time

from ray import tune

from . import trial
from .errors import RayPressError, user_error

log = logging.getLogger("raypress.progress")

# A trial borrows an evaluator; it needs no CPU (Tune refuses an empty request, so: a little memory).
TRIAL_RESOURCES = {"cpu": 0, "memory": 64 * 2**20}
RESTARTS = 3  # per evaluator; like Tune's max_failures before, a crash is retried, a crash loop is not
WAIT_LOG_S = 60.0  # while evaluators start, a line this often (a 70B evaluator loads for minutes)


class Dispatcher:
    """An async actor on the driver's node: lends idle evaluators to trials, retries the candidate of
    an evaluator that died on another one, and takes the restarted evaluator back once it is ready."""

    def __init__(self, members: list, spec):
        self.members, self.spec = members, spec
        self.idle: asyncio.Queue = asyncio.Queue()
        for i in range(len(members)):
            self.idle.put_nowait(i)
        self.lost: set[int] = set()

    async def score(self, config: dict) -> dict:
        import ray

        while True:
            i = await self.idle.get()
            if i is None:  # every evaluator is gone: wake the next waiter too
                self.idle.put_nowait(None)
                raise RayPressError(f"all {len(self.members)} evaluators died and did not restart "
                                    f"(after {RESTARTS} restarts each); see the Ray logs of the evaluator actors")
            try:
                result = await self.members[i].score_trial.remote(config)
            except ray.exceptions.RayActorError:
                asyncio.get_running_loop().create_task(self._rejoin(i))
                continue
            self.idle.put_nowait(i)
            return result

    async def _rejoin(self, i: int) -> None:
        """Back in the queue when Ray has restarted evaluator i (it loads the model again); lost for good
        when it cannot restart. One that never fits again (its node is gone) just never comes back."""
        import ray

        error = "died"
        for attempt in range(RESTARTS + 2):  # a call right after the crash can still reach the dead process
            try:
                error = await self.members[i].load.remote(self.spec)
                break
            except ray.exceptions.RayActorError:
                await asyncio.sleep(1.0 + attempt)
        if error:
            self.lost.add(i)
            if len(self.lost) == len(self.members):
                self.idle.put_nowait(None)
            return
        self.idle.put_nowait(i)


class EvaluatorPool:
    """`n` evaluator actors with `resources` each ({"cpu": c, "gpu": g}) and their dispatcher.

    Use as a context manager around the search and its final evaluations; `call` runs an Evaluator
    method on one live evaluator (the held-out numbers), `dispatcher` is what trials talk to
    (dispatch=False: no dispatcher, for a pool that only measures, e.g. a one-shot schedule's result)."""

    def __init__(self, spec, n: int, resources: dict, dispatch: bool = True):
        self.spec, self.n, self.res, self.dispatch = spec, int(n), dict(resources), dispatch
        self.members: list = []
        self.dispatcher = None
        self._answers: dict = {}  # call's results: a comparison's searches each measure dense and uniform

    def __enter__(self) -> "EvaluatorPool":
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from .evaluator import PoolMember

        opts = {"num_cpus": self.res["cpu"], "num_gpus": self.res.get("gpu", 0), "max_restarts": RESTARTS}
        member = ray.remote(PoolMember).options(**opts)
        self.members = [member.remote() for _ in range(self.n)]
        spec = ray.put(self.spec)  # once, for every evaluator and every reload after a restart
        t0 = time.time()
        pending = {m.load.remote(spec): k for k, m in enumerate(self.members)}
        errors, last_log = [], t0
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1, timeout=5.0)
            for ref in done:
                pending.pop(ref)
                try:
                    error = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    error = f"an evaluator actor died while loading the model ({str(e).splitlines()[0][:160]})"
                if error:
                    errors.append(error)
            if errors:  # one evaluator's user error (out of memory, bad device) is every evaluator's
                raise RayPressError(errors[0])
            if pending and time.time() - last_log >= WAIT_LOG_S:
                last_log = time.time()
                free = ray.available_resources()
                log.info("  starting evaluators: %d/%d ready after %.0f s (each needs %s; the cluster has %s CPU, "
                         "%s GPU free)", self.n - len(pending), self.n, time.time() - t0, self._need(),
                         free.get("CPU", 0), free.get("GPU", 0))
        if self.dispatch:  # it lives with the driver: losing another node must not take it along
            here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
            self.dispatcher = ray.remote(Dispatcher).options(num_cpus=0, scheduling_strategy=here,
                                                             max_concurrency=10_000).remote(self.members, spec)
        log.debug("%d evaluators ready in %.1f s", self.n, time.time() - t0)

    def _need(self) -> str:
        gpu = self.res.get("gpu", 0)
        return f"{self.res['cpu']} CPU" + (f" + {gpu} GPU" if gpu else "")

    def call(self, name: str, *args, **kwargs):
        """Evaluator.<name>(*args, **kwargs) on the first evaluator that answers. Evaluators are
        deterministic functions of their arguments, so a repeated call is answered from memory (at
        OPT-66B width a held-out perplexity is a minute of GPU time)."""
        import json

        import ray

        key = json.dumps([name, args, kwargs], sort_keys=True, default=str)
        if key in self._answers:
            return self._answers[key]
        last = None
        for m in self.members:
            try:
                self._answers[key] = ray.get(getattr(m, name).remote(*args, **kwargs))
                return self._answers[key]
            except ray.exceptions.RayActorError as e:
                last = e
        raise RayPressError(f"no evaluator is left to run the final evaluation ({str(last).splitlines()[0][:160]})")

    def close(self) -> None:
        import ray

        for a in [self.dispatcher, *self.members]:
            if a is not None:
                try:
                    ray.kill(a, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone
                    pass
        self.members, self.dispatcher = [], None


class SharedPool:
    """One evaluator pool for consecutive searches that score candidates the same way (a comparison's
    searchers: same model, database, data and evaluator settings; only the searcher or the target
    differs). The first search that needs evaluators starts the pool, the next ones reuse it, and a
    search whose `key` differs gets a new one. At OPT-66B width each pool start is ~100 s of model
    loading; a comparison of three searchers paid it three times. The owner closes it."""

    def __init__(self):
        self.key, self.pool = None, None

    def get(self, key, spec, n: int, resources: dict) -> tuple[EvaluatorPool, bool]:
        """(the pool for `key`, whether it was started now)."""
        if key == self.key and self.pool is not None:
            return self.pool, False
        self.close()
        self.pool = EvaluatorPool(spec, n, resources).__enter__()
        self.key = key
        return self.pool, True

    def peek(self, key) -> EvaluatorPool | None:
        """The running pool if it serves `key` (a one-shot schedule measures on it), else None."""
        return self.pool if key == self.key else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        self.key, self.pool = None, None

    def __enter__(self) -> "SharedPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class EvaluatorTrainable(tune.Trainable):
    """A Tune trial = one candidate (or one batch of candidates), scored by an evaluator of the pool.

    A user error (RayPressError: out of GPU memory, ...) comes back as a result carrying
    trial.RESULT_KEY instead of an exception: Tune would retry an exception (max_failures) although it
    fails the same way every time; the runner's stopper ends the search and raises it."""

    def setup(self, config, dispatcher=None):
        self._cfg, self._dispatcher = config, dispatcher

    def reset_config(self, new_config):
        self._cfg = new_config
        return True

    def step(self):
        import ray

        try:
            result = ray.get(self._dispatcher.score.remote(self._cfg))
        except RayPressError as e:  # raised in the dispatcher: Ray re-raises it as the same class
            result = trial.user_error_result(user_error(e))
        result["done"] = True
        return result

    # a trial is one stateless evaluation: a retried trial re-runs it, nothing to checkpoint
    def save_checkpoint(self, checkpoint_dir):
        return {}

    def load_checkpoint(self, checkpoint):
        return None


def make_trainable(pool: EvaluatorPool):
    """The Tune trainable of a search whose evaluators are `pool`."""
    return tune.with_resources(tune.with_parameters(EvaluatorTrainable, dispatcher=pool.dispatcher),
                               TRIAL_RESOURCES)
