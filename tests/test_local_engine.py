"""Local engine: failure isolation, resume, --limit, unreadable shards, and workers=2 == workers=1.

The model stages here are small real stages (alt-text captions, a box from the image's non-black
pixels, a stage that refuses given keys); decode and the tar reader are the product's own.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.shard_checks import stats_without_timings
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.decode import DecodeStage
from vesl.pipeline.engines.local import run_local
from vesl.schemas.manifest import check_dataset
from vesl.schemas.stage import Region, Sample, StageResources, fail
from vesl.schemas.validation import validate

REFUSED = {"s01-0003", "s02-0000"}  # the grounding stage raises on these keys


class _NothingToLoad:
    """The test stages load no model; ``kind`` says what each does in the shard's provenance."""

    kind = ""

    def setup(self) -> None:
        pass

    def provenance(self) -> dict[str, str]:
        return {"kind": self.kind}


class CaptionFromAltText(_NothingToLoad):
    """Caption = alt-text with a fixed prefix, like a recaptioner that trusts the alt-text."""

    name = "caption"
    kind = "alt-text-prefix"
    resources = StageResources(batch_size=3)

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        for s in batch:
            assert s.image is not None  # decoded by the product's decode stage
            s.caption, s.caption_source = f"a photo of {s.alt_text}", "vlm"
        return batch


class GroundNonBlack(_NothingToLoad):
    """Grounds the alt-text phrase to the box of the non-black pixels; raises on refused keys
    (the whole batch call fails, so the engine must isolate the one sample)."""

    name = "detect"
    kind = "non-black-bbox"
    resources = StageResources(batch_size=4)

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        for s in batch:
            if s.key in REFUSED:
                raise ValueError(f"cannot ground {s.key}")
            if s.width < 4:
                fail(s, self.name, "image too small to ground", "TooSmall")
                continue
            mask = s.image.convert("L").point(lambda v: 255 if v > 60 else 0)  # ignore JPEG ringing
            x0, y0, x1, y1 = mask.getbbox() or (0, 0, s.width, s.height)
            start = len("a photo of ")
            s.regions = [
                Region(s.alt_text, start, start + len(s.alt_text), (x0 / s.width, y0 / s.height, x1 / s.width, y1 / s.height), 1.0)
            ]
        return batch


def make_test_stages(cfg: LabelConfig) -> list:
    """Module-level so spawned workers can unpickle it."""
    return [DecodeStage(cfg.decode), CaptionFromAltText(), GroundNonBlack()]


def _jpeg(i: int, size: tuple[int, int] = (32, 24)) -> bytes:
    im = Image.new("RGB", size, (0, 0, 0))
    im.paste((200, 30 + 10 * i, 60), (2 + i % 5, 3, 12 + i % 7, 20))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def write_tar(path: Path, shard: int, n: int, broken: dict[int, bytes] | None = None) -> None:
    """An img2dataset-style shard: key.jpg, key.txt, key.json per sample."""
    broken = broken or {}
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            key = f"s{shard:02d}-{i:04d}"
            parts = {
                "jpg": broken.get(i, _jpeg(i)),
                "txt": f"red box {shard} {i}".encode(),
                "json": json.dumps({"key": key, "caption": f"red box {shard} {i}"}).encode(),
            }
            for ext, data in parts.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    write_tar(d / "00000.tar", 0, 9, broken={4: b"", 7: b"not an image"})
    write_tar(d / "00001.tar", 1, 11)
    write_tar(d / "00002.tar", 2, 5, broken={2: _jpeg(0, size=(2, 2))})
    write_tar(d / "00003.tar", 3, 7)
    return d


def _cfg(inputs: Path, out: Path, **kw) -> LabelConfig:
    return LabelConfig(inputs=[str(inputs)], output=str(out), **kw)


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if not p.name.endswith(".stats.json")}




def test_failures_are_isolated_to_their_samples(inputs, tmp_path):
    out = tmp_path / "out"
    summary = run_local(_cfg(inputs, out), make_test_stages, progress=False)
    assert summary["failed"] == []
    assert summary["shards_written"] == 4
    assert summary["images"] == 32
    assert validate(out) == []
    assert check_dataset(out) == []
    keys, errs = [], {}
    for i in range(4):
        t = pq.read_table(out / f"part-{i:05d}.parquet")
        keys += t.column("key").to_pylist()
        for r in t.to_pylist():
            (reg,) = r["regions"]
            assert r["caption"][reg["char_start"] : reg["char_end"]] == r["alt_text"]
            assert 0 < reg["box"][2] - reg["box"][0] < 1
        e = pq.read_table(out / f"part-{i:05d}.errors.parquet")
        for r in e.to_pylist():
            errs[r["key"]] = (r["stage"], r["error_type"])
    assert errs["s01-0003"] == ("detect", "ValueError")
    assert errs["s02-0000"] == ("detect", "ValueError")
    assert errs["s02-0002"] == ("detect", "TooSmall")
    assert errs["s00-0004"][0] == "decode"
    assert errs["s00-0007"][0] == "decode"
    assert len(errs) == 5
    # Every input key is present exactly once, as a row or as an error row.
    assert len(keys) == len(set(keys)) == 27
    assert set(keys) | set(errs) == {f"s{s:02d}-{i:04d}" for s, n in enumerate((9, 11, 5, 7)) for i in range(n)}
    stats = json.loads((out / "part-00001.stats.json").read_text())
    assert stats["errors_by_stage"] == {"detect": 1}
    assert set(stats["timings"]) >= {"caption", "decode", "detect", "wall_s"}


def test_workers_two_write_identical_files(inputs, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    run_local(_cfg(inputs, one), make_test_stages, progress=False)
    summary = run_local(_cfg(inputs, two, workers=2), make_test_stages, progress=False)
    assert summary["workers"] == 2
    assert summary["failed"] == []
    assert _files(one) == _files(two)  # parquet, errors parquet and manifest, byte for byte
    assert stats_without_timings(one) == stats_without_timings(two)


def test_resume_skips_committed_and_overwrite_redoes(inputs, tmp_path):
    out = tmp_path / "out"
    run_local(_cfg(inputs, out), make_test_stages, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    (out / "part-00002.stats.json").unlink()  # as if killed before the commit marker
    again = run_local(_cfg(inputs, out), make_test_stages, progress=False)
    assert (again["shards_written"], again["shards_skipped"]) == (1, 3)
    after = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert after["part-00001.parquet"] == before["part-00001.parquet"]
    assert after["part-00002.parquet"] != before["part-00002.parquet"]
    redo = run_local(_cfg(inputs, out, overwrite=True), make_test_stages, progress=False)
    assert (redo["shards_written"], redo["shards_skipped"]) == (4, 0)
    assert check_dataset(out) == []


def test_limit_takes_first_samples_in_shard_order_and_full_run_completes(inputs, tmp_path):
    out, ref = tmp_path / "out", tmp_path / "ref"
    s = run_local(_cfg(inputs, out, limit=12), make_test_stages, progress=False)
    assert s["images"] == 12
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["part-00000.stats.json", "part-00001.stats.json"]
    st = json.loads((out / "part-00001.stats.json").read_text())
    assert (st["input_count"], st["sample_limit"]) == (3, 3)
    assert pq.read_table(out / "part-00001.parquet").column("key").to_pylist() == ["s01-0000", "s01-0001", "s01-0002"]
    # Same limit again: nothing to do. No limit: only the cut shard and the untouched ones run.
    assert run_local(_cfg(inputs, out, limit=12), make_test_stages, progress=False)["shards_written"] == 0
    full = run_local(_cfg(inputs, out), make_test_stages, progress=False)
    assert (full["shards_written"], full["shards_skipped"]) == (3, 1)
    run_local(_cfg(inputs, ref), make_test_stages, progress=False)
    assert _files(out) == _files(ref)


def test_unreadable_shard_is_reported_and_left_uncommitted(inputs, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    (d / "00000.tar").write_bytes((inputs / "00000.tar").read_bytes())
    (d / "00001.tar").write_bytes(b"this is not a tar archive\n" * 100)
    (d / "00002.tar").write_bytes((inputs / "00001.tar").read_bytes()[:5000])  # cut after 1.5 samples
    out = tmp_path / "out"
    s = run_local(_cfg(d, out), make_test_stages, progress=False)
    assert [f["shard"] for f in s["failed"]] == ["part-00001", "part-00002"]
    assert "cannot read" in s["failed"][0]["error"]
    assert sorted(p.name for p in out.glob("*.stats.json")) == ["part-00000.stats.json"]
    assert not (out / "part-00002.parquet").exists()  # the samples read before the error were not written
    (d / "00001.tar").write_bytes((inputs / "00001.tar").read_bytes())  # fixed inputs: a rerun retries them
    (d / "00002.tar").write_bytes((inputs / "00002.tar").read_bytes())
    s = run_local(_cfg(d, out), make_test_stages, progress=False)
    assert (s["shards_written"], s["shards_skipped"], s["failed"]) == (2, 1, [])
