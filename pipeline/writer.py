"""Shard writer: turns the processed Samples of one input shard into one committed output shard.

Commit protocol (one output shard per input shard, named from the input shard's index):

1. If ``part-00042.stats.json`` exists (an overwrite), it is deleted first, so the shard reads as
   uncommitted while its files are being replaced.
2. ``part-00042.parquet`` (region-text rows of the ok samples, schema v1, zstd, 512-row row groups,
   provenance JSON under the ``vesl.provenance`` metadata key) is written.
3. ``part-00042.errors.parquet`` (one row per failed sample, ERRORS_SCHEMA) is written, even if empty.
4. ``part-00042.stats.json`` is written last: it is the commit marker. A shard is committed if and
   only if its stats file exists.

Every file is first written under a hidden temporary name (``.part-00042.parquet.<uuid>.tmp``),
fsynced and then atomically renamed (``os.replace``; on object stores, written then moved), so a
crash at any point leaves either the old committed shard, an uncommitted shard that a rerun redoes,
or the new committed shard, never a half-written file under a final name.

Rows are sorted by ``Sample.index`` (the position in the input shard), so the bytes never depend on
how an engine batched or split the work: local, Beam and Ray all call :func:`write_shard` and write
identical files. Only the ``timings`` key of the stats differs between runs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from vesl import __version__
from vesl.schemas.dataset import STATS_SUFFIX, dataset_fs, shard_files
from vesl.schemas.manifest import MANIFEST_NAME, build_manifest
from vesl.schemas.region_text import ERRORS_SCHEMA, SCHEMA_VERSION, region_text_schema, row_violations
from vesl.schemas.stage import SOURCE_PATH_KEY, Sample, fail

ROW_GROUP_SIZE = 512
COMPRESSION = "zstd"
TMP_SUFFIX = ".tmp"
_TEMP_NAME = re.compile(r"^\.(part-.+|.+\.[0-9a-f]{32})\.tmp$")  # atomic_write_bytes' temp names
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # "<_io.BytesIO object at 0x7f..>" differs per process


def stable_message(message: str) -> str:
    """Error message without memory addresses, so error files are identical across processes."""
    return _ADDRESS.sub("", message)


def shard_name(index: int) -> str:
    """``42 -> "part-00042"``: the output name comes from the input shard's index."""
    if index < 0:
        raise ValueError(f"shard index must be >= 0, got {index}")
    return f"part-{index:05d}"


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))


def _join(root: str, name: str) -> str:
    return f"{root}/{name}"


def atomic_write_bytes(out_dir: str | os.PathLike, filename: str, data: bytes) -> None:
    """Write ``data`` to ``out_dir/filename`` via a temp name, fsync and atomic rename."""
    fs, root = dataset_fs(out_dir)
    final = _join(root, filename)
    tmp = _join(root, f".{filename}.{uuid.uuid4().hex}{TMP_SUFFIX}")
    if _is_local(fs):
        os.makedirs(root, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
        _fsync_dir(root)
    else:  # object stores: the write of a single object is atomic; the move keeps the final name clean
        fs.makedirs(root, exist_ok=True)
        with fs.open(tmp, "wb") as f:
            f.write(data)
        fs.mv(tmp, final)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove(out_dir: str | os.PathLike, filename: str) -> None:
    fs, root = dataset_fs(out_dir)
    path = _join(root, filename)
    if _is_local(fs):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        _fsync_dir(root)
    elif fs.exists(path):
        fs.rm(path)


def clean_temp_files(out_dir: str | os.PathLike) -> int:
    """Delete temp files left by a killed job; returns how many. Only call when no job writes here."""
    fs, root = dataset_fs(out_dir)
    if not fs.exists(root):
        return 0
    n = 0
    for path in fs.ls(root, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if _TEMP_NAME.match(base):
            fs.rm(path)
            n += 1
    return n


def _image_uri(s: Sample, keep_image_bytes: bool) -> str | None:
    """Where the image came from. With its bytes in the row, the path relative to the input's parent
    (no local file system in published data); without them, the full URI, which loading needs."""
    if keep_image_bytes and s.image_bytes is not None:
        return s.meta.get(SOURCE_PATH_KEY, s.image_uri)
    return s.image_uri


def unmatched_phrases(s: Sample) -> list[dict[str, Any]] | None:
    """The phrases a detector was asked for that kept no region, from the phrases and the regions as they are
    when the row is written (so a later stage that drops boxes is accounted for); None when none was asked."""
    if not s.queried:
        return None
    kept = {(r.phrase, r.char_start, r.char_end) for r in s.regions}
    return [{"text": p.text, "char_start": int(p.char_start), "char_end": int(p.char_end)}
            for p in s.phrases if (p.text, p.char_start, p.char_end) not in kept]  # fmt: skip


def _row(s: Sample, keep_image_bytes: bool) -> dict[str, Any]:
    # No captioner ran: the caption is the alt-text itself.
    caption = s.caption if s.caption is not None else s.alt_text
    return {
        "key": s.key,
        "source_shard": s.source_shard,
        "image": s.image_bytes if keep_image_bytes else None,
        "image_uri": _image_uri(s, keep_image_bytes),
        "width": int(s.width),
        "height": int(s.height),
        "alt_text": s.alt_text,
        "caption": caption,
        "caption_source": s.caption_source or "alt_text",
        "duplicate_of": s.duplicate_of,
        "unmatched_phrases": unmatched_phrases(s),
        "regions": [
            {
                "phrase": r.phrase,
                "char_start": int(r.char_start),
                "char_end": int(r.char_end),
                "box": [float(v) for v in r.box],
                "score": float(r.score),
            }
            for r in s.regions
        ],
    }


WRITER_STAGE = "writer"


def reject_invalid_rows(samples: Iterable[Sample], keep_image_bytes: bool = True) -> int:
    """Turn every ok sample whose row breaks the schema's rules into an error row of stage ``writer``.

    The same rules as ``vesl validate`` (``row_violations``, plus unique keys within the shard), so a
    shard that commits always validates; a row that breaks them is a bug upstream, reported and not
    written, while the shard's other rows still commit. Returns how many samples were rejected.
    """
    rejected, seen = 0, set()
    for s in sorted((s for s in samples if s.ok), key=lambda s: s.index):
        problems = [str(v) for v in row_violations(_row(s, keep_image_bytes), f"key={s.key!r}")]
        if s.key in seen:
            problems.append(f"key={s.key!r}: [duplicate_key] key appears more than once in this shard")
        seen.add(s.key)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            fail(s, WRITER_STAGE, problems[0] + more, error_type="SchemaViolation")
            rejected += 1
    return rejected


def rows_table(samples: Iterable[Sample], provenance: dict[str, Any] | None, keep_image_bytes: bool = True) -> pa.Table:
    """Region-text table of the ok samples, in index order."""
    ok = sorted((s for s in samples if s.ok), key=lambda s: s.index)
    return pa.Table.from_pylist([_row(s, keep_image_bytes) for s in ok], schema=region_text_schema(provenance))


def errors_table(samples: Iterable[Sample]) -> pa.Table:
    """One row per failed sample, in index order."""
    bad = sorted((s for s in samples if not s.ok), key=lambda s: s.index)
    rows = [
        {
            "key": s.key,
            "source_shard": s.source_shard,
            "stage": s.error.stage,
            "error_type": s.error.error_type,
            "message": stable_message(s.error.message),
        }
        for s in bad
    ]
    return pa.Table.from_pylist(rows, schema=ERRORS_SCHEMA)


def parquet_bytes(table: pa.Table, row_group_size: int = ROW_GROUP_SIZE) -> bytes:
    """Serialize deterministically (same table -> same bytes)."""
    sink = pa.BufferOutputStream()
    with pq.ParquetWriter(sink, table.schema, compression=COMPRESSION) as w:
        w.write_table(table, row_group_size=row_group_size)
    return sink.getvalue().to_pybytes()


def provenance_sha256(provenance: dict[str, Any] | None) -> str:
    return hashlib.sha256(json.dumps(provenance or {}, sort_keys=True).encode()).hexdigest()


def shard_stats(
    name: str, source_uri: str, samples: list[Sample], provenance: dict[str, Any] | None, sample_limit: int | None = None
) -> dict[str, Any]:
    """Engine-independent statistics of one shard (everything but ``timings`` and ``files``)."""
    ok = [s for s in samples if s.ok]
    bad = [s for s in samples if not s.ok]
    per_image = Counter(len(s.regions) for s in ok)
    return {
        "shard": name,
        "source_uri": source_uri,
        "vesl_version": __version__,
        "schema_version": SCHEMA_VERSION,
        "input_count": len(samples),
        "sample_limit": sample_limit,
        "rows": len(ok),
        "errors": len(bad),
        "errors_by_type": dict(sorted(Counter(s.error.error_type for s in bad).items())),
        "errors_by_stage": dict(sorted(Counter(s.error.stage for s in bad).items())),
        "regions": sum(len(s.regions) for s in ok),
        "regions_per_image": {str(k): v for k, v in sorted(per_image.items())},
        "caption_source": dict(sorted(Counter(s.caption_source or "alt_text" for s in ok).items())),
        "duplicates": sum(1 for s in ok if s.duplicate_of is not None),
        "provenance_sha256": provenance_sha256(provenance),
        **_verifier_stats(ok),
    }


def _verifier_stats(ok: list[Sample]) -> dict[str, int]:
    """``verifier_dropped``: the regions the verifier took out (only in a job that verifies); ``verifier_relabeled``:
    those it gave another phrase (only with ``verify.rule: relabel``)."""
    counts = [s.verifier_dropped for s in ok if s.verifier_dropped is not None]
    moved = [s.verifier_relabeled for s in ok if s.verifier_relabeled is not None]
    return {**({"verifier_dropped": sum(counts)} if counts else {}),
            **({"verifier_relabeled": sum(moved)} if moved else {})}


def write_shard(
    out_dir: str | os.PathLike,
    name: str,
    source_uri: str,
    samples: list[Sample],
    provenance: dict[str, Any] | None,
    timings: dict[str, Any] | None = None,
    *,
    keep_image_bytes: bool = True,
    sample_limit: int | None = None,
    extra_stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write and commit one output shard (see the module docstring); returns its stats.

    ``samples`` are all samples read from the input shard (ok and failed), in any order.
    ``sample_limit`` records a ``--limit`` cut of this shard so that a later full run redoes it.
    """
    keys = [s.index for s in samples]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{name}: duplicate Sample.index values; each sample must be written once")
    reject_invalid_rows(samples, keep_image_bytes)
    data = parquet_bytes(rows_table(samples, provenance, keep_image_bytes))
    stats = {**shard_stats(name, source_uri, samples, provenance, sample_limit), **(extra_stats or {})}
    return commit_files(out_dir, name, data, errors_table(samples), stats, timings)


def commit_files(
    out_dir: str | os.PathLike, name: str, data: bytes, errors: pa.Table, stats: dict[str, Any], timings: dict[str, Any] | None
) -> dict[str, Any]:
    """Steps 1-4 of the commit protocol for a shard's serialized rows and its errors; returns the stats written."""
    _remove(out_dir, name + STATS_SUFFIX)  # uncommit first (overwrite)
    files = shard_files(name)
    errs = parquet_bytes(errors)
    atomic_write_bytes(out_dir, files["parquet"], data)
    atomic_write_bytes(out_dir, files["errors"], errs)
    stats = dict(stats)
    stats["files"] = {
        "parquet": {"name": files["parquet"], "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
        "errors": {"name": files["errors"], "bytes": len(errs), "sha256": hashlib.sha256(errs).hexdigest()},
    }
    stats["timings"] = timings or {}
    atomic_write_bytes(out_dir, files["stats"], (json.dumps(stats, sort_keys=True, indent=2) + "\n").encode())
    return stats


def write_manifest(out_dir: str | os.PathLike) -> Path | str:
    """Write ``out_dir/manifest.json`` atomically; returns its path (a str for remote filesystems)."""
    data = (json.dumps(build_manifest(out_dir), sort_keys=True, indent=2) + "\n").encode()
    atomic_write_bytes(out_dir, MANIFEST_NAME, data)
    s = str(out_dir)
    return Path(s) / MANIFEST_NAME if "://" not in s else f"{s.rstrip('/')}/{MANIFEST_NAME}"
