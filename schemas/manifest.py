"""Dataset manifest and dataset-level checks (``vesl.pipeline.writer.write_manifest`` writes it).

``manifest.json`` lists every committed shard (rows, bytes, sha256, errors) with the schema version
and provenance. It holds no timestamps or timings, so re-running a finished job rewrites it with
identical bytes, whichever engine wrote the shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from vesl import __version__
from vesl.schemas.dataset import (
    ERRORS_SUFFIX,
    PARQUET_SUFFIX,
    STATS_SUFFIX,
    committed_shards,
    read_shard_provenance,
    read_stats,
)
from vesl.schemas.region_text import (
    ERRORS_SCHEMA,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    Violation,
    readable_version,
)

MANIFEST_NAME = "manifest.json"
FORMAT = "vesl-region-text"


def build_manifest(out_dir: str | os.PathLike) -> dict[str, Any]:
    """The manifest as a dict: committed shards only, sorted by name."""
    shards, provenances = [], {}
    totals = {"shards": 0, "rows": 0, "errors": 0, "regions": 0, "bytes": 0}
    for name in committed_shards(out_dir):
        stats = read_stats(out_dir, name)
        if stats is None:  # removed between listing and reading (a concurrent overwrite)
            continue
        files = stats["files"]
        prov_id = stats["provenance_sha256"]
        if prov_id not in provenances:
            provenances[prov_id] = read_shard_provenance(out_dir, files["parquet"]["name"])
        shards.append(
            {
                "name": name,
                "file": files["parquet"]["name"],
                "rows": stats["rows"],
                "bytes": files["parquet"]["bytes"],
                "sha256": files["parquet"]["sha256"],
                "regions": stats["regions"],
                "errors": stats["errors"],
                "errors_file": files["errors"]["name"],
                "errors_bytes": files["errors"]["bytes"],
                "errors_sha256": files["errors"]["sha256"],
                "source_uri": stats["source_uri"],
                "sample_limit": stats.get("sample_limit"),
                "provenance": prov_id,
            }
        )
        totals["shards"] += 1
        totals["rows"] += stats["rows"]
        totals["errors"] += stats["errors"]
        totals["regions"] += stats["regions"]
        totals["bytes"] += files["parquet"]["bytes"]
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "vesl_version": __version__,
        "totals": totals,
        "provenance": provenances,  # sha256 of the provenance JSON -> provenance; one entry unless mixed
        "shards": shards,
    }


def check_dataset(out_dir: str | os.PathLike) -> list[Violation]:
    """Dataset-level violations beyond the row checks of ``validate``.

    Uncommitted shards (a Parquet file without stats), missing or bad errors files, file hashes that
    do not match the stats, and a manifest that is missing or out of date.
    """
    root = Path(out_dir)
    out: list[Violation] = []
    committed = set(committed_shards(out_dir))
    for p in sorted(root.glob("part-*.parquet")):
        if p.name.endswith(ERRORS_SUFFIX):
            continue
        name = p.name[: -len(PARQUET_SUFFIX)]
        if name not in committed:
            out.append(Violation("uncommitted", p.name, f"no {name}{STATS_SUFFIX}: rerun `vesl label` to finish it"))
    for name in sorted(committed):
        try:
            stats = read_stats(out_dir, name)
            files = stats.get("files")
            if not isinstance(files, dict) or not all(isinstance(m, dict) and "name" in m for m in files.values()):
                raise ValueError("no 'files' entry naming the shard's files")
        except (ValueError, AttributeError, OSError) as exc:
            out.append(Violation("stats", name + STATS_SUFFIX, f"unreadable commit file ({exc}): rerun `vesl label --overwrite`"))
            continue
        for kind, meta in files.items():
            f = root / meta["name"]
            if not f.exists():
                out.append(Violation("missing_file", name, f"{meta['name']} listed in stats is missing"))
                continue
            digest = hashlib.sha256(f.read_bytes()).hexdigest()
            if digest != meta["sha256"]:
                out.append(Violation("sha256", meta["name"], "content does not match the sha256 in the stats"))
            try:
                schema = pq.read_schema(f)
            except Exception as exc:  # corrupt footer: report, keep checking the rest
                out.append(Violation("unreadable", meta["name"], f"not a readable Parquet file: {exc}"))
                continue
            if kind == "errors":
                if not schema.remove_metadata().equals(ERRORS_SCHEMA.remove_metadata()):
                    out.append(Violation("errors_schema", meta["name"], f"schema {schema} is not ERRORS_SCHEMA"))
            elif kind == "parquet":
                version = (schema.metadata or {}).get(SCHEMA_VERSION_KEY.encode())
                if not readable_version(version):
                    out.append(Violation("schema_version", meta["name"], f"schema version {version!r}"))
    manifest = root / MANIFEST_NAME
    if not manifest.exists():
        out.append(Violation("manifest", MANIFEST_NAME, "missing: rerun `vesl label` (it writes the manifest last)"))
        return out
    try:
        stale = json.loads(manifest.read_text()) != build_manifest(out_dir)
    except Exception as exc:
        out.append(Violation("manifest", MANIFEST_NAME, f"cannot be checked ({type(exc).__name__}): rerun `vesl label`"))
        return out
    if stale:
        out.append(Violation("manifest", MANIFEST_NAME, "out of date with the committed shards: rerun `vesl label`"))
    return out
