"""Where a model stage runs: device and dtype resolution, one rule for every captioner and detector."""

from __future__ import annotations

from typing import Any

from vesl.errors import UserError

# accepted spellings -> torch's name (also what vLLM takes)
DTYPE_NAMES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp16": "float16", "float16": "float16",
               "half": "float16", "fp32": "float32", "float32": "float32", "float": "float32"}  # fmt: skip


def resolve_device(device: str) -> Any:
    """``auto``: the first CUDA device when there is one, else the CPU (a ``torch.device``)."""
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: Any) -> Any:
    """``auto``: bf16 on CUDA (what VLMs and detectors are trained in), fp16 on a GPU without bf16, fp32
    elsewhere (CPU bf16 matmuls are slow). Otherwise the named dtype."""
    import torch

    if dtype == "auto":
        if torch.device(device).type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if dtype not in DTYPE_NAMES:
        raise UserError(f"unknown dtype {dtype!r}: use auto, bfloat16, float16 or float32")
    return getattr(torch, DTYPE_NAMES[dtype])
