"""User-facing errors: raised for bad arguments, configs or inputs, printed as one line by the CLI."""


class UserError(Exception):
    """A mistake the user can fix; the message says what to do. The CLI prints it without a traceback."""
