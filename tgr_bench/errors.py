"""The one exception type that reaches the user as a short message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""
