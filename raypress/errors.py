"""One error type for everything a user can fix.

Every RayPressError message is a single line that says what is wrong *and* how to fix it;
the CLI prints it as `raypress: error: <message>` and exits 2 (no traceback).

Errors raised inside Ray actors / Tune trials come back wrapped (RayTaskError, TuneError, ...):
`user_error(exc)` digs the RayPressError out of such a chain so it still prints as one line.
An evaluator reports a user error as a result carrying `trial.RESULT_KEY` (not as an exception),
so Tune does not retry a deterministic mistake (it retries only crashed actors).
"""


class RayPressError(Exception):
    """A user-facing, one-line error naming the fix."""


def _message(e: BaseException) -> str:
    # a RayTaskError.as_instanceof_cause() object is also a RayPressError, but its str() is the
    # whole remote traceback: prefer the plain cause's message, and only ever its first line
    text = str(e.args[0]) if getattr(e, "args", None) else str(e)
    return (text.strip().splitlines() or [""])[0]


def _chain(exc: BaseException | None):
    """`exc` and every exception behind it: causes, contexts, Ray's `cause`, exceptions passed as args
    (Ray / Tune wrap what an actor or a trial raised)."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)  # RayTaskError keeps the remote exception here
        if isinstance(cause, BaseException):
            stack.append(cause)
        stack.extend([e.__cause__, e.__context__])
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))


def user_error(exc: BaseException | None) -> RayPressError | None:
    """The RayPressError behind `exc` (itself, or inside Ray/Tune wrappers), else None."""
    for e in _chain(exc):
        # a RayTaskError.as_instanceof_cause() object is also a RayPressError: take its cause instead
        if isinstance(e, RayPressError) and not isinstance(getattr(e, "cause", None), BaseException):
            return RayPressError(_message(e))
    return None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def os_error(exc: BaseException | None) -> RayPressError | None:
    """A disk-full, permission or read-only failure behind `exc` as one line naming the file and the
    fix (these reach the CLI from deep inside torch, safetensors, MLflow or Ray), else None."""
    import errno

    for e in _chain(exc):
        code = e.errno if isinstance(e, OSError) else None
        what = f" writing {e.filename}" if isinstance(e, OSError) and e.filename else ""
        if code in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e):
            return RayPressError(f"no space left on the device{what}; free space or point output / "
                                 "database.cache_dir / RAYPRESS_CACHE at a larger disk, then run it again "
                                 "(a search resumes with --resume)")
        if code == errno.EFBIG:  # a file-size limit (ulimit -f) or the filesystem's largest file (FAT: 4 GiB)
            return RayPressError(f"no space left for a file that large{what} (a file-size limit or the "
                                 "filesystem's maximum file size); raise the limit or point output / "
                                 "database.cache_dir / RAYPRESS_CACHE at another disk, then run it again")
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return RayPressError(f"permission denied{what} ({e.strerror}); pick a folder you can write "
                                 "(output, database.cache_dir, RAYPRESS_CACHE) or fix its permissions")
    return None


def write_crash_log(exc: BaseException, root, argv=None) -> str:
    """The traceback of an unexpected failure in a log file under `root` (the CLI passes the cache's
    logs folder and prints one line pointing to the file); the temp folder when `root` is unwritable."""
    import os
    import sys
    import tempfile
    import time
    import traceback
    from pathlib import Path

    try:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"raypress-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
        path.write_text(f"argv: {argv if argv is not None else sys.argv[1:]}\n" +
                        "".join(traceback.format_exception(exc)))
    except OSError:  # the cache is unwritable (or full): the temp folder
        fd, name = tempfile.mkstemp(prefix="raypress-crash-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write("".join(traceback.format_exception(exc)))
        path = Path(name)
    return str(path)
