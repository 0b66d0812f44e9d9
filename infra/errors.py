"""The one exception type for mistakes a user can cause (bad path, bad config, unreachable endpoint).

The command line turns a `UserError` into one line on stderr and a non-zero exit, no traceback.
Every package raises it for user mistakes; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; its message is a single self-contained line."""


USER_ERROR_EXIT = 2  # a `UserError` ended the command
INTERRUPTED_EXIT = 130  # Ctrl-C (the shell's convention for SIGINT)
