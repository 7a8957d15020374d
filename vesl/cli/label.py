"""`vesl label`, `vesl inspect` and `vesl validate`.

Heavy imports (pyarrow, torch, models) happen inside the command bodies so `vesl --help` stays fast.
User mistakes raise ``UserError``; ``vesl.cli.main`` prints them as one ``error: ...`` line, exit 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from vesl.cli.profiles import profile_names, resolve_config
from vesl.errors import UserError


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
    verifier: Annotated[
        Optional[str],
        typer.Option(help="off | clip:<open_clip model, local dir or hf-hub:id> | cloc:<vesl run or export>: re-score "
                     "each (phrase, box) and drop the unconfirmed (docs/labeling.md, Verification) [profile's]"),
    ] = None,
    min_score: Annotated[Optional[float], typer.Option(help="Verifier: keep a region whose cosine with its phrase is >= this")] = None,
    min_margin: Annotated[
        Optional[float], typer.Option(help="Verifier: ... and beats the image's best other phrase by >= this")
    ] = None,
    verify_rule: Annotated[
        Optional[str], typer.Option(help="Verifier: drop | relabel (a failing region first takes a phrase that kept no "
                                    "box, if it passes for that phrase) | pick (of a phrase's candidate boxes that "
                                    "pass, keep the best-scored one per mention) [profile's]")
    ] = None,
    detector: Annotated[
        Optional[list[str]],
        typer.Option(help="none | owlv2:<id or path> | grounding-dino:<id or path>; repeat it to fuse several detectors"),
    ] = None,
    tta: Annotated[
        Optional[list[str]],
        typer.Option("--tta", help="Test-time looks fused with the image (repeatable or comma-separated): hflip, "
                     "scale:S, hflip+scale:S (docs/labeling.md, Several looks)"),
    ] = None,
    engine: Annotated[Optional[str], typer.Option(help="local | beam | ray [local]")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Local engine: processes over shards; Ray: actors per stage [1]")] = None,
    stage_threads: Annotated[
        Optional[int],
        typer.Option(help="Torch threads per stage worker, on every engine; shards are byte-identical for equal values [1]"),
    ] = None,
    limit: Annotated[Optional[int], typer.Option(help="Label only the first N samples, in shard order")] = None,
    image_source: Annotated[
        Optional[list[str]],
        typer.Option("--image-source", help="--captioner keep on a dataset stored without image bytes: its original "
                     "input (repeatable); rows read their image again from their source shard there"),
    ] = None,
    overwrite: Annotated[Optional[bool], typer.Option("--overwrite", help="Redo shards that are already committed")] = None,
    duplicates: Annotated[
        Optional[str],
        typer.Option("--duplicates", help="A `vesl dedup` output: caption and ground only each group's representative"),
    ] = None,
    duplicates_policy: Annotated[
        Optional[str],
        typer.Option("--duplicates-policy", help="copy: a duplicate's row copies its representative's labels "
                     "(marked duplicate_of) | skip: no row [copy]"),
    ] = None,
    config: Annotated[Optional[Path], typer.Option("--config", help="YAML file of LabelConfig fields (flags override it)")] = None,
    profile: Annotated[str, typer.Option(help=" | ".join(profile_names()))] = "default",
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
    if image_source:
        ov["source"] = {"image_sources": list(image_source)}
    if duplicates_policy is not None and duplicates is None:
        raise UserError("--duplicates-policy needs --duplicates DUPS (the output of `vesl dedup`)")
    if duplicates is not None:
        ov["duplicates"] = {"table": duplicates, **({"policy": duplicates_policy} if duplicates_policy else {})}
    if captioner is not None:
        ov["captioner"] = {"spec": captioner}
    if phrases is not None:
        ov["phrases"] = {"mode": phrases}
    verify = {k: v for k, v in (("spec", verifier), ("min_score", min_score), ("min_margin", min_margin),
                                                ("rule", verify_rule)) if v is not None}
    if verify:
        ov["verify"] = verify
    if detector:
        ov["detector"] = {"spec": detector[0], "also": list(detector[1:])}
    if tta:
        looks = [t.strip() for item in tta for t in item.split(",") if t.strip()]
        ov["detector"] = {**ov.get("detector", {}), "tta": looks}
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
    repeated = summary.get("repeated_keys") or {}
    if repeated:
        key, shards = next(iter(sorted(repeated.items())))
        typer.echo(f"error: {len(repeated)} key(s) appear in more than one row (e.g. {key!r} in "
                   f"{', '.join(shards[:3])}), so `vesl validate` and `publish` will refuse {cfg.output}: the "
                   "inputs reuse each other's keys; label such inputs into separate outputs", err=True)
    failed = summary.get("failed") or []
    for f in failed:
        typer.echo(f"failed: {f['shard']}: {f['error']}", err=True)
    if failed:
        typer.echo(f"{len(failed)} shard(s) not committed; rerun the same command to retry them", err=True)
    if failed or repeated:
        raise typer.Exit(1)


def print_report(r: dict[str, Any]) -> None:
    echo = typer.echo
    echo(f"dataset    {r['directory']}")
    echo(f"shards     {r['shards']} committed" + (f", {len(r['uncommitted'])} uncommitted" if r["uncommitted"] else ""))
    echo(f"rows       {r['rows']}")
    echo(f"errors     {r['errors']}")
    if r.get("duplicates"):
        echo(f"duplicates {r['duplicates']} (labels of their representative, or left out)")
    for k, v in r["errors_by_type"].items():
        echo(f"  {v:>8}  {k}")
    if r["errors_by_stage"]:
        echo("  by stage: " + ", ".join(f"{k}={v}" for k, v in r["errors_by_stage"].items()))
    echo("captions   " + ", ".join(f"{k}={v}" for k, v in r["caption_source"].items()))
    echo(f"regions    {r['regions']} ({r['regions_per_image_mean']} per image)")
    if r.get("verifier_dropped") is not None:
        echo(f"verified   {r['verifier_dropped']} regions dropped by the verifier (their phrase was not confirmed)")
    if r.get("verifier_relabeled") is not None:
        echo(f"relabeled  {r['verifier_relabeled']} regions given a phrase that had no box (verify.rule relabel)")
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
    if cost and cost.get("model_calls_saved") is not None:
        echo(f"  duplicates: VLM and detector ran on {cost['model_images']} of {cost['images']} images "
             f"({100 * cost['model_calls_saved']:.1f}% fewer calls; {r['duplicates']} copied or skipped)")


def inspect(
    directory: Annotated[Path, typer.Argument(help="A dataset written by `vesl label`")],
    top: Annotated[int, typer.Option(help="How many of the most frequent phrases to list")] = 15,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON")] = False,
) -> None:
    """Rows, errors by type, regions-per-image histogram, score quantiles and top phrases."""
    from vesl.schemas.statistics import inspect_dataset

    report = inspect_dataset(directory, top)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        print_report(report)


def validate(directory: Annotated[Path, typer.Argument(help="A dataset directory or one shard file")]) -> None:
    """Check every row against schema v1 and the dataset's commit files; exit 1 listing every violation."""
    from vesl.schemas.validation import validate as validate_dataset

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


def register(app: typer.Typer) -> None:
    app.command("label")(label)
    app.command("inspect")(inspect)
    app.command("validate")(validate)
