"""Several looks at one image -> one set of regions: weighted box fusion per phrase (ensemble-boxes).

A look is one detector on one view of the image (the image itself, its mirror image, a zoom). Each look
already thresholded, NMS'd and capped its own boxes; here the boxes of each phrase are clustered across the
looks and every cluster becomes one box, the score-weighted mean of its members (Solovyev et al., 2021,
"Weighted boxes fusion"). The fused score follows ``FusionConfig.conf_type``; with the default ``avg`` it is
the sum of the cluster's scores divided by the number of looks, so boxes that every look found keep their
mean score and a box only one look of ``n`` found keeps ``1/n`` of it. ``FusionConfig.threshold`` then drops
fused boxes at or under it.
"""

from __future__ import annotations

from collections.abc import Sequence

from vesl.schemas.config import FusionConfig
from vesl.schemas.stage import Phrase, Region


def fuse_looks(
    looks: Sequence[Sequence[Region]], phrases: Sequence[Phrase], cfg: FusionConfig
) -> list[Region]:
    """Fuse the regions of several looks at one image (each a list of regions of ``phrases``) per phrase.

    Returns the fused regions by decreasing score (ties: phrase order, then box), every box clipped to [0, 1].
    A region whose phrase is not one of ``phrases`` is a bug upstream and raises ``ValueError``.
    """
    import numpy as np
    from ensemble_boxes import weighted_boxes_fusion

    index = {(p.text, p.char_start, p.char_end): i for i, p in enumerate(phrases)}
    boxes, scores, labels = [], [], []
    for look in looks:
        try:
            lab = np.asarray([index[(r.phrase, r.char_start, r.char_end)] for r in look], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(
                f"a look labeled a box with {exc.args[0]!r}, which is not one of the image's phrases"
            ) from None
        # a shrunk view's boxes on its padding map past the image: clipped, and those left empty dropped
        b = np.clip(np.asarray([list(r.box) for r in look], dtype=np.float64).reshape(-1, 4), 0.0, 1.0)
        real = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        boxes.append(b[real])
        scores.append(np.asarray([r.score for r in look], dtype=np.float64)[real])
        labels.append(lab[real])
    if not any(len(lab) for lab in labels):
        return []
    fb, fs, fl = weighted_boxes_fusion(
        boxes, scores, labels, iou_thr=cfg.iou_thr, skip_box_thr=cfg.skip_box_thr, conf_type=cfg.conf_type
    )
    out = []
    for box, score, label in zip(np.clip(fb, 0.0, 1.0).tolist(), fs.tolist(), fl.tolist(), strict=True):
        if score > cfg.threshold:
            p = phrases[int(label)]
            out.append(Region(p.text, p.char_start, p.char_end, tuple(float(v) for v in box), float(score)))
    order = sorted(
        range(len(out)),
        key=lambda k: (-out[k].score, index[(out[k].phrase, out[k].char_start, out[k].char_end)], out[k].box),
    )
    return [out[k] for k in order]
