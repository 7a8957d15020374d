"""User-facing errors: raised for bad arguments, configs or inputs, printed as one line by the CLI."""


class UserError(Exception):
    """A mistake the user can fix; the message says what to do. The CLI prints it without a traceback."""


def first_line(exc: BaseException, limit: int | None = None) -> str:
    """The first line of an exception's message (its type name when empty), for one-line user errors."""
    line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return line[:limit] if limit else line


class InfrastructureError(Exception):
    """A failure of the service or device, not of the sample: a server unreachable, timing out or
    answering 5xx after its retries, a CUDA out-of-memory on a single sample. The shard it hits is not
    committed (a rerun retries it) and the job exits 1, instead of the failure being stored as data."""


def is_infrastructure(exc: BaseException) -> bool:
    """Whether ``exc`` is a failure of the infrastructure (see :class:`InfrastructureError`)."""
    if isinstance(exc, InfrastructureError):
        return True
    return type(exc).__name__ == "OutOfMemoryError" or "CUDA out of memory" in str(exc)
