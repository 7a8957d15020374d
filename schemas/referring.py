"""Relative position words: which of two look-alikes a referring expression means.

RefCOCO-style expressions ("man on left") place an object against its look-alike, not on the image grid.
One rule, shared by the synthetic world, the trainer and the exporters, so that the words a model learns are
the words it is asked about: the axis with the larger centre offset wins; ties go to the horizontal axis.
"""

from __future__ import annotations

from collections.abc import Sequence

RELATIVE_WORDS = ("on the left", "on the right", "at the top", "at the bottom")


def relative_position_word(box: Sequence[float], other_box: Sequence[float]) -> str:
    """Where ``box`` lies against ``other_box`` (normalized ``x0, y0, x1, y1``), in words.

    The centres' horizontal and vertical offsets are compared: the larger one names the side ("on the left",
    "on the right", "at the top", "at the bottom"); an exact tie picks the horizontal word.
    """
    dx = (box[0] + box[2] - other_box[0] - other_box[2]) / 2
    dy = (box[1] + box[3] - other_box[1] - other_box[3]) / 2
    if abs(dx) >= abs(dy):
        return "on the left" if dx < 0 else "on the right"
    return "at the top" if dy < 0 else "at the bottom"
