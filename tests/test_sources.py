"""Each source reads what that format's writer wrote: img2dataset tars, webdataset, HF/img2dataset parquet, folders."""

from __future__ import annotations

import io
import json
import os
import tarfile

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from vesl.errors import UserError
from vesl.pipeline.config import SourceConfig
from vesl.pipeline.sources import ShardRef, list_shards, read_shard, resolve_inside

CFG = SourceConfig()


def _jpeg(color=(200, 30, 30), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "JPEG")
    return buf.getvalue()


def _png(color=(10, 200, 30), size=(20, 20)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def write_img2dataset_tar(path, samples) -> None:
    """The member layout img2dataset's WebDatasetSampleWriter produces: key.jpg, key.txt, key.json per sample."""
    with tarfile.open(path, "w") as tar:
        for key, parts in samples:
            for ext, data in parts.items():
                _add(tar, f"{key}.{ext}", data)


def _meta(key: str, caption: str | None) -> bytes:
    return json.dumps(
        {"url": f"https://example.com/{key}.jpg", "caption": caption, "key": key, "status": "success",
         "error_message": None, "width": 24, "height": 16, "original_width": 48, "original_height": 32,
         "exif": "{}", "sha256": "0" * 64}
    ).encode()


def test_img2dataset_tar(tmp_path):
    tar_path = tmp_path / "00000.tar"
    write_img2dataset_tar(
        tar_path,
        [
            ("000000000", {"jpg": _jpeg(), "txt": b"a red square\n", "json": _meta("000000000", "a red square")}),
            ("000000001", {"jpg": _jpeg((0, 0, 255)), "json": _meta("000000001", "json only caption")}),
            ("000000002", {"png": _png()}),  # image without caption: allowed, empty alt-text
            ("000000003", {"txt": b"caption without image"}),
            ("000000004", {"webp": b"RIFF....WEBP", "txt": b"\xff\xfe not utf-8"}),
        ],
    )
    # img2dataset writes metadata next to the tar; listing the folder must pick only the tar
    pq.write_table(pa.table({"key": ["000000000"], "caption": ["x"]}), tmp_path / "00000.parquet")
    (tmp_path / "00000_stats.json").write_text("{}")

    refs = list_shards([str(tmp_path)], CFG)
    assert refs == [ShardRef(0, str(tar_path), "wds")]
    assert refs[0].name == "part-00000"
    samples = list(read_shard(refs[0], CFG))
    assert [s.key for s in samples] == [f"00000000{i}" for i in range(5)]
    assert [s.index for s in samples] == list(range(5))
    # relative to the parent of what the user named: the rows never show the local file system
    assert all(s.source_shard == f"{tmp_path.name}/00000.tar" for s in samples)

    s0, s1, s2, s3, s4 = samples
    assert s0.ok
    assert s0.alt_text == "a red square"
    assert s0.image_bytes == _jpeg()
    assert s0.meta["json"]["url"] == "https://example.com/000000000.jpg"
    assert s0.meta["format"] == "jpg"
    assert s1.ok
    assert s1.alt_text == "json only caption"
    assert s2.ok
    assert s2.alt_text == ""
    assert s2.meta["format"] == "png"
    assert not s3.ok
    assert s3.error.stage == "read"
    assert s3.error.error_type == "MissingImage"
    assert not s4.ok
    assert s4.error.error_type == "CaptionEncoding"
    assert "UTF-8" in s4.error.message

    assert [s.key for s in read_shard(refs[0], CFG, limit=2)] == ["000000000", "000000001"]


def test_webdataset_tarwriter_roundtrip(tmp_path):
    """Tars written by the webdataset library itself (what img2dataset calls under the hood)."""
    import webdataset as wds

    path = tmp_path / "shard-000001.tar"
    with open(path, "wb") as f, wds.TarWriter(f) as sink:
        for i in range(3):
            sink.write({"__key__": f"s{i:03d}", "jpg": _jpeg((i * 50, 0, 0)), "txt": f"item {i}", "json": {"i": i}})
    (ref,) = list_shards([str(path)], CFG)
    samples = list(read_shard(ref, CFG))
    assert [(s.key, s.alt_text, s.meta["json"]["i"]) for s in samples] == [(f"s{i:03d}", f"item {i}", i) for i in range(3)]
    assert all(Image.open(io.BytesIO(s.image_bytes)).size == (24, 16) for s in samples)


def test_tar_through_fsspec_memory_filesystem():
    """Non-local URIs go through fsspec (memory:// here stands in for s3:// or gs://)."""
    fs = fsspec.filesystem("memory")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        _add(tar, "k1.jpg", _jpeg())
        _add(tar, "k1.txt", b"remote")
    fs.pipe("/vesl-test/remote/000.tar", buf.getvalue())
    try:
        refs = list_shards(["memory://vesl-test/remote"], CFG)
        assert [(r.uri, r.kind) for r in refs] == [("memory:///vesl-test/remote/000.tar", "wds")]
        (s,) = list(read_shard(refs[0], CFG))
        assert s.key == "k1"
        assert s.alt_text == "remote"
    finally:
        fs.rm("/vesl-test", recursive=True)


def test_img2dataset_parquet_bytes_column(tmp_path):
    n = 600  # spans several read batches and row groups
    table = pa.table(
        {
            "key": [f"{i:09d}" for i in range(n)],
            "jpg": [_jpeg((i % 256, 0, 0), (8, 8)) for i in range(n)],
            "caption": [f"caption {i}" for i in range(n)],
            "url": [f"https://e/{i}" for i in range(n)],
        }
    )
    pq.write_table(table, tmp_path / "00000.parquet", row_group_size=100)
    (ref,) = list_shards([str(tmp_path / "*.parquet")], CFG)
    samples = list(read_shard(ref, CFG))
    assert [s.index for s in samples] == list(range(n))
    assert [s.key for s in samples] == table.column("key").to_pylist()
    assert samples[599].alt_text == "caption 599"
    assert samples[599].image_bytes == table.column("jpg")[599].as_py()
    assert len(list(read_shard(ref, CFG, limit=7))) == 7


def test_hf_image_dataset_parquet(tmp_path):
    """An HF `datasets` image dataset exported to parquet: struct<bytes, path> image column, no key column."""
    datasets = pytest.importorskip("datasets")
    images = [Image.new("RGB", (12, 10), (i * 60, 10, 10)) for i in range(3)]
    ds = datasets.Dataset.from_dict({"image": images, "text": ["a", "b", "c"]}).cast_column("image", datasets.Image())
    out = tmp_path / "train-00000-of-00001.parquet"
    ds.to_parquet(str(out))
    cfg = SourceConfig(image_column="image", caption_column="text")
    (ref,) = list_shards([str(out)], cfg)
    samples = list(read_shard(ref, cfg))
    assert [s.key for s in samples] == [f"train-00000-of-00001-{i:06d}" for i in range(3)]
    assert [s.alt_text for s in samples] == ["a", "b", "c"]
    assert [Image.open(io.BytesIO(s.image_bytes)).getpixel((0, 0))[0] for s in samples] == pytest.approx([0, 60, 120], abs=3)


def test_parquet_path_column_stays_inside(tmp_path):
    data_dir = tmp_path / "data"
    (data_dir / "imgs").mkdir(parents=True)
    (data_dir / "imgs" / "a.jpg").write_bytes(_jpeg())
    (tmp_path / "outside.jpg").write_bytes(_jpeg((0, 255, 0)))
    os.symlink(tmp_path / "outside.jpg", data_dir / "imgs" / "link.jpg")
    rows = {
        "path": ["imgs/a.jpg", "../outside.jpg", str(tmp_path / "outside.jpg"), str(data_dir / "imgs" / "a.jpg"),
                 "imgs/link.jpg", "imgs/missing.jpg", "imgs/../imgs/a.jpg"],
        "caption": ["ok rel", "dotdot", "abs outside", "abs inside", "symlink out", "missing", "normalized"],
    }
    pq.write_table(pa.table(rows), data_dir / "index.parquet")
    cfg = SourceConfig(path_column="path")
    (ref,) = list_shards([str(data_dir / "index.parquet")], cfg)
    samples = {s.alt_text: s for s in read_shard(ref, cfg)}
    for ok in ("ok rel", "abs inside", "normalized"):
        assert samples[ok].ok
        assert samples[ok].image_bytes == _jpeg()
        assert samples[ok].image_uri == str(data_dir / "imgs" / "a.jpg")
    for bad in ("dotdot", "abs outside", "symlink out"):
        assert samples[bad].error.error_type == "PathOutsideInput", bad
        assert samples[bad].image_bytes is None
    assert samples["missing"].error.error_type == "ReadError"
    assert samples["ok rel"].key == "index-000000"


def test_resolve_inside_is_pure_path_math():
    assert resolve_inside("/d", "x/y.jpg") == "/d/x/y.jpg"
    assert resolve_inside("/d", "../e/y.jpg") is None
    assert resolve_inside("/d", "/dd/y.jpg") is None  # prefix trick
    assert resolve_inside("/d", "/d/y.jpg") == "/d/y.jpg"
    assert resolve_inside("/d", "a/../../d/y.jpg") == "/d/y.jpg"


def test_parquet_non_utf8_caption_is_an_error_row(tmp_path):
    table = pa.table({"jpg": [_jpeg(), _jpeg()], "caption": pa.array([b"fine", b"\xc3\x28bad"], pa.binary())})
    pq.write_table(table, tmp_path / "p.parquet")
    (ref,) = list_shards([str(tmp_path / "p.parquet")], CFG)
    good, bad = read_shard(ref, CFG)
    assert good.ok
    assert good.alt_text == "fine"
    assert bad.error.error_type == "CaptionEncoding"


def test_parquet_wrong_column_is_a_user_error(tmp_path):
    pq.write_table(pa.table({"image": [b"x"], "caption": ["c"]}), tmp_path / "p.parquet")
    with pytest.raises(UserError, match="image_column"):
        list_shards([str(tmp_path)], CFG)
    with pytest.raises(UserError, match="caption_column"):
        list_shards([str(tmp_path)], SourceConfig(image_column="image", caption_column="text"))


def test_image_folders(tmp_path):
    flat = tmp_path / "flat"
    flat.mkdir()
    (flat / "b.jpg").write_bytes(_jpeg())
    (flat / "b.txt").write_text("bee\n")
    (flat / "a.PNG").write_bytes(_png())  # no sidecar: empty alt-text
    (flat / "c.txt").write_text("orphan caption")
    (flat / "d.jpg").write_bytes(_jpeg())
    (flat / "d.txt").write_bytes(b"\x80\x81")
    (flat / ".hidden.jpg").write_bytes(b"junk")
    (ref,) = list_shards([str(flat)], CFG)
    assert ref.kind == "folder"
    assert ref.uri == str(flat)
    samples = list(read_shard(ref, CFG))
    assert [(s.key, s.index) for s in samples] == [("flat/a", 0), ("flat/b", 1), ("flat/c", 2), ("flat/d", 3)]
    assert samples[0].ok
    assert samples[0].alt_text == ""
    assert samples[0].image_bytes == _png()
    assert samples[1].ok
    assert samples[1].alt_text == "bee"
    assert samples[1].image_uri == str(flat / "b.jpg")
    assert samples[2].error.error_type == "MissingImage"
    assert samples[3].error.error_type == "CaptionEncoding"

    nested = tmp_path / "nested"
    for sub in ("cats", "dogs"):
        (nested / sub).mkdir(parents=True)
        (nested / sub / "x.jpg").write_bytes(_jpeg())
        (nested / sub / "x.txt").write_text(sub)
    refs = list_shards([str(nested)], CFG)
    assert [(r.index, r.uri, r.kind) for r in refs] == [(0, str(nested / "cats"), "folder"), (1, str(nested / "dogs"), "folder")]
    assert [s.key for r in refs for s in read_shard(r, CFG)] == ["cats/x", "dogs/x"]


def test_list_shards_order_dedupe_and_errors(tmp_path):
    for i in (2, 0, 1):
        write_img2dataset_tar(tmp_path / f"{i:05d}.tar", [("k", {"jpg": _jpeg(), "txt": b"t"})])
    refs = list_shards([str(tmp_path / "0000[12].tar"), str(tmp_path / "*.tar")], CFG)
    names = [os.path.basename(r.uri) for r in refs]
    assert names == ["00001.tar", "00002.tar", "00000.tar"]  # inputs in order, each sorted, duplicates dropped
    assert [r.index for r in refs] == [0, 1, 2]
    assert list_shards([str(tmp_path)], CFG) == list_shards([str(tmp_path)], CFG)
    with pytest.raises(UserError, match="does not exist"):
        list_shards([str(tmp_path / "nope.tar")], CFG)
    with pytest.raises(UserError, match="matches nothing"):
        list_shards([str(tmp_path / "*.nothing")], CFG)
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(UserError, match="don't know how to read"):
        list_shards([str(tmp_path / "x.csv")], CFG)
    with pytest.raises(UserError, match="synth://N"):
        list_shards(["synth://lots?seed=1"], CFG)
    with pytest.raises(UserError, match="no inputs"):
        list_shards([], CFG)


def test_synth_source_shards():
    synth = pytest.importorskip("vesl.demo.synth")
    refs = list_shards(["synth://7?seed=3&shard_size=3"], CFG)
    assert [r.uri for r in refs] == [f"synth://7?seed=3&shard_size=3&part={p}" for p in range(3)]
    assert all(r.kind == "synth" for r in refs)
    samples = [s for r in refs for s in read_shard(r, CFG)]
    assert [s.index for s in samples] == [0, 1, 2, 0, 1, 2, 0]
    expected = [synth.make_scene(3, i) for i in range(7)]
    assert [s.key for s in samples] == [e.key for e in expected]
    assert [s.image_bytes for s in samples] == [e.image for e in expected]
    assert [s.alt_text for s in samples] == [e.alt_text for e in expected]
    assert len({s.key for s in samples}) == 7


@pytest.mark.parametrize("fmt", ["wds", "parquet"])
def test_reads_what_the_synth_writers_wrote(tmp_path, fmt):
    synth = pytest.importorskip("vesl.demo.synth")
    scenes = list(synth.make_scenes(5, seed=11))
    writer = synth.write_webdataset if fmt == "wds" else synth.write_parquet
    writer(scenes, tmp_path, shard_size=2)
    refs = list_shards([str(tmp_path)], CFG)
    assert [r.kind for r in refs] == [fmt] * 3
    samples = [s for r in refs for s in read_shard(r, CFG)]
    assert [(s.key, s.image_bytes, s.alt_text) for s in samples] == [(x.key, x.image, x.alt_text) for x in scenes]
    assert all(s.ok for s in samples)


def test_count_samples_matches_the_reader_where_cheap(tmp_path):
    """The progress total: the counts equal what the reader yields; costly counts are None, never wrong."""
    from vesl.demo.synth import make_scenes, write_parquet, write_webdataset
    from vesl.pipeline.sources import count_samples

    scenes = list(make_scenes(7, seed=4))
    cfg = SourceConfig()
    (tar,) = write_webdataset(scenes, tmp_path / "wds", shard_size=7)
    with tarfile.open(tar) as t, tarfile.open(tmp_path / "extra.tar", "w") as out:  # plus a stray and a hidden file
        for m in t.getmembers():
            out.addfile(m, t.extractfile(m))
        _add(out, "README", b"no part name")
        _add(out, ".hidden.txt", b"x")
    (pq_file,) = write_parquet(scenes, tmp_path / "pq", shard_size=7)
    with tarfile.open(tmp_path / "gz.tar.gz", "w:gz") as out:
        _add(out, "a.jpg", _jpeg())
    for uri, kind in ((str(tar), "wds"), (str(tmp_path / "extra.tar"), "wds"), (str(pq_file), "parquet"),
                      ("synth://7?seed=4&shard_size=5&part=1", "synth")):  # fmt: skip
        ref = ShardRef(0, uri, kind)
        assert count_samples(ref, cfg) == sum(1 for _ in read_shard(ref, cfg)), uri
    assert count_samples(ShardRef(0, str(tmp_path / "gz.tar.gz"), "wds"), cfg) is None  # would cost a decompression
    assert count_samples(ShardRef(0, str(tmp_path / "missing.tar"), "wds"), cfg) is None  # the reader reports it
