"""The one exception type for mistakes a user can fix (bad paths, bad checkpoints, bad arguments).

The command line prints these as a single line and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class SambayError(Exception):
    """A user-facing error: the message says what was wrong and what to do about it."""
