"""Relative referring: look-alike twins in the synthetic world, the relative REC split, and what trains on it."""

from __future__ import annotations

import json

import pytest

from vesl.demo.synth import REFEXP_SPLITS, make_refexp_relative, make_scene, make_scenes, write_refexp
from vesl.schemas.referring import relative_position_word


@pytest.mark.parametrize(("box", "other", "word"), [
    ((0.1, 0.4, 0.2, 0.5), (0.6, 0.4, 0.7, 0.5), "on the left"),
    ((0.6, 0.4, 0.7, 0.5), (0.1, 0.4, 0.2, 0.5), "on the right"),
    ((0.4, 0.1, 0.5, 0.2), (0.45, 0.7, 0.55, 0.8), "at the top"),  # vertical offset dominates
    ((0.4, 0.7, 0.5, 0.8), (0.35, 0.1, 0.45, 0.2), "at the bottom"),
    ((0.0, 0.0, 0.2, 0.2), (0.3, 0.3, 0.5, 0.5), "on the left"),  # an exact diagonal: the horizontal word
    ((0.8, 0.0, 1.0, 0.3), (0.0, 0.5, 0.3, 0.9), "on the right"),  # 0.75 right against 0.55 up
])  # fmt: skip
def test_relative_position_word_takes_the_larger_centre_offset(box, other, word):
    assert relative_position_word(box, other) == word


def _twins(scene):
    cats = [o.category for o in scene.objects]
    return [o for o in scene.objects if cats.count(o.category) == 2]


# sha256 over image, alt-text and caption of make_scenes(20, seed=11), as drawn before twins existed
PLAIN_WORLD_DIGEST = "d6367e0f3540991709e18031a7620a650a8a980fb1bb66f909a78267652d2cd8"


def test_the_world_without_twins_is_the_world_drawn_before_twins_existed():
    import hashlib

    h = hashlib.sha256()
    for s in make_scenes(20, seed=11):
        h.update(s.image)
        h.update(s.alt_text.encode())
        h.update(s.caption.encode())
    assert h.hexdigest() == PLAIN_WORLD_DIGEST


def test_scenes_without_a_twin_stay_byte_identical_and_twins_are_exact_look_alikes():
    plain = list(make_scenes(40, seed=11))
    twinned = list(make_scenes(40, seed=11, twins=0.5))
    n_twin = 0
    for a, b in zip(plain, twinned, strict=True):
        pair = _twins(b)
        if not pair:
            assert a == b
            assert a.image == b.image
            assert a.alt_text == b.alt_text
            continue
        n_twin += 1
        t, u = pair
        assert (t.color, t.shape, t.size) == (u.color, u.shape, u.size)
        w = lambda o, width=b.width: round((o.box[2] - o.box[0]) * width)  # noqa: E731
        assert abs(w(t) - w(u)) <= 1.01  # one half-side: the same drawn size, to the pixel
        assert len(b.objects) == len(a.objects) + 1
        assert a.width == b.width
        assert a.height == b.height
        for o, other in ((t, u), (u, t)):  # the caption says which is which, by side
            assert f"{o.phrase} {relative_position_word(o.box, other.box)}" in b.caption
        assert sum(r.phrase == t.phrase for r in b.regions) == 2
    assert 10 <= n_twin <= 30
    assert make_scene(11, 3, twins=0.5) == make_scene(11, 3, twins=0.5)


def test_relative_split_names_the_target_by_its_side_against_its_twin(tmp_path):
    seen = set()
    for i in range(60):
        r = make_refexp_relative(3, i)
        t = r.scene.objects[r.target]
        twins = [o for o in r.scene.objects if o.category == t.category and o is not t]
        assert len(twins) == 1
        twin = twins[0]
        assert (twin.size, abs((twin.box[2] - twin.box[0]) - (t.box[2] - t.box[0])) * r.scene.width <= 1.01) == (t.size, True)
        word = r.expression.removeprefix(f"the {t.color} {t.shape} ")
        assert word == relative_position_word(t.box, twin.box)
        cx = lambda o: (o.box[0] + o.box[2]) / 2  # noqa: E731
        cy = lambda o: (o.box[1] + o.box[3]) / 2  # noqa: E731
        side = {"on the left": cx(t) < cx(twin), "on the right": cx(t) > cx(twin),
                "at the top": cy(t) < cy(twin), "at the bottom": cy(t) > cy(twin)}  # fmt: skip
        assert side[word]
        assert all(o.category != t.category for o in r.scene.objects if o is not t and o is not twin)
        seen.add(word)
    assert seen == {"on the left", "on the right", "at the top", "at the bottom"}
    assert REFEXP_SPLITS["relative"] is make_refexp_relative
    path = write_refexp((make_refexp_relative(3, i) for i in range(5)), tmp_path / "rel")
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(lines) == 5
    assert all(len(x["candidates"]) >= 2 and x["bbox"] in x["candidates"] for x in lines)


def test_synth_refexp_split_option(tmp_path, monkeypatch, capsys):
    import sys

    from vesl.cli import main

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["vesl", "synth", "--format", "refexp", *args])
        with pytest.raises(SystemExit) as exc:
            main()
        return exc.value.code

    assert run("--n", "4", "--seed", "9", "--refexp-split", "relative", "--out", str(tmp_path / "r")) == 0
    first = json.loads((tmp_path / "r" / "refexp.jsonl").read_text().splitlines()[0])
    assert first["expression"] == make_refexp_relative(9, 0).expression
    assert run("--refexp-split", "sideways", "--out", str(tmp_path / "x")) != 0
    assert "--refexp-split must be one of absolute, relative" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_relative_words_extend_only_phrases_with_a_look_alike_region():
    from vesl.pretrain.data import BatchBuilder

    row = {"key": "k", "regions": [
        {"phrase": "a red circle", "box": [0.1, 0.4, 0.3, 0.6]},
        {"phrase": "a red circle", "box": [0.6, 0.3, 0.8, 0.5]},
        {"phrase": "a blue star", "box": [0.4, 0.7, 0.5, 0.9]},
    ]}  # fmt: skip
    bb = BatchBuilder(None, None, 2, 4, relative_share=1.0)
    assert bb._relative_words(row, row["regions"], 0) == ["on the left", "on the right", None]
    assert BatchBuilder(None, None, 2, 4)._relative_words(row, row["regions"], 0) == [None] * 3
    half = BatchBuilder(None, None, 2, 4, relative_share=0.5)
    draws = [tuple(half._relative_words({**row, "key": str(k)}, row["regions"], e)) for k in range(20) for e in range(2)]
    assert {d[2] for d in draws} == {None}
    assert {d[0] for d in draws} == {None, "on the left"}
    assert draws == [tuple(half._relative_words({**row, "key": str(k)}, row["regions"], e)) for k in range(20) for e in range(2)]


def test_a_phrase_named_twice_keeps_twice_the_boxes_per_phrase():
    import torch

    from vesl.labelers.boxes import PostProcess, per_label_cap, postprocess
    from vesl.labelers.phrases import _dedupe_and_cap
    from vesl.schemas.stage import Phrase

    ph = _dedupe_and_cap([Phrase("a red circle", 9, 21), Phrase("a blue star", 40, 51), Phrase("A red circle", 60, 72)], 20)
    assert ph == [Phrase("a red circle", 9, 21, 2), Phrase("a blue star", 40, 51)]
    labels = torch.tensor([0, 0, 1, 1, 0])
    assert per_label_cap(labels, 1).tolist() == [True, False, True, False, False]
    assert per_label_cap(labels, 1, [2, 1]).tolist() == [True, True, True, False, False]
    boxes = torch.tensor([[0.1, 0.1, 0.3, 0.3], [0.6, 0.6, 0.8, 0.8], [0.4, 0.0, 0.5, 0.1], [0.0, 0.8, 0.1, 0.9],
                          [0.1, 0.6, 0.2, 0.7]])
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.5])
    one = postprocess(boxes, scores, labels, 100, 100, PostProcess(boxes_per_phrase=1))
    assert one[2].tolist() == [0, 1]
    assert postprocess(boxes, scores, labels, 100, 100, PostProcess(boxes_per_phrase=1), [1, 1])[0].tolist() == one[0].tolist()
    two = postprocess(boxes, scores, labels, 100, 100, PostProcess(boxes_per_phrase=1), [p.count for p in ph])
    assert two[2].tolist() == [0, 0, 1]


def test_demo_relrec_table_judges_the_best_clip_ranking():
    from vesl.demo.runner import relrec_table

    m = {"relrec_clip_roi_align": 0.45, "relrec_clip_crop": 0.47, "relrec_cloc_prompter": 0.66, "relrec_cloc_ground": 0.2,
         "relrec_chance": 0.4}
    table = relrec_table(m, 300)
    assert "+19.0 points" in table
    assert "NOT MET" in table
    assert "(target +20: MET)" in relrec_table({**m, "relrec_cloc_prompter": 0.70}, 300)
