"""The one exception type that reaches the user as a short message instead of a traceback."""


class UserError(Exception):
    """Bad input or environment: the message says what is wrong and how to fix it."""


def number(name: str, value: object) -> float:
    """`value` as a float, or a one-line error naming the setting (never a traceback)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UserError(f"{name}={value!r} is not a number.")
    return float(value)


def whole(name: str, value: object, minimum: int = 1) -> int:
    """`value` as a whole number >= minimum, or a one-line error naming the setting."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{name}={value!r}: need a whole number >= {minimum}.")
    return value


def flag(name: str, value: object) -> bool:
    """`value` as a bool, or a one-line error: a string such as "no" must never switch on."""
    if not isinstance(value, bool):
        raise UserError(f"{name}={value!r}: use true or false.")
    return value


class Terminated(BaseException):
    """SIGTERM (a scheduler's kill, `kill PID`), raised in the main thread like Ctrl-C's
    KeyboardInterrupt so that the same cleanup runs."""


class Interrupted(Exception):
    """A run stopped by Ctrl-C or SIGTERM: the message says what is saved and how to resume."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code_of(signal_error: BaseException) -> int:
    """130 for Ctrl-C, 143 for SIGTERM, as shells report them."""
    return 143 if isinstance(signal_error, Terminated) else 130
