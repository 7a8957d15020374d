"""`vesl publish`: validation first, a Hugging Face dataset card, deterministic artifacts, and the
published directory read back by the ecosystem's own tools (datasets, duckdb, polars, pandas, Ray)."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from tests.region_dataset import PROVENANCE, write_region_dataset
from vesl.errors import UserError
from vesl.pipeline.publish import CHECKSUMS_FILE, DATA_FILES_PATTERN, publish
from vesl.schemas.dataset import InvalidDataset
from vesl.schemas.region_text import region_text_schema


def _rows(d: Path) -> list[dict]:
    return pq.read_table(sorted(d.glob("part-*[0-9].parquet")), columns=["key", "regions"]).to_pylist()


def _front_matter(card: Path) -> dict:
    text = card.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def _snapshot(d: Path) -> dict[str, bytes]:
    return {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def published(tmp_path_factory) -> Path:
    d = write_region_dataset(tmp_path_factory.mktemp("pub") / "ds", n_images=12, n_shards=2)
    publish(d, name="shapes-demo", license_id="CC-BY-4.0", description="Synthetic shapes for tests.")
    return d


def test_card_front_matter_follows_hf_conventions(published):
    from datasets import Features

    fm = _front_matter(published / "README.md")
    assert fm["license"] == "cc-by-4.0"
    assert fm["pretty_name"] == "shapes-demo"
    assert {"object-detection", "zero-shot-object-detection", "image-to-text"} <= set(fm["task_categories"])
    assert fm["size_categories"] == ["n<1K"]
    assert fm["configs"] == [
        {"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES_PATTERN}]}
    ]
    # the features block is what `datasets` itself derives from the Arrow schema, with `image` declared an Image
    from datasets import Image as HFImage

    expected = Features.from_arrow_schema(region_text_schema())
    expected["image"] = HFImage()
    assert fm["dataset_info"]["features"] == expected._to_yaml_list()
    assert fm["dataset_info"]["splits"][0]["num_examples"] == 12


def test_card_statistics_match_the_data(published):
    rows = _rows(published)
    per_image = Counter(len(r["regions"]) for r in rows)
    phrases = Counter(x["phrase"] for r in rows for x in r["regions"])
    stats = json.loads((published / "card" / "stats.json").read_text())
    assert stats["images"] == len(rows) == 12
    assert stats["regions"] == sum(phrases.values())
    assert stats["regions_per_image"]["histogram"] == {str(k): v for k, v in sorted(per_image.items())}
    assert stats["distinct_phrases"] == len(phrases)
    assert dict(stats["top_phrases"]) == dict(phrases)
    assert stats["errors"] == {"total": 3, "by_type": {"caption/EmptyCaption": 1, "decode/UnidentifiedImageError": 2}}
    scores = sorted(x["score"] for r in rows for x in r["regions"])
    assert abs(stats["score"]["p50"] - scores[len(scores) // 2]) <= 0.06  # histogram quantile, 0.001 bins
    card = (published / "README.md").read_text(encoding="utf-8")
    assert f"| regions | {stats['regions']} |" in card
    assert "| decode/UnidentifiedImageError | 2 |" in card
    # provenance: models, revisions, prompt hash, thresholds, vesl version
    for needle in ("tiny-owlv2", "def456", "sha256:0f1e2d", "detector.threshold", PROVENANCE["vesl_version"]):
        assert needle in card


def test_plots_gallery_and_checksums_are_written(published):
    from PIL import Image

    card = (published / "README.md").read_text(encoding="utf-8")
    for name in ("regions_per_image", "score_histogram", "box_size", "top_phrases"):
        png = published / "card" / "plots" / f"{name}.png"
        with Image.open(png) as im:
            assert im.format == "PNG"
            assert im.width > 200
            assert "Software" not in im.info  # no library version stamped into the bytes
        assert f"card/plots/{name}.png" in card
    assert (published / "card" / "gallery" / "contact_sheet.png").exists()
    assert "card/gallery/contact_sheet.png" in card
    listed = {}
    for line in (published / CHECKSUMS_FILE).read_text().splitlines():
        digest, rel = line.split("  ", 1)
        listed[rel] = digest
    for rel in ("part-00000.parquet", "part-00001.errors.parquet", "README.md", "card/stats.json"):
        assert listed[rel] == hashlib.sha256((published / rel).read_bytes()).hexdigest()
    assert set(listed) == {p.relative_to(published).as_posix() for p in published.rglob("*")
                           if p.is_file() and p.name != CHECKSUMS_FILE}


def test_republish_is_byte_identical(published, tmp_path):
    before = _snapshot(published)
    publish(published, name="shapes-demo", license_id="CC-BY-4.0", description="Synthetic shapes for tests.")
    assert _snapshot(published) == before
    # the same data written elsewhere publishes to the same bytes too (no paths or dates leak in)
    other = write_region_dataset(tmp_path / "ds", n_images=12, n_shards=2)
    publish(other, name="shapes-demo", license_id="CC-BY-4.0", description="Synthetic shapes for tests.")
    assert _snapshot(other) == before


def _corrupt(d: Path) -> None:
    path = d / "part-00000.parquet"
    t = pq.read_table(path)
    rows = t.to_pylist()
    with_regions = [r for r in rows if r["regions"]]
    with_regions[0]["regions"][0]["box"] = [0.5, 0.1, 1.7, 0.2]  # outside [0, 1]
    with_regions[1]["regions"][0]["char_start"] += 1  # span no longer equals the phrase
    meta = {k.decode(): v.decode() for k, v in t.schema.metadata.items()}
    schema = region_text_schema(json.loads(meta["vesl.provenance"]))
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def test_invalid_data_is_refused_and_nothing_written(tmp_path):
    d = write_region_dataset(tmp_path / "bad", n_images=6, n_shards=1)
    _corrupt(d)
    before = _snapshot(d)
    with pytest.raises(InvalidDataset) as info:
        publish(d, name="x", license_id="MIT")
    kinds = {v.kind for v in info.value.violations}
    assert {"box_range", "span_text"} <= kinds
    assert _snapshot(d) == before  # no card, no plots, no checksums


def test_cli_refusal_lists_violations_in_one_error_line(tmp_path):
    d = write_region_dataset(tmp_path / "bad", n_images=6, n_shards=1)
    _corrupt(d)
    vesl = Path(sys.executable).parent / "vesl"
    cmd = [str(vesl)] if vesl.exists() else [sys.executable, "-c", "from vesl.cli import main; main()"]
    proc = subprocess.run([*cmd, "publish", str(d), "--name", "x", "--license", "MIT"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    error_lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(error_lines) == 1
    assert "refusing to publish" in error_lines[0]
    assert "[box_range]" in proc.stderr
    assert "[span_text]" in proc.stderr
    assert not (d / "README.md").exists()


def test_bad_arguments_are_user_errors(tmp_path):
    d = write_region_dataset(tmp_path / "ds", n_images=3, n_shards=1)
    with pytest.raises(UserError, match="SPDX"):
        publish(d, name="x", license_id="my own license")
    with pytest.raises(UserError, match="no region-text shards"):
        publish(tmp_path, name="x", license_id="MIT")


# ---------------------------------------------------------------- the ecosystem reads it


def test_datasets_uses_the_card_config(published, tmp_path):
    import datasets

    # a directory load goes through the card: only the shard pattern, not errors parquet, PNGs or JSON
    builder = datasets.load_dataset_builder(str(published), cache_dir=str(tmp_path / "hf"))
    files = [Path(f).name for f in builder.config.data_files["train"]]
    assert files == ["part-00000.parquet", "part-00001.parquet"]
    ds = datasets.load_dataset(str(published), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 12
    assert ds.features["regions"].feature["box"].length == 4
    assert isinstance(ds.features["image"], datasets.Image)  # decoded like any image dataset on the hub
    first = ds[0]
    assert first["image"].size == (first["width"], first["height"])
    # the packaged parquet loader with the card's pattern
    ds2 = datasets.load_dataset("parquet", data_dir=str(published), data_files=DATA_FILES_PATTERN,
                                split="train", cache_dir=str(tmp_path / "hf2"))
    assert sorted(ds2["key"]) == sorted(ds["key"])
    assert sum(len(r) for r in ds2["regions"]) == sum(len(r["regions"]) for r in _rows(published))


def test_duckdb_unnest_count_and_filter_by_area(published):
    import duckdb

    rows = _rows(published)
    regions = [x for r in rows for x in r["regions"]]
    con = duckdb.connect()
    glob = (published / DATA_FILES_PATTERN).as_posix()
    got = con.execute(
        f"SELECT r.phrase, count(*) FROM (SELECT unnest(regions) AS r FROM read_parquet('{glob}')) "
        "GROUP BY 1 ORDER BY 1"
    ).fetchall()
    assert dict(got) == dict(Counter(x["phrase"] for x in regions))
    big = con.execute(
        f"SELECT count(*) FROM (SELECT unnest(regions) AS r FROM read_parquet('{glob}')) "
        "WHERE (r.box[3] - r.box[1]) * (r.box[4] - r.box[2]) > 0.07"
    ).fetchone()[0]
    expected = sum(1 for x in regions if (x["box"][2] - x["box"][0]) * (x["box"][3] - x["box"][1]) > 0.07)
    assert big == expected
    assert 0 < big < len(regions)


def test_polars_and_pandas_read_the_shards(published):
    import pandas as pd
    import polars as pl

    files = sorted(str(p) for p in published.glob(DATA_FILES_PATTERN))
    n_regions = sum(len(r["regions"]) for r in _rows(published))
    df = pl.read_parquet(files)
    assert df.height == 12
    exploded = df.select("key", "regions").explode("regions").drop_nulls("regions").unnest("regions")
    assert exploded.height == n_regions
    assert set(exploded.columns) >= {"phrase", "char_start", "char_end", "box", "score"}
    pdf = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    assert len(pdf) == 12
    assert int(pdf["regions"].map(len).sum()) == n_regions


def test_ray_data_reads_the_shards(published, ray_session):
    ray = ray_session
    files = sorted(str(p) for p in published.glob(DATA_FILES_PATTERN))
    ds = ray.data.read_parquet(files)
    assert ds.count() == 12
    counts = ds.map(lambda r: {"key": r["key"], "n": len(r["regions"])}).take_all()
    assert sum(c["n"] for c in counts) == sum(len(r["regions"]) for r in _rows(published))


def test_publish_a_dataset_written_by_the_shard_writer(tmp_path):
    """The real writer's layout (stats JSON with timings, hidden temp names) publishes and loads."""
    import datasets

    pytest.importorskip("vesl.demo.synth")
    from tests.region_dataset import write_synth_region_dataset

    d = write_synth_region_dataset(tmp_path / "synth", n_images=6, n_shards=2)
    res = publish(d, name="synth", license_id="Apache-2.0")
    stats = json.loads(res.stats.read_text())
    assert stats["images"] == 6
    assert stats["errors"] == {"total": 2, "by_type": {"decode/UnidentifiedImageError": 2}}
    assert stats["score"]["p50"] == 1.0  # ground-truth regions carry score 1
    ds = datasets.load_dataset(str(d), split="train", cache_dir=str(tmp_path / "hf"))
    assert ds.num_rows == 6
