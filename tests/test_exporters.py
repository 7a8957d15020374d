"""`vesl export`: each format read back by the tool that consumes it (webdataset as open_clip uses it,
pycocotools, and the ODVG lines as Open-GroundingDino parses them)."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.region_dataset import write_region_dataset
from vesl.errors import UserError
from vesl.pipeline.exporters import export, export_wds


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_region_dataset(tmp_path_factory.mktemp("exp") / "ds", n_images=12, n_shards=2)


def _rows(d: Path) -> list[dict]:
    return pq.read_table(sorted(d.glob("part-*[0-9].parquet"))).to_pylist()


def test_wds_reads_back_with_webdataset_as_open_clip_does(dataset, tmp_path):
    import webdataset as wds

    res = export(dataset, "wds", tmp_path / "wds")
    rows = {r["key"]: r for r in _rows(dataset)}
    assert res.images == 12
    urls = [str(p) for p in res.files]
    # raw samples: image + txt + json per key; the key's dot must not split the sample
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == 12
    for s in samples:
        meta = json.loads(s["json"])
        row = rows[meta["key"]]
        assert s["__key__"] == meta["key"].replace(".", "_")
        assert s["txt"].decode() == row["caption"]
        img_ext = next(e for e in ("jpg", "png", "webp") if e in s)
        assert s[img_ext] == row["image"]  # original bytes, not re-encoded
        assert [r["phrase"] for r in meta["regions"]] == [r["phrase"] for r in row["regions"]]
        for got, want in zip(meta["regions"], row["regions"], strict=True):
            assert got["box"] == pytest.approx(want["box"], abs=1e-6)
            assert row["caption"][got["char_start"]:got["char_end"]] == got["phrase"]
    # open_clip's own pipeline stages: decode to PIL, rename, tuple
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.decode("pilrgb"),
        wds.rename(image="jpg;png;jpeg;webp", text="txt"),
        wds.to_tuple("image", "text"),
    )
    pairs = list(pipeline)
    assert len(pairs) == 12
    assert all(isinstance(img, Image.Image) and img.size == (160, 120) for img, _ in pairs)
    assert {t for _, t in pairs} == {r["caption"] for r in rows.values()}


def test_wds_tars_are_deterministic_and_sharded(dataset, tmp_path):
    a = export_wds(dataset, tmp_path / "a", shard_size=5)
    b = export_wds(dataset, tmp_path / "b", shard_size=5)
    assert [p.name for p in a.files] == ["00000.tar", "00001.tar", "00002.tar"]
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()  # noqa: E731
    assert [digest(p) for p in a.files] == [digest(p) for p in b.files]


def test_coco_reads_back_with_pycocotools(dataset, tmp_path):
    from pycocotools.coco import COCO

    res = export(dataset, "coco", tmp_path / "coco")
    rows = _rows(dataset)
    coco = COCO(str(tmp_path / "coco" / "annotations.json"))
    assert len(coco.getImgIds()) == 12
    assert len(coco.getAnnIds()) == res.regions == sum(len(r["regions"]) for r in rows)
    phrases = sorted({x["phrase"] for r in rows for x in r["regions"]})
    assert sorted(c["name"] for c in coco.loadCats(coco.getCatIds())) == phrases
    by_key = {r["key"]: r for r in rows}
    for img in coco.loadImgs(coco.getImgIds()):
        row = by_key[img["key"]]
        with Image.open(tmp_path / "coco" / "images" / img["file_name"]) as im:
            assert im.size == (img["width"], img["height"]) == (row["width"], row["height"])
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[img["id"]]))
        assert len(anns) == len(row["regions"])
        for ann, reg in zip(anns, row["regions"], strict=True):
            x0, y0, x1, y1 = reg["box"]
            w, h = row["width"], row["height"]
            assert ann["bbox"] == pytest.approx([x0 * w, y0 * h, (x1 - x0) * w, (y1 - y0) * h], abs=0.02)
            assert coco.loadCats(ann["category_id"])[0]["name"] == reg["phrase"]
    # a category query works the COCO way
    cat = coco.getCatIds(catNms=[phrases[0]])
    assert len(coco.getAnnIds(catIds=cat)) == sum(x["phrase"] == phrases[0] for r in rows for x in r["regions"])


def test_odvg_lines_parse_as_grounding_records(dataset, tmp_path):
    res = export(dataset, "odvg", tmp_path / "odvg")
    rows = {r["key"].replace(".", "_"): r for r in _rows(dataset)}
    lines = (tmp_path / "odvg" / "odvg.jsonl").read_text(encoding="utf-8").splitlines()
    with_regions = [r for r in rows.values() if r["regions"]]
    assert len(lines) == res.images == len(with_regions)
    assert res.skipped == {"no_regions": 12 - len(with_regions)}
    for line in lines:
        rec = json.loads(line)
        assert set(rec) == {"filename", "height", "width", "grounding"}
        row = rows[Path(rec["filename"]).stem]
        img = Image.open(io.BytesIO((tmp_path / "odvg" / "images" / rec["filename"]).read_bytes()))
        assert img.size == (rec["width"], rec["height"])
        g = rec["grounding"]
        assert g["caption"] == row["caption"]
        for region, want in zip(g["regions"], row["regions"], strict=True):
            x0, y0, x1, y1 = region["bbox"]
            assert 0 <= x0 <= x1 <= rec["width"]
            assert 0 <= y0 <= y1 <= rec["height"]
            assert region["bbox"] == pytest.approx(
                [want["box"][0] * 160, want["box"][1] * 120, want["box"][2] * 160, want["box"][3] * 120], abs=0.01
            )
            (s, e), = region["tokens_positive"]
            assert g["caption"][s:e] == region["phrase"] == want["phrase"]
        # Open-GroundingDino's VG mode (datasets/odvg.py) joins the distinct phrases into the text prompt with
        # " . " and labels each box by its phrase's position; the model later splits the prompt on the dots.
        # That only round-trips when every phrase is non-empty, trimmed and free of the separator.
        uni = list(dict.fromkeys(r["phrase"] for r in g["regions"]))
        prompt = " . ".join(uni) + " ."
        assert prompt.removesuffix(" .").split(" . ") == uni
        assert all(p and p == p.strip() for p in uni)


def test_export_refuses_bad_arguments(dataset, tmp_path):
    with pytest.raises(UserError, match="not one of"):
        export(dataset, "yolo", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        export(dataset, "coco", tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_cli_export(dataset, tmp_path):
    from vesl.cli import app

    res = CliRunner().invoke(app, ["export", str(dataset), "--format", "odvg", "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "odvg:" in res.output
    assert (tmp_path / "o" / "odvg.jsonl").exists()


def test_wds_meets_open_clip_train_reader_contract(dataset, tmp_path):
    """open_clip_train reads tars with its own ``group_by_keys_nothrow`` over ``{"fname", "data", "__url__"}``
    member records (what webdataset <= 0.2.86 yields; 1.x renamed them, hence its KeyError 'fname') and keeps
    samples that pass ``filter_no_caption_or_no_image``. Fed those records from the exported tars, its own code
    must keep every image with its caption."""
    import tarfile

    data = pytest.importorskip("open_clip_train.data")

    res = export(dataset, "wds", tmp_path / "wds")
    rows = {r["key"]: r for r in _rows(dataset)}

    def members():
        for url in res.files:
            with tarfile.open(url) as tar:
                for m in tar:
                    if m.isfile():
                        yield {"fname": m.name, "data": tar.extractfile(m).read(), "__url__": str(url)}

    samples = [s for s in data.group_by_keys_nothrow(members()) if data.filter_no_caption_or_no_image(s)]
    assert len(samples) == len(rows) == 12
    for s in samples:
        row = rows[json.loads(s["json"])["key"]]
        assert s["txt"].decode() == row["caption"]
        img = Image.open(io.BytesIO(next(s[e] for e in ("png", "jpg", "jpeg", "webp") if e in s))).convert("RGB")
        assert img.size == (row["width"], row["height"])
