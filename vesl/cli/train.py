"""`vesl train`, `vesl eval`, `vesl export-model`. Heavy imports stay inside the command bodies."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from vesl.errors import UserError


def _train(
    config: Optional[Path] = typer.Option(None, "--config", "-c", help="YAML file with any of the options below"),
    data: Optional[list[str]] = typer.Option(None, "--data", help="region-text shards (dir, glob, file, fsspec URL)"),
    out: Optional[str] = typer.Option(None, "--out", help="run directory [runs/vesl]"),
    model: Optional[str] = typer.Option(None, "--model", help="open_clip model name or vesl-tiny-vit [vesl-tiny-vit]"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained", help="open_clip pretrained tag or weights file"),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="[1]"),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="cap on optimizer steps"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="images per process per step [32]"),
    workers: Optional[int] = typer.Option(None, "--workers", help="loader workers per process [2]"),
    lr: Optional[float] = typer.Option(None, "--lr", help="peak learning rate [5e-4]"),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="warmup steps [100]"),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="[0.2]"),
    grad_clip: Optional[float] = typer.Option(None, "--grad-clip", help="max grad norm [1.0]"),
    regions_per_image: Optional[int] = typer.Option(None, "--regions-per-image", help="M [4]"),
    lam: Optional[float] = typer.Option(None, "--lambda", help="the paper's shared factor of L_region and L_ground [1.0]"),
    region_weight: Optional[float] = typer.Option(None, "--region-weight", help="weight of L_region inside --lambda [1.0]"),
    ground_weight: Optional[float] = typer.Option(None, "--ground-weight", help="weight of L_ground inside --lambda [1]"),
    ground_head: Optional[str] = typer.Option(
        None, "--ground-head", help="locate (soft-argmax over the text prompt's Prompter attention) | patch (a box per patch, "
        "picked by the text) | mlp (paper) [patch]"),
    region_position_words: Optional[float] = typer.Option(
        None, "--region-position-words", help="share of region texts given their box's position words [0]"),
    ground_cell_weight: Optional[float] = typer.Option(
        None, "--ground-cell-weight", help="--ground-head locate: weight of the centre-cell cross-entropy [0: off]"),
    ground_l1_weight: Optional[float] = typer.Option(None, "--ground-l1-weight", help="--ground-loss l1+giou: L1 weight [5]"),
    ground_giou_weight: Optional[float] = typer.Option(
        None, "--ground-giou-weight", help="--ground-loss l1+giou: GIoU weight [2]"),
    text_sim_threshold: Optional[float] = typer.Option(None, "--text-sim-threshold", help="[0.9]"),
    region_loss_drop: Optional[float] = typer.Option(
        None, "--region-loss-drop", help="leave out this share of the hardest region pairs (noisy labels) [0]"),
    ground_loss: Optional[str] = typer.Option(None, "--ground-loss", help="l1+giou (DETR) | l2 (paper) [l1+giou]"),
    prompter_pool: Optional[str] = typer.Option(None, "--prompter-pool", help="prompt | mean [prompt]"),
    box_bias: Optional[bool] = typer.Option(None, "--box-bias/--no-box-bias",
                                            help="bias box-prompt attention to covered patches [on; off = paper-literal]"),
    clip_only: Optional[bool] = typer.Option(None, "--clip-only/--cloc", help="CLIP baseline only [--cloc]"),
    local_loss: Optional[bool] = typer.Option(None, "--local-loss/--no-local-loss"),
    gather_with_grad: Optional[bool] = typer.Option(None, "--gather-with-grad/--no-gather-with-grad"),
    precision: Optional[str] = typer.Option(None, "--precision", help="auto | fp32 | bf16 [auto: bf16 on GPU]"),
    grad_checkpointing: Optional[bool] = typer.Option(None, "--grad-checkpointing/--no-grad-checkpointing"),
    save_every: Optional[int] = typer.Option(None, "--save-every", help="checkpoint every N steps [100]"),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' or a checkpoint folder"),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite",
                                             help="train into a run directory that holds an earlier run, deleting it"),
    seed: Optional[int] = typer.Option(None, "--seed", help="[0]"),
    log_every: Optional[int] = typer.Option(None, "--log-every", help="[10]"),
    text_field: Optional[str] = typer.Option(None, "--text-field", help="caption | alt_text [caption]"),
    nproc_per_node: int = typer.Option(1, "--nproc-per-node", help="launch this many processes with torchrun"),
) -> None:
    """Train a CLOC model (CLIP + region-text + grounding losses) on region-text shards."""
    import yaml

    from vesl.pretrain.train import load_config, train

    overrides = {
        "data": (data[0] if data and len(data) == 1 else data) or None, "out": out, "model": model,
        "pretrained": pretrained, "epochs": epochs, "max_steps": max_steps, "batch_size": batch_size,
        "workers": workers, "lr": lr, "warmup": warmup, "weight_decay": weight_decay, "grad_clip": grad_clip,
        "regions_per_image": regions_per_image, "lam": lam, "region_weight": region_weight,
        "ground_weight": ground_weight, "ground_head": ground_head, "ground_l1_weight": ground_l1_weight,
        "ground_cell_weight": ground_cell_weight,
        "ground_giou_weight": ground_giou_weight, "overwrite": overwrite, "text_sim_threshold": text_sim_threshold,
        "region_loss_drop": region_loss_drop, "region_position_words": region_position_words,
        "ground_loss": ground_loss, "prompter_pool": prompter_pool, "box_bias": box_bias, "clip_only": clip_only, "local_loss": local_loss,
        "gather_with_grad": gather_with_grad, "precision": precision, "grad_checkpointing": grad_checkpointing,
        "save_every": save_every, "resume": resume, "seed": seed, "log_every": log_every, "text_field": text_field,
    }
    cfg = load_config(config, **overrides)
    if nproc_per_node > 1:
        import subprocess
        import sys

        run = Path(cfg.out)
        run.mkdir(parents=True, exist_ok=True)
        resolved = run / "launch.yaml"
        resolved.write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc_per_node}",
               "-m", "vesl.pretrain.train", str(resolved)]
        raise typer.Exit(subprocess.call(cmd))
    run_dir = train(cfg)
    typer.echo(f"run directory: {run_dir}")


def _eval(
    model: str = typer.Argument(..., help="export folder, run directory or checkpoint folder; or an open_clip "
                                "model name (with --pretrained) for the CLIP baselines"),
    pretrained: Optional[str] = typer.Option(None, "--pretrained",
                                             help="open_clip pretrained tag or weights file for a plain open_clip model"),
    coco_annotations: Optional[str] = typer.Option(None, "--coco-annotations", help="COCO instances JSON"),
    coco_images: Optional[str] = typer.Option(None, "--coco-images", help="folder with the COCO images"),
    shards: Optional[list[str]] = typer.Option(None, "--shards", help="held-out region-text shards"),
    refexp: Optional[str] = typer.Option(None, "--refexp", help="referring expressions, RefCOCO-style JSONL "
                                         "(`vesl synth --format refexp`)"),
    out: Optional[str] = typer.Option(None, "--out", help="write the results JSON here"),
    template: Optional[list[str]] = typer.Option(None, "--template", help="class prompt template(s), averaged per class ['a {}', 'a small {}', 'a large {}']"),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_images: Optional[int] = typer.Option(None, "--max-images"),
) -> None:
    """Zero-shot region classification (Prompter / RoI-Align / crop), retrieval, grounding and referring expressions."""
    from vesl.pretrain.eval import DEFAULT_TEMPLATES, evaluate, format_table

    if template and any("{}" not in t for t in template):
        raise UserError("each --template needs a {} where the class name goes, e.g. 'a photo of a {}.'")
    res = evaluate(model, coco_annotations=coco_annotations, coco_images=coco_images,
                   shards=(shards[0] if shards and len(shards) == 1 else shards) or None, out_json=out,
                   templates=tuple(template) if template else DEFAULT_TEMPLATES, batch_size=batch_size,
                   max_images=max_images, pretrained=pretrained, refexp=refexp)
    typer.echo(format_table(res))
    if out:
        typer.echo(f"results: {out}")


def _export(
    source: str = typer.Argument(..., help="run directory, checkpoint folder or export folder"),
    out: str = typer.Option(..., "--out", help="export folder (must be new or empty unless --overwrite)"),
    format: str = typer.Option("open_clip", "--format",
                               help="open_clip (local-dir layout) | hf (transformers CLIPModel folder) [open_clip]"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an export already in --out"),
) -> None:
    """Export the CLIP towers (open_clip or transformers CLIPModel layout), with the Prompter and grounding head beside it."""
    from vesl.pretrain.export import export_model

    path = export_model(source, out, format=format, overwrite=overwrite)
    if format == "hf":
        typer.echo(f"exported to {path}; transformers.CLIPModel.from_pretrained('{path}') (or CLIPVisionModel), "
                   f"vesl.pretrain.hf.CLOCRegionModel.from_pretrained('{path}') for regions and grounding")
    else:
        typer.echo(f"exported to {path}; open_clip.create_model('local-dir:{path}') or vesl.pretrain.load('{path}')")


def register(app: typer.Typer) -> None:
    app.command("train")(_train)
    app.command("eval")(_eval)
    app.command("export-model")(_export)
