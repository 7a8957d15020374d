"""Local engine: one machine, stages called directly, shards written by the shared writer.

Within a process, a reader thread walks the shards and hands batches to a small thread pool that
runs the first stage (decode); decoded batches wait in a bounded queue, so the model stages (run
in the main thread) never wait on IO and memory stays bounded. ``--workers N`` starts N spawned
processes that each build their stages once and pull whole shards from a shared queue.

A failure inside a stage only fails the samples that caused it (``apply_stage``); a shard whose
input cannot be read is reported and left uncommitted, so a rerun retries it.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from vesl.errors import UserError
from vesl.pipeline.apply import teardown_stages
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.job import (
    ShardTask,
    caller_numerics,
    commit,
    finish,
    job_provenance,
    plan,
    read,
    read_batch_size,
    read_failed,
    run_stage,
    setup_stage,
    stopped,
)
from vesl.pipeline.wiring import build_stages
from vesl.schemas.stage import Sample, Stage

PREFETCH_BATCHES = 4  # decoded batches waiting for the models, per process
DECODE_THREADS = 2
MAX_PENDING_WRITES = 2

StagesFactory = Callable[[LabelConfig], list[Stage]]
Report = Callable[[int, int, int], None]  # images, regions, errors


@dataclass
class _ShardState:
    task: ShardTask
    samples: list[Sample] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    seconds: dict[str, float] = field(default_factory=dict)

    def add_time(self, key: str, dt: float) -> None:
        self.seconds[key] = self.seconds.get(key, 0.0) + dt


def _timed_apply(stage: Stage, batch: list[Sample]) -> tuple[list[Sample], float]:
    return batch, run_stage(stage, batch, first=True)


def _put(q: queue.Queue, item: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.2)
            return True
        except queue.Full:
            continue
    return False


def _reader(
    cfg: LabelConfig,
    tasks: Iterable[ShardTask],
    first: Stage,
    batch_size: int,
    pool: ThreadPoolExecutor,
    q: queue.Queue,
    stop: threading.Event,
) -> None:
    try:
        for task in tasks:
            if stop.is_set():
                return
            try:
                for batch in read(cfg, task, batch_size):
                    if not _put(q, ("batch", task, pool.submit(_timed_apply, first, batch)), stop):
                        return
            except Exception as exc:  # unreadable shard: reported, left uncommitted, retried on rerun
                if not _put(q, ("fail", task, read_failed(task, exc)), stop):
                    return
                continue
            if not _put(q, ("end", task, None), stop):
                return
    except Exception as exc:  # the task iterator itself failed
        _put(q, ("abort", None, exc), stop)
        return
    _put(q, ("done", None, None), stop)


def process_tasks(
    cfg: LabelConfig,
    stages: list[Stage],
    provenance: dict[str, Any],
    tasks: Iterable[ShardTask],
    report: Report | None = None,
    extra_timings: dict[str, Any] | None = None,
) -> Iterator[dict[str, Any]]:
    """Label and commit each shard of ``tasks`` with already set-up ``stages``; yields one result per
    shard (see ``vesl.pipeline.job``), and stops after the first shard hit by an infrastructure failure.

    Also a Ray worker's loop when all stages share one actor pool (``extra_timings``: its engine and run id).
    """
    first, rest = stages[0], stages[1:]
    batch_size = read_batch_size(cfg, stages)
    q: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
    stop = threading.Event()
    decode_pool = ThreadPoolExecutor(DECODE_THREADS, thread_name_prefix="vesl-decode")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="vesl-write")
    reader = threading.Thread(
        target=_reader, args=(cfg, tasks, first, batch_size, decode_pool, q, stop), name="vesl-reader", daemon=True
    )
    reader.start()
    states: dict[str, _ShardState] = {}
    pending: list[Future] = []

    def finished(block: bool) -> Iterator[dict[str, Any]]:
        while pending and (block or pending[0].done()):
            yield pending.pop(0).result()

    def write(st: _ShardState) -> dict[str, Any]:
        t = time.perf_counter()
        timings = {k: round(v, 4) for k, v in sorted(st.seconds.items())}
        timings["wall_s"] = round(t - st.started, 4)
        timings.update(extra_timings or {})
        result = commit(cfg, st.task, st.samples, provenance, timings)
        if result["ok"]:
            result["stats"]["timings"]["write_s"] = round(time.perf_counter() - t, 4)  # in the returned copy only
        return result

    try:
        while True:
            kind, task, payload = q.get()
            if kind == "done":
                break
            if kind == "abort":
                raise payload
            st = states.get(task.name) or states.setdefault(task.name, _ShardState(task))
            if kind == "batch":
                batch, dt = payload.result()
                st.add_time(first.name, dt)
                for stage in rest:
                    st.add_time(stage.name, run_stage(stage, batch, first=False))
                for s in batch:
                    s.image = None  # never kept past the last stage
                st.samples.extend(batch)
                if report is not None:
                    ok = [s for s in batch if s.ok]
                    report(len(batch), sum(len(s.regions) for s in ok), len(batch) - len(ok))
                failed = stopped(task.name, batch)
                if failed is not None:  # the service or device is down: this shard fails and the job stops
                    del states[task.name]
                    yield failed
                    yield from finished(block=True)
                    return
            elif kind == "end":
                del states[task.name]
                while len(pending) >= MAX_PENDING_WRITES:
                    yield from finished(block=True)
                pending.append(write_pool.submit(write, st))
            elif kind == "fail":
                del states[task.name]
                yield payload
            yield from finished(block=False)
        yield from finished(block=True)
    finally:
        stop.set()
        decode_pool.shutdown(wait=False, cancel_futures=True)
        write_pool.shutdown(wait=True)
        reader.join(timeout=5)


def setup_stages(cfg: LabelConfig, stages_factory: StagesFactory) -> tuple[list[Stage], dict[str, Any]]:
    """Build and set up the stages once per worker; returns them with the job provenance."""
    stages = stages_factory(cfg)
    if not stages:
        raise UserError("the stage list is empty")
    return stages, job_provenance(cfg, {s.name: setup_stage(cfg, s) for s in stages})


class _Progress:
    """tqdm bar with images/s (the bar's rate), regions/s and errors.

    The total (hence the ETA) is counted in a background thread from the shards' cheap counts
    (``count_samples``), so a job over many shards starts at once; it stays open when one is unknown.
    """

    def __init__(self, enabled: bool, todo: list[ShardTask], source: Any) -> None:
        self.images = self.regions = self.errors = self.shards_done = 0
        self.shards = len(todo)
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=None, unit="img", desc="label", file=sys.stderr, dynamic_ncols=True)
            threading.Thread(target=self._count, args=(todo, source), name="vesl-count", daemon=True).start()

    def _count(self, todo: list[ShardTask], source: Any) -> None:
        from vesl.pipeline.sources import count_samples

        total = 0
        for t in todo:
            n = t.limit if t.limit is not None else count_samples(t.ref, source)
            if n is None:
                return
            total += n
        if self.bar is not None:
            self.bar.total = total
            self.bar.refresh()

    def update(self, images: int, regions: int, errors: int) -> None:
        self.images += images
        self.regions += regions
        self.errors += errors
        if self.bar is not None:
            self.bar.update(images)
            self._postfix()

    def shard_done(self) -> None:
        self.shards_done += 1
        if self.bar is not None:
            self._postfix()

    def _postfix(self) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        self.bar.set_postfix_str(
            f"regions/s={self.regions / dt:.1f} errors={self.errors} shards={self.shards_done}/{self.shards}",
            refresh=False,
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _exit_with_parent(parent: int) -> None:
    """A worker must not outlive a killed parent: it would keep writing while a rerun starts."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.2)
        os._exit(3)

    threading.Thread(target=watch, name="vesl-parent-watch", daemon=True).start()


def _worker_main(cfg: LabelConfig, stages_factory: StagesFactory, task_q: Any, result_q: Any, parent: int) -> None:
    pid = os.getpid()
    _exit_with_parent(parent)
    stages: list[Stage] = []
    try:
        stages, provenance = setup_stages(cfg, stages_factory)

        def report(images: int, regions: int, errors: int) -> None:
            result_q.put((pid, "progress", (images, regions, errors)))

        for result in process_tasks(cfg, stages, provenance, iter(task_q.get, None), report):
            result_q.put((pid, "shard", result))
    except BaseException as exc:
        result_q.put((pid, "fatal", (isinstance(exc, UserError), f"{type(exc).__name__}: {exc}")))
    finally:
        teardown_stages(stages)
        result_q.put((pid, "exit", None))


def _run_workers(
    cfg: LabelConfig, stages_factory: StagesFactory, todo: list[ShardTask], n: int, prog: _Progress
) -> list[dict[str, Any]]:
    ctx = mp.get_context("spawn")
    task_q, result_q = ctx.Queue(), ctx.Queue()
    for t in todo:
        task_q.put(t)
    for _ in range(n):
        task_q.put(None)
    procs = [
        ctx.Process(target=_worker_main, args=(cfg, stages_factory, task_q, result_q, os.getpid()), name=f"vesl-worker-{i}")
        for i in range(n)
    ]
    for p in procs:
        p.start()
    results: list[dict[str, Any]] = []
    exited: set[int] = set()
    crashed: list[str] = []

    def handle(msg: tuple) -> None:
        pid, kind, payload = msg
        if kind == "progress":
            prog.update(*payload)
        elif kind == "shard":
            results.append(payload)
            prog.shard_done()
            if payload.get("stop"):  # an infrastructure failure: the other workers start no more shards
                for p in procs:
                    if p.is_alive():
                        p.terminate()  # a shard in its commit is left uncommitted (the commit is atomic)
                    exited.add(p.pid)
        elif kind == "exit":
            exited.add(pid)
        elif kind == "fatal":
            for p in procs:
                if p.is_alive():
                    p.terminate()
            for p in procs:
                p.join(timeout=10)
            is_user, message = payload
            if is_user:
                raise UserError(message.split(": ", 1)[1])
            raise RuntimeError(f"a worker failed while labeling: {message}")

    try:
        while len(exited) < n:
            try:
                handle(result_q.get(timeout=1.0))
                continue
            except queue.Empty:
                pass
            for p in procs:
                if not p.is_alive() and p.pid not in exited:
                    while True:  # messages it sent before dying are still in the pipe
                        try:
                            handle(result_q.get(timeout=0.5))
                        except queue.Empty:
                            break
                    if p.pid not in exited:
                        exited.add(p.pid)
                        crashed.append(f"{p.name} died with exit code {p.exitcode}")
    finally:
        for p in procs:
            p.join(timeout=10)
    done = {r["shard"] for r in results}
    for t in todo:
        if t.name not in done:
            reason = "; ".join(crashed) or "worker stopped early"
            results.append({"shard": t.name, "ok": False, "error": f"not finished ({reason}); rerun to resume"})
    return results


def run_local(cfg: LabelConfig, stages_factory: StagesFactory = build_stages, progress: bool = True) -> dict[str, Any]:
    """Label every planned shard of ``cfg`` on this machine, then write the manifest; returns a summary."""
    job = plan(cfg, "local")
    todo = job.todo
    prog = _Progress(progress, todo, cfg.source)
    n = min(cfg.workers, len(todo))
    try:
        if n <= 1:
            results = []
            if todo:
                with caller_numerics():
                    results = _run_here(cfg, stages_factory, todo, prog)
        else:
            results = _run_workers(cfg, stages_factory, todo, n, prog)
    finally:
        prog.close()
    return finish(job, results, max(n, 1))


def _run_here(cfg: LabelConfig, stages_factory: StagesFactory, todo: list[ShardTask], prog: _Progress) -> list[dict[str, Any]]:
    """Every shard in this process, the stages set up once."""
    results = []
    stages, provenance = setup_stages(cfg, stages_factory)
    try:
        for r in process_tasks(cfg, stages, provenance, todo, prog.update):
            results.append(r)
            prog.shard_done()
    finally:
        teardown_stages(stages)
    return results
