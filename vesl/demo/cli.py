"""`vesl demo` and `vesl synth`: the demo world's commands (the ``vesl.commands`` entry point ``demo``)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

from vesl.demo.runner import (
    DEMO_N,
    FULL_EVAL_N,
    FULL_N,
    FULL_STEPS,
    FULL_TWINS,
    PROBE_STEPS,
    run_demo,
    run_full_demo,
)
from vesl.errors import UserError

SYNTH_FORMATS = ("wds", "parquet", "coco", "refexp")


def synth(
    out: Annotated[Path, typer.Option("--out", help="Output directory")],
    n: Annotated[int, typer.Option("--n", help="Number of scenes")] = 200,
    seed: Annotated[int, typer.Option(help="Same seed, same bytes")] = 0,
    fmt: Annotated[str, typer.Option("--format", help="wds | parquet | coco | refexp (RefCOCO-style JSONL)")] = "wds",
    shard_size: Annotated[int, typer.Option(help="Scenes per shard (wds and parquet)")] = 100,
    duplicates: Annotated[
        float,
        typer.Option(help="Fraction of the N items that are near-duplicate copies (re-encoded, resized) of others; "
                     "adds 5% look-alike hard negatives; the json's vesl_synth says which is which"),
    ] = 0.0,
    refexp_split: Annotated[
        str,
        typer.Option("--refexp-split", help="--format refexp: absolute (size and grid words) or relative (an exact "
                     "look-alike pair told apart by side: 'the red circle on the left')"),
    ] = "absolute",
) -> None:
    """Generate synthetic scenes with ground-truth captions and boxes (input data or COCO eval set)."""
    from vesl.demo import synth as synthetic

    if fmt not in SYNTH_FORMATS:
        raise UserError(f"--format {fmt!r} is not supported: use one of {', '.join(SYNTH_FORMATS)}")
    if n < 1 or shard_size < 1:
        raise UserError("--n and --shard-size must be >= 1")
    if not 0.0 <= duplicates < 1.0:
        raise UserError(f"--duplicates must be a fraction in [0, 1), got {duplicates}")
    if refexp_split not in synthetic.REFEXP_SPLITS:
        raise UserError(f"--refexp-split must be one of {', '.join(synthetic.REFEXP_SPLITS)}, got {refexp_split!r}")
    if refexp_split != "absolute" and fmt != "refexp":
        raise UserError("--refexp-split applies to --format refexp")
    if duplicates and fmt == "refexp":
        raise UserError("--duplicates applies to scenes: use --format wds, parquet or coco")
    from vesl.pipeline.confine import check_output_dir

    check_output_dir(out, "--out")
    if fmt == "refexp":
        make = synthetic.REFEXP_SPLITS[refexp_split]
        path = synthetic.write_refexp((make(seed, i) for i in range(n)), out)
        typer.echo(f"wrote {n} {refexp_split} referring expressions to {path} (seed {seed}); evaluate with "
                   f"`vesl eval MODEL --refexp {path}`")
        return
    try:
        scenes = synthetic.make_world(n, seed, duplicates) if duplicates else synthetic.make_scenes(n, seed)
    except ValueError as exc:
        raise UserError(f"{exc}: raise --n or lower --duplicates") from None
    if fmt == "wds":
        paths = synthetic.write_webdataset(scenes, out, shard_size)
    elif fmt == "parquet":
        paths = synthetic.write_parquet(scenes, out, shard_size)
    else:
        paths = [synthetic.write_coco(scenes, out)]
    typer.echo(f"wrote {n} scenes to {out} ({len(paths)} file(s), format {fmt}, seed {seed})")


def register(app: typer.Typer) -> None:
    app.command("synth")(synth)

    @app.command("demo")
    def demo_cmd(
        full: bool = typer.Option(
            False, "--full", help="Also train CLOC and a CLIP baseline and compare them."
        ),
        out: Path = typer.Option(Path("demo-out"), "--out", help="Where the demo writes everything."),
        n: int = typer.Option(None, "--n", help=f"Number of pairs (default {DEMO_N}; {FULL_N} with --full)."),
        steps: int = typer.Option(FULL_STEPS, "--steps", help="Training steps per model (--full)."),
        eval_n: int = typer.Option(FULL_EVAL_N, "--eval-n", help="Held-out evaluation scenes (--full)."),
        profile: str = typer.Option("demo", "--profile", help="Labeling profile."),
        labels: str = typer.Option(
            "vesl", "--labels", help="--full: train on vesl pseudo-labels, or on gt (oracle ground truth)."
        ),
        train_seed: int = typer.Option(0, "--train-seed", help="--full: seed of both trainings (init and order)."),
        seeds: int = typer.Option(1, "--seeds", help="--full: train with this many seeds from --train-seed; judge the means."),
        eval_split: str = typer.Option(
            "test", "--eval-split", help="--full: evaluate on the sealed test worlds, or on validation worlds to tune."
        ),
        twins: float = typer.Option(
            FULL_TWINS, "--twins", help="--full: share of training scenes with an exact look-alike pair (and "
            "region_relative_words 0.5 with them)."
        ),
        probe_steps: int = typer.Option(
            PROBE_STEPS, "--probe-steps", help="--full: MLLM probe steps per tower (0 skips the probe)."
        ),
    ) -> None:
        """Run the whole machinery offline on the synthetic world: synth -> label -> inspect -> gallery
        (and with --full: -> train CLOC and CLIP -> zero-shot region classification)."""
        t = time.perf_counter()
        if full:
            res = run_full_demo(
                out, n=FULL_N if n is None else n, eval_n=eval_n, steps=steps, profile=profile, labels=labels,
                train_seed=train_seed, seeds=seeds, eval_split=eval_split, twins=twins, probe_steps=probe_steps,
            )
            typer.echo(f"results: {out / 'full' / 'results.json'}")
            typer.echo(f"done in {time.perf_counter() - t:.0f}s; region-classification goal "
                       f"{'met' if res.goal_met else 'not met'} (the other goals: in the tables above)")
        else:
            run_demo(out, n=DEMO_N if n is None else n, profile=profile)
            typer.echo(f"done in {time.perf_counter() - t:.0f}s")
