"""The error type that ends a run with a one-line message instead of a traceback."""


class UserError(Exception):
    """A problem the user can fix (bad config, missing data); printed as one line, exit code 2."""
