"""Schema v1: round trip through Parquet, and ``validate`` finds every kind of violation."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vesl.schemas.region_text import (
    PROVENANCE_KEY,
    SCHEMA_VERSION,
    SCHEMA_VERSION_KEY,
    region_text_schema,
    schema_as_json,
)
from vesl.schemas.validation import validate

CAPTION = "a red circle next to a blue square"


def _region(phrase="a red circle", start=0, end=12, box=(0.1, 0.2, 0.5, 0.6), score=0.9):
    return {"phrase": phrase, "char_start": start, "char_end": end, "box": list(box), "score": score}


def _row(key="k0", regions=None, caption=CAPTION, caption_source="vlm"):
    return {
        "key": key,
        "source_shard": "part-00000",
        "image": b"\x89PNG",
        "image_uri": None,
        "width": 64,
        "height": 48,
        "alt_text": "IMG_2231 stock vector",
        "caption": caption,
        "caption_source": caption_source,
        "regions": [_region()] if regions is None else regions,
    }


def _table(rows, provenance=None):
    return pa.Table.from_pylist(rows, schema=region_text_schema(provenance))


def test_round_trip_keeps_rows_types_and_metadata(tmp_path):
    prov = {"detector": {"spec": "owlv2:x", "threshold": 0.1}}
    rows = [_row("k0"), _row("k1", regions=[]), _row("k2", regions=[_region(), _region("a blue square", 21, 34)])]
    path = tmp_path / "part-00000.parquet"
    pq.write_table(_table(rows, prov), path, compression="zstd")
    back = pq.read_table(path)
    assert back.schema.equals(region_text_schema(), check_metadata=False)
    assert back.to_pylist() == pa.Table.from_pylist(rows, schema=region_text_schema()).to_pylist()
    meta = back.schema.metadata
    assert meta[SCHEMA_VERSION_KEY.encode()] == SCHEMA_VERSION.encode()
    assert json.loads(meta[PROVENANCE_KEY.encode()]) == prov
    assert validate(path) == []


def test_schema_json_names_every_field():
    rendered = json.loads(schema_as_json())
    assert set(rendered["fields"]) == set(region_text_schema().names)
    assert rendered["fields"]["regions"][0]["box"] == "fixed_size_list<float>[4]"


@pytest.mark.parametrize(
    ("rows", "kind"),
    [
        ([_row(regions=[_region(box=(-0.1, 0.2, 0.5, 0.6))])], "box_range"),
        ([_row(regions=[_region(box=(0.1, 0.2, 1.5, 0.6))])], "box_range"),
        ([_row(regions=[_region(box=(0.6, 0.2, 0.5, 0.6))])], "box_order"),
        ([_row(regions=[_region(box=(0.1, 0.7, 0.5, 0.6))])], "box_order"),
        ([_row(regions=[_region(start=30, end=40)])], "span_range"),
        ([_row(regions=[_region(start=-1, end=5)])], "span_range"),
        ([_row(regions=[_region(start=1, end=13)])], "span_text"),
        ([_row(key="")], "empty_key"),
        ([_row(key="k0"), _row(key="k0")], "duplicate_key"),
        ([_row(caption_source="web")], "caption_source"),
        ([_row(regions=[{**_region(), "box": None}])], "box_shape"),
    ],
)
def test_validate_catches_each_violation(rows, kind):
    found = validate(_table(rows))
    assert [v.kind for v in found] == [kind]
    assert "row" in found[0].where


def test_validate_reports_every_violation_not_just_the_first():
    rows = [
        _row("a", regions=[_region(box=(0.6, 0.2, 0.5, 1.2)), _region(start=2, end=14)]),
        _row("a"),
        _row(""),
    ]
    kinds = sorted(v.kind for v in validate(_table(rows)))
    assert kinds == ["box_order", "box_range", "duplicate_key", "empty_key", "span_text"]


def test_validate_catches_wrong_column_types(tmp_path):
    good = _table([_row()])
    bad = good.set_column(good.schema.get_field_index("width"), "width", pa.array([64], pa.int64()))
    bad = bad.set_column(bad.schema.get_field_index("caption"), "caption", pa.array([CAPTION.encode()], pa.binary()))
    kinds = [v.kind for v in validate(bad)]
    assert kinds.count("column_type") == 2
    assert any("width" in v.message for v in validate(bad))
    missing = good.drop_columns(["key"])
    assert "missing_column" in [v.kind for v in validate(missing)]


def test_validate_directory_checks_duplicates_across_files_and_version(tmp_path):
    pq.write_table(_table([_row("k0")]), tmp_path / "part-00000.parquet")
    pq.write_table(_table([_row("k0")]), tmp_path / "part-00001.parquet")
    no_version = _table([_row("k9")]).replace_schema_metadata({})
    pq.write_table(no_version, tmp_path / "part-00002.parquet")
    kinds = sorted(v.kind for v in validate(tmp_path))
    assert kinds == ["duplicate_key", "schema_version"]


def test_validate_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError):
        validate(tmp_path / "nope")


def test_check_dataset_catches_missing_unreadable_and_wrong_errors_files(tmp_path):
    """The dataset-level kinds: a file the stats list is gone, a shard is not Parquet, an errors file has
    another schema. Each is found, named, and the other shards are still checked."""
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.engines.local import run_local
    from vesl.schemas.manifest import check_dataset

    out = tmp_path / "out"
    run_local(LabelConfig(inputs=["synth://9?seed=1&shard_size=3"], output=str(out)), progress=False)
    assert check_dataset(out) == []
    (out / "part-00000.errors.parquet").unlink()
    (out / "part-00001.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.table({"key": ["x"]}), out / "part-00002.errors.parquet")
    found = {(v.kind, v.where) for v in check_dataset(out)}
    assert ("missing_file", "part-00000") in found
    assert ("unreadable", "part-00001.parquet") in found
    assert ("errors_schema", "part-00002.errors.parquet") in found
