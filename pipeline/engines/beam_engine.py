"""Apache Beam engine: the same stages as DoFns, the same shard writer.

Pipeline::

    Create(shard tasks) -> ParDo(read shard: read batches + end marker, keyed by shard name)
      -> for each stage: ParDo(stage DoFn, setup() once per worker)
      -> GroupByKey(shard name) -> ParDo(write shard)

- A stage DoFn builds its stage in ``setup()``, once per DoFn instance. Stages that ask for a GPU
  are shared by all threads of a worker process (``apache_beam.utils.shared``), so a process holds
  one copy of a large model, its calls serialized by a lock.
- Batches are formed inside each shard exactly as the local engine forms them (read batches of the
  largest stage batch size, split per stage by its ``batch_size`` config), not by ``BatchElements``
  across shards: batched model calls are not bit-exact across batch compositions, and an output
  shard must not depend on how the runner split the work (see ``distributed.py``). With the writer
  sorting rows by their index in the input shard, the bytes equal the local engine's.
- ``--runner DirectRunner`` (the default) runs Beam's Python FnApiRunner in this process. Beam's own
  ``DirectRunner`` name first tries the Prism runner, which downloads a Go binary; vesl never does.
  Extra pipeline options (``cfg.beam_options``, the words after ``--`` on the command line) pass
  through, e.g. ``--direct_num_workers=2 --direct_running_mode=multi_processing`` locally, or
  ``--project ... --region ... --temp_location gs://... --sdk_container_image ...`` for Dataflow.
- Progress: per-shard log lines and Beam metrics (namespace ``vesl``: images, rows, errors, regions,
  shards), summarized at the end.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from typing import Any

import apache_beam as beam
from apache_beam.metrics import Metrics
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.utils import shared

from vesl.errors import InfrastructureError, UserError
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.engines.distributed import (
    ShardEnd,
    StageRunner,
    StagesFactory,
    committed_results,
    read_items,
    write_items,
)
from vesl.pipeline.engines.runtime_logs import quiet_runtime_logs
from vesl.pipeline.job import Job, caller_numerics, finish, plan, read_batch_size, stopped
from vesl.pipeline.wiring import build_stages

log = logging.getLogger(__name__)
LOCAL_RUNNERS = {"directrunner", "direct", "fnapirunner"}
METRICS_NAMESPACE = "vesl"


class _Stop(InfrastructureError):
    """Raised by a stage DoFn whose batch hit an infrastructure failure: it fails the pipeline, so the job
    stops within that batch (Beam workers cannot hand a result back to the driver). Carries the failed
    shard's name and message; Beam re-raises it with the step's name added to the first argument."""

    def __init__(self, message: str, shard: str = "", error: str = "") -> None:
        super().__init__(message, shard, error)

    def __str__(self) -> str:
        return str(self.args[0])


class _ReadShard(beam.DoFn):
    def __init__(self, cfg: LabelConfig, batch_size: int) -> None:
        self.cfg, self.batch_size = cfg, batch_size

    def process(self, task):
        for item in read_items(task, self.cfg, self.batch_size):
            yield task.name, item


class _StageDoFn(beam.DoFn):
    """One stage; ``setup()`` builds and loads it once per worker, ``teardown()`` releases it."""

    def __init__(self, cfg: LabelConfig, factory: StagesFactory, position: int, last: bool, share: bool) -> None:
        self.cfg, self.factory, self.position, self.last, self.share = cfg, factory, position, last, share
        self._shared = shared.Shared() if share else None
        self.runner: StageRunner | None = None

    def _build(self) -> StageRunner:
        return StageRunner(self.cfg, self.factory, self.position, self.last).setup()

    def setup(self) -> None:
        if self._shared is not None:
            self.runner = self._shared.acquire(self._build, tag=f"vesl-stage-{self.position}").acquire()
        else:
            self.runner = self._build().acquire()

    def teardown(self) -> None:
        if self.runner is not None:
            self.runner.release()  # the last DoFn holding a shared runner tears its stage down
            self.runner = None

    def process(self, element):
        assert self.runner is not None
        name, item = element
        self.runner([item])
        failed = stopped(name, item) if isinstance(item, list) else None
        if failed is not None:
            raise _Stop(f"shard {name}: {failed['error']}", name, failed["error"])
        yield element


class _WriteShard(beam.DoFn):
    def __init__(self, cfg: LabelConfig, run_id: str) -> None:
        self.cfg, self.run_id = cfg, run_id
        self.images = Metrics.counter(METRICS_NAMESPACE, "images")
        self.rows = Metrics.counter(METRICS_NAMESPACE, "rows")
        self.errors = Metrics.counter(METRICS_NAMESPACE, "errors")
        self.regions = Metrics.counter(METRICS_NAMESPACE, "regions")
        self.shards = Metrics.counter(METRICS_NAMESPACE, "shards")
        self.failed = Metrics.counter(METRICS_NAMESPACE, "shards_failed")

    def setup(self) -> None:
        self.t0, self.done_images, self.done_errors = time.perf_counter(), 0, 0

    def process(self, element):
        name, items = element
        result = write_items(self.cfg, name, items, "beam", self.run_id)
        if not result["ok"]:
            self.failed.inc()
            log.warning("vesl beam: shard %s not committed: %s", name, result["error"])
            yield result
            return
        st = result["stats"]
        for counter, value in ((self.images, st["input_count"]), (self.rows, st["rows"]), (self.errors, st["errors"]),
                               (self.regions, st["regions"]), (self.shards, 1)):  # fmt: skip
            counter.inc(value)
        self.done_images += st["input_count"]
        self.done_errors += st["errors"]
        rate = self.done_images / max(time.perf_counter() - self.t0, 1e-9)
        log.info(
            "vesl beam: %s committed (%d rows, %d errors); this worker: %d images, %.1f images/s, %d errors",
            name, st["rows"], st["errors"], self.done_images, rate, self.done_errors,
        )  # fmt: skip
        yield result


def _runner(name: str, options: PipelineOptions) -> Any:
    """The FnApiRunner for local runs (never the Prism binary); cluster runners by name."""
    if name.lower() in LOCAL_RUNNERS:
        from apache_beam.portability.api import beam_provision_api_pb2
        from apache_beam.runners.portability.fn_api_runner import fn_runner
        from apache_beam.runners.portability.portable_runner import JobServiceHandle

        # As Beam's SwitchingDirectRunner sets it up, minus its Prism attempt.
        encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
        info = fn_runner.ExtendedProvisionInfo(beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded))
        return fn_runner.FnApiRunner(provision_info=info)
    return name


def build_pipeline(
    p: beam.Pipeline, cfg: LabelConfig, tasks: list, factory: StagesFactory, run_id: str
) -> beam.PCollection:
    """Add the labeling transforms to ``p``; returns the per-shard results."""
    stages = factory(cfg)  # built, not set up: only names and resources are read here
    items = (
        p
        | "Shards" >> beam.Create(tasks)
        | "Read" >> beam.ParDo(_ReadShard(cfg, read_batch_size(cfg, stages)))
    )  # fmt: skip
    last = len(stages) - 1
    for i, stage in enumerate(stages):
        share = stage.resources.num_gpus > 0
        items = items | f"Stage-{i}-{stage.name}" >> beam.ParDo(_StageDoFn(cfg, factory, i, i == last, share))
    return items | "GroupByShard" >> beam.GroupByKey() | "Write" >> beam.ParDo(_WriteShard(cfg, run_id))


def run_beam(cfg: LabelConfig, stages_factory: StagesFactory = build_stages, progress: bool = True) -> dict[str, Any]:
    """Label every planned shard of ``cfg`` with Beam, then write the manifest; returns a summary."""
    job = plan(cfg, "beam")
    if quiet_runtime_logs("apache_beam") > logging.INFO:
        # vesl reports a failing stage setup itself, in one line; Beam would log its traceback first
        logging.getLogger("apache_beam.runners.common").setLevel(logging.CRITICAL)
    with caller_numerics():  # the DirectRunner runs the stages in this process
        failed = _run_pipeline(job, stages_factory, progress) if job.todo else []
    return finish(job, committed_results(cfg, job.todo, job.run_id) + failed, 1)


def _run_pipeline(job: Job, stages_factory: StagesFactory, progress: bool) -> list[dict[str, Any]]:
    """Run the pipeline; returns the shard that stopped it with an infrastructure failure (or nothing)."""
    cfg = job.cfg
    options = PipelineOptions(list(cfg.beam_options))
    try:
        p = beam.Pipeline(runner=_runner(cfg.beam_runner, options), options=options)
    except ValueError as exc:  # unknown runner name
        raise UserError(f"Beam cannot use runner {cfg.beam_runner!r} ({exc}): try DirectRunner, FlinkRunner, SparkRunner or DataflowRunner") from None
    build_pipeline(p, cfg, job.todo, stages_factory, job.run_id)
    if progress:
        print(f"vesl beam: {len(job.todo)} shards on {cfg.beam_runner} ({len(job.skipped)} already committed)", file=sys.stderr)
    try:
        result = p.run()
        state = result.wait_until_finish()
    except Exception as exc:
        stop = _stop_of(exc)
        if stop is None:
            raise
        shard, error = stop
        return [{"shard": shard, "ok": False, "error": error, "stop": True}]
    if progress:
        _print_metrics(result, job.started)
    if str(state) not in ("DONE", "PipelineState.DONE"):
        log.warning("vesl beam: pipeline ended in state %s", state)
    return []


_STOP_TEXT = re.compile(r"shard (\S+): (\d+ sample\(s\) hit an infrastructure failure .*?rerun to retry)")


def _stop_of(exc: BaseException) -> tuple[str, str] | None:
    """(shard, message) of the ``_Stop`` that failed the pipeline, wherever the runner wrapped it; from
    its text when a runner in other processes passed it on as another exception."""
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            break
        if isinstance(seen, _Stop):
            return str(seen.args[1]), str(seen.args[2])
        seen = seen.__cause__ or seen.__context__
    found = _STOP_TEXT.search(str(exc))
    return (found.group(1), found.group(2)) if found else None


def _print_metrics(result: Any, t0: float) -> None:
    try:
        counters = result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]
    except Exception:  # some runners report no metrics
        return
    values = {c.key.metric.name: c.committed if c.committed is not None else c.attempted for c in counters}
    dt = max(time.perf_counter() - t0, 1e-9)
    images = values.get("images", 0)
    print(
        f"vesl beam: {images} images ({images / dt:.1f}/s), {values.get('regions', 0)} regions, "
        f"{values.get('errors', 0)} errors, {values.get('shards', 0)} shards committed, "
        f"{values.get('shards_failed', 0)} failed",
        file=sys.stderr,
    )


__all__ = ["ShardEnd", "build_pipeline", "run_beam"]
