"""Reading a labeled region-text dataset: its committed shards, their stats, rows and provenance.

The one place that knows how a ``vesl label`` output directory reads back (the writer in
``vesl.pipeline.writer`` is the one place that knows how it is written):

- ``part-00042.parquet``: region-text rows (schema v1), provenance JSON under ``vesl.provenance``;
- ``part-00042.errors.parquet``: one row per failed sample;
- ``part-00042.stats.json``: written last, the commit marker. A shard is committed iff it exists.

``inspect``, ``validate``, ``publish``, ``show``, ``export``, the manifest, keep-captions and the
trainer all list and read shards through here. Paths may be local or fsspec URLs where noted.

The trainer reads by (file, row group): ``training_shards`` lists the files, ``row_group_sizes`` reads a
file's footer, and ``read_row_group`` reads one group's ``TRAINING_COLUMNS``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.parquet as pq

from vesl.errors import UserError, first_line
from vesl.schemas.region_text import PROVENANCE_KEY

PARQUET_SUFFIX = ".parquet"
ERRORS_SUFFIX = ".errors.parquet"
STATS_SUFFIX = ".stats.json"
DATA_SHARD_RE = re.compile(r"^part-\d+\.parquet$")  # data shards, never *.errors.parquet
# What a trainer reads of a row: the image, its size, the texts and the regions (not the shard bookkeeping).
TRAINING_COLUMNS = ("key", "image", "image_uri", "width", "height", "alt_text", "caption", "regions")


class InvalidDataset(UserError):
    """The dataset fails schema validation; ``violations`` lists every problem found."""

    def __init__(self, violations: list, action: str = "publish") -> None:
        self.violations = violations
        super().__init__(
            f"refusing to {action}: {len(violations)} schema violation(s), first: {violations[0]} "
            "(fix the data or re-run `vesl label`; `vesl validate DIR` lists them all)"
        )


def dataset_fs(out_dir: str | os.PathLike) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and root path of a dataset directory (a local path or an fsspec URL)."""
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    return fs, root.rstrip("/") or "/"


def shard_files(name: str) -> dict[str, str]:
    """File names of one output shard."""
    return {"parquet": name + PARQUET_SUFFIX, "errors": name + ERRORS_SUFFIX, "stats": name + STATS_SUFFIX}


# ---------------------------------------------------------------- committed shards and their stats


def is_committed(out_dir: str | os.PathLike, name: str) -> bool:
    """A shard is committed iff its stats JSON (written last, atomically) exists."""
    fs, root = dataset_fs(out_dir)
    return fs.exists(f"{root}/{name}{STATS_SUFFIX}")


def read_stats(out_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    """The stats of a committed shard, or None if the shard is not committed."""
    fs, root = dataset_fs(out_dir)
    try:
        with fs.open(f"{root}/{name}{STATS_SUFFIX}", "rb") as f:
            return json.loads(f.read())
    except FileNotFoundError:
        return None


def committed_shards(out_dir: str | os.PathLike) -> list[str]:
    """Names of all committed shards in ``out_dir``, sorted."""
    fs, root = dataset_fs(out_dir)
    if not fs.exists(root):
        return []
    names = []
    for path in fs.ls(root, detail=False):
        base = path.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(STATS_SUFFIX) and not base.startswith("."):
            names.append(base[: -len(STATS_SUFFIX)])
    return sorted(names)


def uncommitted_shards(out_dir: str | Path, committed: list[str] | set[str]) -> list[str]:
    """Data shard files of a local dataset directory that have no commit marker (a job still running or killed)."""
    done = set(committed)
    return sorted(p.name for p in Path(out_dir).glob("part-*" + PARQUET_SUFFIX)
                  if not p.name.endswith(ERRORS_SUFFIX) and p.name[: -len(PARQUET_SUFFIX)] not in done)  # fmt: skip


def repeated_keys(out_dir: str | os.PathLike) -> dict[str, list[str]]:
    """Keys that more than one committed row holds, each with the shards holding it (``validate`` rejects
    them). Reads only the ``key`` column of each committed shard."""
    fs, root = dataset_fs(out_dir)
    where: dict[str, list[str]] = {}
    for name in committed_shards(out_dir):
        with fs.open(f"{root}/{name}{PARQUET_SUFFIX}", "rb") as f:
            for key in pq.read_table(f, columns=["key"]).column("key").to_pylist():
                where.setdefault(key, []).append(name)
    return {k: v for k, v in where.items() if len(v) > 1}


# ---------------------------------------------------------------- data shards and rows


def data_shards(dataset_dir: str | Path) -> list[Path]:
    """The data shards of a local dataset directory in index order (``part-NNNNN.parquet``, no errors files).

    Any region-text directory: a ``vesl label`` output, or shards written by other tools (no stats files).
    """
    d = Path(dataset_dir)
    if not d.is_dir():
        raise UserError(f"{d} is not a directory; pass the output directory of `vesl label`")
    shards = sorted(p for p in d.iterdir() if DATA_SHARD_RE.match(p.name))
    if not shards:
        raise UserError(f"no region-text shards (part-*.parquet) in {d}; run `vesl label ... --output {d}` first")
    return shards


def error_shards(dataset_dir: str | Path) -> list[Path]:
    return sorted(Path(dataset_dir).glob("part-*" + ERRORS_SUFFIX))


def iter_rows(dataset_dir: str | Path, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
    """Rows as dicts, shard by shard and batch by batch, so memory stays bounded."""
    for shard in data_shards(dataset_dir):
        pf = pq.ParquetFile(shard)
        cols = [c for c in columns if c in pf.schema_arrow.names] if columns else None
        for batch in pf.iter_batches(batch_size=256, columns=cols):
            yield from batch.to_pylist()


# ---------------------------------------------------------------- training reads: files, row groups (fsspec)


def url_fs(url: str, storage_options: dict | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and path of a local path or fsspec URL, with the user's storage options."""
    return fsspec.core.url_to_fs(url, **(storage_options or {}))


def training_shards(data: str | list[str], storage_options: dict | None = None) -> list[str]:
    """Region-text shard URLs from a directory, a glob, a file, or a list of those (errors shards skipped).

    Any ``*.parquet`` in a directory counts, so shards written by other tools train too.
    """
    paths = [data] if isinstance(data, str) else list(data)
    out: list[str] = []
    for p in paths:
        fs, root = url_fs(p, storage_options)
        if fs.isdir(root):
            found = fs.glob(root.rstrip("/") + "/*" + PARQUET_SUFFIX)
        elif any(c in root for c in "*?["):
            found = fs.glob(root)
        elif fs.exists(root):
            found = [root]
        else:
            raise UserError(f"training data {p!r} does not exist; pass a directory of region-text shards (*.parquet)")
        proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        prefix = "" if proto in ("file", "local") else f"{proto}://"
        out += [prefix + f for f in sorted(found) if not f.endswith(ERRORS_SUFFIX)]
    if not out:
        raise UserError(f"no region-text shards (*.parquet) found in {data!r}; run `vesl label` first or check the path")
    return out


def row_group_sizes(url: str, storage_options: dict | None = None) -> list[int]:
    """Rows in each row group of a shard, from its footer alone."""
    fs, root = url_fs(url, storage_options)
    try:
        with fs.open(root, "rb") as f:
            md = pq.ParquetFile(f).metadata
    except Exception as exc:
        raise UserError(
            f"training shard {url} is not a readable Parquet file ({type(exc).__name__}: {first_line(exc, 200)}); "
            "check it with `vesl validate`, then relabel or remove it"
        ) from None
    return [md.row_group(i).num_rows for i in range(md.num_row_groups)]


def read_row_group(url: str, index: int, storage_options: dict | None = None,
                   columns: tuple[str, ...] = TRAINING_COLUMNS) -> list[dict[str, Any]]:
    """The rows of one row group as dicts, with those of ``columns`` the file has."""
    fs, root = url_fs(url, storage_options)
    with fs.open(root, "rb") as f:
        pf = pq.ParquetFile(f)
        cols = [c for c in columns if c in pf.schema_arrow.names]
        return pf.read_row_group(index, columns=cols).to_pylist()


# ---------------------------------------------------------------- provenance


def shard_provenance(path: str | os.PathLike) -> dict[str, Any]:
    """The provenance JSON in a shard's footer (``{}`` when none): a local path or an fsspec URL."""
    fs, p = fsspec.core.url_to_fs(str(path))
    with fs.open(p, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    raw = meta.get(PROVENANCE_KEY.encode())
    return json.loads(raw) if raw else {}


def read_shard_provenance(out_dir: str | os.PathLike, filename: str) -> dict[str, Any]:
    """The provenance of the shard file ``filename`` in the dataset directory ``out_dir``."""
    return shard_provenance(f"{str(out_dir).rstrip('/')}/{filename}")
