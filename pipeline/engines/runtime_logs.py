"""The engines' runtimes (Beam, Ray) are chatty: their logs stay quiet unless ``vesl --verbose``."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator


def runtime_verbose() -> bool:
    """``vesl --verbose`` (``VESL_VERBOSE=1``, inherited by spawned workers and Ray actors)."""
    return os.environ.get("VESL_VERBOSE", "") not in ("", "0")


def quiet_runtime_logs(*loggers: str) -> int:
    """The engines' runtimes (Beam, Ray) log dozens of INFO lines per job, burying the job's own progress:
    keep them at WARNING unless verbose. Returns the level set."""
    level = logging.INFO if runtime_verbose() else logging.WARNING
    for name in loggers:
        logging.getLogger(name).setLevel(level)
    return level


def _not_apitools_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("apitools not found")


@contextlib.contextmanager
def import_notices_dropped() -> Iterator[None]:
    """Importing Beam logs a root WARNING that its (unused) BigQuery client is missing; drop that one."""
    root = logging.getLogger()
    if runtime_verbose():
        yield
        return
    root.addFilter(_not_apitools_notice)
    try:
        yield
    finally:
        root.removeFilter(_not_apitools_notice)
