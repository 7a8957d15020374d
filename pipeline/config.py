"""Job configuration: one pydantic model per stage, composed into ``LabelConfig``.

YAML files, profiles and CLI flags all resolve to this one object; unknown keys are rejected so a
typo gets a one-line error instead of being silently ignored. The model stages' configs live in
``vesl.schemas.config``, where ``labelers/`` read them without depending on the pipeline.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from vesl.schemas.config import (
    NOT_IN_ROWS,
    CaptionerConfig,
    DetectorConfig,
    PhrasesConfig,
    StrictConfig,
    VerifierConfig,
)


class SourceConfig(StrictConfig):
    """How to read inputs. Column names apply to Parquet inputs (img2dataset / HF image datasets)."""

    image_column: str = "jpg"
    path_column: str | None = None
    caption_column: str = "caption"
    key_column: str = "key"
    image_extensions: list[str] = Field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"], min_length=1)
    # one file (tar member, image, sidecar) larger than this is an error row, checked before reading it
    max_file_bytes: int = Field(256 * 2**20, ge=1)
    # Re-grounding a labeled dataset stored without image bytes: its original inputs, named by the user. A
    # row's image is read again from its ``source_shard`` only when that shard is one of these inputs'.
    # Where the images are, as INPUT says where the samples are: paths, never settings.
    image_sources: list[str] = Field(default_factory=list, json_schema_extra=NOT_IN_ROWS)


class DecodeConfig(StrictConfig):
    max_image_pixels: int = Field(89_478_485, ge=1)  # Pillow's own default bomb limit, made explicit
    max_caption_chars: int = Field(10_000, ge=1)
    keep_image_bytes: bool = True  # store the source image bytes in the output rows
    allow_empty_alt_text: bool = False  # empty alt-text is an error row unless a VLM recaptions anyway
    batch_size: int = Field(32, ge=1, json_schema_extra=NOT_IN_ROWS)


class DuplicatesConfig(StrictConfig):
    """``vesl label --duplicates DUPS``: label only the representatives of a `vesl dedup` table.

    ``table`` is where the user keeps it (a path, compared through its content): the job records the
    table's ``table_sha256`` and ``threshold``, filled in from the table when the job is planned.
    """

    table: str = Field("", json_schema_extra=NOT_IN_ROWS)
    policy: Literal["copy", "skip"] = "copy"  # copy: a duplicate's row gets its representative's labels
    table_sha256: str = ""
    threshold: int | None = None


class LabelConfig(StrictConfig):
    """Every field is a setting a resume must match (``row_settings``) unless marked ``NOT_IN_ROWS``."""

    # which shards, where to, on which engine: never what a shard's rows hold (inputs and model paths are
    # matched through the output's private job file instead; ``limit`` through each shard's ``sample_limit``)
    inputs: list[str] = Field(default_factory=list, json_schema_extra=NOT_IN_ROWS)
    output: str = Field("", json_schema_extra=NOT_IN_ROWS)
    engine: Literal["local", "beam", "ray"] = Field("local", json_schema_extra=NOT_IN_ROWS)
    workers: int = Field(1, ge=1, le=4096, json_schema_extra=NOT_IN_ROWS)
    limit: int | None = Field(None, ge=1, le=2**62, json_schema_extra=NOT_IN_ROWS)
    overwrite: bool = Field(False, json_schema_extra=NOT_IN_ROWS)
    seed: int = Field(0, ge=0, le=2**32 - 1)
    # The numerical set-up of every stage worker, on every engine: torch's intra-op thread count. CPU
    # matmuls and convolutions split their float sums by thread, so scores can differ in the last bits
    # between thread counts; shards are byte-identical across engines and machines for equal values.
    stage_threads: int = Field(1, ge=1, le=1024)
    trust_remote_code: bool = False  # applies to every model stage; off unless the user asks
    beam_runner: str = Field("DirectRunner", json_schema_extra=NOT_IN_ROWS)
    # extra Beam pipeline options, passed through
    beam_options: list[str] = Field(default_factory=list, json_schema_extra=NOT_IN_ROWS)
    # None: ray.init() locally; "auto" or "ray://host:port" for a cluster
    ray_address: str | None = Field(None, json_schema_extra=NOT_IN_ROWS)
    source: SourceConfig = Field(default_factory=SourceConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    captioner: CaptionerConfig = Field(default_factory=CaptionerConfig)
    phrases: PhrasesConfig = Field(default_factory=PhrasesConfig)
    detector: DetectorConfig = Field(default_factory=DetectorConfig)
    verify: VerifierConfig = Field(default_factory=VerifierConfig)  # after the detector; off unless asked
    duplicates: DuplicatesConfig = Field(default_factory=DuplicatesConfig)


class DedupSettings(StrictConfig):
    """The perceptual hash of `vesl dedup` and the Hamming distance at or under which two images are one."""

    hash: Literal["phash"] = "phash"
    hash_size: int = Field(16, ge=4, le=32)  # a hash_size x hash_size bit hash: 256 bits
    threshold: int = Field(31, ge=0)  # chosen on the validation worlds (docs/benchmarks.md)


class DedupConfig(LabelConfig):
    """A `vesl dedup` job: the labeling job's inputs, output, engines and resume rules, with a hash stage."""

    dedup: DedupSettings = Field(default_factory=DedupSettings)
