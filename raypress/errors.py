"""One error type for everything a user can fix.

Every RayPressError message is a single line that says what is wrong *and* how to fix it;
the CLI prints it as `raypress: error: <message>` and exits 2 (no traceback).
"""


class RayPressError(Exception):
    """A user-facing, one-line error naming the fix."""
