"""`--captioner keep`: a labeled dataset is re-grounded with new phrase and detector settings, reusing its
stored captions, with no captioner model built or loaded."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from vesl.errors import UserError
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.engines import run
from vesl.schemas.config import CaptionerConfig, DetectorConfig, PhrasesConfig
from vesl.schemas.manifest import check_dataset
from vesl.schemas.region_text import PROVENANCE_KEY


def _rows(d):
    return [r for p in sorted(d.glob("part-*[0-9].parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, tiny_vlm_dir):
    out = tmp_path_factory.mktemp("labeled") / "out"
    cfg = LabelConfig(inputs=["synth://6?seed=4&shard_size=3"], output=str(out),
                      captioner=CaptionerConfig(spec=f"hf:{tiny_vlm_dir}", max_new_tokens=10, device="cpu"))  # fmt: skip
    assert run(cfg, progress=False)["failed"] == []
    return out


def test_keep_regrounds_stored_captions_without_a_captioner(labeled, tmp_path, tiny_owlv2_dir, monkeypatch):
    import vesl.labelers.captioners as captioners

    def no_captioner(*a, **kw):
        raise AssertionError("--captioner keep built a captioner")

    monkeypatch.setattr(captioners, "make_captioner", no_captioner)
    out = tmp_path / "regrounded"
    cfg = LabelConfig(inputs=[str(labeled)], output=str(out), captioner=CaptionerConfig(spec="keep"),
                      phrases=PhrasesConfig(mode="noun_chunks"),
                      detector=DetectorConfig(spec=f"owlv2:{tiny_owlv2_dir}", threshold=0.0, max_regions=3, device="cpu"))  # fmt: skip
    summary = run(cfg, progress=False)
    assert summary["failed"] == []
    assert summary["shards_written"] == 2  # the labeled dataset's committed shards, not its errors files
    before, after = {r["key"]: r for r in _rows(labeled)}, {r["key"]: r for r in _rows(out)}
    assert set(after) == set(before)
    for key, r in after.items():
        assert (r["caption"], r["caption_source"]) == (before[key]["caption"], before[key]["caption_source"])
        assert r["image"] == before[key]["image"]
        assert r["source_shard"] == before[key]["source_shard"]  # where the image came from
    assert sum(len(r["regions"]) for r in after.values()) > 0  # detected anew
    assert check_dataset(out) == []
    prov = json.loads(pq.read_schema(sorted(out.glob("part-*[0-9].parquet"))[0]).metadata[PROVENANCE_KEY.encode()])
    orig = json.loads(pq.read_schema(sorted(labeled.glob("part-*[0-9].parquet"))[0]).metadata[PROVENANCE_KEY.encode()])
    assert json.loads(prov["stages"]["caption"]["captioner.kept_from"]) == orig["captioner"]  # the VLM's record stays
    assert prov["phrases"]["mode"] == "noun_chunks"
    assert run(cfg, progress=False)["shards_skipped"] == 2  # a rerun resumes like any job


def test_keep_on_an_unlabeled_input_is_one_line(tmp_path):
    cfg = LabelConfig(inputs=["synth://3?seed=1"], output=str(tmp_path / "o"), captioner=CaptionerConfig(spec="keep"))
    with pytest.raises(UserError, match="labeled vesl dataset"):
        run(cfg, progress=False)


def test_keep_reads_images_again_from_the_named_original_input(tmp_path, tiny_vlm_dir, tiny_owlv2_dir):
    """A dataset labeled without image bytes re-grounds from its rows' source shards, only under --image-source."""
    from vesl.demo.runner import generate_input
    from vesl.pipeline.config import DecodeConfig

    inp = tmp_path / "input"
    generate_input(inp, n=5, seed=2, shard_size=3)
    slim, full = tmp_path / "slim", tmp_path / "full"
    for out, keep_bytes in ((slim, False), (full, True)):
        cfg = LabelConfig(inputs=[str(inp)], output=str(out), decode=DecodeConfig(keep_image_bytes=keep_bytes),
                          captioner=CaptionerConfig(spec=f"hf:{tiny_vlm_dir}", max_new_tokens=10, device="cpu"))
        assert run(cfg, progress=False)["failed"] == []
    detector = DetectorConfig(spec=f"owlv2:{tiny_owlv2_dir}", threshold=0.0, max_regions=3, device="cpu")

    def reground(src, out, image_sources=()):
        cfg = LabelConfig(inputs=[str(src)], output=str(out), captioner=CaptionerConfig(spec="keep"), detector=detector,
                          source={"image_sources": [str(p) for p in image_sources]})
        return run(cfg, progress=False)

    summary = reground(slim, tmp_path / "no-source")  # nothing named: every row says what to do, none is lost
    assert summary["rows"] == 0
    errs = [r for p in sorted((tmp_path / "no-source").glob("*.errors.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(errs) == 5
    assert all(e["error_type"] == "MissingImage" and "--image-source" in e["message"] for e in errs)

    elsewhere = tmp_path / "other"
    generate_input(elsewhere, n=2, seed=9, shard_size=2)
    reground(slim, tmp_path / "wrong-source", [elsewhere])  # a named input that is not the rows' source
    errs = [r for p in sorted((tmp_path / "wrong-source").glob("*.errors.parquet")) for r in pq.read_table(p).to_pylist()]
    assert len(errs) == 5
    assert all("not one of the --image-source inputs" in e["message"] for e in errs)

    assert reground(slim, tmp_path / "from-slim", [inp])["failed"] == []
    assert reground(full, tmp_path / "from-full")["failed"] == []
    got, want = _rows(tmp_path / "from-slim"), _rows(tmp_path / "from-full")
    assert len(got) == len(want) == 5
    for a, b in zip(got, want, strict=True):  # the same images, so the same regions as from stored bytes
        assert (a["key"], a["caption"], a["regions"]) == (b["key"], b["caption"], b["regions"])
        assert a["image"] == b["image"]  # the bytes came back from the source shard
