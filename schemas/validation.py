"""``vesl validate``: the rows of a region-text dataset and, for a `vesl label` output, its commit files."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from vesl.schemas.manifest import check_dataset
from vesl.schemas.region_text import Violation, validate_rows


def validate(path_or_table: str | Path | pa.Table) -> list[Violation]:
    """Every violation of schema v1 in a table, a shard file, or a dataset directory (empty list = valid).

    For a directory written by `vesl label` (one with ``*.stats.json`` commit files) the commit files
    are checked too (hashes, missing or uncommitted shards, the manifest), as `vesl validate` does.
    A file that cannot be read is a violation, never an exception.
    """
    out = validate_rows(path_or_table)
    if not isinstance(path_or_table, pa.Table) and Path(path_or_table).is_dir() and any(Path(path_or_table).glob("*.stats.json")):
        out += check_dataset(path_or_table)
    return out
