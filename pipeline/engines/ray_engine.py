"""Ray engine: the same stages in Ray actors, the same shard writer.

When every stage fits in one actor pool (CPU-only stages with equal pool sizes: the usual CPU job), the
job is ``--workers`` plain Ray actors, each handed a few shard tasks per call until none are left::

    shard actor: set the stages up once; per call: read, label and commit whole shards, stream each result

Each actor runs the local engine's shard loop (``process_tasks``: prefetching reader, decode threads, the
shared writer), so no sample is pickled or crosses a process and the driver only gathers each shard's
result; the shards are the local engine's by construction. Otherwise (a GPU stage, a stage with its own
pool size or its own Ray processor), the job is a Ray Data dataset::

    from_items(shard tasks) -> flat_map(read shard: samples + end marker)
      -> for each stage: map_batches(callable class = actor pool; batch_size, concurrency, num_gpus
         from the stage's config, fractional GPUs allowed)
      -> driver: gather each shard's items as they stream out, commit it with the shared writer

- ``cfg.ray_address`` None: ``ray.init()`` on this machine (reusing a session already started in
  this process); ``"auto"`` or ``"ray://host:10001"``: join that cluster, whose workers must have
  vesl installed (see the Dockerfile and docs/cluster.md).
- Actor pools: a stage's ``concurrency`` config sets its pool size; stages without one use
  ``--workers``. A GPU stage always has its own pool (``num_gpus`` per actor, fractions allowed);
  consecutive CPU-only stages with equal pool sizes share one pool, the way Ray Data fuses
  consecutive maps. Each actor asks for one CPU, less on a small machine so that every pool and the
  read/write tasks fit at once (a pool that cannot start would stall the stream).
- A row is one read batch of one shard (pickled Samples), formed and split per stage exactly as the
  local engine does, so a shard's output never depends on which other samples Ray batched it with
  (see ``distributed.py``); the decoded image travels between stage pools and is dropped after the
  last stage. The driver groups the last stage's rows by shard and commits each shard as soon as
  its end marker and all its samples have arrived, so shards commit progressively and an interrupted
  job loses only the shards in flight. (A ``groupby().map_groups()`` shuffle would keep the writes on
  the workers but commit nothing before the whole job is done, and its shuffle actors cost more than
  the labeling on small jobs.) The output bytes pass through the driver: run it near the output store.
- A stage that describes itself as a vLLM chat model (the ``vllm:<model>`` captioner, with the ``vllm``
  extra) is placed as a ``ray.data.llm`` processor, one row per sample (``ray_llm.py``). vLLM batches
  continuously, so that path is not byte-comparable with the local engine.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from vesl.errors import UserError
from vesl.pipeline.apply import teardown_stages
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.engines.distributed import (
    ShardEnd,
    StageRunner,
    StagesFactory,
    dumps,
    loads,
    read_items,
    write_items,
)
from vesl.pipeline.engines.local import process_tasks, setup_stages
from vesl.pipeline.engines.ray_llm import offers_llm_processor, place_llm_processor
from vesl.pipeline.engines.runtime_logs import quiet_runtime_logs
from vesl.pipeline.job import Job, finish, plan, read_batch_size, stopped
from vesl.pipeline.wiring import build_stages
from vesl.schemas.dataset import read_stats

log = logging.getLogger(__name__)
MAX_PENDING_WRITES = 2
MAX_SHARD_ATTEMPTS = 3  # tries per shard when its actor dies (one-pool layout)


def _read_rows(row: dict[str, Any], cfg: LabelConfig, batch_size: int) -> list[dict[str, Any]]:
    task = loads(row["task"])
    return [{"shard": task.name, "item": dumps(item)} for item in read_items(task, cfg, batch_size)]


class _StageActor:
    """The stages at ``positions`` (usually one), built and set up once per actor, called on batches of rows,
    torn down when the actor exits."""

    def __init__(self, cfg: LabelConfig, factory: StagesFactory, positions: list[int], last: int) -> None:
        self.runners = [StageRunner(cfg, factory, p, p == last).setup().acquire() for p in positions]

    def __del__(self) -> None:
        # Ray Data drops the UDF when the actor exits gracefully (the pool's end): the stages' teardown.
        for runner in getattr(self, "runners", []):
            runner.release()

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        items = [loads(b) for b in batch["item"]]
        for runner in self.runners:
            runner(items)
        out = np.empty(len(items), dtype=object)
        out[:] = [dumps(x) for x in items]
        return {"shard": batch["shard"], "item": out}


class _ShardActor:
    """Every stage in one actor (placed with ``ray.remote``): reads, labels and commits whole shards with the local
    engine's shard loop, and returns only each shard's result (no sample crosses a process)."""

    def __init__(self, cfg: LabelConfig, factory: StagesFactory, run_id: str) -> None:
        self.cfg, self.timings = cfg, {"engine": "ray", "run_id": run_id}
        self.stages, self.provenance = setup_stages(cfg, factory)

    def label(self, tasks: list) -> Iterator[dict[str, Any]]:
        """Several shards per call, so the next shard's read and this one's commit overlap the labeling (as in
        the local engine); each shard's result streams out as soon as it is committed."""
        yield from process_tasks(self.cfg, self.stages, self.provenance, tasks, extra_timings=self.timings)

    def close(self) -> None:
        teardown_stages(self.stages)
        self.stages = []


class _ShardCollector:
    """Driver side: gathers each shard's items as they stream out of the last stage and commits a
    shard (in a writer thread) as soon as its end marker and all of its samples have arrived."""

    def __init__(self, cfg: LabelConfig, run_id: str, total: int, t0: float, progress: bool) -> None:
        self.cfg, self.run_id, self.total, self.t0, self.progress = cfg, run_id, total, t0, progress
        self.open: dict[str, list[Any]] = {}
        self.counts: dict[str, int] = {}
        self.ends: dict[str, ShardEnd] = {}
        self.closed: set[str] = set()
        self.pending: list[tuple[str, Future]] = []
        self.results: list[dict[str, Any]] = []
        self.images = self.errors = 0
        self.stopped = False  # a shard hit an infrastructure failure: the job starts no more shards
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="vesl-ray-write")

    def add(self, name: str, item: Any) -> None:
        if name in self.closed:
            return  # a sample of a shard whose read failed: the shard is redone on rerun
        failed = stopped(name, item) if isinstance(item, list) else None
        if failed is not None:  # the job stops at the first batch hit by an infrastructure failure
            self.closed.add(name)
            self.open.pop(name, None)
            self.record(failed)
            return
        self.open.setdefault(name, []).append(item)
        if isinstance(item, ShardEnd):
            self.ends[name] = item
        else:
            self.counts[name] = self.counts.get(name, 0) + len(item)
        end = self.ends.get(name)
        if end is not None and (end.error is not None or self.counts.get(name, 0) == end.count):
            self.closed.add(name)
            items = self.open.pop(name)
            del self.ends[name]
            self.counts.pop(name, None)
            self.pending.append((name, self.pool.submit(write_items, self.cfg, name, items, "ray", self.run_id)))
        while len(self.pending) > MAX_PENDING_WRITES:  # back-pressure: don't hold many finished shards in memory
            self._collect_one()
        self._collect(block=False)

    def _collect(self, block: bool) -> None:
        while self.pending and (block or self.pending[0][1].done()):
            self._collect_one()

    def _collect_one(self) -> None:
        name, fut = self.pending.pop(0)
        try:
            result = fut.result()
        except Exception as exc:  # e.g. the output filesystem failed: the shard stays uncommitted
            result = {"shard": name, "ok": False, "error": f"write failed: {type(exc).__name__}: {exc}"}
        self.record(result)

    def record(self, result: dict[str, Any]) -> None:
        """A shard's outcome (committed here, or by a shard actor)."""
        self.results.append(result)
        self.stopped = self.stopped or bool(result.get("stop"))
        if result["ok"]:
            self.images += result["stats"]["input_count"]
            self.errors += result["stats"]["errors"]
        else:
            log.warning("vesl ray: shard %s not committed: %s", result["shard"], result["error"])
        if self.progress:
            dt = max(time.perf_counter() - self.t0, 1e-9)
            print(
                f"vesl ray: {len(self.results)}/{self.total} shards, {self.images} images "
                f"({self.images / dt:.1f}/s), {self.errors} errors",
                file=sys.stderr,
            )

    def close(self) -> list[dict[str, Any]]:
        self._collect(block=True)
        self.pool.shutdown(wait=True)
        if not self.stopped:  # (a stopped job leaves its open shards to the summary: not finished)
            for name, items in self.open.items():  # never completed: should not happen; reported, not written
                self.results.append({"shard": name, "ok": False, "error": f"only {len(items)} items arrived; rerun to resume"})
        return self.results


def _run_shard_actors(cfg: LabelConfig, tasks: list, factory: StagesFactory, run_id: str, size: int,
                      collector: _ShardCollector) -> None:
    """The one-pool layout: ``size`` shard actors, each given a few shards per call until none are left.

    Plain Ray actors, not a Ray Data pool: the work is already one call per group of shards, and a first job in
    a process started 4-5 s sooner without Ray Data's executor and helper actors (measured on 2 cores). An
    actor that dies (out of memory, a lost node, a poison input) is replaced; the shards of its call that it had
    committed count as done, the others go to the queue again one per call, up to ``MAX_SHARD_ATTEMPTS`` tries
    each; then they are reported and a rerun resumes them.
    """
    import ray
    from ray.exceptions import RayActorError, RayError

    remote = ray.remote(_ShardActor).options(num_cpus=_cpus_per_slot(size), max_restarts=0)
    per = _shards_per_call(len(tasks), size)
    todo = deque(tasks[i : i + per] for i in range(0, len(tasks), per))
    tries: dict[str, int] = {}
    idle = [remote.remote(cfg, factory, run_id) for _ in range(min(size, len(todo)))]
    running: dict[Any, tuple[Any, list, set[str]]] = {}  # streaming call -> (actor, its shards, those reported)
    try:
        while todo or running:
            while idle and todo:
                actor, group = idle.pop(), todo.popleft()
                running[actor.label.options(num_returns="streaming").remote(group)] = (actor, group, set())
            (call,), _ = ray.wait(list(running), num_returns=1)
            actor, group, reported = running[call]
            try:
                result = ray.get(next(call))
            except StopIteration:
                del running[call]
                idle.append(actor)
                continue
            except RayActorError as exc:
                if getattr(exc, "_actor_init_failed", False):
                    raise
                del running[call]
                rest = _record_committed(cfg, [t for t in group if t.name not in reported], run_id, collector)
                for t in rest:
                    tries[t.name] = tries.get(t.name, 1) + 1
                again = [t for t in rest if tries[t.name] <= MAX_SHARD_ATTEMPTS]
                for t in rest:
                    if tries[t.name] > MAX_SHARD_ATTEMPTS:
                        collector.record({"shard": t.name, "ok": False, "error": f"worker died {MAX_SHARD_ATTEMPTS} "
                                          f"times ({type(exc).__name__}); rerun to resume"})
                log.warning("vesl ray: a shard actor died (%s); %d shard(s) go to a new actor", type(exc).__name__,
                            len(again))
                ray.kill(actor)
                todo.extendleft([t] for t in reversed(again))  # one shard per call now: a poison shard dies alone
                if todo:  # a replacement, so the pool keeps its size while work is left
                    idle.append(remote.remote(cfg, factory, run_id))
                continue
            reported.add(result["shard"])
            collector.record(result)
            if collector.stopped:  # an infrastructure failure: no more shards; those in flight are dropped
                for actor, group, done in running.values():
                    _record_committed(cfg, [t for t in group if t.name not in done], run_id, collector)
                    ray.kill(actor)
                running.clear()
                todo.clear()
        try:  # the stages' teardown, then the processes go; every shard is already committed or reported
            ray.get([a.close.remote() for a in idle], timeout=120)
        except RayError as exc:  # a timeout or an actor lost after its last shard
            log.warning("vesl ray: a shard actor's teardown failed (%s: %s)", type(exc).__name__, exc)
    finally:
        for actor in idle + [a for a, _, _ in running.values()]:
            ray.kill(actor)


def _record_committed(cfg: LabelConfig, tasks: list, run_id: str, collector: _ShardCollector) -> list:
    """Record the shards of ``tasks`` that this run committed but a lost call never reported; returns the others."""
    rest = []
    for t in tasks:
        stats = read_stats(cfg.output, t.name)
        if stats is not None and stats.get("timings", {}).get("run_id") == run_id:
            collector.record({"shard": t.name, "ok": True, "stats": stats})
        else:
            rest.append(t)
    return rest


def _init_ray(cfg: LabelConfig) -> bool:
    """Start or join Ray; returns True if this call started it (and so should stop it)."""
    import ray
    import ray.data

    level = quiet_runtime_logs("ray")
    for handler in logging.getLogger("ray.data").handlers:  # its console; the session log file keeps INFO
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(level)
    if ray.is_initialized():
        return False
    if cfg.ray_address:
        try:
            ray.init(address=cfg.ray_address, logging_level=level)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UserError(f"cannot join the Ray cluster at {cfg.ray_address!r} ({exc}): check --ray-address") from None
    else:
        ray.init(include_dashboard=False, logging_level=level)
    return True


def _cpus_per_slot(slots: int) -> float:
    """One CPU per actor/task, less when the cluster is smaller than the pipeline, so all fit at once."""
    import ray

    total = float(ray.cluster_resources().get("CPU", 1.0))
    return min(1.0, math.floor(100 * total / max(1, slots)) / 100) or 0.01


def _pool_groups(stages: list, pools: list[int]) -> list[list[int]]:
    """Stage positions per actor pool: each GPU stage (and a stage offering its own Ray processor) gets its
    own pool; consecutive CPU-only stages with the same pool size share one, as Ray Data fuses consecutive
    maps, so decoded images don't cross processes between them and no process is spent per stage."""
    groups: list[list[int]] = []
    for i, stage in enumerate(stages):
        alone = stage.resources.num_gpus > 0 or offers_llm_processor(stage)
        prev = groups[-1][-1] if groups else None
        if (
            prev is not None
            and not alone
            and stages[prev].resources.num_gpus == 0
            and not offers_llm_processor(stages[prev])
            and pools[prev] == pools[i]
        ):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _concurrency(stage_concurrency: int, workers: int) -> int:
    return stage_concurrency if stage_concurrency > 1 else max(1, workers)


def _stage_pools(stages: list, workers: int) -> list[int]:
    """Each stage's actor-pool size."""
    return [_concurrency(s.resources.concurrency, workers) for s in stages]


def _fits_one_pool(stages: list, groups: list) -> bool:
    """Whether the shard-actor layout applies: every stage in one pool, and no stage bringing its own processor."""
    return len(groups) == 1 and not offers_llm_processor(stages[0])


def _cause(exc: BaseException) -> BaseException:
    """The user's error inside a Ray task/actor error, if there is one."""
    seen = exc
    for _ in range(10):
        # an actor whose constructor raised holds that RayTaskError as its first argument, not as a cause
        wrapped = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        inner = getattr(seen, "cause", None) or seen.__cause__ or wrapped
        if inner is None or inner is seen:
            break
        seen = inner
        if isinstance(seen, UserError):
            return seen
    return exc


def _shards_per_call(shards: int, actors: int) -> int:
    """Shard tasks per actor call: enough to pipeline reads and commits with the labeling, few enough (about
    four calls per actor) that the actors stay balanced when shards differ in size; at most 16."""
    return max(1, min(16, shards // (4 * actors)))


def build_dataset(cfg: LabelConfig, tasks: list, factory: StagesFactory, stages: list, pools: list[int],
                  groups: list[list[int]]):
    """The split-pool labeling dataset (lazy), rows ``{shard, item}`` after the last stage, in no particular order."""
    import ray

    cpu = _cpus_per_slot(sum(pools[g[0]] for g in groups) + 1)  # + the reader tasks
    ds = ray.data.from_items([{"task": dumps(t)} for t in tasks], override_num_blocks=max(1, len(tasks)))
    ds = ds.flat_map(_read_rows, fn_kwargs={"cfg": cfg, "batch_size": read_batch_size(cfg, stages)}, num_cpus=cpu)
    last = len(stages) - 1
    for group in groups:
        first = stages[group[0]]
        placed = place_llm_processor(ds, first) if offers_llm_processor(first) else None
        if placed is not None:
            ds = placed
            continue
        ds = ds.map_batches(
            _StageActor,
            fn_constructor_args=(cfg, factory, group, last),
            batch_size=1,  # one row = one read batch of a shard, split per stage like the local engine
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=pools[group[0]]),
            num_gpus=first.resources.num_gpus or None,
            num_cpus=cpu,
        )
    return ds


def run_ray(cfg: LabelConfig, stages_factory: StagesFactory = build_stages, progress: bool = True) -> dict[str, Any]:
    """Label every planned shard of ``cfg`` with Ray, then write the manifest; returns a summary."""
    job = plan(cfg, "ray")
    results = _run_job(job, stages_factory, progress) if job.todo else []
    return finish(job, results, max(1, cfg.workers))


def _run_job(job: Job, stages_factory: StagesFactory, progress: bool) -> list[dict[str, Any]]:
    """Every shard's result; shards already complete still commit when the job fails."""
    import ray

    cfg = job.cfg
    started = _init_ray(cfg)
    ctx = ray.data.DataContext.get_current()
    saved = ctx.enable_progress_bars
    ctx.enable_progress_bars = progress
    collector = _ShardCollector(cfg, job.run_id, len(job.todo), job.started, progress)
    try:
        stages = stages_factory(cfg)  # built, not set up: only names and resources are read here
        pools = _stage_pools(stages, cfg.workers)
        groups = _pool_groups(stages, pools)
        if _fits_one_pool(stages, groups):
            _run_shard_actors(cfg, job.todo, stages_factory, job.run_id, pools[0], collector)
        else:
            ds = build_dataset(cfg, job.todo, stages_factory, stages, pools, groups)
            for batch in ds.iter_batches(batch_format="numpy", batch_size=None):
                for name, data in zip(batch["shard"], batch["item"], strict=True):
                    collector.add(str(name), loads(data))
                if collector.stopped:
                    break
    except Exception as exc:
        cause = _cause(exc)
        if isinstance(cause, UserError):
            raise UserError(str(cause)) from None
        raise
    finally:
        results = collector.close()
        ctx.enable_progress_bars = saved
        if started:
            ray.shutdown()
    return results

