"""`vesl label`, `vesl inspect`, `vesl validate` and `vesl synth`.

Heavy imports (pyarrow, torch, models) happen inside the command bodies so `vesl --help` stays fast.
User mistakes raise ``UserError``; ``vesl.cli.main`` prints them as one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vesl.errors import UserError, first_line

SYNTH_FORMATS = ("wds", "parquet", "coco", "refexp")


def _passthrough(inputs: list[str]) -> tuple[list[str], list[str]]:
    """Split the args after a bare ``--`` (Beam pipeline options) from the INPUT paths.

    Click hands everything after ``--`` to the variadic INPUT argument, so the split is recovered
    from the raw command line.
    """
    argv = sys.argv[1:]
    if "--" not in argv:
        return inputs, []
    extra = argv[argv.index("--") + 1 :]
    if extra and inputs[-len(extra) :] == extra:
        return inputs[: -len(extra)], extra
    return inputs, []


def label(
    inputs: Annotated[
        Optional[list[str]],
        typer.Argument(help="Input shards: WebDataset tars, Parquet files, image folders, globs or synth://N?seed=S"),
    ] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output dataset directory (local or fsspec URL)")] = None,
    captioner: Annotated[Optional[str], typer.Option(help="alt_text | hf:<id or path> | openai:<base_url>#<model> | vllm:<model> | keep (a labeled dataset's captions)")] = None,
    phrases: Annotated[Optional[str], typer.Option(help="Phrase extraction mode: paper | noun_chunks [profile's]")] = None,
    detector: Annotated[Optional[str], typer.Option(help="none | owlv2:<id or path> | grounding-dino:<id or path>")] = None,
    engine: Annotated[Optional[str], typer.Option(help="local | beam | ray [local]")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Local engine: processes over shards; Ray: actors per stage [1]")] = None,
    stage_threads: Annotated[
        Optional[int],
        typer.Option(help="Torch threads per stage worker, on every engine; shards are byte-identical for equal values [1]"),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="Label only the first N samples, in shard order")] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Redo shards that are already committed")] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of LabelConfig fields (flags override it)")] = None,
    profile: Annotated[str, typer.Option(help="default | paper | grit | demo")] = "default",
    seed: Annotated[Optional[int], typer.Option(help="Seed for sampling stages [0]")] = None,
    trust_remote_code: Annotated[
        Optional[bool], typer.Option("--trust-remote-code", help="Allow model repos to run their own code (off by default)")
    ] = None,
    runner: Annotated[Optional[str], typer.Option(help="Beam runner, e.g. DirectRunner, DataflowRunner, FlinkRunner")] = None,
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (auto, ray://host:port); default: local")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar")] = True,
) -> None:
    """Label image/alt-text shards into a region-text Parquet dataset (reruns resume).

    Arguments after a bare `--` are passed to Beam as pipeline options, e.g. `-- --num_workers=4`.
    """
    from vesl.pipeline.engines import run
    from vesl.profiles import resolve_config

    for flag, value, top in (("--limit", limit, 2**62), ("--workers", workers, 4096)):
        if value is not None and not 1 <= value <= top:
            raise UserError(f"{flag} must be between 1 and {top}, got {value}")
    paths, beam_options = _passthrough(list(inputs or []))
    ov: dict[str, Any] = {}
    if paths:
        ov["inputs"] = paths
    for key, value in (
        ("output", output),
        ("engine", engine),
        ("workers", workers),
        ("stage_threads", stage_threads),
        ("limit", limit),
        ("overwrite", overwrite),
        ("seed", seed),
        ("trust_remote_code", trust_remote_code),
        ("beam_runner", runner),
        ("ray_address", ray_address),
    ):
        if value is not None:
            ov[key] = value
    if beam_options:
        ov["beam_options"] = beam_options
    if captioner is not None:
        ov["captioner"] = {"spec": captioner}
    if phrases is not None:
        ov["phrases"] = {"mode": phrases}
    if detector is not None:
        ov["detector"] = {"spec": detector}
    cfg = resolve_config(profile, config, ov)
    if beam_options and cfg.engine != "beam":
        raise UserError(f"arguments after `--` ({' '.join(beam_options)}) are Beam pipeline options: add --engine beam")
    summary = run(cfg, progress=progress)
    typer.echo(
        f"{cfg.output}: {summary.get('shards_written', 0)} shards written, {summary.get('shards_skipped', 0)} already "
        f"committed (skipped); written: {summary.get('rows', 0)} rows, {summary.get('regions', 0)} regions, "
        f"{summary.get('errors', 0)} error rows, {summary.get('images_per_s', 0)} images/s; "
        f"manifest {summary.get('manifest', '')}"
    )
    failed = summary.get("failed") or []
    for f in failed:
        typer.echo(f"failed: {f['shard']}: {f['error']}", err=True)
    if failed:
        typer.echo(f"{len(failed)} shard(s) not committed; rerun the same command to retry them", err=True)
        raise typer.Exit(1)


def _quantiles(values: Any, qs: tuple[float, ...]) -> dict[str, float]:
    import numpy as np

    if len(values) == 0:
        return {}
    return {f"p{round(q * 100)}": round(float(np.quantile(values, q)), 4) for q in qs}


def inspect_dataset(out_dir: str | Path, top: int = 15) -> dict[str, Any]:
    """Summary of a labeled dataset (committed shards only)."""
    from collections import Counter

    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from vesl.pipeline.writer import committed_shards, read_stats

    root = Path(out_dir)
    if not root.is_dir():
        raise UserError(f"{root} is not a directory: pass the --output directory of `vesl label`")
    names = committed_shards(root)
    if not names:
        raise UserError(f"no committed shards in {root}: run `vesl label ... --output {root}` first")
    per_image: list[int] = []
    scores: list[Any] = []
    phrases: Counter = Counter()
    errors_by_type: Counter = Counter()
    errors_by_stage: Counter = Counter()
    sources: Counter = Counter()
    rows = errors = 0
    timings: list[dict[str, Any]] = []
    for name in names:
        try:
            stats = read_stats(root, name) or {}
            t = pq.read_table(root / stats["files"]["parquet"]["name"], columns=["caption_source", "regions"])
            stats["errors"], stats["errors_by_type"], stats["errors_by_stage"]
        except Exception as exc:
            raise UserError(
                f"{root}: shard {name} cannot be read ({type(exc).__name__}: {first_line(exc, 200)}); "
                f"`vesl validate {root}` lists the damage, rerun `vesl label` to redo it"
            ) from None
        timings.append({"images": stats.get("input_count", 0), **stats.get("timings", {})})
        rows += t.num_rows
        per_image += pc.list_value_length(t["regions"]).to_pylist()
        flat = pc.list_flatten(t["regions"])
        scores.append(pc.struct_field(flat, "score").to_numpy(zero_copy_only=False))
        phrases.update(pc.struct_field(flat, "phrase").to_pylist())
        sources.update(t["caption_source"].to_pylist())
        errors += stats["errors"]
        errors_by_type.update(stats["errors_by_type"])
        errors_by_stage.update(stats["errors_by_stage"])
    uncommitted = sorted(
        p.name for p in root.glob("part-*.parquet") if not p.name.endswith(".errors.parquet") and p.stem not in names
    )
    all_scores = np.concatenate(scores) if scores else np.zeros(0)
    edges = [(0, 0), (1, 1), (2, 2), (3, 3), (4, 5), (6, 10), (11, 20), (21, None)]
    hist = {}
    for lo, hi in edges:
        label = str(lo) if lo == hi else (f"{lo}-{hi}" if hi is not None else f"{lo}+")
        hist[label] = sum(1 for n in per_image if n >= lo and (hi is None or n <= hi))
    return {
        "directory": str(root),
        "shards": len(names),
        "uncommitted": uncommitted,
        "rows": rows,
        "errors": errors,
        "errors_by_type": dict(errors_by_type.most_common()),
        "errors_by_stage": dict(errors_by_stage.most_common()),
        "caption_source": dict(sources.most_common()),
        "regions": int(sum(per_image)),
        "regions_per_image_mean": round(float(np.mean(per_image)), 3) if per_image else 0.0,
        "regions_per_image_hist": hist,
        "score_quantiles": _quantiles(all_scores, (0.0, 0.1, 0.5, 0.9, 1.0)),
        "top_phrases": phrases.most_common(top),
        "cost": cost_report(timings),
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


def _print_report(r: dict[str, Any]) -> None:
    echo = typer.echo
    echo(f"dataset    {r['directory']}")
    echo(f"shards     {r['shards']} committed" + (f", {len(r['uncommitted'])} uncommitted" if r["uncommitted"] else ""))
    echo(f"rows       {r['rows']}")
    echo(f"errors     {r['errors']}")
    for k, v in r["errors_by_type"].items():
        echo(f"  {v:>8}  {k}")
    if r["errors_by_stage"]:
        echo("  by stage: " + ", ".join(f"{k}={v}" for k, v in r["errors_by_stage"].items()))
    echo("captions   " + ", ".join(f"{k}={v}" for k, v in r["caption_source"].items()))
    echo(f"regions    {r['regions']} ({r['regions_per_image_mean']} per image)")
    echo("regions per image:")
    most = max(r["regions_per_image_hist"].values(), default=0) or 1
    for k, v in r["regions_per_image_hist"].items():
        echo(f"  {k:>6}  {v:>8}  {'#' * round(30 * v / most)}")
    if r["score_quantiles"]:
        echo("scores     " + "  ".join(f"{k}={v}" for k, v in r["score_quantiles"].items()))
    if r["top_phrases"]:
        echo("top phrases:")
        for phrase, n in r["top_phrases"]:
            echo(f"  {n:>8}  {phrase}")
    cost = r.get("cost")
    if cost:
        echo(f"cost       {cost['busy_seconds']} s of stage time for {cost['images']} images "
             f"({1000 * cost['seconds_per_image']:.1f} ms per image)")
        for stage, c in cost["stages"].items():
            echo(f"  {stage:<10} {c['seconds']:>9.1f} s  {c['images_per_s'] or 0:>9.1f} img/s  {100 * c['share']:5.1f}%")
        echo(f"  projected: {cost['hours_per_million_images_per_worker']} hours per million images per worker "
             "on this machine (model loading not included)")


def inspect(
    directory: Annotated[Path, typer.Argument(help="A dataset written by `vesl label`")],
    top: Annotated[int, typer.Option(help="How many of the most frequent phrases to list")] = 15,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Rows, errors by type, regions-per-image histogram, score quantiles and top phrases."""
    report = inspect_dataset(directory, top)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        _print_report(report)


def validate(directory: Annotated[Path, typer.Argument(help="A dataset directory or one shard file")]) -> None:
    """Check every row against schema v1 and the dataset's commit files; exit 1 listing every violation."""
    from vesl.schemas.region_text import validate as validate_dataset

    if not directory.exists():
        raise UserError(f"{directory} does not exist: pass a dataset directory or a .parquet shard")
    try:
        violations = validate_dataset(directory)  # rows, and the commit files of a `vesl label` output
    except FileNotFoundError as exc:
        raise UserError(f"{exc}: pass the --output directory of `vesl label`") from None
    for v in violations:
        typer.echo(str(v))
    if violations:
        typer.echo(f"{len(violations)} violation(s) in {directory}", err=True)
        raise typer.Exit(1)
    typer.echo(f"ok: {directory} is a valid region-text v1 dataset")


def synth(
    out: Annotated[Path, typer.Option("--out", help="Output directory")],
    n: Annotated[int, typer.Option("--n", help="Number of scenes")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="wds | parquet | coco | refexp (RefCOCO-style JSONL)")] = "wds",
    shard_size: Annotated[int, typer.Option(help="Scenes per shard (wds and parquet)")] = 100,
) -> None:
    """Generate synthetic scenes with ground-truth captions and boxes (input data or COCO eval set)."""
    from vesl.pipeline import synth as synthetic

    if fmt not in SYNTH_FORMATS:
        raise UserError(f"--format {fmt!r} is not supported: use one of {', '.join(SYNTH_FORMATS)}")
    if n < 1 or shard_size < 1:
        raise UserError("--n and --shard-size must be >= 1")
    from vesl.pipeline.confine import check_output_dir

    check_output_dir(out, "--out")
    if fmt == "refexp":
        path = synthetic.write_refexp((synthetic.make_refexp(seed, i) for i in range(n)), out)
        typer.echo(f"wrote {n} referring expressions to {path} (seed {seed}); evaluate with `vesl eval MODEL --refexp {path}`")
        return
    scenes = synthetic.make_scenes(n, seed)
    if fmt == "wds":
        paths = synthetic.write_webdataset(scenes, out, shard_size)
    elif fmt == "parquet":
        paths = synthetic.write_parquet(scenes, out, shard_size)
    else:
        paths = [synthetic.write_coco(scenes, out)]
    typer.echo(f"wrote {n} scenes to {out} ({len(paths)} file(s), format {fmt}, seed {seed})")


def register(app: typer.Typer) -> None:
    app.command("label")(label)
    app.command("inspect")(inspect)
    app.command("validate")(validate)
    app.command("synth")(synth)
