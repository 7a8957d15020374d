"""Referring-expression comprehension: the synthetic RefCOCO-style set and `vesl eval --refexp`."""

from __future__ import annotations

import json
import sys

import pytest

from tests.test_hf_export import _checkpoint
from vesl.demo.synth import _POSITIONS, _position, make_refexp, write_refexp


def test_refexp_scenes_have_look_alikes_named_by_size_and_position():
    for i in range(60):
        r = make_refexp(5, i)
        objs = r.scene.objects
        t = objs[r.target]
        alike = [o for o in objs if o.category == t.category]
        assert len(alike) >= 2  # a distractor of the same colour and shape
        assert r.expression == f"the {t.size} {t.color} {t.shape} {_POSITIONS[_position(t.box)]}"
        # size + position cell name exactly one look-alike
        assert sum((o.size, _position(o.box)) == (t.size, _position(t.box)) for o in alike) == 1
    assert make_refexp(5, 3).scene.image == make_refexp(5, 3).scene.image
    assert make_refexp(5, 3).scene.image != make_refexp(6, 3).scene.image


def test_some_look_alikes_differ_only_by_position():
    same_size = 0
    for i in range(60):
        r = make_refexp(5, i)
        t = r.scene.objects[r.target]
        alike = [o for o in r.scene.objects if o.category == t.category]
        same_size += all(o.size == t.size for o in alike)
    assert 15 <= same_size <= 45


def test_synth_refexp_cli_writes_jsonl(tmp_path, monkeypatch, capsys):
    from PIL import Image

    from vesl.cli import main

    monkeypatch.setattr(sys, "argv", ["vesl", "synth", "--format", "refexp", "--n", "12", "--seed", "3",
                                      "--out", str(tmp_path / "rx")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    lines = [json.loads(x) for x in (tmp_path / "rx" / "refexp.jsonl").read_text().splitlines()]
    assert len(lines) == 12
    for d in lines:
        im = Image.open(tmp_path / "rx" / d["image"])
        assert im.size == (d["width"], d["height"])
        assert d["bbox"] in d["candidates"]
        assert 2 <= len(d["candidates"]) <= 5
        x, y, w, h = d["bbox"]
        assert w > 0
        assert h > 0
        assert x + w <= d["width"]
        assert y + h <= d["height"]
        assert d["expression"].startswith("the ")
        assert d["category"] in d["expression"]


@pytest.fixture(scope="module")
def rec_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    path = write_refexp((make_refexp(11, i) for i in range(24)), root / "rx")
    return path


def test_eval_refexp_reports_every_method_and_keeps_bad_lines_as_errors(tmp_path, rec_set, monkeypatch, capsys):
    from vesl.cli import main
    from vesl.pretrain.model import create_model

    run = _checkpoint(tmp_path, create_model("vesl-tiny-vit", seed=0))
    bad = tmp_path / "bad.jsonl"
    lines = rec_set.read_text().splitlines()
    lines.insert(2, "{not json")
    lines.append(json.dumps({"image": "images/missing.jpg", "expression": "the red circle", "bbox": [1, 1, 5, 5]}))
    bad.write_text("\n".join(lines) + "\n")
    # images are resolved next to the JSONL
    (tmp_path / "images").symlink_to(rec_set.parent / "images")
    out = tmp_path / "res.json"
    monkeypatch.setattr(sys, "argv", ["vesl", "eval", str(run), "--refexp", str(bad), "--out", str(out)])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for row in ("ground (no candidates)", "prompter ranking", "roi_align ranking", "crop ranking", "random candidate",
                "2 bad line(s)"):
        assert row in text
    rx = json.loads(out.read_text())["refexp"]
    assert rx["errors"] == 2
    assert {e["line"] for e in rx["error_rows"]} == {3, len(lines)}
    assert all(rx[m]["n"] == 24 for m in ("ground", "prompter", "roi_align", "crop"))
    cands = [len(json.loads(x)["candidates"]) for x in rec_set.read_text().splitlines()]
    assert rx["chance"]["acc@0.5"] == pytest.approx(100 * sum(1 / c for c in cands) / len(cands))


def test_plain_open_clip_model_gets_crop_and_roi_align_only(rec_set):
    from vesl.pretrain.eval import evaluate

    res = evaluate("vesl-tiny-vit", refexp=rec_set)["refexp"]
    assert {"roi_align", "crop"} <= set(res)
    assert "prompter" not in res
    assert "ground" not in res


def test_prompter_and_ground_accuracy_match_the_exported_region_api(tmp_path, rec_set):
    """The same figures through a second implementation (the transformers export), item by item."""
    from PIL import Image

    from vesl.pretrain.eval import evaluate
    from vesl.pretrain.export import export_model
    from vesl.pretrain.hf import CLOCRegionModel
    from vesl.pretrain.model import create_model
    from vesl.schemas.boxes import box_iou

    model = create_model("vesl-tiny-vit", seed=3).eval()
    res = evaluate(model, refexp=rec_set)["refexp"]
    hf = CLOCRegionModel.from_pretrained(export_model(_checkpoint(tmp_path, model), tmp_path / "hf", format="hf"))
    items = [json.loads(x) for x in rec_set.read_text().splitlines()]
    images = [Image.open(rec_set.parent / d["image"]).convert("RGB") for d in items]

    def xyxy(b):
        return [b[0], b[1], b[0] + b[2], b[1] + b[3]]

    regions = hf.encode_regions(images, [[xyxy(c) for c in d["candidates"]] for d in items])
    text = hf.encode_text([d["expression"] for d in items])
    hits = [box_iou(xyxy(d["candidates"][int((r @ t).argmax())]), xyxy(d["bbox"])) >= 0.5
            for d, r, t in zip(items, regions, text, strict=True)]
    assert res["prompter"]["acc@0.5"] == pytest.approx(100 * sum(hits) / len(hits))
    boxes = hf.ground(images, [d["expression"] for d in items]).tolist()
    ground = [box_iou(b, xyxy(d["bbox"])) >= 0.5 for b, d in zip(boxes, items, strict=True)]
    assert res["ground"]["acc@0.5"] == pytest.approx(100 * sum(ground) / len(ground))


def test_refexp_file_errors_are_one_line(tmp_path):
    from vesl.errors import UserError
    from vesl.pretrain.eval import evaluate

    with pytest.raises(UserError, match="not found"):
        evaluate("vesl-tiny-vit", refexp=tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text("[]\n{}\n")
    with pytest.raises(UserError, match="no usable referring expression"):
        evaluate("vesl-tiny-vit", refexp=tmp_path / "bad.jsonl")


def test_demo_rec_table_judges_the_best_clip_ranking():
    from vesl.demo.runner import rec_table

    m = {"rec_clip_roi_align": 0.52, "rec_clip_crop": 0.47, "rec_cloc_prompter": 0.70, "rec_cloc_ground": 0.1,
         "rec_chance": 0.37}
    table = rec_table(m, 300)
    assert "+18.0 points" in table
    assert "NOT MET" in table
    assert "(target +20: MET)" in rec_table({**m, "rec_cloc_prompter": 0.75}, 300)
