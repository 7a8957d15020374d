"""How an engine calls a stage: failures isolated per sample, chunks cut the same way on every engine.

Every engine (local, Beam, Ray) runs stages only through these functions, so a shard's output never
depends on which engine ran it.
"""

from __future__ import annotations

import logging

from vesl.errors import InfrastructureError, is_infrastructure
from vesl.schemas.stage import Sample, Stage, fail, fail_infrastructure

log = logging.getLogger(__name__)


def apply_stage(stage: Stage, batch: list[Sample]) -> list[Sample]:
    """Run ``stage`` on the ok samples of ``batch``, isolating failures to the samples that cause them.

    If the batched call raises, each sample is retried alone so one bad sample never costs its
    neighbours. An infrastructure failure (``InfrastructureError``; a CUDA out-of-memory on a single
    sample) is not the sample's fault: it marks the batch so that its shard is not committed.
    Order and length of ``batch`` are preserved.
    """
    todo = [s for s in batch if s.ok]
    if not todo:
        return batch
    try:
        stage(todo)
    except InfrastructureError as exc:
        fail_infrastructure(todo, stage.name, exc)
    except Exception:
        for s in todo:
            try:
                stage([s])
            except Exception as exc:  # every failure becomes an error row
                if is_infrastructure(exc):
                    fail_infrastructure(todo, stage.name, exc)
                    break
                fail(s, stage.name, exc)
    return batch


def stage_batch_size(stage: Stage) -> int:
    """The batch size a stage asks for (1 when it declares none)."""
    return max(1, int(getattr(getattr(stage, "resources", None), "batch_size", 1)))


def apply_stage_chunked(stage: Stage, batch: list[Sample]) -> list[Sample]:
    """Run ``stage`` on the ok samples of ``batch`` in chunks of its own batch size.

    Every engine cuts chunks the same way, so batched model calls (not bit-exact across batch
    contents) see the same batches on every engine. Known duplicates (``Sample.duplicate_of``) are left out.
    """
    ok = [s for s in batch if s.ok and s.duplicate_of is None]  # a duplicate gets its representative's labels
    size = stage_batch_size(stage)
    for i in range(0, len(ok), size):
        apply_stage(stage, ok[i : i + size])
    return batch


def teardown_stages(stages: list[Stage]) -> None:
    """Call ``teardown()`` on every stage that has one, last stage first, once the worker is done.

    A stage whose teardown fails is logged and the others still run: the shards are already committed.
    """
    for stage in reversed(stages):
        fn = getattr(stage, "teardown", None)
        if not callable(fn):
            continue
        try:
            fn()
        except Exception as exc:  # never fail a finished job on cleanup
            log.warning("vesl: teardown of stage %s failed: %s: %s", getattr(stage, "name", stage), type(exc).__name__, exc)
