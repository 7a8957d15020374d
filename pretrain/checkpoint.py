"""Checkpoints of a training run: ``RUN/checkpoints/step-NNNNNNNN/`` (model.safetensors, optimizer.pt,
state.json with the loader cursors), written under a temporary name and renamed into place, so a killed
run never leaves a half checkpoint; ``resume: latest`` picks the newest complete one."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from vesl.errors import UserError, first_line


def checkpoint_dirs(run_dir: str | os.PathLike) -> list[Path]:
    root = Path(run_dir) / "checkpoints"
    if not root.exists():
        return []
    return sorted(p for p in root.glob("step-*") if (p / "state.json").exists())


def resolve_resume(resume: str, run_dir: str | os.PathLike) -> Path | None:
    if resume == "latest":
        found = checkpoint_dirs(run_dir)
        return found[-1] if found else None
    p = Path(resume)
    if not (p / "state.json").exists():
        raise UserError(f"{p} is not a checkpoint directory (no state.json); pass --resume latest or a step-* folder")
    return p


def save_checkpoint(ck_dir: Path, model, optimizer, state: dict[str, Any], keep: int) -> Path:
    """Atomic: write into a temp folder, then rename it to its final name."""
    import torch
    from safetensors.torch import save_file

    ck_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = ck_dir.parent / f".tmp-{ck_dir.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(tmp / "model.safetensors"), metadata={"vesl": json.dumps(model.config_dict())})
    torch.save({"optimizer": optimizer.state_dict()}, tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if ck_dir.exists():
        shutil.rmtree(ck_dir)
    os.replace(tmp, ck_dir)
    for old in checkpoint_dirs(ck_dir.parent.parent)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return ck_dir


REEXPORT = "re-export it with `vesl export-model`"  # what to do about an unusable weights file of an export


def read_safetensors(path: str | os.PathLike, next_step: str, device: str = "cpu") -> dict:
    """The tensors of a safetensors file; one line naming the file and ``next_step`` when it is missing or not
    safetensors (garbage, truncated, a header too large), instead of the reader's traceback."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:  # SafetensorError, OSError, a header that is not JSON: all mean an unusable file
        raise UserError(
            f"{path} is not a readable safetensors file ({type(exc).__name__}: {first_line(exc, 200)}); {next_step}"
        ) from None


def load_weights(model, path: str | os.PathLike) -> None:
    model.load_state_dict(read_safetensors(path, "resume from another checkpoint, or start without --resume"))


def load_optimizer_state(path: str | os.PathLike, device) -> dict:
    """``optimizer.pt`` of a checkpoint, tensors only (``weights_only``); one line when it is not that."""
    import torch

    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:
        raise UserError(
            f"{path} is not a tensors-only optimizer state ({type(exc).__name__}: {first_line(exc, 200)}); "
            "resume from another checkpoint, or start without --resume"
        ) from None


# ---- the loop --------------------------------------------------------------------------------------


