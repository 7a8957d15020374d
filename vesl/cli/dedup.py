"""`vesl dedup`: near-duplicate groups of the inputs, so `vesl label --duplicates` pays the VLM once per picture."""

from __future__ import annotations

from typing import Annotated, Any, Optional

import typer

from vesl.cli.label import _passthrough
from vesl.errors import UserError


def dedup(
    inputs: Annotated[Optional[list[str]], typer.Argument(help="Input shards, as for `vesl label`")] = None,
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="Output directory DUPS (hash shards, duplicates.parquet, summary.json)")] = None,
    threshold: Annotated[Optional[int], typer.Option(help="Hamming distance (of 256 bits) at or under which two images are one [31]")] = None,
    engine: Annotated[str, typer.Option(help="local | beam | ray")] = "local",
    workers: Annotated[int, typer.Option(help="Local engine: processes over shards; Ray: actors")] = 1,
    limit: Annotated[Optional[int], typer.Option(help="Hash only the first N samples, in shard order")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo shards that are already hashed")] = False,
    runner: Annotated[str, typer.Option(help="Beam runner")] = "DirectRunner",
    ray_address: Annotated[Optional[str], typer.Option(help="Ray cluster address (auto, ray://host:port)")] = None,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show the progress bar")] = True,
) -> None:
    """Group near-duplicate images across all shards by perceptual hash (reruns resume, as `vesl label`).

    Writes DUPS/duplicates.parquet (key, source_shard, hash, representative_key, representative_shard) and
    DUPS/summary.json; the representative of a group is its first image in input order.
    """
    from vesl.pipeline.config import DedupConfig
    from vesl.pipeline.engines import run

    for flag, value, top in (("--limit", limit, 2**62), ("--workers", workers, 4096)):
        if value is not None and not 1 <= value <= top:
            raise UserError(f"{flag} must be between 1 and {top}, got {value}")
    if threshold is not None and not 0 <= threshold < 256:
        raise UserError(f"--threshold must be between 0 and 255 bits, got {threshold}")
    paths, beam_options = _passthrough(list(inputs or []))
    fields: dict[str, Any] = {"inputs": paths, "output": output or "", "engine": engine, "workers": workers, "limit": limit,
                              "overwrite": overwrite, "beam_runner": runner, "ray_address": ray_address,
                              "beam_options": beam_options}  # fmt: skip
    if threshold is not None:
        fields["dedup"] = {"threshold": threshold}
    summary = run(DedupConfig.model_validate(fields), progress=progress)
    failed = summary.get("failed") or []
    for f in failed:
        typer.echo(f"failed: {f['shard']}: {f['error']}", err=True)
    if failed:
        typer.echo(f"{len(failed)} shard(s) not hashed; rerun the same command to retry them (the table waits for all)", err=True)
        raise typer.Exit(1)
    d = summary["dedup"]
    typer.echo(f"{output}: {d['images']} images in {d['groups']} groups, {d['duplicates']} duplicates "
               f"({100 * d['duplicate_fraction']:.1f}%), {d['errors']} error rows; table {summary['manifest']}")


def register(app: typer.Typer) -> None:
    app.command("dedup")(dedup)
