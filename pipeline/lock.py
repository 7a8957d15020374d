"""One writer per output directory.

``vesl label`` holds ``OUT/.vesl-lock.json`` (created with O_EXCL) for the whole job: a second job on
the same directory stops at once with one line naming the holder, before it reads, cleans or writes
anything. A lock left by a killed job is taken over when its process is gone (same host), with one line on
stderr naming that job; a lock from another host, or a corrupt one, must be removed by hand once that job is
known to be dead (the error says so).

Local directories only: object stores have no exclusive create, so a job writing to ``s3://`` /
``gs://`` must be the only one by the user's own arrangement (the commit protocol still keeps every
shard whole).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from vesl.errors import UserError

LOCK_NAME = ".vesl-lock.json"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: str) -> dict[str, Any] | None:
    """The lock's fields; None when there is no lock; ``{}`` when it is not a vesl lock (corrupt)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # half-written by a job killed while taking it, or not a lock at all: corrupt
    if not isinstance(data, dict) or not isinstance(data.get("pid"), int) or not isinstance(data.get("host"), str):
        return {}
    return data


def _holder(info: dict[str, Any]) -> str:
    started = info.get("started")
    since = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(started)) if isinstance(started, int) else "?"
    return f"pid {info['pid']} on {info['host']}, run {info.get('run_id', '?')}, since {since}"


def _stale(info: dict[str, Any]) -> bool:
    if not info:
        return False
    return info.get("host") == socket.gethostname() and isinstance(info.get("pid"), int) and not _alive(info["pid"])


def acquire(out_dir: str) -> tuple[str, str]:
    """Take the lock of ``out_dir`` (created if missing); returns (lock path, run id)."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, LOCK_NAME)
    run_id = uuid.uuid4().hex[:12]
    info = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": run_id, "started": int(time.time())}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            held = _read(path)
            if held is None:
                continue  # released meanwhile
            if not held:
                time.sleep(0.2)  # a job that has just created it may still be writing it
                held = _read(path)
                if held is None:
                    continue
            if not held:
                raise UserError(
                    f"{path} is corrupt (not a vesl lock; a job killed while taking it leaves one): if no other "
                    f"vesl job writes to {out_dir}, delete it and rerun"
                ) from None
            if _stale(held):
                try:
                    os.unlink(path)  # its job is dead; take over
                except FileNotFoundError:
                    continue
                print(f"vesl: took over the lock of {out_dir} from a job that is gone ({_holder(held)})",
                      file=sys.stderr, flush=True)
                continue
            raise UserError(
                f"{out_dir} is being written by another vesl job ({_holder(held)}): wait for it to finish, "
                f"or pick another --output; if that job is dead, delete {path}"
            ) from None
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(info, f)
            f.flush()
            os.fsync(f.fileno())
        return path, run_id
    raise UserError(f"cannot take the lock {path}: another job keeps taking it; retry when it is done")


def release(path: str, run_id: str) -> None:
    """Drop the lock if it is still ours."""
    held = _read(path)
    if held is not None and held.get("run_id") == run_id:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


@contextmanager
def output_lock(out_dir: str) -> Iterator[str | None]:
    """Hold ``out_dir``'s lock for the block (local directories; no-op for URLs). An output directory
    this job created and left empty (the job stopped before writing) is removed again."""
    if "://" in out_dir:
        yield None
        return
    created = not os.path.exists(out_dir)
    path, run_id = acquire(out_dir)
    try:
        yield run_id
    finally:
        release(path, run_id)
        if created:
            _remove_if_unused(out_dir)


def _remove_if_unused(out_dir: str) -> None:
    """Remove a directory this job created if it holds no data (the job stopped before writing any)."""
    from vesl.pipeline.confine import JOB_FILE

    try:
        names = os.listdir(out_dir)
        if set(names) <= {JOB_FILE}:
            for name in names:
                os.unlink(os.path.join(out_dir, name))
            os.rmdir(out_dir)
    except OSError:
        pass
