"""What the Beam and Ray engines share: reading a shard into a flow of items, running one stage on a
batch of items, and committing one shard from its grouped items.

A distributed engine moves *items*, each keyed by its output shard name: the shard's samples in
read batches (lists of consecutive Samples, sized and then split per stage exactly as the local
engine does), then one :class:`ShardEnd` marker that the reader emits after the last batch.

Why batches are formed per shard and not by the runner (Beam's ``BatchElements``, Ray's
``batch_size`` over rows): batched model calls are not bit-exact across batch compositions (padding
changes the numerics of a VLM's greedy decode), so a sample's caption could depend on which samples of
*other* shards shared its batch. Forming batches inside each shard, the local engine's way, keeps
every output shard independent of how the runner splits and schedules the work. The marker travels through
every stage like a sample (stages never see it) and collects each stage's provenance from the very
worker that ran it, after ``setup()``, exactly as the local engine records it. The writer of a shard
thus knows how many samples to expect (nothing lost), whether the read failed (then the shard stays
uncommitted, as on the local engine), and the job provenance, without loading any model itself.

Stage time is shared out over the samples of each batch (``Sample.meta``), so per-shard stats carry
per-stage seconds like the local engine's; only ``timings`` differ between engines.
"""

from __future__ import annotations

import pickle
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from vesl.pipeline.apply import teardown_stages
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.job import ShardTask, commit, job_provenance, read, read_failed, run_stage, setup_stage
from vesl.schemas.dataset import read_stats
from vesl.schemas.stage import Sample, Stage

StagesFactory = Callable[[LabelConfig], list[Stage]]
SECONDS_KEY = "_vesl_stage_seconds"  # in Sample.meta; never written to the output rows


@dataclass
class ShardEnd:
    """Last item of a shard: how many samples were read, whether reading failed, stage provenance."""

    task: ShardTask
    count: int
    error: str | None = None
    started: float = field(default_factory=time.time)
    provenance: dict[str, dict[str, Any]] = field(default_factory=dict)


Item = list[Sample] | ShardEnd


def read_items(task: ShardTask, cfg: LabelConfig, batch_size: int) -> Iterator[Item]:
    """The shard's samples (at most ``task.limit``) in read batches, then its :class:`ShardEnd`."""
    started, count, error = time.time(), 0, None
    try:
        for batch in read(cfg, task, batch_size):
            count += len(batch)
            yield batch
    except Exception as exc:  # unreadable shard: reported, left uncommitted, retried on rerun
        error = read_failed(task, exc)["error"]
    yield ShardEnd(task, count, error, started)


def dumps(item: Any) -> bytes:
    return pickle.dumps(item, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    """Only for items this job pickled itself (between its own workers)."""
    return pickle.loads(data)  # noqa: S301


class StageRunner:
    """One stage, built and set up once per worker; applies it to the samples of a batch of items.

    ``shared``: calls are serialized by a lock so one instance can serve several threads of a worker
    process (one model copy per process instead of per thread).
    """

    def __init__(self, cfg: LabelConfig, factory: StagesFactory, position: int, last: bool) -> None:
        self.cfg, self.factory, self.position, self.last = cfg, factory, position, last
        self.stage: Stage | None = None
        self.provenance: dict[str, Any] = {}
        self._lock = threading.Lock()
        self._users = 0  # holders of a shared runner (Beam's Shared); the last release tears the stage down

    def acquire(self) -> StageRunner:
        with self._lock:
            self._users += 1
        return self

    def release(self) -> None:
        """Drop one holder; the last one calls the stage's ``teardown()``."""
        with self._lock:
            self._users -= 1
            if self._users > 0 or self.stage is None:
                return
            stage, self.stage = self.stage, None
        teardown_stages([stage])

    def setup(self) -> StageRunner:
        stage = self.factory(self.cfg)[self.position]
        self.provenance = setup_stage(self.cfg, stage)
        self.stage = stage
        return self

    @property
    def name(self) -> str:
        assert self.stage is not None, "setup() first"
        return self.stage.name

    def __call__(self, items: list[Item]) -> list[Item]:
        """Each read batch as the local engine runs it: the first stage on the whole batch, later
        stages on its ok samples in chunks of their own batch size."""
        assert self.stage is not None, "setup() first"
        with self._lock:
            for item in items:
                if isinstance(item, ShardEnd):
                    item.provenance[self.stage.name] = self.provenance
                elif item:
                    self._run(item)
        return items

    def _run(self, batch: list[Sample]) -> None:
        stage = self.stage
        share = run_stage(stage, batch, first=self.position == 0) / len(batch)
        for s in batch:
            secs = s.meta.setdefault(SECONDS_KEY, {})
            secs[stage.name] = secs.get(stage.name, 0.0) + share
            if self.last:
                s.image = None  # decoded pixels never travel to the writer


def write_items(cfg: LabelConfig, name: str, items: Iterable[Item], engine: str, run_id: str = "") -> dict[str, Any]:
    """Commit one shard from all of its items (any order); returns its result (see ``vesl.pipeline.job``)."""
    samples: list[Sample] = []
    ends: list[ShardEnd] = []
    for x in items:
        if isinstance(x, ShardEnd):
            ends.append(x)
        else:
            samples.extend(x)
    if len(ends) != 1:
        return {"shard": name, "ok": False, "error": f"internal: {len(ends)} end markers for one shard; rerun to resume"}
    end = ends[0]
    if end.error is not None:
        return {"shard": name, "ok": False, "error": end.error}
    if len(samples) != end.count:
        return {"shard": name, "ok": False, "error": f"read {end.count} samples but {len(samples)} reached the writer"}
    provenance = job_provenance(cfg, end.provenance)
    seconds: dict[str, float] = {}
    for s in samples:
        for k, v in s.meta.pop(SECONDS_KEY, {}).items():
            seconds[k] = seconds.get(k, 0.0) + v
    timings: dict[str, Any] = {k: round(v, 4) for k, v in sorted(seconds.items())}
    timings["wall_s"] = round(time.time() - end.started, 4)
    timings["engine"] = engine
    timings["run_id"] = run_id
    return commit(cfg, end.task, samples, provenance, timings)


def committed_results(cfg: LabelConfig, todo: list[ShardTask], run_id: str) -> list[dict[str, Any]]:
    """Results read back from the output (for runners whose workers can't hand results to the driver):
    the shards this run (``run_id`` in their timings) committed."""
    out = []
    for t in todo:
        stats = read_stats(cfg.output, t.name)
        if stats is not None and stats.get("timings", {}).get("run_id") == run_id:
            out.append({"shard": t.name, "ok": True, "stats": stats})
    return out
