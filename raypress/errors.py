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


def user_error(exc: BaseException | None) -> RayPressError | None:
    """The RayPressError behind `exc` (itself, or inside Ray/Tune wrappers), else None."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        e = stack.pop(0)
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)  # RayTaskError keeps the remote exception here
        if isinstance(e, RayPressError) and not isinstance(cause, BaseException):
            return RayPressError(_message(e))
        if isinstance(cause, BaseException):
            stack.append(cause)
        stack.extend([e.__cause__, e.__context__])
        stack.extend(a for a in getattr(e, "args", ()) if isinstance(a, BaseException))
    return None
