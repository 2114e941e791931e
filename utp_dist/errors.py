"""The error type that ends a run with a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data); printed as one line, exit code 2."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__
