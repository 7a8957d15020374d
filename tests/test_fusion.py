"""Several looks fused (TTA, more detectors) and the phrases that were queried without a kept box (issue 31)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw
from pydantic import ValidationError

from tests.region_dataset import write_region_dataset
from tests.test_hardening import cli, one_line_error
from vesl.errors import UserError
from vesl.labelers.fusion import fuse_looks
from vesl.labelers.grounding import FusedDetector, hflip_box, make_view, view_image, view_to_image
from vesl.schemas.config import DetectorConfig, FusionConfig
from vesl.schemas.region_text import SCHEMA_VERSION_KEY, validate_rows
from vesl.schemas.stage import Phrase, Region, Sample

CAPTION = "a red circle and a blue square on a gray canvas"
RED, BLUE, GRAY = (
    Phrase("a red circle", 0, 12),
    Phrase("a blue square", 17, 30),
    Phrase("a gray canvas", 34, 47),
)
PHRASES = [RED, BLUE, GRAY]


def _region(p: Phrase, box, score: float) -> Region:
    return Region(p.text, p.char_start, p.char_end, tuple(box), score)


def test_phrases_slice_the_caption():
    assert all(CAPTION[p.char_start : p.char_end] == p.text for p in PHRASES)


def test_two_agreeing_looks_give_one_box_with_the_mean_box_and_score():
    a = [_region(RED, (0.1, 0.1, 0.5, 0.5), 0.8)]
    b = [_region(RED, (0.12, 0.1, 0.5, 0.52), 0.6)]
    (fused,) = fuse_looks([a, b], PHRASES, FusionConfig())
    assert fused.phrase == RED.text
    assert (fused.char_start, fused.char_end) == (0, 12)
    assert fused.score == pytest.approx(0.7, abs=1e-6)  # (0.8 + 0.6) / 2 looks
    # the score-weighted mean box: x0 = (0.8 * 0.1 + 0.6 * 0.12) / 1.4
    assert fused.box == pytest.approx((0.10857, 0.1, 0.5, 0.50857), abs=1e-4)


def test_disagreeing_looks_keep_both_boxes_each_scored_over_the_number_of_looks():
    a = [_region(RED, (0.1, 0.1, 0.5, 0.5), 0.8)]
    b = [_region(RED, (0.6, 0.6, 0.9, 0.9), 0.6), _region(BLUE, (0.1, 0.1, 0.5, 0.5), 0.5)]
    fused = fuse_looks([a, b], PHRASES, FusionConfig())
    # a box of another phrase never merges, however it overlaps; a box one look of two found keeps half its score
    assert [(r.phrase, round(r.score, 5)) for r in fused] == [
        (RED.text, 0.4),
        (RED.text, 0.3),
        (BLUE.text, 0.25),
    ]
    kept = fuse_looks([a, b], PHRASES, FusionConfig(threshold=0.3))  # fused score <= threshold: dropped
    assert [(r.phrase, round(r.score, 5)) for r in kept] == [(RED.text, 0.4)]
    most = fuse_looks([a, b], PHRASES, FusionConfig(conf_type="max"))  # max: a lone box keeps its own score
    assert [round(r.score, 5) for r in most] == [0.8, 0.6, 0.5]


def test_after_fusion_a_phrase_named_twice_keeps_a_box_per_mention_as_the_plain_detector_does():
    twin = Phrase("a red circle", 0, 12, count=2)  # "a red circle on the left ... a red circle on the right"
    left, right = (0.05, 0.1, 0.3, 0.4), (0.6, 0.1, 0.85, 0.4)
    look = [_region(twin, left, 0.8), _region(twin, right, 0.7)]
    stage = FusedDetector(DetectorConfig(spec="owlv2:unused", tta=["hflip"], boxes_per_phrase=1), [])
    fused = stage.fuse([look, look], [twin, BLUE], (200, 200))
    assert [r.box[0] for r in sorted(fused, key=lambda r: r.box)] == pytest.approx([left[0], right[0]])
    once = stage.fuse([look, look], [Phrase("a red circle", 0, 12), BLUE], (200, 200))
    assert [r.box[0] for r in once] == pytest.approx([left[0]])  # named once: one box, the better one


def test_fusion_refuses_a_box_of_a_phrase_the_image_does_not_have():
    with pytest.raises(ValueError, match="not one of the image's phrases"):
        fuse_looks([[_region(Phrase("a cat", 0, 5), (0, 0, 1, 1), 0.5)]], PHRASES, FusionConfig())


def test_views_map_boxes_back_to_the_image():
    assert hflip_box((0.125, 0.25, 0.375, 0.5)) == (0.625, 0.25, 0.875, 0.5)
    assert hflip_box(hflip_box((0.1, 0.2, 0.3, 0.4))) == pytest.approx((0.1, 0.2, 0.3, 0.4), abs=1e-15)
    img = Image.new("RGB", (100, 60))
    for look, region in (("scale:2", (25, 15, 75, 45)), ("scale:0.5", (0, 0, 200, 120)),
                         ("hflip+scale:2", (25, 15, 75, 45))):  # fmt: skip
        v = make_view(look, 100, 60)
        whole = view_to_image((0.0, 0.0, 1.0, 1.0), v, 100, 60)  # the whole view is this part of the image
        assert whole == pytest.approx(tuple(c / s for c, s in zip(region, (100, 60, 100, 60), strict=True)))
        assert view_image(img, v).size == ((50, 30) if v.scale > 1 else (100, 60))


def _asymmetric(size=(96, 64)) -> Image.Image:
    img = Image.new("RGB", size, (128, 128, 128))
    d = ImageDraw.Draw(img)
    d.rectangle([4, 6, 30, 40], fill=(220, 40, 40))
    d.ellipse([50, 30, 70, 60], fill=(40, 70, 220))
    return img


@pytest.fixture(scope="module")
def tiny_owlv2(tmp_path_factory) -> Path:
    from tests.tiny_detectors import build_tiny_owlv2

    return build_tiny_owlv2(tmp_path_factory.mktemp("owlv2") / "model")


def test_flip_look_maps_a_real_detectors_boxes_back_exactly(tiny_owlv2):
    """The flip look of the mirrored image sees the original image, pixel for pixel: its boxes, mapped back, are
    exactly the mirror of the original image's boxes."""
    import torch

    from vesl.labelers.detectors import Owlv2Detector, make_detector

    torch.set_num_threads(1)
    spec = f"owlv2:{tiny_owlv2}"
    plain = make_detector(DetectorConfig(spec=spec, threshold=0.0, nms="none", max_regions=500))
    assert isinstance(plain, Owlv2Detector)  # one detector, no TTA: the plain stage, rows as before
    fused = make_detector(
        DetectorConfig(spec=spec, threshold=0.0, nms="none", max_regions=500, tta=["hflip"])
    )
    assert isinstance(fused, FusedDetector)
    fused.setup()
    a = _asymmetric()
    b = a.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    phrases = [Phrase("a red square", 0, 12)]
    with torch.inference_mode():
        (on_a,) = fused.detectors[0].detect([a], [phrases], [a.size])
    itself, flipped = fused.looks_of(b, phrases, b.size)
    assert len(on_a) > 10
    key = lambda r: (r.box, r.score)  # noqa: E731
    assert sorted(map(key, flipped)) == sorted((hflip_box(r.box), r.score) for r in on_a)
    assert sorted(map(key, itself)) != sorted(map(key, flipped))  # the image is not symmetric: a real check


def _sample(phrases, regions, queried=True) -> Sample:
    return Sample(key="k", source_shard="s", caption=CAPTION, alt_text="x", width=10, height=10,
                  caption_source="vlm", phrases=list(phrases), regions=list(regions), queried=queried)  # fmt: skip


def test_unmatched_phrases_are_the_queried_phrases_without_a_kept_box():
    from vesl.pipeline.writer import _row

    row = _row(_sample(PHRASES, [_region(BLUE, (0.1, 0.1, 0.5, 0.5), 0.5)]), True)
    assert row["unmatched_phrases"] == [{"text": RED.text, "char_start": 0, "char_end": 12},
                                        {"text": GRAY.text, "char_start": 34, "char_end": 47}]  # fmt: skip
    assert all(CAPTION[p["char_start"] : p["char_end"]] == p["text"] for p in row["unmatched_phrases"])
    assert _row(_sample(PHRASES, [], queried=False), True)["unmatched_phrases"] is None  # no detector: null
    assert _row(_sample([], []), True)["unmatched_phrases"] == []


def test_a_row_read_back_for_the_duplicates_copy_pass_writes_the_same_unmatched_phrases():
    from vesl.pipeline.dedup import _row_sample
    from vesl.pipeline.writer import _row

    row = _row(_sample([GRAY, RED, BLUE], [_region(BLUE, (0.1, 0.1, 0.5, 0.5), 0.5)]), True)
    assert [p["text"] for p in row["unmatched_phrases"]] == [GRAY.text, RED.text]
    again = _row(_row_sample(row, 0), True)
    assert again["unmatched_phrases"] == row["unmatched_phrases"]
    assert _row(_row_sample({**row, "unmatched_phrases": None}, 0), True)["unmatched_phrases"] is None


def test_a_labeling_job_writes_unmatched_phrases_that_validate(tmp_path, tiny_owlv2):
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.engines.local import run_local
    from vesl.schemas.validation import validate

    cfg = LabelConfig(inputs=["synth://6?seed=4"], output=str(tmp_path / "out"),
                      detector=DetectorConfig(spec=f"owlv2:{tiny_owlv2}", threshold=0.5, tta=["hflip"],
                                              fusion={"threshold": 0.6}))  # fmt: skip
    assert run_local(cfg, progress=False)["shards_written"] == 1
    t = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert t.schema.metadata[SCHEMA_VERSION_KEY.encode()] == b"1.2"
    prov = json.loads(t.schema.metadata[b"vesl.provenance"])
    assert prov["detector"]["tta"] == ["hflip"]
    assert prov["detector"]["fusion"]["threshold"] == 0.6
    assert prov["stages"]["detect"]["detector.tta"] == "hflip"
    n_regions = n_unmatched = 0
    for row in t.to_pylist():
        grounded = {(r["phrase"], r["char_start"], r["char_end"]) for r in row["regions"]}
        for p in row["unmatched_phrases"]:
            assert row["caption"][p["char_start"] : p["char_end"]] == p["text"]
            assert (p["text"], p["char_start"], p["char_end"]) not in grounded
        n_regions += len(row["regions"])
        n_unmatched += len(row["unmatched_phrases"])
    assert n_regions > 0
    assert n_unmatched > 0
    assert validate(tmp_path / "out") == []


def test_validate_flags_bad_unmatched_phrases():
    from vesl.pipeline.writer import rows_table

    good = rows_table([_sample(PHRASES, [_region(BLUE, (0.1, 0.1, 0.5, 0.5), 0.5)])], None)
    assert validate_rows(good) == []
    rows = good.to_pylist()
    rows[0]["unmatched_phrases"] = [{"text": "a red circle", "char_start": 1, "char_end": 13},
                                    {"text": BLUE.text, "char_start": 17, "char_end": 30}]  # fmt: skip
    bad = validate_rows(good.from_pylist(rows, schema=good.schema))
    assert [v.kind for v in bad] == ["span_text", "unmatched_grounded"]


def _as_schema_1_1(d: Path) -> None:
    """Rewrite a dataset's shards as vesl 1.1 wrote them: no unmatched_phrases column, version 1.1."""
    from vesl.pipeline.writer import write_manifest

    for f in sorted(d.glob("part-*[0-9].parquet")):
        t = pq.read_table(f)
        meta = {**t.schema.metadata, SCHEMA_VERSION_KEY.encode(): b"1.1"}
        pq.write_table(
            t.drop_columns(["unmatched_phrases"]).replace_schema_metadata(meta), f, compression="zstd"
        )
        stats_path = f.with_name(f.name.replace(".parquet", ".stats.json"))
        stats = json.loads(stats_path.read_text())
        stats["files"]["parquet"] = {"name": f.name, "bytes": f.stat().st_size,
                                     "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}  # fmt: skip
        stats_path.write_text(json.dumps(stats, sort_keys=True))
    write_manifest(d)


def test_shards_without_unmatched_phrases_still_validate_publish_export_and_load(tmp_path):
    from vesl.pipeline.exporters import export_wds
    from vesl.pipeline.publish import publish
    from vesl.schemas.dataset import TRAINING_COLUMNS
    from vesl.schemas.validation import validate

    d = write_region_dataset(tmp_path / "ds", n_images=6, n_shards=2)
    _as_schema_1_1(d)
    assert "unmatched_phrases" not in pq.read_schema(d / "part-00000.parquet").names
    assert validate(d) == []
    publish(d, name="old-shards", license_id="MIT", description="1.1 shards")
    assert export_wds(d, tmp_path / "wds").images == 6
    rows = pq.read_table(d / "part-00000.parquet", columns=list(TRAINING_COLUMNS)).to_pylist()
    assert len(rows) == 3


def test_bad_settings_are_one_line_errors_before_any_shard(tmp_path, monkeypatch, capsys):
    for bad in ({"tta": ["vflip"]}, {"tta": ["scale:0"]}, {"tta": ["hflip", "hflip"]},
                {"fusion": {"threshold": -0.1}}, {"fusion": {"iou_thr": 1.5}}, {"fusion": {"conf_type": "mean"}}):  # fmt: skip
        with pytest.raises(ValidationError):
            DetectorConfig(spec="owlv2:x", **bad)
    out = tmp_path / "out"
    rc, _, err = cli(monkeypatch, capsys, "label", "synth://2", "-o", out, "--detector", "owlv2:x", "--tta", "vflip",
                     "--no-progress")  # fmt: skip
    one_line_error(rc, err, "vflip")
    rc, _, err = cli(monkeypatch, capsys, "label", "synth://2", "-o", out, "--captioner", "alt_text", "--detector", "none",
                     "--tta", "hflip",
                     "--no-progress")  # fmt: skip
    one_line_error(rc, err, "--detector")
    assert not out.exists() or not any(out.glob("*.parquet"))
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.wiring import build_stages

    with pytest.raises(UserError, match="--detector SPEC"):
        build_stages(LabelConfig(detector={"tta": ["hflip"]}))


def test_unmatched_negatives_enter_the_region_loss_and_near_copies_of_the_positive_are_filtered():
    import torch
    import torch.nn.functional as F

    from vesl.pretrain.losses import ContrastiveLoss

    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(2, 3, 8), dim=-1), F.normalize(torch.randn(2, 3, 8), dim=-1)
    valid, scale = torch.ones(2, 3, dtype=torch.bool), torch.tensor(10.0)
    loss = ContrastiveLoss(text_sim_threshold=0.9)
    base = loss(a, b, scale, valid, text_keys=b)
    hard = a[:, :1].clone()  # a negative text right on the first region of each image: a harder softmax
    with_neg = loss(a, b, scale, valid, text_keys=b, extra_b=hard, extra_valid=torch.ones(2, 1, dtype=torch.bool))
    assert with_neg > base + 0.1
    off = loss(a, b, scale, valid, text_keys=b, extra_b=hard, extra_valid=torch.zeros(2, 1, dtype=torch.bool))
    assert torch.allclose(off, base)  # padded negatives never count
    copy = b[:, :1].clone()  # the first positive's own text: removed for that row, a negative for the others
    same = loss(a[:, :1], b[:, :1], scale, valid[:, :1], text_keys=b[:, :1], extra_b=copy,
                extra_valid=torch.tensor([[True], [False]]))  # fmt: skip
    alone = loss(a[:, :1], b[:, :1], scale, valid[:, :1], text_keys=b[:, :1])
    assert same > alone  # row 1 sees row 0's text as one more negative; row 0 does not see its own


def test_the_loader_draws_unmatched_phrases_as_negative_texts():
    import open_clip

    from vesl.pretrain.data import BatchBuilder, Preprocess

    tok = open_clip.get_tokenizer("ViT-B-32")
    row = {"key": "k", "image": None, "width": 10, "height": 10, "caption": CAPTION, "image_uri": None,
           "regions": [{"phrase": BLUE.text, "char_start": 17, "char_end": 30, "box": [0.1, 0.1, 0.5, 0.5], "score": 0.5}],
           "unmatched_phrases": [{"text": t, "char_start": 0, "char_end": 0} for t in ("a red circle", "a gray canvas")]}  # fmt: skip
    builder = BatchBuilder(tok, Preprocess(16, (0.5,) * 3, (0.5,) * 3), 2, 2, unmatched_negatives=1)
    builder._image = lambda r: Image.new("RGB", (10, 10))
    out = builder.build([row, {**row, "key": "old", "unmatched_phrases": None}], 0)
    assert out["negative_valid"].tolist() == [[True], [False]]  # a row without the column gives none
    drawn = out["negative_texts"][0, 0]
    assert any(bool((drawn == tok([t])[0]).all()) for t in ("a red circle", "a gray canvas"))
