"""The one exception type for mistakes a user can cause (bad path, bad config, unreachable endpoint).

The command line turns a `UserError` into one line on stderr and a non-zero exit, no traceback.
Every package raises it for user mistakes; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem the user can fix; its message is a single self-contained line."""
