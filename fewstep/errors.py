"""The one exception type for mistakes a user can make (bad path, bad size, unknown key ...).

The CLI prints a `FewstepError` as a single line and exits with status 2; anything else is a bug
and keeps its traceback.
"""


class FewstepError(Exception):
    """A user-facing error: the message names the thing that is wrong and says what to do."""
