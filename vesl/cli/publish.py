"""`vesl publish`, `vesl show`, `vesl export`: share a dataset, look at it, hand it to other trainers.

Heavy imports (matplotlib, Pillow, pyarrow readers) stay inside the command bodies so `vesl --help`
stays fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

_MAX_LISTED = 50


def _print_violations(exc: Exception) -> None:
    violations = getattr(exc, "violations", None) or []
    for v in violations[:_MAX_LISTED]:
        typer.echo(f"  {v}", err=True)
    if len(violations) > _MAX_LISTED:
        typer.echo(f"  ... and {len(violations) - _MAX_LISTED} more (`vesl validate DIR` lists all)", err=True)


def publish_cmd(
    dataset_dir: Path = typer.Argument(..., help="Output directory of `vesl label` (part-*.parquet)."),
    name: str = typer.Option(..., "--name", help="Display name of the dataset (the card's title)."),
    license_id: str = typer.Option(..., "--license", help="SPDX license id, e.g. CC-BY-4.0, Apache-2.0."),
    description: Optional[str] = typer.Option(None, "--description", help="A paragraph for the card."),
    allow_any_image_uri: bool = typer.Option(
        False, "--allow-any-image-uri", help="Read image_uri values outside the dataset and its inputs (URLs too)."
    ),
) -> None:
    """Validate, then write a dataset card (README.md), stats, plots, a gallery and checksums into DIR."""
    from vesl.pipeline.publish import publish
    from vesl.schemas.dataset import InvalidDataset

    try:
        res = publish(dataset_dir, name=name, license_id=license_id, description=description,
                      allow_any_image_uri=allow_any_image_uri)
    except InvalidDataset as exc:
        _print_violations(exc)
        raise
    if res.note:
        typer.echo(res.note, err=True)
    typer.echo(f"dataset card: {res.card}")
    typer.echo(f"checksums: {res.checksums}")


def show_cmd(
    dataset_dir: Path = typer.Argument(..., help="A region-text dataset directory."),
    n: int = typer.Option(50, "--n", help="How many images to render."),
    query: Optional[str] = typer.Option(None, "--query", help="Only images with a region matching this phrase."),
    out: Optional[Path] = typer.Option(None, "--out", help="Where to write the gallery (default DIR/gallery)."),
    allow_any_image_uri: bool = typer.Option(
        False, "--allow-any-image-uri", help="Read image_uri values outside the dataset and its inputs (URLs too)."
    ),
) -> None:
    """Render an HTML gallery and a PNG contact sheet (boxes, phrases, highlighted captions); prints the path."""
    from vesl.pipeline.confine import check_output_dir
    from vesl.pipeline.gallery import render_gallery

    check_output_dir(out or Path(dataset_dir) / "gallery", "--out")
    page, png = render_gallery(
        dataset_dir, out or Path(dataset_dir) / "gallery", n=n, query=query, allow_any_image_uri=allow_any_image_uri
    )
    typer.echo(str(page))
    typer.echo(str(png))


def export_cmd(
    dataset_dir: Path = typer.Argument(..., help="A region-text dataset directory."),
    fmt: str = typer.Option(..., "--format", help="wds (WebDataset tars), coco (instances JSON), odvg (JSONL) "
                            "or llava (instruction JSON: grounding, referring, control; docs/mllm-probe.md)."),
    out: Path = typer.Option(..., "--out", help="Output directory (must be new or empty)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Write into a non-empty --out."),
    allow_any_image_uri: bool = typer.Option(
        False, "--allow-any-image-uri", help="Read image_uri values outside the dataset and its inputs (URLs too)."
    ),
    seed: int = typer.Option(0, "--seed", help="llava: seed of the question sampling and the train/eval split."),
    tasks: str = typer.Option(
        "grounding,referring,control", "--tasks",
        help="llava: comma-separated tasks; add caption for brief-description turns (the probe trains on them)."),
    max_questions: int = typer.Option(3, "--max-questions", help="llava: at most this many questions per task and image."),
    eval_fraction: float = typer.Option(0.1, "--eval-fraction", help="llava: share of images in eval.json (by image)."),
) -> None:
    """Export to WebDataset, COCO, ODVG (Grounding DINO) or LLaVA instructions after validating the data."""
    from vesl.pipeline.confine import check_output_dir
    from vesl.pipeline.exporters import export
    from vesl.schemas.dataset import InvalidDataset

    check_output_dir(out, "--out")
    try:
        llava = {"seed": seed, "tasks": tasks, "max_questions": max_questions, "eval_fraction": eval_fraction}
        res = export(dataset_dir, fmt, out, overwrite=overwrite, allow_any_image_uri=allow_any_image_uri,
                     **(llava if fmt == "llava" else {}))
    except InvalidDataset as exc:
        _print_violations(exc)
        raise
    skipped = ", ".join(f"{k}: {v}" for k, v in sorted(res.skipped.items())) or "none"
    what = "questions" if fmt == "llava" else "regions"
    typer.echo(f"{fmt}: {res.images} images, {res.regions} {what} -> {res.out} (skipped: {skipped})")
    if res.note:
        typer.echo(res.note, err=True)


def register(app: typer.Typer) -> None:
    app.command("publish")(publish_cmd)
    app.command("show")(show_cmd)
    app.command("export")(export_cmd)
