"""Box math on ``x0, y0, x1, y1`` boxes (the schema's layout), shared by the labelers, the trainer and the demo.

Pure functions: single boxes as plain sequences, batches as torch tensors (torch is imported only there).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two xyxy boxes (0 when the union is empty)."""
    ax0, ay0, ax1, ay1 = a
    bx0, by0, bx1, by1 = b
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    union = (ax1 - ax0) * (ay1 - ay0) + (bx1 - bx0) * (by1 - by0) - inter
    return inter / union if union > 0 else 0.0


def cxcywh_to_xyxy(boxes: Any) -> Any:
    """``[..., 4]`` centre/size boxes -> corner boxes (a torch tensor)."""
    import torch

    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
