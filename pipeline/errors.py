"""The one exception type for mistakes a user can fix (bad config, bad data, missing model)."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints its message as one line, without a traceback."""
