"""Shard writer: atomic commit protocol, resume planning, overwrite, manifest determinism."""

from __future__ import annotations

import json
import os

import pyarrow.parquet as pq
import pytest

from vesl.pipeline import writer
from vesl.pipeline.writer import write_manifest
from vesl.schemas import dataset
from vesl.schemas.manifest import build_manifest, check_dataset
from vesl.schemas.region_text import ERRORS_SCHEMA, PROVENANCE_KEY, SCHEMA_VERSION
from vesl.schemas.stage import Region, Sample, SampleError
from vesl.schemas.validation import validate

PROV = {"detector": {"spec": "none"}, "vesl_version": "test"}


def _samples(n: int, shard: str = "part-00003", bad_every: int = 5) -> list[Sample]:
    out = []
    for i in range(n):
        cap = f"a red circle number {i}"
        s = Sample(key=f"{shard}-{i:06d}", source_shard=shard, index=i, image_bytes=b"img%d" % i, alt_text=f"alt {i}")
        if bad_every and i % bad_every == 3:
            s.error = SampleError("decode", "UnidentifiedImageError", f"cannot identify image {i}")
        else:
            s.width, s.height, s.caption, s.caption_source = 64, 32, cap, "vlm"
            s.regions = [Region("a red circle", 0, 12, (0.1, 0.1, 0.5 + i % 3 / 10, 0.9), 0.5)] * (i % 3)
        out.append(s)
    return out


def test_shard_name():
    assert writer.shard_name(42) == "part-00042"
    assert writer.shard_name(123456) == "part-123456"
    with pytest.raises(ValueError, match=">= 0"):
        writer.shard_name(-1)


def test_write_shard_commits_rows_errors_and_stats(tmp_path):
    samples = _samples(20)
    stats = writer.write_shard(tmp_path, "part-00003", "file:///in/3.tar", samples, PROV, {"wall_s": 1.0})
    assert dataset.is_committed(tmp_path, "part-00003")
    assert sorted(os.listdir(tmp_path)) == ["part-00003.errors.parquet", "part-00003.parquet", "part-00003.stats.json"]
    rows = pq.read_table(tmp_path / "part-00003.parquet")
    errs = pq.read_table(tmp_path / "part-00003.errors.parquet")
    assert rows.num_rows == 16
    assert errs.num_rows == 4
    assert rows.num_rows + errs.num_rows == len(samples)
    assert errs.schema.equals(ERRORS_SCHEMA, check_metadata=False)
    assert errs.column("stage").to_pylist() == ["decode"] * 4
    assert json.loads(rows.schema.metadata[PROVENANCE_KEY.encode()]) == PROV
    assert validate(tmp_path / "part-00003.parquet") == []
    on_disk = json.loads((tmp_path / "part-00003.stats.json").read_text())
    assert on_disk == stats
    assert stats["rows"] == 16
    assert stats["errors"] == 4
    assert stats["input_count"] == 20
    assert stats["errors_by_type"] == {"UnidentifiedImageError": 4}
    assert stats["errors_by_stage"] == {"decode": 4}
    assert stats["regions"] == sum(len(s.regions) for s in samples if s.ok)
    assert sum(stats["regions_per_image"].values()) == 16
    assert stats["timings"] == {"wall_s": 1.0}
    assert stats["files"]["parquet"]["bytes"] == (tmp_path / "part-00003.parquet").stat().st_size


def test_output_does_not_depend_on_sample_order_or_timings(tmp_path):
    samples = _samples(40)
    a = writer.write_shard(tmp_path / "a", "part-00003", "u", samples, PROV, {"wall_s": 1})
    b = writer.write_shard(tmp_path / "b", "part-00003", "u", list(reversed(_samples(40))), PROV, {"wall_s": 9})
    for f in ("part-00003.parquet", "part-00003.errors.parquet"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    a.pop("timings"), b.pop("timings")
    assert a == b
    keys = pq.read_table(tmp_path / "b" / "part-00003.parquet").column("key").to_pylist()
    assert keys == sorted(keys)


def test_row_groups_are_512_rows(tmp_path):
    writer.write_shard(tmp_path, "part-00000", "u", _samples(1200, "part-00000", bad_every=0), PROV)
    meta = pq.ParquetFile(tmp_path / "part-00000.parquet").metadata
    assert [meta.row_group(i).num_rows for i in range(meta.num_row_groups)] == [512, 512, 176]
    assert meta.row_group(0).column(0).compression == "ZSTD"


def test_keep_image_bytes_false_drops_images(tmp_path):
    writer.write_shard(tmp_path, "part-00000", "u", _samples(5), PROV, keep_image_bytes=False)
    assert set(pq.read_table(tmp_path / "part-00000.parquet").column("image").to_pylist()) == {None}


def test_duplicate_indices_are_refused(tmp_path):
    s = _samples(3)
    s[2].index = 0
    with pytest.raises(ValueError, match="duplicate"):
        writer.write_shard(tmp_path, "part-00000", "u", s, PROV)


def _crash_on_write(monkeypatch, suffix: str, message: str) -> None:
    """The writer's atomic write of a file ending in ``suffix`` raises OSError(message), as a crash there would."""
    real = writer.atomic_write_bytes

    def dying(out_dir, filename, data):
        if filename.endswith(suffix):
            raise OSError(message)
        return real(out_dir, filename, data)

    monkeypatch.setattr(writer, "atomic_write_bytes", dying)


def test_crash_before_stats_leaves_shard_uncommitted(tmp_path, monkeypatch):
    """The stats file is the commit marker: a write that dies before it leaves nothing committed."""
    _crash_on_write(monkeypatch, ".stats.json", "disk gone")
    with pytest.raises(OSError, match="disk gone"):
        writer.write_shard(tmp_path, "part-00001", "u", _samples(4), PROV)
    assert not dataset.is_committed(tmp_path, "part-00001")
    assert dataset.committed_shards(tmp_path) == []
    assert [v.kind for v in check_dataset(tmp_path)] == ["uncommitted", "manifest"]


def test_overwrite_uncommits_first(tmp_path, monkeypatch):
    writer.write_shard(tmp_path, "part-00001", "u", _samples(4), PROV)
    assert dataset.is_committed(tmp_path, "part-00001")
    _crash_on_write(monkeypatch, ".errors.parquet", "killed")
    with pytest.raises(OSError, match="killed"):
        writer.write_shard(tmp_path, "part-00001", "u", _samples(8), PROV)
    # New parquet is in place but the old stats no longer vouch for it.
    assert not dataset.is_committed(tmp_path, "part-00001")


def test_atomic_write_leaves_no_temp_files_and_cleanup(tmp_path):
    writer.atomic_write_bytes(tmp_path, "x.bin", b"abc")
    assert os.listdir(tmp_path) == ["x.bin"]
    (tmp_path / ".part-00001.parquet.1234.tmp").write_bytes(b"half")
    assert writer.clean_temp_files(tmp_path) == 1
    assert os.listdir(tmp_path) == ["x.bin"]


def test_manifest_lists_committed_shards_deterministically(tmp_path):
    for i in (2, 0, 1):
        writer.write_shard(tmp_path, writer.shard_name(i), f"in/{i}.tar", _samples(10, writer.shard_name(i)), PROV)
    # An uncommitted leftover must not be listed.
    (tmp_path / "part-00009.parquet").write_bytes(b"partial")
    path = write_manifest(tmp_path)
    first = path.read_bytes()
    m = json.loads(first)
    assert [s["name"] for s in m["shards"]] == ["part-00000", "part-00001", "part-00002"]
    assert m["totals"]["rows"] == 24
    assert m["totals"]["errors"] == 6
    assert m["schema_version"] == SCHEMA_VERSION == "1.2"
    assert list(m["provenance"].values()) == [PROV]
    import hashlib

    for s in m["shards"]:
        assert s["sha256"] == hashlib.sha256((tmp_path / s["file"]).read_bytes()).hexdigest()
        assert s["bytes"] == (tmp_path / s["file"]).stat().st_size
    # Rewriting the same shards (new timings) gives identical manifest bytes.
    writer.write_shard(tmp_path, "part-00001", "in/1.tar", _samples(10, "part-00001"), PROV, {"wall_s": 123})
    assert write_manifest(tmp_path).read_bytes() == first
    assert "timings" not in first.decode()
    assert "wall_s" not in first.decode()
    os.remove(tmp_path / "part-00009.parquet")
    assert check_dataset(tmp_path) == []
    assert build_manifest(tmp_path) == m


def test_check_dataset_catches_tampering_and_stale_manifest(tmp_path):
    writer.write_shard(tmp_path, "part-00000", "u", _samples(6, "part-00000"), PROV)
    write_manifest(tmp_path)
    writer.write_shard(tmp_path, "part-00001", "u", _samples(6, "part-00001"), PROV)
    assert [v.kind for v in check_dataset(tmp_path)] == ["manifest"]
    write_manifest(tmp_path)
    p = tmp_path / "part-00000.errors.parquet"
    p.write_bytes(p.read_bytes()[:-1] + b"X")
    assert [v.kind for v in check_dataset(tmp_path)] == ["sha256", "unreadable"]


def test_error_messages_drop_memory_addresses(tmp_path):
    s = _samples(4)
    s[3].error = SampleError("decode", "NotAnImage", "cannot identify image file <_io.BytesIO object at 0x7fa4933046d0>")
    writer.write_shard(tmp_path, "part-00000", "u", s, PROV)
    msg = pq.read_table(tmp_path / "part-00000.errors.parquet").column("message")[0].as_py()
    assert msg == "cannot identify image file <_io.BytesIO object>"


def test_fsspec_output_filesystem(tmp_path):
    """Non-local outputs (s3, gs, ...) go through fsspec; the in-memory filesystem stands in here."""
    import fsspec

    out = f"memory://vesl-test-{os.getpid()}/out"
    try:
        writer.write_shard(out, "part-00000", "u", _samples(6, "part-00000"), PROV)
        writer.write_shard(tmp_path, "part-00000", "u", _samples(6, "part-00000"), PROV)
        assert dataset.is_committed(out, "part-00000")
        assert dataset.committed_shards(out) == ["part-00000"]
        write_manifest(out)
        write_manifest(tmp_path)
        fs = fsspec.filesystem("memory")
        root = out.removeprefix("memory://")
        assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)) == sorted(os.listdir(tmp_path))
        for name in os.listdir(tmp_path):
            if not name.endswith(".stats.json"):
                assert fs.cat(f"{root}/{name}") == (tmp_path / name).read_bytes()
    finally:
        fsspec.filesystem("memory").rm(out.removeprefix("memory://").split("/")[0], recursive=True)
