"""Detectors: controlled output tensors through the pure post-processing, then tiny real OWLv2 and
Grounding DINO checkpoints loaded through ``make_detector`` and run as one batched forward."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from PIL import Image

from vesl.errors import UserError
from vesl.labelers.boxes import PostProcess
from vesl.labelers.detectors import (
    grounding_dino_prompt,
    grounding_dino_regions,
    make_detector,
    owlv2_regions,
    parse_spec,
    phrase_token_map,
)
from vesl.schemas.config import DetectorConfig
from vesl.schemas.stage import Phrase, Sample


def _sig(x: float) -> float:
    return 1 / (1 + math.exp(-x))


def _sq(x0, y0, x1, y1, side):
    """Pixel xyxy -> cxcywh normalized to the padded square, i.e. what OWLv2 predicts."""
    return [(x0 + x1) / 2 / side, (y0 + y1) / 2 / side, (x1 - x0) / side, (y1 - y0) / side]


CAT, SOFA = Phrase("a cat", 0, 5), Phrase("a red sofa", 10, 20)


def test_spec_parsing_and_none():
    assert parse_spec("owlv2:google/owlv2-base-patch16-ensemble") == (
        "owlv2",
        "google/owlv2-base-patch16-ensemble",
    )
    assert parse_spec("grounding-dino:/models/gd") == ("grounding-dino", "/models/gd")
    assert make_detector(DetectorConfig(spec="none")) is None
    for bad in ("owlv3:x", "owlv2:", "owlv2", "glip:x"):
        with pytest.raises(UserError, match="detector spec"):
            parse_spec(bad)


def test_owlv2_boxes_land_on_the_original_640x360_image():
    # image 0: 640x360 with 2 phrases (3rd query slot is padding); image 1: 360x640 with 1 phrase
    side = 640
    boxes = torch.tensor(
        [
            [
                _sq(320, 90, 480, 270, side),  # the sofa
                _sq(0, 0, 64, 36, side),  # the cat, top-left corner
                _sq(100, 100, 200, 200, side),  # below threshold
                _sq(100, 400, 200, 600, side),  # inside the square's padding (y > 360): clipped away
            ],
            [
                _sq(90, 320, 270, 480, side),
                _sq(0, 0, 10, 10, side),
                _sq(0, 0, 10, 10, side),
                _sq(0, 0, 10, 10, side),
            ],
        ]
    )
    logits = torch.tensor(
        [
            [[-5.0, 3.0, 10.0], [2.0, -1.0, 0.0], [-3.0, -4.0, 50.0], [5.0, 0.0, 0.0]],  # col 2 = padding
            [
                [4.0, 99.0, 99.0],
                [-9.0, 99.0, 99.0],
                [-9.0, 99.0, 99.0],
                [-9.0, 99.0, 99.0],
            ],  # cols 1-2 = padding
        ]
    )
    sizes = [(640, 360), (360, 640)]
    out = owlv2_regions(logits, boxes, [[CAT, SOFA], [CAT]], sizes, 0.1, PostProcess())
    assert [r.phrase for r in out[0]] == ["a red sofa", "a cat"]  # best score first, padding never wins
    assert out[0][0].box == pytest.approx((0.5, 0.25, 0.75, 0.75), abs=1e-6)
    assert out[0][0].score == pytest.approx(_sig(3.0))
    assert (out[0][0].char_start, out[0][0].char_end) == (10, 20)
    assert out[0][1].box == pytest.approx((0.0, 0.0, 0.1, 0.1), abs=1e-6)
    assert out[0][1].score == pytest.approx(_sig(2.0))
    # portrait: x is the padded axis now
    assert len(out[1]) == 1
    assert out[1][0].box == pytest.approx((0.25, 0.5, 0.75, 0.75), abs=1e-6)
    # an image without phrases gets no regions
    assert owlv2_regions(logits[:1], boxes[:1], [[]], sizes[:1], 0.1, PostProcess()) == [[]]


def test_owlv2_threshold_nms_and_cap():
    side = 640
    boxes = torch.tensor([[_sq(0, 0, 320, 180, side), _sq(4, 0, 320, 180, side), _sq(0, 2, 320, 182, side)]])
    logits = torch.tensor([[[3.0, -9.0], [2.0, -9.0], [-9.0, 1.0]]])  # two cat boxes overlap, one sofa box
    sizes = [(640, 360)]
    per_phrase = owlv2_regions(logits, boxes, [[CAT, SOFA]], sizes, 0.1, PostProcess(nms="per_phrase"))
    assert [r.phrase for r in per_phrase[0]] == ["a cat", "a red sofa"]
    agnostic = owlv2_regions(logits, boxes, [[CAT, SOFA]], sizes, 0.1, PostProcess(nms="class_agnostic"))
    assert [r.phrase for r in agnostic[0]] == ["a cat"]
    none = owlv2_regions(logits, boxes, [[CAT, SOFA]], sizes, 0.1, PostProcess(nms="none"))
    assert [r.score for r in none[0]] == pytest.approx([_sig(3.0), _sig(2.0), _sig(1.0)])
    capped = owlv2_regions(logits, boxes, [[CAT, SOFA]], sizes, 0.1, PostProcess(nms="none", max_regions=2))
    assert len(capped[0]) == 2
    high = owlv2_regions(logits, boxes, [[CAT, SOFA]], sizes, _sig(2.5), PostProcess(nms="none"))
    assert [r.score for r in high[0]] == pytest.approx([_sig(3.0)])


REMOTE = Phrase("A Remote Control", 11, 27)


def test_grounding_dino_prompt_and_token_span_mapping():
    prompt, ranges = grounding_dino_prompt([CAT, REMOTE, Phrase("Mr. Smith", 30, 39)])
    assert prompt == "a cat. a remote control. mr  smith."  # lowercased; inner "." would split the phrase
    assert [prompt[s:e] for s, e in ranges] == ["a cat", "a remote control", "mr  smith"]
    # BERT-style offsets: [CLS] a cat . a remote control . mr smith . [SEP] [PAD]
    offsets = torch.tensor(
        [
            [0, 0],
            [0, 1],
            [2, 5],
            [5, 6],
            [7, 8],
            [9, 15],
            [16, 23],
            [23, 24],
            [25, 27],
            [29, 34],
            [34, 35],
            [0, 0],
            [0, 0],
        ]
    )
    tmap = phrase_token_map(offsets, ranges, 14)
    assert tmap.shape == (3, 14)
    assert tmap[0].nonzero().flatten().tolist() == [1, 2]
    assert tmap[1].nonzero().flatten().tolist() == [4, 5, 6]  # all three tokens of the multi-token phrase
    assert tmap[2].nonzero().flatten().tolist() == [8, 9]
    assert not tmap[:, [0, 3, 7, 10, 11, 12, 13]].any()  # specials, delimiters and padding belong to none


def test_grounding_dino_token_map_with_a_real_wordpiece_tokenizer(tiny_grounding_dino_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_grounding_dino_dir)
    phrases = [CAT, REMOTE, Phrase("a snowboarder", 0, 13)]
    prompt, ranges = grounding_dino_prompt(phrases)
    enc = tok([prompt], return_offsets_mapping=True, return_tensors="pt")
    tmap = phrase_token_map(enc["offset_mapping"][0], ranges, enc["input_ids"].shape[1])
    ids = enc["input_ids"][0]
    for j, p in enumerate(phrases):
        toks = ids[tmap[j]].tolist()
        assert len(toks) >= 2  # every phrase here spans several tokens (word pieces included)
        assert tok.decode(toks) == p.text.lower()
    assert tok.convert_ids_to_tokens(ids[~tmap.any(0)].tolist()) == ["[CLS]", ".", ".", ".", "[SEP]"]


def test_grounding_dino_regions_from_controlled_logits():
    prompt, ranges = grounding_dino_prompt([CAT, REMOTE])  # "a cat. a remote control."
    offsets = torch.tensor([[0, 0], [0, 1], [2, 5], [5, 6], [7, 8], [9, 15], [16, 23], [23, 24], [0, 0]])
    tmap = phrase_token_map(offsets, ranges, 9)
    t = 256
    logits = torch.full((1, 4, t), float("-inf"))
    logits[0, :, :9] = -4.0
    logits[0, 0, [5, 6]] = 4.0  # "remote", "control": the whole multi-token phrase fires
    logits[0, 1, 4] = 4.0  # only the "a" of "a remote control": mean 0.34 < text threshold
    logits[0, 2, [0, 3, 8]] = 10.0  # [CLS], "." and [SEP] fire: no phrase token, never a region
    logits[0, 3, [1, 2]] = 1.0  # "a cat" at prob 0.73: above both thresholds
    boxes = torch.tensor(
        [[[0.5, 0.5, 0.2, 0.4], [0.2, 0.2, 0.1, 0.1], [0.5, 0.5, 1.0, 1.0], [0.8, 0.3, 0.2, 0.2]]]
    )
    out = grounding_dino_regions(
        logits, boxes, [tmap], [[CAT, REMOTE]], [(640, 360)], 0.35, 0.4, PostProcess()
    )
    (regions,) = out
    assert [r.phrase for r in regions] == ["A Remote Control", "a cat"]
    assert (regions[0].char_start, regions[0].char_end) == (11, 27)
    assert regions[0].box == pytest.approx((0.4, 0.3, 0.6, 0.7), abs=1e-6)  # cxcywh of the image -> xyxy
    assert regions[0].score == pytest.approx(_sig(4.0))
    assert regions[1].score == pytest.approx(_sig(1.0))
    # a higher box threshold drops the cat box; a lower text threshold lets the lone "a" box in
    (hi,) = grounding_dino_regions(
        logits, boxes, [tmap], [[CAT, REMOTE]], [(640, 360)], 0.8, 0.4, PostProcess()
    )
    assert [r.phrase for r in hi] == ["A Remote Control"]
    (lo,) = grounding_dino_regions(
        logits, boxes, [tmap], [[CAT, REMOTE]], [(640, 360)], 0.35, 0.3, PostProcess()
    )
    assert sorted(r.phrase for r in lo) == ["A Remote Control", "A Remote Control", "a cat"]


# ---------------------------------------------------------------- tiny real models


def _batch():
    """Four images of different sizes and phrase counts (one without phrases)."""
    specs = [
        (
            (640, 360),
            "a cat sits on a red sofa next to a remote control",
            ["a cat", "a red sofa", "a remote control"],
        ),
        ((360, 640), "a dog", ["a dog"]),
        ((100, 100), "nothing to see", []),
        ((200, 150), "a bus and a tree", ["a bus", "a tree"]),
    ]
    out = []
    for i, ((w, h), cap, texts) in enumerate(specs):
        phrases = [Phrase(t, cap.index(t), cap.index(t) + len(t)) for t in texts]
        img = Image.new("RGB", (w, h), (40 * i, 120, 200 - 30 * i))
        out.append(
            Sample(key=f"k{i}", source_shard="s", image=img, width=w, height=h, caption=cap, phrases=phrases)
        )
    return out


def _check_regions(batch):
    for s in batch:
        assert s.ok
        for r in s.regions:
            assert s.caption[r.char_start : r.char_end] == r.phrase
            assert r.phrase in {p.text for p in s.phrases}
            x0, y0, x1, y1 = r.box
            assert 0.0 <= x0 < x1 <= 1.0
            assert 0.0 <= y0 < y1 <= 1.0
            assert 0.0 <= r.score <= 1.0


def _count_forwards(stage):
    calls = []
    stage.model.register_forward_hook(lambda mod, args, kwargs_or_out: calls.append(1))
    return calls


def test_tiny_owlv2_one_batched_forward(tiny_owlv2_dir):
    stage = make_detector(DetectorConfig(spec=f"owlv2:{tiny_owlv2_dir}", threshold=0.0, nms="none", forward="batch"))
    assert stage.name == "detect"
    stage.setup()
    calls = _count_forwards(stage)
    batch = _batch()
    stage(batch)
    assert len(calls) == 1  # all four images and their query sets in one forward
    _check_regions(batch)
    assert all(len(s.regions) > 0 for s in batch if s.phrases)
    assert batch[2].regions == []
    # the 640x360 image: no box from the square padding below the image survives
    assert all(r.box[1] < 1.0 for r in batch[0].regions)
    # padding queries do not change results: each image alone gives the same regions
    for s in _batch():
        if not s.phrases:
            continue
        stage([s])
        batched = next(b for b in batch if b.key == s.key)
        assert [r.phrase for r in s.regions] == [r.phrase for r in batched.regions]
        for a, b in zip(s.regions, batched.regions, strict=True):
            assert a.box == pytest.approx(b.box, abs=1e-5)
            assert a.score == pytest.approx(b.score, abs=1e-5)
    prov = stage.provenance()
    assert prov["detector.backend"] == "owlv2"
    assert prov["detector.threshold"] == "0.0"
    assert prov["detector.revision"] == "local"
    # engines pickle stages: the loaded model stays behind
    clone = pickle.loads(pickle.dumps(stage))  # noqa: S301 - our own object
    assert clone.model is None
    assert clone.cfg == stage.cfg


def test_tiny_grounding_dino_one_batched_forward(tiny_grounding_dino_dir):
    cfg = DetectorConfig(spec=f"grounding-dino:{tiny_grounding_dino_dir}", threshold=0.0, text_threshold=0.0,
                         forward="batch")
    stage = make_detector(cfg)
    stage.setup()
    calls = _count_forwards(stage)
    batch = _batch()
    stage(batch)
    assert len(calls) == 1
    _check_regions(batch)
    assert any(s.regions for s in batch)
    assert batch[2].regions == []
    assert stage.provenance()["detector.text_threshold"] == "0.0"


def test_on_cpu_each_image_is_its_own_forward_so_batch_mates_never_change_a_row(tiny_owlv2_dir):
    """``forward: auto`` on a CPU: one forward per image, and an image's regions are bit-identical whichever
    images share its batch (what lets a deduplicated run equal a full run)."""
    stage = make_detector(DetectorConfig(spec=f"owlv2:{tiny_owlv2_dir}", threshold=0.0, nms="none"))
    stage.setup()
    assert stage.device.type == "cpu"
    assert not stage.batched
    calls = _count_forwards(stage)
    together = _batch()
    stage(together)
    assert len(calls) == 3  # the image without phrases needs no forward
    for drop in range(4):
        apart = [s for i, s in enumerate(_batch()) if i != drop]
        stage(apart[::-1])
        for s in apart:
            same = next(b for b in together if b.key == s.key)
            assert [(r.phrase, r.box, r.score) for r in s.regions] == [(r.phrase, r.box, r.score) for r in same.regions]


def test_unreachable_hub_id_offline_is_a_one_line_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    stage = make_detector(DetectorConfig(spec="owlv2:no-such-org/no-such-owlv2-model"))
    with pytest.raises(UserError, match="--profile demo") as err:
        stage.setup()
    assert "\n" not in str(err.value)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="save_pretrained"):
        make_detector(DetectorConfig(spec=f"grounding-dino:{empty}")).setup()


def test_samples_without_image_fail_and_without_phrases_get_no_regions(tiny_owlv2_dir):
    stage = make_detector(DetectorConfig(spec=f"owlv2:{tiny_owlv2_dir}"))
    no_img = Sample(key="a", source_shard="s", caption="a cat", phrases=[Phrase("a cat", 0, 5)])
    no_phr = Sample(key="b", source_shard="s", caption="x", image=Image.new("RGB", (8, 8)), width=8, height=8)
    stage([no_img, no_phr])
    assert no_img.error is not None
    assert no_img.error.stage == "detect"
    assert no_phr.ok
    assert no_phr.regions == []
