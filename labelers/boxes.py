"""Box math shared by every detector: pure functions on ``torch`` tensors of shape ``[N, 4]``.

Conventions: ``xyxy`` is ``x0, y0, x1, y1``; ``cxcywh`` is centre and size (convert with
``torchvision.ops.box_convert``). "Normalized" means divided by the original image's width (x) and
height (y), the schema's box format.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms, box_iou, nms


def normalize(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Pixel xyxy -> xyxy in [0, 1] of a ``width`` x ``height`` image."""
    scale = boxes.new_tensor([width, height, width, height])
    return boxes / scale


def denormalize(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    scale = boxes.new_tensor([width, height, width, height])
    return boxes * scale


def square_pad_to_image(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalized boxes of an image padded bottom/right to a square -> normalized boxes of the image.

    OWLv2 pads every image to ``max(w, h)`` square before resizing, so its boxes are fractions of that
    square; in original pixels a coordinate is ``b * max(w, h)``, and ``/ w`` (x) or ``/ h`` (y) brings
    it back to the original image.
    """
    side = float(max(width, height))
    scale = boxes.new_tensor([side / width, side / height, side / width, side / height])
    return boxes * scale


def clip01(boxes: torch.Tensor) -> torch.Tensor:
    """Clip normalized boxes to the image. Apply it after the last arithmetic on a box: a mean or a
    rescale of in-range float32 values can still round past 1 (1.0000001 fails the schema)."""
    return boxes.clamp(0.0, 1.0)


def box_sizes(boxes: torch.Tensor, width: int, height: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Width and height in pixels of normalized xyxy boxes."""
    return (boxes[:, 2] - boxes[:, 0]) * width, (boxes[:, 3] - boxes[:, 1]) * height


def min_size_keep(boxes: torch.Tensor, width: int, height: int, min_size: float) -> torch.Tensor:
    """Mask of boxes whose both sides are positive and at least ``min_size`` x the image's shorter side."""
    w, h = box_sizes(boxes, width, height)
    limit = min_size * min(width, height)
    return (w > 0) & (h > 0) & (w >= limit) & (h >= limit)


def nms_keep(
    boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float, mode: str
) -> torch.Tensor:
    """Indices kept by NMS, by decreasing score.

    ``per_phrase`` suppresses only among boxes with the same label (phrase); ``class_agnostic`` across all
    phrases (GRIT's "even if they are not for the same noun chunk"); ``none`` keeps everything.
    """
    if boxes.numel() == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    boxes, scores = boxes.float(), scores.float()
    if mode == "per_phrase":
        return batched_nms(boxes, scores, labels, iou_threshold)
    if mode == "class_agnostic":
        return nms(boxes, scores, iou_threshold)
    if mode == "none":
        return torch.argsort(scores, descending=True, stable=True)
    raise ValueError(f"unknown nms mode {mode!r}; use per_phrase, class_agnostic or none")


@dataclass(frozen=True)
class PostProcess:
    """The shared post-processing settings, taken from ``DetectorConfig``."""

    nms: str = "per_phrase"
    nms_iou: float = 0.5
    min_box_size: float = 0.0
    max_regions: int = 50
    boxes_per_phrase: int = 0  # 0: no limit
    box_voting_iou: float = 0.0  # 0: off


def per_label_cap(labels: torch.Tensor, k: int, mentions: Sequence[int] | None = None) -> torch.Tensor:
    """Mask keeping the first ``k`` rows of every label (rows already sorted by decreasing score); label ``j``
    keeps ``k * mentions[j]`` when given (a phrase the caption names twice may ground two look-alikes)."""
    keep = torch.ones(labels.shape[0], dtype=torch.bool, device=labels.device)
    if k <= 0 or labels.numel() == 0:
        return keep
    seen: dict[int, int] = {}
    for i, lab in enumerate(labels.tolist()):
        seen[lab] = seen.get(lab, 0) + 1
        keep[i] = seen[lab] <= k * (mentions[lab] if mentions is not None and lab < len(mentions) else 1)
    return keep


def vote_boxes(
    kept: torch.Tensor,
    kept_labels: torch.Tensor,
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    iou_threshold: float,
) -> torch.Tensor:
    """Box voting: each kept box becomes the score-weighted mean of its label's boxes overlapping it.

    A detector fires on several neighbouring patches of one object; NMS keeps the best-scoring of them,
    whose box is not the best-placed one. Averaging the overlapping candidates (IoU >= ``iou_threshold``,
    same label, the kept box included) gives tighter boxes (Gidaris & Komodakis, 2015). Scores stay.
    """
    if kept.numel() == 0:
        return kept
    same = kept_labels[:, None] == labels[None, :]
    weight = ((box_iou(kept, boxes) >= iou_threshold) & same).float() * scores[None, :]
    return (weight @ boxes) / weight.sum(1, keepdim=True).clamp_min(1e-12)


def postprocess(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    labels: torch.Tensor,
    width: int,
    height: int,
    pp: PostProcess,
    mentions: Sequence[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clip, size-filter, NMS and cap one image's thresholded boxes (normalized xyxy of the original image).

    With ``pp.boxes_per_phrase = k > 0`` only the ``k`` best boxes of each phrase survive (phrase
    grounding: a phrase that names one object gets one box, however many patches fire on it; a phrase the
    caption names ``mentions[label]`` times gets that many times ``k``). With
    ``pp.box_voting_iou = t > 0`` every surviving box is refined by :func:`vote_boxes`.
    Returns ``(boxes, scores, labels)`` sorted by decreasing score, at most ``pp.max_regions`` rows.
    Every box returned is finite, ordered (``x0 <= x1``, ``y0 <= y1``) and inside [0, 1]: the final
    clip comes after voting, the last arithmetic on a box. Non-finite candidates are dropped.
    """
    boxes, scores = boxes.float(), scores.float()
    finite = torch.isfinite(boxes).all(-1) & torch.isfinite(scores)
    boxes = clip01(boxes[finite])
    scores, labels = scores[finite], labels[finite]
    keep = min_size_keep(boxes, width, height, pp.min_box_size)
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    order = nms_keep(boxes, scores, labels, pp.nms_iou, pp.nms)
    order = order[per_label_cap(labels[order], pp.boxes_per_phrase, mentions)][: max(pp.max_regions, 0)]
    kept = boxes[order]
    if pp.box_voting_iou > 0:
        kept = clip01(vote_boxes(kept, labels[order], boxes, scores, labels, pp.box_voting_iou))
    return kept, scores[order], labels[order]
