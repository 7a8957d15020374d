"""Region-text schema v1: one row per image, its grounded phrases in ``regions``.

Boxes are ``x0, y0, x1, y1`` normalized to [0, 1] of the original image and
``caption[char_start:char_end] == phrase`` holds for every region.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

# 1.1 added the nullable ``duplicate_of`` column, 1.2 the nullable ``unmatched_phrases``; older shards (without
# them) still read and validate.
SCHEMA_VERSION = "1.2"
READABLE_VERSIONS = ("1", "1.1", "1.2")
SCHEMA_VERSION_KEY = "vesl.schema_version"


def readable_version(version: bytes | None) -> bool:
    """Whether a file's ``vesl.schema_version`` metadata value is one this vesl reads."""
    return version is not None and version.decode(errors="replace") in READABLE_VERSIONS
PROVENANCE_KEY = "vesl.provenance"
CAPTION_SOURCES = ("alt_text", "vlm")

REGION_TYPE = pa.struct(
    [
        pa.field("phrase", pa.string(), nullable=False),
        pa.field("char_start", pa.int32(), nullable=False),
        pa.field("char_end", pa.int32(), nullable=False),
        pa.field("box", pa.list_(pa.float32(), 4), nullable=False),
        pa.field("score", pa.float32(), nullable=False),
    ]
)

# a phrase the detector was asked for and that kept no box: a negative text for this image
PHRASE_TYPE = pa.struct(
    [
        pa.field("text", pa.string(), nullable=False),
        pa.field("char_start", pa.int32(), nullable=False),
        pa.field("char_end", pa.int32(), nullable=False),
    ]
)

_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_shard", pa.string(), nullable=False),
    pa.field("image", pa.binary()),
    pa.field("image_uri", pa.string()),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("alt_text", pa.string(), nullable=False),
    pa.field("caption", pa.string(), nullable=False),
    pa.field("caption_source", pa.string(), nullable=False),
    pa.field("regions", pa.list_(pa.field("item", REGION_TYPE, nullable=False)), nullable=False),
    # the key of the representative whose caption and regions this near-duplicate row copies (`--duplicates`)
    pa.field("duplicate_of", pa.string()),
    # the phrases queried without a kept box, in caption order of extraction; null: no detector was asked
    pa.field("unmatched_phrases", pa.list_(pa.field("item", PHRASE_TYPE, nullable=False))),
]

ERRORS_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source_shard", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),
        pa.field("error_type", pa.string(), nullable=False),
        pa.field("message", pa.string(), nullable=False),
    ],
    metadata={SCHEMA_VERSION_KEY: SCHEMA_VERSION},
)


def region_text_schema(provenance: dict[str, Any] | None = None) -> pa.Schema:
    """The v1 schema, with the schema version (and optional provenance) in the file metadata."""
    meta = {SCHEMA_VERSION_KEY: SCHEMA_VERSION}
    if provenance:
        meta[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)
    return pa.schema(_FIELDS, metadata=meta)


def schema_as_json() -> str:
    """A readable JSON rendering of the schema, for the README and dataset cards."""

    def render(t: pa.DataType) -> Any:
        if pa.types.is_struct(t):
            return {f.name: render(f.type) for f in t}
        if pa.types.is_fixed_size_list(t):
            return f"fixed_size_list<{t.value_type}>[{t.list_size}]"
        if pa.types.is_list(t):
            return [render(t.value_type)]
        return str(t)

    schema = region_text_schema()
    out = {
        "schema_version": SCHEMA_VERSION,
        "fields": {f.name: render(f.type) for f in schema},
        "nullable": [f.name for f in schema if f.nullable],
    }
    return json.dumps(out, indent=2)


@dataclass(frozen=True)
class Violation:
    """One problem found by :func:`validate`; ``where`` names the file, row key and region."""

    kind: str
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: [{self.kind}] {self.message}"


def _check_types(table: pa.Table, where: str) -> list[Violation]:
    expected = region_text_schema()
    out = []
    for f in expected:
        if f.name not in table.schema.names:
            if f.nullable:
                continue
            out.append(Violation("missing_column", where, f"column {f.name!r} is missing"))
            continue
        got = table.schema.field(f.name).type
        if not got.equals(f.type):
            out.append(Violation("column_type", where, f"column {f.name!r} is {got}, expected {f.type}"))
    return out


def row_violations(row: dict[str, Any], at: str) -> list[Violation]:
    """The schema rules one row must meet on its own (everything but key uniqueness).

    ``vesl validate`` and the shard writer both call it, so what vesl writes, vesl accepts.
    """
    out: list[Violation] = []
    if not row.get("key"):
        out.append(Violation("empty_key", at, "key is empty"))
    if "caption_source" in row and row["caption_source"] not in CAPTION_SOURCES:
        out.append(Violation("caption_source", at, f"caption_source {row['caption_source']!r} not in {CAPTION_SOURCES}"))
    cap = row.get("caption") or ""
    for j, r in enumerate(row.get("regions") or []):
        rat = f"{at} region {j}"
        box = r.get("box")
        if box is None or len(box) != 4:
            out.append(Violation("box_shape", rat, f"box {box!r} must have 4 values"))
        else:
            x0, y0, x1, y1 = box
            if any(not (0.0 <= v <= 1.0) for v in box):  # NaN fails this too
                out.append(Violation("box_range", rat, f"box {list(box)} has values outside [0, 1]"))
            if x0 > x1 or y0 > y1:
                out.append(Violation("box_order", rat, f"box {list(box)} has x0 > x1 or y0 > y1"))
        s, e, phrase = r.get("char_start"), r.get("char_end"), r.get("phrase")
        if s is None or e is None or not (0 <= s <= e <= len(cap)):
            out.append(Violation("span_range", rat, f"char span [{s}, {e}) outside caption of length {len(cap)}"))
        elif cap[s:e] != phrase:
            out.append(Violation("span_text", rat, f"caption[{s}:{e}] is {cap[s:e]!r}, not phrase {phrase!r}"))
    grounded = {(r.get("phrase"), r.get("char_start"), r.get("char_end")) for r in row.get("regions") or []}
    for j, p in enumerate(row.get("unmatched_phrases") or []):
        pat = f"{at} unmatched phrase {j}"
        s, e, text = p.get("char_start"), p.get("char_end"), p.get("text")
        if s is None or e is None or not (0 <= s <= e <= len(cap)):
            out.append(Violation("span_range", pat, f"char span [{s}, {e}) outside caption of length {len(cap)}"))
        elif cap[s:e] != text:
            out.append(Violation("span_text", pat, f"caption[{s}:{e}] is {cap[s:e]!r}, not phrase {text!r}"))
        elif (text, s, e) in grounded:
            out.append(Violation("unmatched_grounded", pat, f"phrase {text!r} at [{s}, {e}) also has a region"))
    return out


def _check_rows(table: pa.Table, where: str, seen: Counter) -> list[Violation]:
    out: list[Violation] = []
    names = [n for n in ("key", "caption", "caption_source", "regions", "unmatched_phrases") if n in table.schema.names]
    for i, row in enumerate(table.select(names).to_pylist()):
        at = f"{where} row {i} key={row.get('key')!r}"
        if row.get("key"):
            seen[row["key"]] += 1
            if seen[row["key"]] == 2:
                out.append(Violation("duplicate_key", at, f"key {row['key']!r} appears more than once"))
        out += row_violations(row, at)
    return out


def _tables(path_or_table: str | Path | pa.Table) -> list[tuple[str, Path | pa.Table]]:
    if isinstance(path_or_table, pa.Table):
        return [("<table>", path_or_table)]
    p = Path(path_or_table)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.parquet") if not f.name.endswith(".errors.parquet"))
        if not files:
            raise FileNotFoundError(f"no region-text shards (*.parquet) in {p}")
    elif p.exists():
        files = [p]
    else:
        raise FileNotFoundError(f"{p} does not exist")
    return [(f.name, f) for f in files]


def _read(where: str, source: Path | pa.Table) -> pa.Table | Violation:
    if isinstance(source, pa.Table):
        return source
    try:
        return pq.read_table(source)
    except Exception as exc:
        line = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return Violation("unreadable", where, f"not a readable Parquet file ({type(exc).__name__}: {line})")


def validate_rows(path_or_table: str | Path | pa.Table) -> list[Violation]:
    """Every violation of schema v1 in the rows of a table, a shard file, or a directory's shards.

    A file that cannot be read is a violation, never an exception. ``vesl.schemas.validation.validate``
    adds the commit files of a `vesl label` output.
    """
    out: list[Violation] = []
    seen: Counter = Counter()
    for where, source in _tables(path_or_table):
        table = _read(where, source)
        if isinstance(table, Violation):
            out.append(table)
            continue
        meta = table.schema.metadata or {}
        version = meta.get(SCHEMA_VERSION_KEY.encode())
        if where != "<table>" and not readable_version(version):
            out.append(Violation("schema_version", where, f"file metadata {SCHEMA_VERSION_KEY}={version!r}, expected {SCHEMA_VERSION!r}"))
        types = _check_types(table, where)
        out += types
        if not types:  # row checks need the right column types
            out += _check_rows(table, where, seen)
    return out
