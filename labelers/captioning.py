"""What every captioner backend shares, so that each writes the same kind of caption: the stage name, the
image handling, the empty-caption rule, the prompt and the provenance.

The backends themselves are in ``captioners.py``; ``make_captioner`` there picks one.
"""

from __future__ import annotations

import io
import os
from typing import Any

from vesl.labelers.prompts import prompt_hash, render_prompt
from vesl.schemas.config import CaptionerConfig
from vesl.schemas.stage import Sample, StageResources, fail

STAGE_NAME = "caption"


def sample_image(sample: Sample):
    """The decoded RGB image; decodes ``image_bytes`` itself when no decode stage ran before."""
    if sample.image is not None:
        return sample.image if sample.image.mode == "RGB" else sample.image.convert("RGB")
    if sample.image_bytes:
        from PIL import Image, ImageOps

        with Image.open(io.BytesIO(sample.image_bytes)) as im:
            return ImageOps.exif_transpose(im).convert("RGB")
    raise ValueError("sample has no decoded image and no image bytes")


def images_or_fail(batch: list[Sample]) -> list[tuple[Sample, Any]]:
    """Pair each sample with its image; samples whose image can't be had become error rows."""
    out = []
    for s in batch:
        try:
            out.append((s, sample_image(s)))
        except Exception as exc:  # a broken image costs only its own sample
            fail(s, STAGE_NAME, exc)
    return out


def set_caption(sample: Sample, text: str | None) -> None:
    """The model's caption, stripped; an empty one is the sample's error, never an empty caption."""
    text = (text or "").strip()
    if not text:
        fail(sample, STAGE_NAME, "the model generated an empty caption", "EmptyCaption")
        return
    sample.caption = text
    sample.caption_source = "vlm"


class CaptionerBase:
    """A captioner Stage: cheap to construct and pickle (engines ship it to workers), heavy work in
    ``setup()``, per-sample failures become error rows through ``fail()``."""

    name = STAGE_NAME
    backend = ""

    def __init__(self, cfg: CaptionerConfig, model: str = ""):
        self.cfg = cfg
        self.model_id = model
        self.resources = StageResources(batch_size=cfg.batch_size, concurrency=cfg.concurrency,
                                        num_gpus=cfg.num_gpus)
        self._revision: str | None = None

    def setup(self) -> None:
        """Nothing to load by default."""

    def teardown(self) -> None:
        """Nothing to release by default."""

    def provenance(self) -> dict[str, str]:
        return {
            "captioner.backend": self.backend,
            "captioner.model": self.model_id,
            "captioner.revision": self._revision or self.cfg.revision or self._default_revision(),
            "captioner.prompt_sha256": prompt_hash(self.cfg.prompt_template),
            "captioner.max_new_tokens": str(self.cfg.max_new_tokens),
        }

    def _default_revision(self) -> str:
        """A local directory has no revision; a hub id we could not pin is its default branch."""
        return "local" if os.path.isdir(self.model_id) else "main"

    def __getstate__(self) -> dict:
        # Engines pickle stages to ship them to workers; loaded models stay behind.
        return {k: (None if k in ("_model", "_processor", "_llm") else v) for k, v in self.__dict__.items()}

    def _prompts(self, items: list[tuple[Sample, Any]], control_tokens: frozenset[str] = frozenset()) -> list[str]:
        return [render_prompt(self.cfg.prompt_template, s.alt_text, control_tokens) for s, _ in items]
