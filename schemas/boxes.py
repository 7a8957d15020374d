"""IoU of two single ``x0, y0, x1, y1`` boxes (the schema's layout), shared by the labelers, the trainer and the demo.

Batches of boxes use ``torchvision.ops`` (``box_convert``, ``box_iou``, ``generalized_box_iou``) and
``vesl.labelers.boxes``. This one stays plain Python because its callers compare one list-of-floats box
pair at a time (evaluation loops over Parquet rows), where building tensors would cost more than the math.
"""

from __future__ import annotations

from collections.abc import Sequence


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0 when the union is empty)."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0
