"""The sizes every tiny transformers config in the tests shares, written once."""

from __future__ import annotations

from typing import Any


def encoder_dims(hidden_size: int, num_layers: int, num_heads: int, **extra: Any) -> dict[str, Any]:
    """Width, depth and heads of a text or vision tower (FFN at twice the width), plus ``extra`` keys."""
    return {
        "hidden_size": hidden_size,
        "intermediate_size": hidden_size * 2,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        **extra,
    }
