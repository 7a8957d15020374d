"""User-facing errors: raised for bad arguments, configs or inputs, printed as one line by the CLI."""


class UserError(Exception):
    """A mistake the user can fix; the message says what to do. The CLI prints it without a traceback."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when empty), for one-line user errors."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line[:limit] if limit else line
