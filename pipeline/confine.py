"""Confinement: a job reads only what the user named and writes only where it may.

- the output directory is checked before any work (not a file, not under a file, writable), and it
  must never be, or lie inside, an input (its shards would overwrite or be read as inputs);
- ``show`` and ``export`` read a row's ``image_uri`` only inside the dataset and the input roots its
  job recorded (``--allow-any-image-uri`` lifts that); they say how many rows that left out, and why.

Reading inputs themselves is confined in ``sources`` (links out of the input are never followed).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

from vesl.errors import UserError

if TYPE_CHECKING:
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.sources import ShardRef

JOB_FILE = ".vesl-job.json"  # hidden, never published: what resume and show/export need (absolute paths)


def check_output_dir(path: str | os.PathLike, flag: str = "--output") -> None:
    """One line, before any work, for an output directory that cannot be written: it (or a parent)
    is a file, or the nearest existing directory is not writable."""
    p = os.path.abspath(os.fspath(path))
    if os.path.exists(p) and not os.path.isdir(p):
        raise UserError(f"{flag} {path} is a file: pass a directory (new or from an earlier run)")
    probe = p
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise UserError(f"{flag} {path}: {probe} is a file, not a directory; pick another output path")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: {probe} is not writable by this user; pick a writable output path")


def check_not_input(cfg: LabelConfig, refs: list[ShardRef]) -> None:
    """The output must never overwrite or be read as an input: refuse an output directory that is an
    input, lies inside an input directory, or holds an input shard."""
    if "://" in cfg.output:
        return
    out = os.path.realpath(cfg.output)

    def under(path: str, root: str) -> bool:
        return path == root or path.startswith(root.rstrip("/") + "/")

    for raw in cfg.inputs:
        if "://" in raw:
            continue
        real = os.path.realpath(raw)
        if os.path.isdir(real) and under(out, real):
            raise UserError(
                f"--output {cfg.output} is inside the input directory {raw}: its shards would be read as "
                "inputs (or overwrite them); pick an output directory outside the inputs"
            )
    for ref in refs:
        if "://" in ref.uri:
            continue
        if under(os.path.realpath(ref.uri), out):
            raise UserError(
                f"input {ref.source} lies inside --output {cfg.output}: labeling would overwrite it; "
                "pick an output directory outside the inputs"
            )


def input_roots(inputs: list[str]) -> list[str]:
    """Real local directories the inputs name (a directory, a glob's fixed directory, a file's folder):
    where a dataset's ``image_uri`` values may point."""
    from vesl.pipeline.sources import glob_root

    roots = []
    for raw in inputs:
        if "://" in raw:
            continue
        path = os.path.abspath(raw)
        if any(c in path for c in "*?["):
            path = glob_root(path)
        elif not os.path.isdir(path):
            path = os.path.dirname(path)
        roots.append(os.path.realpath(path))
    return sorted(set(roots))


def image_uri_roots(dataset_dir: str | os.PathLike) -> list[str]:
    """Where ``show``/``export`` may read a row's ``image_uri``: the dataset directory and the input
    roots its job recorded (in the hidden job file, never published)."""
    roots = [os.path.realpath(dataset_dir)]
    try:
        with open(os.path.join(dataset_dir, JOB_FILE), encoding="utf-8") as f:
            stored = json.load(f)
        roots += [r for r in stored.get("input_roots", []) if isinstance(r, str)]
    except (OSError, ValueError, AttributeError):
        pass
    return roots


def image_uri_allowed(uri: str, roots: list[str]) -> bool:
    """A local path inside one of ``roots`` (links resolved); URLs never."""
    if uri.startswith("file://"):
        uri = uri[len("file://") :]
    elif "://" in uri:
        return False
    real = os.path.realpath(uri)
    return any(real == r or real.startswith(r.rstrip("/") + "/") for r in roots)


OUTSIDE = "_image_uri_outside"  # marks a row whose image_uri confine_row dropped, so callers can say why
ALLOW_ANY_IMAGE_URI = "--allow-any-image-uri"


def confine_row(row: dict[str, Any], roots: list[str] | None) -> dict[str, Any]:
    """``row`` without an ``image_uri`` outside ``roots`` (None: any allowed), so nothing reads it; such a
    row is marked with :data:`OUTSIDE`."""
    uri = row.get("image_uri")
    if roots is None or row.get("image") is not None or not uri or image_uri_allowed(uri, roots):
        return row
    return {**row, "image_uri": None, OUTSIDE: True}


def outside_note(n: int, what: str = "row(s)") -> str | None:
    """The one line telling the user that ``n`` rows' images were not read, why, and the flag that reads them."""
    if not n:
        return None
    return (f"{n} {what} have an image_uri outside the dataset and the inputs its job recorded, so their images were "
            f"not read; pass {ALLOW_ANY_IMAGE_URI} if you trust those paths")
