"""The one job API every engine calls, and what it rests on: planning, resume checks, provenance, commit.

Every engine (local, Beam, Ray) walks a job the same way, in one direction::

    plan(cfg, engine) -> Job                        which shards to (re)do; the output readied
      per worker: setup_stage(cfg, stage)          each stage set up once, its provenance recorded
      per shard:  read -> run_stage (each batch through each stage) -> stopped? -> commit
    finish(job, results, workers) -> summary        the manifest, then the run summary

No engine reaches the writer itself: ``commit`` writes a shard, ``finish`` the manifest.

``--limit N`` keeps the first N samples of the input in shard order (shards sorted as
``list_shards`` returns them, samples in their order inside each shard). Shards after the cut are
not part of the job; the shard where the cut falls is written truncated and its stats record
``sample_limit``, so a later run with another (or no) limit redoes exactly that shard.

Longer than 400 lines on purpose: it is the one contract every engine follows (plan, resume checks,
provenance, commit), kept in one file so the engines cannot drift apart.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import posixpath
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vesl import __version__
from vesl.errors import UserError
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.confine import JOB_FILE, check_not_input, check_output_dir, input_roots
from vesl.redact import redact
from vesl.schemas.config import row_settings
from vesl.schemas.dataset import read_stats
from vesl.schemas.region_text import SCHEMA_VERSION

if TYPE_CHECKING:
    from collections.abc import Iterator

    from vesl.pipeline.sources import ShardRef
    from vesl.schemas.stage import Sample, Stage


@dataclass(frozen=True)
class ShardTask:
    """One input shard to label; ``limit`` caps how many of its samples are read (None = all)."""

    ref: ShardRef
    limit: int | None = None

    @property
    def name(self) -> str:
        return self.ref.name


def check_job(cfg: LabelConfig) -> None:
    """Raise a one-line UserError for a job that cannot run (before any work is done)."""
    if not cfg.inputs:
        raise UserError("no inputs: pass one or more INPUT paths/globs (or `inputs:` in the --config file)")
    if not cfg.output:
        raise UserError("no output: pass --output DIR (or `output:` in the --config file)")
    if cfg.workers < 1:
        raise UserError(f"--workers must be >= 1, got {cfg.workers}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit must be >= 1, got {cfg.limit}")
    if "://" not in cfg.output:
        check_output_dir(cfg.output, "--output")


def _count(ref: ShardRef, cfg: LabelConfig, at_most: int) -> int:
    from vesl.errors import first_line
    from vesl.pipeline.sources import read_shard

    try:
        return sum(1 for _ in itertools.islice(read_shard(ref, cfg.source), at_most))
    except UserError:
        raise
    except Exception as exc:
        raise UserError(
            f"input {ref.source} cannot be read to place the --limit cut ({type(exc).__name__}: {first_line(exc, 200)}); "
            "fix or remove it, or run without --limit (a corrupt shard then fails alone)"
        ) from None


def shard_caps(refs: list[ShardRef], cfg: LabelConfig) -> dict[str, int | None]:
    """For ``--limit``: shard name -> sample cap (None = whole shard) for the shards inside the cut.

    Counts come from the stats of committed full shards, else from reading the shard (only the
    shards up to the cut are read).
    """
    assert cfg.limit is not None
    remaining, caps = cfg.limit, {}
    for ref in refs:
        if remaining <= 0:
            break
        stats = read_stats(cfg.output, ref.name)
        if stats is not None and stats.get("sample_limit") is None:
            n = stats["input_count"]
        else:
            n = _count(ref, cfg, remaining + 1)
        if n > remaining:
            caps[ref.name] = remaining
            remaining = 0
        else:
            caps[ref.name] = None
            remaining -= n
    return caps


def plan_shards(cfg: LabelConfig) -> tuple[list[ShardTask], list[ShardRef]]:
    """(shards to label, committed shards skipped). A committed shard is redone only with
    ``cfg.overwrite`` or when its ``--limit`` cut differs from this job's."""
    from vesl.pipeline.dedup import resolve_duplicates
    from vesl.pipeline.sources import list_shards

    check_job(cfg)
    resolve_duplicates(cfg)
    refs = list_shards(list(cfg.inputs), cfg.source)
    if not refs:
        raise UserError(f"no input shards found in {cfg.inputs}: check the paths (tar, parquet, image folder, synth://)")
    unlabeled = next((r for r in refs if r.kind != "vesl"), None)
    if cfg.captioner.spec.strip().lower() == "keep" and unlabeled is not None:
        raise UserError(
            f"--captioner keep reuses the captions of a labeled vesl dataset, and {unlabeled.source} is not one "
            "(no .stats.json beside it): give the --output directory of an earlier `vesl label`, or a captioner"
        )
    seen: dict[str, str] = {}
    for ref in refs:
        if ref.name in seen:
            raise UserError(
                f"inputs {seen[ref.name]} and {ref.uri} both map to output shard {ref.name}: "
                "label them into separate --output directories"
            )
        seen[ref.name] = ref.uri
    check_not_input(cfg, refs)
    caps = shard_caps(refs, cfg) if cfg.limit is not None else None
    todo: list[ShardTask] = []
    skipped: list[ShardRef] = []
    checked: set[str] = set()
    for ref in refs:
        if caps is not None and ref.name not in caps:
            continue  # after the --limit cut
        cap = caps[ref.name] if caps is not None else None
        stats = None if cfg.overwrite else read_stats(cfg.output, ref.name)
        if stats is not None and stats.get("sample_limit") == cap and shard_intact(cfg.output, stats):
            if stats.get("provenance_sha256") not in checked:  # one footer read per distinct provenance
                check_same_settings(cfg, stats)
                checked.add(stats.get("provenance_sha256"))
            skipped.append(ref)
        else:
            todo.append(ShardTask(ref, cap))
    if not cfg.overwrite:
        check_same_paths(cfg)
    return todo, skipped


def shard_intact(out_dir: str, stats: dict[str, Any]) -> bool:
    """Whether the committed files still hold the bytes their stats describe (size and sha256).

    A shard changed after its commit (a second writer, a copy gone wrong) is redone by the rerun.
    """
    import fsspec

    files = stats.get("files")
    if not isinstance(files, dict) or not files:
        return False
    fs, root = fsspec.core.url_to_fs(str(out_dir))
    for meta in files.values():
        path = f"{root.rstrip('/')}/{meta.get('name')}"
        try:
            if fs.size(path) != meta.get("bytes"):
                return False
            h = hashlib.sha256()
            with fs.open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except (OSError, TypeError):
            return False
        if h.hexdigest() != meta.get("sha256"):
            return False
    return True


_NOT_COMPARED = ("vesl_version", "stages")  # versions and resolved model revisions may move; settings may not


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def settings_difference(stored: dict[str, Any], current: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """(setting, stored value, current value) for every setting that differs, sorted by name."""
    missing = object()
    a = _flat({k: v for k, v in stored.items() if k not in _NOT_COMPARED})
    b = _flat(json.loads(json.dumps({k: v for k, v in current.items() if k not in _NOT_COMPARED})))
    return [(k, a.get(k, missing), b.get(k, missing)) for k in sorted(a.keys() | b.keys()) if a.get(k, missing) != b.get(k, missing)]


def _differs(cfg: LabelConfig, diffs: list[tuple[str, Any, Any]]) -> UserError:
    key, old, new = diffs[0]
    show = lambda v: "(unset)" if not isinstance(v, (str, int, float, bool, list, type(None))) else repr(v)  # noqa: E731
    more = f" (and {len(diffs) - 1} more setting(s))" if len(diffs) > 1 else ""
    return UserError(
        f"{cfg.output} was labeled with other settings: {key} is {show(old)} there, {show(new)} in this job{more}; "
        "rerun with the same settings to resume, pass --overwrite to relabel, or pick a new --output"
    )


def check_same_settings(cfg: LabelConfig, stats: dict[str, Any]) -> None:
    """A resume must run the job that wrote the committed shards: refuse, naming the first difference."""
    from vesl.schemas.dataset import read_shard_provenance

    try:
        stored = read_shard_provenance(cfg.output, stats["files"]["parquet"]["name"])
    except Exception:
        return
    diffs = settings_difference(stored, job_settings(cfg))
    if diffs:
        raise _differs(cfg, diffs)


def _private_settings(cfg: LabelConfig) -> dict[str, Any]:
    """What the hidden job file keeps: every text setting as the user wrote it (local paths included,
    credentials redacted) under its dotted name, and the input roots."""
    text = {k: redact(v) for k, v in _flat(row_settings(cfg)).items() if isinstance(v, str) and k != "captioner.prompt_template"}
    return {**text, "input_roots": input_roots(cfg.inputs)}


def check_same_paths(cfg: LabelConfig) -> None:
    """Text settings as the user wrote them (model paths included) must match the last job's: the
    public provenance keeps only a local path's name. Only the settings the job file holds are compared."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(str(cfg.output))
    try:
        with fs.open(f"{root.rstrip('/')}/{JOB_FILE}", "rb") as f:
            stored = json.loads(f.read())
    except (OSError, ValueError):
        return
    if not isinstance(stored, dict) or not committed_any(cfg.output):
        return
    current = _private_settings(cfg)
    compared = [k for k in stored if k != "input_roots"]
    diffs = settings_difference({k: stored[k] for k in compared}, {k: current.get(k) for k in compared})
    if diffs:
        raise _differs(cfg, diffs)


def committed_any(out_dir: str) -> bool:
    from vesl.schemas.dataset import committed_shards

    return bool(committed_shards(out_dir))


def write_job_file(cfg: LabelConfig) -> None:
    from vesl.pipeline.writer import atomic_write_bytes

    data = (json.dumps(_private_settings(cfg), sort_keys=True, indent=2) + "\n").encode()
    atomic_write_bytes(cfg.output, JOB_FILE, data)


def redact_spec(spec: str) -> str:
    """A model spec without credentials (``openai:https://user:key@host?api_key=...#m``)."""
    return redact(spec)


def public_spec(spec: str) -> str:
    """A model spec as published: no credentials, and a local model directory by its name only
    (``hf:/home/me/models/captioner`` -> ``hf:captioner``), so the data never shows the file system."""
    spec = redact(spec)
    backend, sep, target = spec.partition(":")
    return f"{backend}:{_public_text(target)}" if sep and target else spec


def _is_local_path(value: str) -> bool:
    return os.path.isabs(value) or value.startswith(("./", "../", "~")) or os.path.exists(value)


def _public_text(value: str) -> str:
    """A text setting as published: no credentials, and a local path by its name only."""
    value = redact(value)
    if "://" not in value and _is_local_path(value):
        return posixpath.basename(value.rstrip("/")) or value
    return value


def _public_value(value: Any) -> Any:
    if isinstance(value, str) and "://" not in value and os.path.isabs(value):
        return posixpath.basename(value.rstrip("/")) or value
    return redact(value) if isinstance(value, str) else value


def _short_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def job_provenance(cfg: LabelConfig, stages: list[Stage] | Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """What produced the data: written into every shard's metadata. ``stages``: the stages, or each
    stage's provenance by name as ``setup_stage`` recorded it in its worker.

    Only settings that change the output are included (no batch sizes, devices or concurrency), so
    the same job run on another engine or machine writes byte-identical shards. Local paths appear
    by name only and credentials never (see ``public_spec``).
    """
    if not isinstance(stages, Mapping):
        stages = {s.name: stage_provenance(s) for s in stages}
    stage_prov = {name: {k: _public_value(v) for k, v in prov.items()} for name, prov in stages.items()}
    return {"vesl_version": __version__, **job_settings(cfg), "stages": stage_prov}


def stage_provenance(stage: Stage) -> dict[str, Any]:
    """What a stage reports about itself (model ids, revisions, thresholds), once it is set up."""
    fn = getattr(stage, "provenance", None)
    return {str(k): v for k, v in (fn() if callable(fn) else {}).items()}


def job_settings(cfg: LabelConfig) -> dict[str, Any]:
    """The settings part of the provenance, what a resume must match: every row-changing field of the
    config (``row_settings``: all but those marked ``NOT_IN_ROWS``), in its published form."""
    return {"schema_version": SCHEMA_VERSION, **_published(row_settings(cfg))}


def _published(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings as the data shows them: model specs by ``public_spec``, the prompt by its hash, and any
    other text without credentials and a local path by its name."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if isinstance(value, dict):
            out[key] = _published(value)
        elif key == "spec":
            out[key] = public_spec(value)
        elif key == "prompt_template":
            out["prompt_template_sha256"] = _short_hash(value)
        elif isinstance(value, list):
            out[key] = [_public_text(v) if isinstance(v, str) else v for v in value]
        else:
            out[key] = _public_text(value) if isinstance(value, str) else value
    return out


# ---------------------------------------------------------------- the job API every engine calls (see the top)
#
# A result is ``{"shard", "ok": True, "stats"}`` or ``{"shard", "ok": False, "error"}``, with ``"stop": True``
# when the shard hit an infrastructure failure: the engine then starts no more shards.


@dataclass
class Job:
    """A planned job: the shards to label and those already committed, for the driver (never sent to workers)."""

    cfg: LabelConfig
    engine: str
    todo: list[ShardTask]
    skipped: list[ShardRef]
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    started: float = field(default_factory=time.perf_counter)


def plan(cfg: LabelConfig, engine: str) -> Job:
    """Plan the shards and ready the output directory (leftover temp files of a killed run removed)."""
    from vesl.pipeline.writer import clean_temp_files

    started = time.perf_counter()
    todo, skipped = plan_shards(cfg)
    if "://" not in cfg.output:
        os.makedirs(cfg.output, exist_ok=True)
    clean_temp_files(cfg.output)
    if todo:
        write_job_file(cfg)
    return Job(cfg, engine, todo, skipped, started=started)


def setup_stage(cfg: LabelConfig, stage: Stage) -> dict[str, Any]:
    """Set ``stage`` up in this worker with the job's numerics; returns its provenance, recorded after setup."""
    stage.setup()
    apply_stage_numerics(cfg)
    return stage_provenance(stage)


# torch's thread count in this process before a stage first pinned it (its default, if the caller never set one)
_threads_before_stages: list[int] = []


def apply_stage_numerics(cfg: LabelConfig) -> None:
    """Give this worker the job's numerical set-up, after ``setup()`` of its stages.

    Torch's intra-op thread count decides how CPU kernels split their float sums, and each engine's
    workers would otherwise inherit a different one (the local process: one per core; Ray actors: one;
    spawned workers: what their parent chose). Stages that never imported torch need nothing.
    """
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.get_num_threads() != cfg.stage_threads:
        if not _threads_before_stages:
            _threads_before_stages.append(torch.get_num_threads())
        torch.set_num_threads(cfg.stage_threads)


@contextmanager
def caller_numerics() -> Iterator[None]:
    """Hand the caller its torch thread count back after a job that ran stages in its process. Why:
    ``apply_stage_numerics`` pins the count for the stages, and a Python caller that trains next (a notebook,
    ``vesl demo --full``) would otherwise train on one thread."""
    import sys

    torch = sys.modules.get("torch")
    before = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        torch = sys.modules.get("torch")
        if before is None and _threads_before_stages:
            before = _threads_before_stages[0]
        if torch is not None and before is not None and torch.get_num_threads() != before:
            torch.set_num_threads(before)


def read_batch_size(cfg: LabelConfig, stages: list[Stage]) -> int:
    """Samples per batch, formed inside one shard by every engine.

    As large as the largest stage batch so no model runs on half-empty batches; engines never mix
    shards in a batch because batched VLM decoding is not bit-exact across batch contents.
    """
    from vesl.pipeline.apply import stage_batch_size

    return max(1, cfg.decode.batch_size, *(stage_batch_size(s) for s in stages))


def read_task(task: ShardTask, cfg: LabelConfig) -> Iterator[Sample]:
    """The samples of one task in shard order, cut at ``task.limit``."""
    from vesl.pipeline.dedup import mark_duplicates
    from vesl.pipeline.sources import read_shard

    return mark_duplicates(cfg, itertools.islice(read_shard(task.ref, cfg.source), task.limit))


def read(cfg: LabelConfig, task: ShardTask, batch_size: int) -> Iterator[list[Sample]]:
    """The samples of one task in read batches of ``batch_size``: what every engine reads. A shard
    that cannot be read raises; the engine reports it with ``read_failed``."""
    samples = read_task(task, cfg)
    while batch := list(itertools.islice(samples, batch_size)):
        yield batch


def read_failed(task: ShardTask, exc: BaseException) -> dict[str, Any]:
    """The result of a shard whose input cannot be read: left uncommitted, retried on rerun."""
    return {"shard": task.name, "ok": False, "error": f"cannot read {task.ref.uri}: {type(exc).__name__}: {exc}"}


def run_stage(stage: Stage, batch: list[Sample], first: bool) -> float:
    """Run one stage on a read batch as every engine does; returns the seconds it took.

    The first stage (decode) sees the whole read batch; later stages see its ok samples in chunks of
    their own batch size, so batched model calls see the same batches on every engine.
    """
    from vesl.pipeline.apply import apply_stage, apply_stage_chunked

    t = time.perf_counter()
    (apply_stage if first else apply_stage_chunked)(stage, batch)
    return time.perf_counter() - t


def stopped(name: str, samples: list[Sample]) -> dict[str, Any] | None:
    """The failed result of shard ``name`` if ``samples`` hit an infrastructure failure, else None.

    Engines check every batch: the service or device is down, so the job stops rather than fail every
    remaining shard the same way (a rerun retries them all).
    """
    from vesl.schemas.stage import infrastructure_failure

    broken = infrastructure_failure(samples)
    if broken is None:
        return None
    n = sum(1 for s in samples if s.error is not None and s.error.infrastructure)
    error = (f"{n} sample(s) hit an infrastructure failure in stage {broken.stage} ({broken.error_type}: "
             f"{broken.message[:300]}); not committed: fix the service or device, then rerun to retry")
    return {"shard": name, "ok": False, "error": error, "stop": True}


def commit(
    cfg: LabelConfig,
    task: ShardTask,
    samples: list[Sample],
    provenance: dict[str, Any],
    timings: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write and commit the output shard of ``task`` from all its processed samples (any order).

    The one call every engine makes per shard, so engines write byte-identical files. A shard with an
    infrastructure failure is never committed (a ``stop`` result); a failed write leaves it uncommitted.
    """
    from vesl.pipeline.config import DedupConfig
    from vesl.pipeline.dedup import write_hash_shard
    from vesl.pipeline.writer import write_shard

    failed = stopped(task.name, samples)
    if failed is not None:
        return failed
    try:
        if isinstance(cfg, DedupConfig):
            stats = write_hash_shard(cfg, task.name, task.ref.source, samples, provenance, timings, task.limit)
        else:
            samples, extra = _duplicate_rows(cfg, samples)
            stats = write_shard(cfg.output, task.name, task.ref.source, samples, provenance, timings,
                                keep_image_bytes=cfg.decode.keep_image_bytes, sample_limit=task.limit, extra_stats=extra)
    except Exception as exc:  # e.g. the output filesystem failed: the shard stays uncommitted
        return {"shard": task.name, "ok": False, "error": f"write failed: {type(exc).__name__}: {exc}"}
    return {"shard": task.name, "ok": True, "stats": stats}


def _duplicate_rows(cfg: LabelConfig, samples: list[Sample]) -> tuple[list[Sample], dict[str, Any] | None]:
    """``--duplicates``: a duplicate's row waits for its representative's labels (``duplicates_pending``, filled
    by ``finish``), or is left out with ``--duplicates-policy skip``."""
    if not cfg.duplicates.table:
        return samples, None
    dups = [s for s in samples if s.duplicate_of is not None and s.ok]
    if cfg.duplicates.policy == "skip":
        return [s for s in samples if s.duplicate_of is None], {"duplicates_skipped": len(dups)}
    return samples, {"duplicates_pending": len(dups)}


def finish(job: Job, results: list[dict[str, Any]], workers: int) -> dict[str, Any]:
    """Write the manifest of everything committed so far (a dedup job: its table); returns the run summary.

    With ``--duplicates`` (copy), the second phase runs first: every committed shard of the job whose
    duplicate rows still wait gets its representatives' labels (``fill_duplicates``).
    """
    from vesl.pipeline.config import DedupConfig
    from vesl.pipeline.writer import write_manifest
    from vesl.schemas.dataset import repeated_keys

    cfg = job.cfg
    names = sorted({t.name for t in job.todo} | {r.name for r in job.skipped})
    if isinstance(cfg, DedupConfig):
        from vesl.pipeline.dedup import TABLE_NAME, write_table

        done = {r["shard"] for r in results if r["ok"]} | {r.name for r in job.skipped}
        summary = job_summary(job, results, workers, f"{cfg.output.rstrip('/')}/{TABLE_NAME}")
        if not summary["failed"]:  # the table groups every shard, so it waits for all of them
            summary["dedup"] = write_table(cfg, [n for n in names if n in done], job.engine, summary["wall_s"])
        return summary
    if cfg.duplicates.table and cfg.duplicates.policy == "copy":
        from vesl.pipeline.dedup import fill_duplicates

        if fill_duplicates(cfg, names):  # the summary counts the filled rows' regions
            results = [{**r, "stats": read_stats(cfg.output, r["shard"]) or r["stats"]} if r["ok"] else r for r in results]
    summary = job_summary(job, results, workers, write_manifest(cfg.output))
    summary["repeated_keys"] = repeated_keys(cfg.output)  # keys are the inputs': two inputs may share them
    return summary


def job_summary(job: Job, results: list[dict[str, Any]], workers: int, manifest: Any) -> dict[str, Any]:
    """The run summary every engine returns: shards not reported are listed as not finished."""
    cfg, todo, wall = job.cfg, job.todo, time.perf_counter() - job.started
    stats = [r["stats"] for r in results if r["ok"]]
    done = {r["shard"] for r in results}
    failed = [{"shard": r["shard"], "error": r["error"]} for r in results if not r["ok"]]
    failed += [{"shard": t.name, "error": "not finished; rerun to resume"} for t in todo if t.name not in done]
    images = sum(s["input_count"] for s in stats)
    return {
        "engine": job.engine,
        "output": cfg.output,
        "workers": workers,
        "shards_planned": len(todo),
        "shards_written": len(stats),
        "shards_skipped": len(job.skipped),
        "failed": sorted(failed, key=lambda r: r["shard"]),
        "images": images,
        "rows": sum(s["rows"] for s in stats),
        "errors": sum(s["errors"] for s in stats),
        "regions": sum(s["regions"] for s in stats),
        "wall_s": round(wall, 3),
        "images_per_s": round(images / wall, 2) if wall > 0 else 0.0,
        "manifest": str(manifest),
    }
