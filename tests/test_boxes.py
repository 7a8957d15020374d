"""Shared box math: conversions, OWLv2 square padding, clipping, size filter, NMS modes, per-image cap."""

from __future__ import annotations

import pytest
import torch

from vesl.labelers.boxes import (
    PostProcess,
    denormalize,
    min_size_keep,
    nms_keep,
    normalize,
    postprocess,
    square_pad_to_image,
    vote_boxes,
)
from vesl.schemas.boxes import box_iou


def test_normalize_round_trips():
    xyxy = torch.tensor([[10.0, 20.0, 50.0, 80.0], [0.0, 0.0, 1.0, 1.0]])
    norm = normalize(xyxy[:1], 640, 360)
    assert torch.allclose(norm, torch.tensor([[10 / 640, 20 / 360, 50 / 640, 80 / 360]]))
    assert torch.allclose(denormalize(norm, 640, 360), xyxy[:1])


def test_square_pad_to_image_landscape_and_portrait():
    # 640x360 padded to 640x640: y fractions of the square scale by 640/360, x unchanged
    sq = torch.tensor([[0.5, 90 / 640, 0.75, 270 / 640]])
    assert torch.allclose(square_pad_to_image(sq, 640, 360), torch.tensor([[0.5, 0.25, 0.75, 0.75]]))
    # 360x640 (portrait) padded to 640x640: x scales instead
    sq = torch.tensor([[90 / 640, 0.5, 270 / 640, 0.75]])
    assert torch.allclose(square_pad_to_image(sq, 360, 640), torch.tensor([[0.25, 0.5, 0.75, 0.75]]))
    # square images are untouched
    assert torch.allclose(square_pad_to_image(sq, 500, 500), sq)


def test_min_size_is_a_fraction_of_the_shorter_side():
    boxes = torch.tensor([[0.0, 0.0, 0.1, 0.1], [0.0, 0.0, 0.01, 0.5], [0.2, 0.2, 0.2, 0.4]])
    # 640x360: box 0 is 64x36 px, box 1 is 6.4x180 px, box 2 has zero width
    assert min_size_keep(boxes, 640, 360, 0.0).tolist() == [True, True, False]
    assert min_size_keep(boxes, 640, 360, 0.05).tolist() == [True, False, False]  # limit 18 px
    assert min_size_keep(boxes, 640, 360, 0.2).tolist() == [False, False, False]  # limit 72 px


def test_nms_per_phrase_vs_class_agnostic_vs_none():
    boxes = torch.tensor(
        [[0.0, 0.0, 0.5, 0.5], [0.02, 0.0, 0.5, 0.5], [0.6, 0.6, 1.0, 1.0], [0.0, 0.0, 0.5, 0.52]]
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    labels = torch.tensor([0, 0, 0, 1])
    assert box_iou(boxes[0].tolist(), boxes[1].tolist()) > 0.9
    # same phrase: box 1 suppressed by box 0; box 3 is another phrase and survives
    assert nms_keep(boxes, scores, labels, 0.5, "per_phrase").tolist() == [0, 2, 3]
    # across phrases (GRIT): box 3 is suppressed too
    assert nms_keep(boxes, scores, labels, 0.5, "class_agnostic").tolist() == [0, 2]
    assert nms_keep(boxes, scores, labels, 0.5, "none").tolist() == [0, 1, 2, 3]
    assert nms_keep(boxes[:0], scores[:0], labels[:0], 0.5, "per_phrase").numel() == 0
    with pytest.raises(ValueError, match="nms mode"):
        nms_keep(boxes, scores, labels, 0.5, "bogus")


def test_postprocess_clips_filters_and_caps_by_score():
    boxes = torch.tensor(
        [
            [-0.1, -0.1, 0.3, 0.3],  # clipped to [0, 0, .3, .3]
            [1.2, 0.2, 1.5, 0.4],  # fully outside: zero width after clipping -> dropped
            [0.5, 0.5, 0.9, 0.9],
            [0.1, 0.6, 0.4, 0.95],
            [0.6, 0.0, 0.9, 0.3],
        ]
    )
    scores = torch.tensor([0.3, 0.99, 0.5, 0.4, 0.2])
    labels = torch.tensor([0, 1, 2, 3, 4])
    b, s, lab = postprocess(boxes, scores, labels, 640, 360, PostProcess(max_regions=3))
    assert lab.tolist() == [2, 3, 0]  # the three best surviving boxes, best first
    assert torch.allclose(s, torch.tensor([0.5, 0.4, 0.3]))
    assert torch.allclose(b[2], torch.tensor([0.0, 0.0, 0.3, 0.3]))
    assert float(b.min()) >= 0.0
    assert float(b.max()) <= 1.0
    b, _, _ = postprocess(boxes, scores, labels, 640, 360, PostProcess(max_regions=0))
    assert b.shape == (0, 4)


def test_boxes_per_phrase_keeps_the_best_non_overlapping_boxes_of_each_phrase():
    # phrase 0 fires on three separate places (NMS keeps all three), phrase 1 on two
    boxes = torch.tensor(
        [[0.0, 0.0, 0.2, 0.2], [0.5, 0.5, 0.7, 0.7], [0.8, 0.0, 1.0, 0.2], [0.0, 0.6, 0.2, 0.8], [0.3, 0.3, 0.4, 0.4]]
    )
    scores = torch.tensor([0.2, 0.6, 0.3, 0.5, 0.1])
    labels = torch.tensor([0, 0, 0, 1, 1])
    _, s, lab = postprocess(boxes, scores, labels, 100, 100, PostProcess())
    assert lab.tolist() == [0, 1, 0, 0, 1]  # no cap: everything survives per-phrase NMS
    _, s, lab = postprocess(boxes, scores, labels, 100, 100, PostProcess(boxes_per_phrase=1))
    assert lab.tolist() == [0, 1]
    assert torch.allclose(s, torch.tensor([0.6, 0.5]))
    _, s, lab = postprocess(boxes, scores, labels, 100, 100, PostProcess(boxes_per_phrase=2, max_regions=3))
    assert lab.tolist() == [0, 1, 0]
    assert torch.allclose(s, torch.tensor([0.6, 0.5, 0.3]))


def test_box_voting_averages_the_overlapping_candidates_of_the_same_phrase_by_score():
    boxes = torch.tensor(
        [
            [0.10, 0.10, 0.30, 0.30],  # phrase 0, the best candidate
            [0.14, 0.14, 0.34, 0.34],  # phrase 0, overlaps it (IoU ~0.47): votes
            [0.60, 0.60, 0.80, 0.80],  # phrase 0, elsewhere: does not vote
            [0.12, 0.12, 0.32, 0.32],  # phrase 1 on the same spot: another phrase, does not vote
        ]
    )
    scores = torch.tensor([0.6, 0.2, 0.5, 0.9])
    labels = torch.tensor([0, 0, 0, 1])
    voted = vote_boxes(boxes[:1], labels[:1], boxes, scores, labels, 0.3)
    assert torch.allclose(voted, torch.tensor([[0.11, 0.11, 0.31, 0.31]]))  # (0.6 * 0.10 + 0.2 * 0.14) / 0.8
    assert torch.equal(vote_boxes(boxes[:1], labels[:1], boxes, scores, labels, 0.5), boxes[:1])  # too far apart

    b, s, lab = postprocess(boxes, scores, labels, 100, 100, PostProcess(boxes_per_phrase=1, box_voting_iou=0.3))
    assert lab.tolist() == [1, 0]
    assert torch.allclose(s, torch.tensor([0.9, 0.6]))  # scores are kept
    assert torch.allclose(b, torch.tensor([[0.12, 0.12, 0.32, 0.32], [0.11, 0.11, 0.31, 0.31]]))
    b_off, _, _ = postprocess(boxes, scores, labels, 100, 100, PostProcess(boxes_per_phrase=1))
    assert torch.equal(b_off[1], boxes[0])


def test_box_voting_iou_must_be_a_fraction():
    from pydantic import ValidationError

    from vesl.schemas.config import DetectorConfig

    assert DetectorConfig(box_voting_iou=0.3).box_voting_iou == 0.3
    with pytest.raises(ValidationError):
        DetectorConfig(box_voting_iou=1.5)


def test_boxes_per_phrase_rejects_negative_values():
    from pydantic import ValidationError

    from vesl.schemas.config import DetectorConfig

    assert DetectorConfig(boxes_per_phrase=1).boxes_per_phrase == 1
    with pytest.raises(ValidationError):
        DetectorConfig(boxes_per_phrase=-1)
