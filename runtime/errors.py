"""The one exception type for errors a user can cause (bad files, mismatched engines, ...)."""


class PersenseError(Exception):
    """A user-facing error: the message says what is wrong and how to fix it."""
