"""The one seam between models and engines: a Stage maps a batch of Samples to a batch of Samples.

These types are the contract both sides share: ``labelers/`` implement stages, ``pipeline/`` runs them
(``setup()`` once per worker, ``vesl.pipeline.apply.apply_stage`` on batches, ``teardown()`` when the
worker is done). Stages never know which engine runs them, and engines never know what a stage does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

# Sample.meta key set by the sources: the image file relative to the input's parent. The writer stores it
# as ``image_uri`` when the image bytes are kept, so published rows never show the local file system.
SOURCE_PATH_KEY = "source_path"

Box = tuple[float, float, float, float]  # x0, y0, x1, y1 normalized to [0, 1] of the original image


@dataclass(frozen=True)
class Phrase:
    """A phrase found in a caption; ``caption[char_start:char_end] == text`` (its first mention).

    ``count``: how many times the caption names it ("a red circle on the left and a red circle on the right"
    names two look-alikes with one phrase), so a detector that keeps k boxes per phrase may keep k x count.
    """

    text: str
    char_start: int
    char_end: int
    count: int = 1


@dataclass(frozen=True)
class Region:
    """A grounded phrase: box is normalized ``x0, y0, x1, y1`` of the original image."""

    phrase: str
    char_start: int
    char_end: int
    box: Box
    score: float


@dataclass(frozen=True)
class SampleError:
    """Why a sample left the flow; becomes one row of ``part-XXXXX.errors.parquet``.

    ``infrastructure``: the service or device failed, not the sample; such a shard is never committed.
    """

    stage: str
    error_type: str
    message: str
    infrastructure: bool = False


@dataclass
class Sample:
    """One image/alt-text pair as it flows through the stages.

    ``index`` is the position inside the source shard; writers order rows by it so that output
    never depends on how an engine split the work.
    """

    key: str
    source_shard: str
    index: int = 0
    image_bytes: bytes | None = None
    image_uri: str | None = None
    alt_text: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    image: Any = None  # decoded RGB PIL.Image (set by the decode stage, dropped before writing)
    width: int = 0  # of the original image
    height: int = 0
    caption: str | None = None
    caption_source: str | None = None  # "alt_text" | "vlm"
    phrases: list[Phrase] = field(default_factory=list)
    regions: list[Region] = field(default_factory=list)
    error: SampleError | None = None
    # key of the image this one is a near-duplicate of (`vesl label --duplicates`): the model stages skip it
    duplicate_of: str | None = None
    # regions the verification stage dropped (None: no verifier ran); counted in the shard's stats
    verifier_dropped: int | None = None
    # regions it gave another phrase of the image (rule relabel; None: that rule did not run)
    verifier_relabeled: int | None = None
    # whether a detector was asked for ``phrases``: the writer then records the ones without a region as unmatched
    queried: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class StageResources:
    """What a stage asks of the engine: batch size, parallel copies, GPUs per copy (may be fractional)."""

    batch_size: int = 16
    concurrency: int = 1
    num_gpus: float = 0.0


@runtime_checkable
class Stage(Protocol):
    name: str
    resources: StageResources

    def setup(self) -> None:
        """Load models once per worker."""

    def teardown(self) -> None:
        """Release what ``setup()`` acquired (clients, pools); every engine calls it once per worker, last."""

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        """Process the ok samples of a batch; may set ``sample.error`` on individual samples."""

    def provenance(self) -> dict[str, str]:
        """Model ids, revisions, thresholds, prompt hash: written into the Parquet metadata."""


def fail(sample: Sample, stage: str, exc: BaseException | str, error_type: str | None = None) -> Sample:
    """Mark a sample as failed in ``stage``; it then skips all later stages and lands in the errors file."""
    if isinstance(exc, BaseException):
        sample.error = SampleError(stage, error_type or type(exc).__name__, str(exc)[:2000] or repr(exc))
    else:
        sample.error = SampleError(stage, error_type or "Error", exc)
    sample.image = None
    return sample


def fail_infrastructure(samples: list[Sample], stage: str, exc: BaseException) -> None:
    """Mark ``samples`` as hit by an infrastructure failure: their shard will not commit."""
    message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:2000]
    for s in samples:
        if s.ok:
            s.error = SampleError(stage, getattr(exc, "error_type", type(exc).__name__), message, infrastructure=True)
            s.image = None


def infrastructure_failure(samples: list[Sample]) -> SampleError | None:
    """The first infrastructure failure among ``samples`` (None: the shard may commit)."""
    return next((s.error for s in samples if s.error is not None and s.error.infrastructure), None)
