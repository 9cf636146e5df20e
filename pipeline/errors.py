"""The one exception type for mistakes a user can fix (bad config, bad data, missing model)."""


class UserError(Exception):
    """A problem with the user's input. The CLI prints its message as one line, without a traceback."""


def one_line(error: BaseException) -> str:
    """A library error's text for a UserError: on one line (some messages break before their point),
    kept short."""
    text = " ".join(str(error).split())
    if len(text) > 300:
        text = text[:297] + "..."
    return text or type(error).__name__
