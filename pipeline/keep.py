"""``--captioner keep``: re-ground a labeled vesl dataset's stored captions without the VLM.

The VLM is over 90% of a labeling job's cost. A labeled dataset is itself an input (its committed shards,
read with their stored image bytes and captions), and this stage puts each row's caption and caption source
back on the sample, so that only phrase extraction and detection run again: a new phrase mode, a new
detector, new thresholds. No captioner model is built or loaded. The original captioner's provenance stays
in the new shards' provenance (``captioner.kept_from``).
"""

from __future__ import annotations

import json
from typing import Any

from vesl.pipeline.sources import KEPT_CAPTION_KEY
from vesl.schemas.stage import Sample, StageResources, fail

KEEP_SPEC = "keep"


class KeepCaption:
    """The caption stage of a re-grounding job: the labeled row's caption, as it was."""

    name = "caption"

    def __init__(self, kept_from: dict[str, Any] | None = None) -> None:
        self.kept_from = kept_from or {}
        self.resources = StageResources(batch_size=64)

    def teardown(self) -> None:
        """Nothing to release: models go with the worker."""

    def setup(self) -> None:
        pass

    def provenance(self) -> dict[str, str]:
        return {"captioner.backend": KEEP_SPEC, "captioner.kept_from": json.dumps(self.kept_from, sort_keys=True)}

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        for s in batch:
            caption, source = s.meta.get(KEPT_CAPTION_KEY, (None, None))
            if not caption:
                fail(s, self.name, "the labeled row has no caption to keep", "MissingCaption")
            else:
                s.caption, s.caption_source = caption, source
        return batch


def original_captioner(inputs: list[str]) -> dict[str, Any]:
    """The captioner record in the provenance of the first labeled shard of ``inputs`` (one footer read)."""
    import posixpath

    from vesl.pipeline.config import SourceConfig
    from vesl.pipeline.sources import list_shards
    from vesl.schemas.dataset import read_shard_provenance

    refs = [r for r in list_shards(inputs, SourceConfig()) if r.kind == "vesl"]
    if not refs:
        return {}
    folder, name = posixpath.split(refs[0].uri)
    return read_shard_provenance(folder, name).get("captioner", {})
