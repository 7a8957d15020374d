"""CLOC pretraining: model, losses, Parquet loader (library half) and train/eval/export."""

from __future__ import annotations

import os


def load(path: str | os.PathLike, device: str = "cpu"):
    """The full CLOC model (towers, Prompter, grounding head) from an export, run or checkpoint folder."""
    from vesl.pretrain.export import load as _load

    return _load(path, device=device)
