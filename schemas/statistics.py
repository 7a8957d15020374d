"""Statistics of a labeled dataset: one pass over the rows, two summaries of it.

:class:`RegionStatistics` reads the ``caption_source`` and ``regions`` columns shard by shard
(images are never decoded) and is the only code that counts regions, phrases, scores and box areas.

- :func:`inspect_dataset` (``vesl inspect``, ``vesl demo``): the committed shards of a ``vesl label``
  output, with errors and stage timings from their stats files;
- :func:`compute_stats` (``vesl publish``'s ``card/stats.json``): every data shard of a region-text
  directory, with errors from the errors files and quantiles from fine fixed-bin histograms.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from vesl.errors import UserError, first_line
from vesl.schemas.dataset import committed_shards, data_shards, error_shards, read_stats, uncommitted_shards
from vesl.schemas.region_text import SCHEMA_VERSION

HIST_BINS = 1000  # fine fixed bins: quantiles to 0.001 with bounded memory, whatever the dataset size
STAT_COLUMNS = ["caption_source", "regions"]


@dataclass
class RegionStatistics:
    """Counts over the rows of region-text tables, added shard by shard (:meth:`add`)."""

    images: int = 0
    regions: int = 0
    per_image: list[int] = field(default_factory=list)  # regions of each image, in row order
    phrases: Counter = field(default_factory=Counter)  # in order of first appearance
    sources: Counter = field(default_factory=Counter)
    scores: list[np.ndarray] = field(default_factory=list)  # one array per shard (exact quantiles)
    score_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    area_hist: list[int] = field(default_factory=lambda: [0] * HIST_BINS)
    score_sum: float = 0.0
    area_sum: float = 0.0

    def add(self, table: pa.Table) -> None:
        """Count the rows of one shard (a table holding at least ``caption_source`` and ``regions``)."""
        self.images += table.num_rows
        self.per_image += pc.list_value_length(table["regions"]).fill_null(0).to_pylist()
        self.sources.update(table["caption_source"].to_pylist())
        regs = pc.list_flatten(table["regions"])
        if len(regs) == 0:
            return
        regs = regs.combine_chunks() if isinstance(regs, pa.ChunkedArray) else regs
        self.regions += len(regs)
        vc = pc.value_counts(regs.field("phrase"))  # values in order of first appearance
        self.phrases.update(dict(zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True)))
        scores = regs.field("score")
        self.scores.append(scores.to_numpy(zero_copy_only=False))
        _add_hist(self.score_hist, scores)
        self.score_sum += pc.sum(scores).as_py()
        box = pc.list_flatten(regs.field("box"))
        x0, y0, x1, y1 = (pc.take(box, pa.array(range(k, len(box), 4))) for k in range(4))
        area = pc.multiply(pc.subtract(x1, x0), pc.subtract(y1, y0))
        _add_hist(self.area_hist, area)
        self.area_sum += pc.sum(area).as_py()

    def all_scores(self) -> np.ndarray:
        return np.concatenate(self.scores) if self.scores else np.zeros(0)


def _hist_quantiles(counts: list[int], qs: tuple[float, ...]) -> dict[str, float | None]:
    total = sum(counts)
    out: dict[str, float | None] = {}
    for q in qs:
        if total == 0:
            out[f"p{round(q * 100)}"] = None
            continue
        target, acc = q * total, 0
        for i, c in enumerate(counts):
            acc += c
            if acc >= target and acc > 0:
                out[f"p{round(q * 100)}"] = round((i + 1) / HIST_BINS, 3)
                break
    return out


def _add_hist(counts: list[int], values: pa.Array) -> None:
    if len(values) == 0:
        return
    idx = pc.cast(pc.floor(pc.multiply(pc.cast(values, pa.float64()), HIST_BINS)), pa.int64())
    idx = pc.max_element_wise(pc.min_element_wise(idx, HIST_BINS - 1), 0)
    vc = pc.value_counts(idx)
    for v, c in zip(vc.field("values").to_pylist(), vc.field("counts").to_pylist(), strict=True):
        counts[v] += c


def _quantiles(values: Any, qs: tuple[float, ...]) -> dict[str, float]:
    import numpy as np

    if len(values) == 0:
        return {}
    return {f"p{round(q * 100)}": round(float(np.quantile(values, q)), 4) for q in qs}


def inspect_dataset(out_dir: str | Path, top: int = 15) -> dict[str, Any]:
    """Summary of a labeled dataset (committed shards only): what ``vesl inspect`` prints."""
    root = Path(out_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass the --output directory of `vesl label`")
    names = committed_shards(root)
    if not names:
        raise UserError(f"no committed shards in {root}: run `vesl label ... --output {root}` first")
    st = RegionStatistics()
    errors_by_type: Counter = Counter()
    errors_by_stage: Counter = Counter()
    errors = duplicates = 0
    dropped: int | None = None  # regions the verifier took out; None: no shard was verified
    relabeled: int | None = None  # regions it gave a phrase that had no box (verify.rule relabel)
    timings: list[dict[str, Any]] = []
    for name in names:
        try:
            stats = read_stats(root, name) or {}
            t = pq.read_table(root / stats["files"]["parquet"]["name"], columns=STAT_COLUMNS)
            stats["errors"], stats["errors_by_type"], stats["errors_by_stage"]
        except Exception as exc:
            raise UserError(
                f"{root}: shard {name} cannot be read ({type(exc).__name__}: {first_line(exc, 200)}); "
                f"`vesl validate {root}` lists the damage, rerun `vesl label` to redo it"
            ) from None
        timings.append({"images": stats.get("input_count", 0), **stats.get("timings", {})})
        st.add(t)
        duplicates += stats.get("duplicates", 0) + stats.get("duplicates_skipped", 0)
        if "verifier_dropped" in stats:
            dropped = (dropped or 0) + stats["verifier_dropped"]
        if "verifier_relabeled" in stats:
            relabeled = (relabeled or 0) + stats["verifier_relabeled"]
        errors += stats["errors"]
        errors_by_type.update(stats["errors_by_type"])
        errors_by_stage.update(stats["errors_by_stage"])
    per_image = st.per_image
    edges = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 20), (21, None)]
    hist = {}
    for lo, hi in edges:
        label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f"{lo}+")
        hist[label] = sum(1 for n in per_image if n >= lo and (hi is None or n <= hi))
    return {
        "directory": str(root),
        "shards": len(names),
        "uncommitted": uncommitted_shards(root, names),
        "rows": st.images,
        "errors": errors,
        "errors_by_type": dict(errors_by_type.most_common()),
        "errors_by_stage": dict(errors_by_stage.most_common()),
        "caption_source": dict(st.sources.most_common()),
        "regions": int(sum(per_image)),
        "regions_per_image_mean": round(float(np.mean(per_image)), 3) if per_image else 0.0,
        "regions_per_image_hist": hist,
        "score_quantiles": _quantiles(st.all_scores(), (0.0, 0.1, 0.5, 0.9, 1.0)),
        "top_phrases": st.phrases.most_common(top),
        "duplicates": duplicates,
        "verifier_dropped": dropped,
        "verifier_relabeled": relabeled,
        "cost": {**cost_report(timings), **_model_calls(timings, duplicates)},
    }


def _model_calls(shards: list[dict[str, Any]], duplicates: int) -> dict[str, Any]:
    """How the captioner and detector calls fell with ``--duplicates``: a duplicate never reaches them."""
    images = sum(s.get("images", 0) for s in shards)
    if not duplicates or not images:
        return {}
    return {"model_images": images - duplicates, "model_calls_saved": round(duplicates / images, 4)}


def compute_stats(dataset_dir: str | Path, top_k: int = 25) -> dict[str, Any]:
    """Dataset statistics for a published card: every data shard, errors from the errors files."""
    st = RegionStatistics()
    shards = data_shards(dataset_dir)
    for shard in shards:
        st.add(pq.read_table(shard, columns=STAT_COLUMNS))
    errors: Counter = Counter()
    for ef in error_shards(dataset_dir):
        et = pq.read_table(ef, columns=["stage", "error_type"])
        for stage, etype in zip(et["stage"].to_pylist(), et["error_type"].to_pylist(), strict=True):
            errors[f"{stage}/{etype}"] += 1

    per_image = Counter(st.per_image)
    n_images, n_regions, sources = st.images, st.regions, st.sources
    qs = (0.1, 0.25, 0.5, 0.75, 0.9)
    top = sorted(st.phrases.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
    return {
        "schema_version": SCHEMA_VERSION,
        "shards": len(shards),
        "images": n_images,
        "regions": n_regions,
        "images_without_regions": per_image.get(0, 0),
        "regions_per_image": {
            "mean": round(n_regions / n_images, 4) if n_images else 0.0,
            "max": max(per_image) if per_image else 0,
            "histogram": {str(k): per_image[k] for k in sorted(per_image)},
        },
        "distinct_phrases": len(st.phrases),
        "top_phrases": [[p, c] for p, c in top],
        "score": {"mean": round(st.score_sum / n_regions, 4) if n_regions else None,
                  **_hist_quantiles(st.score_hist, qs)},
        "box_area": {"mean": round(st.area_sum / n_regions, 4) if n_regions else None,
                     **_hist_quantiles(st.area_hist, qs)},
        "caption_source": {k: sources[k] for k in sorted(sources)},
        "errors": {"total": sum(errors.values()), "by_type": {k: errors[k] for k in sorted(errors)}},
        "_score_hist": st.score_hist,
        "_area_hist": st.area_hist,
    }


def cost_report(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Where a job's time went, from its shards' stats: each stage's seconds, images/s and share, and the
    hours a million images would take per worker on the machine that ran it.

    Stage seconds are the time each stage spent on the shard's samples, in the worker that ran it, so they
    add up to one worker's busy time: a trial run of a few shards sizes a cluster job. Model loading, once per
    worker, is not in them; the local engine overlaps decoding with the models, which the projection ignores.
    """
    images = sum(s.get("images", 0) for s in shards)
    stage_s: dict[str, float] = {}
    for s in shards:
        for k, v in s.items():
            if k not in ("images", "wall_s", "write_s", "engine", "run_id") and isinstance(v, (int, float)):
                stage_s[k] = stage_s.get(k, 0.0) + float(v)
    busy = sum(stage_s.values())
    if not images or busy <= 0:
        return {}
    return {
        "images": images,
        "stages": {k: {"seconds": round(v, 3), "images_per_s": round(images / v, 2) if v > 0 else None,
                       "share": round(v / busy, 4)} for k, v in sorted(stage_s.items(), key=lambda kv: -kv[1])},
        "busy_seconds": round(busy, 3),
        "seconds_per_image": round(busy / images, 5),
        "hours_per_million_images_per_worker": round(busy / images * 1e6 / 3600, 2),
    }
