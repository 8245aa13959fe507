"""Fault injection for subprocess tests (imported by Ray workers via worker_process_setup_hook).

    ray.init(runtime_env={"worker_process_setup_hook": "_faultinject.gpu_oom", ...})

`gpu_oom` makes every evaluator forward pass raise torch.cuda.OutOfMemoryError, exactly what a
too-large evaluator.batch_size does on a real GPU; `gpu_oom_at_load` makes every evaluator run out of
GPU memory while it loads; `trial_crash` makes every Tune trial fail.
"""


def gpu_oom():
    import torch

    from raypress import evaluator

    def forward(self, ids):
        import os

        if os.environ.get("RAYPRESS_FAULT_LOG"):  # one line per attempt: lets the test count retries
            with open(os.environ["RAYPRESS_FAULT_LOG"], "a") as f:
                f.write("oom\n")
        raise torch.cuda.OutOfMemoryError(
            "CUDA out of memory. Tried to allocate 3.00 GiB. GPU 0 has a total capacity of 79.11 GiB")
        yield  # a generator, like the real _forward

    evaluator.Evaluator._forward = forward


def gpu_oom_at_load():
    """Every evaluator runs out of GPU memory while it loads (a GPU that another process fills: on an
    H100 the driver's own cached memory after a Hessian-scheduler pass did). This CPU machine has no
    CUDA, so the free/total memory the message quotes is what a full 80 GiB GPU would report."""
    import torch

    from raypress import evaluator

    def init(self, spec, model=None):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 44.00 GiB. GPU 0 has a total "
                                          "capacity of 79.11 GiB of which 21.50 GiB is free")

    evaluator.Evaluator.__init__ = init
    torch.cuda.empty_cache = lambda: None
    torch.cuda.mem_get_info = lambda device=None: (int(21.5 * 2**30), int(79.11 * 2**30))


def trial_crash():
    """Every Tune trial fails with an exception that is not a user error (a worker that cannot do its
    job: a broken install, a crash at every call); Tune retries each, the searcher re-queues it."""
    from raypress import pool

    def step(self):
        raise RuntimeError("injected: this trial worker cannot score anything")

    pool.EvaluatorTrainable.step = step


def run_cli(argv, hook=None, num_cpus=2):
    """Start a fresh local Ray (with `hook` in every worker and here), then `raypress` argv."""
    import os
    import sys
    from pathlib import Path

    import ray

    from raypress.cli import _quiet

    _quiet()  # what `raypress` does before it starts Ray (its environment reaches the workers)
    tests = Path(__file__).resolve().parent
    env = {"PYTHONPATH": os.pathsep.join([str(tests.parent), str(tests)])}
    rt = {"env_vars": env}
    if hook:
        rt["worker_process_setup_hook"] = f"_faultinject.{hook}"
        globals()[hook]()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="WARNING", runtime_env=rt)
    from raypress.cli import main
    from raypress.ray_env import _quiet_shutdown

    rc = main(argv)
    # this harness started Ray, so main() leaves it running (a Ray the caller started is the caller's);
    # shut it down as the CLI shuts down its own, not at interpreter exit, where Ray's atexit hook
    # prints the killed workers' last words after the command's one line
    _quiet_shutdown(ray)
    sys.exit(rc)


if __name__ == "__main__":
    import sys

    hook = sys.argv[1] if sys.argv[1] != "-" else None
    run_cli(sys.argv[2:], hook)
