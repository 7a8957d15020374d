"""`vesl train`, `vesl eval`, `vesl export-model`, `vesl probe-mllm`. Heavy imports stay inside the command bodies.

`vesl train`'s options are made from ``TrainConfig``'s fields (type, range, description), so a new training
option needs one edit, on the config, and its flag and help follow. Building them imports
``vesl.pretrain.train`` (pydantic and yaml; torch loads only when training starts).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Optional, Union, get_args, get_origin

import typer
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from vesl.errors import UserError

# The train command's options are TrainConfig's fields, so each is declared once (name, type, range and help
# live on the field). Only these differ from the rule "field foo_bar -> --foo-bar, a bool -> --foo-bar/--no-foo-bar":
OPTION_NAMES = {"lam": "--lambda", "clip_only": "--clip-only/--cloc"}
JSON = "<json object>"  # the metavar of a dict field, given as JSON on the command line
CLI_ONLY = {  # flags that are not TrainConfig fields
    "config": typer.Option(None, "--config", "-c", help="YAML file with any of the options below (flags override it)"),
    "nproc_per_node": typer.Option(1, "--nproc-per-node", min=1, max=1024,
                                   help="launch this many processes with torchrun"),
}


def _cli_type(name: str, annotation: Any) -> tuple[Any, str]:
    """The option type of a TrainConfig field, and its metavar (a Literal's choices, a JSON object)."""
    args = get_args(annotation) if get_origin(annotation) in (Union, UnionType) else (annotation,)
    args = tuple(a for a in args if a is not type(None))
    if any(get_origin(a) is list for a in args):
        return list[str], "<str, repeatable>"
    if any(a is dict or get_origin(a) is dict for a in args):
        return str, JSON
    if len(args) == 1 and get_origin(args[0]) is Literal:
        return str, "<" + "|".join(str(c) for c in get_args(args[0])) + ">"
    if len(args) == 1 and args[0] in (bool, int, float, str):
        return args[0], f"<{args[0].__name__}>"
    raise TypeError(f"TrainConfig.{name}: no command-line type for {annotation} (add one in vesl/cli/train.py)")


def option_name(name: str, field: FieldInfo) -> str:
    """The flag of a field, e.g. ``--batch-size`` or ``--box-bias/--no-box-bias``."""
    if name in OPTION_NAMES:
        return OPTION_NAMES[name]
    flag = name.replace("_", "-")
    return f"--{flag}/--no-{flag}" if _cli_type(name, field.annotation)[0] is bool else f"--{flag}"


def _option(name: str, field: FieldInfo) -> tuple[Any, Any]:
    """(type, typer.Option) of a field: its description as help, its default in brackets."""
    kind, metavar = _cli_type(name, field.annotation)
    text, default = field.description or "", field.get_default()
    if kind is bool:
        text += f" [{option_name(name, field).split('/')[0 if default else 1]}]"
    elif default is not None and default is not PydanticUndefined:
        text += f" [{default}]"
    return Optional[kind], typer.Option(None, option_name(name, field), help=text,
                                        metavar=None if kind is bool else metavar)


def train_options() -> dict[str, tuple[Any, Any]]:
    """Option name -> (type, typer.Option): every TrainConfig field, then the flags that are not fields."""
    from vesl.pretrain.train import TrainConfig

    out = {name: _option(name, field) for name, field in TrainConfig.model_fields.items()}
    return {"config": (Optional[Path], CLI_ONLY["config"]), **out,
            "nproc_per_node": (int, CLI_ONLY["nproc_per_node"])}


def _overrides(options: dict[str, Any]) -> dict[str, Any]:
    """Flag values -> TrainConfig overrides (None: not given, so the YAML file or the default holds)."""
    from vesl.pretrain.train import TrainConfig

    out = {}
    for name, value in options.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = value[0] if len(value) == 1 else value
        elif _cli_type(name, TrainConfig.model_fields[name].annotation)[1] == JSON:
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise UserError(f"{option_name(name, TrainConfig.model_fields[name])} must be a JSON object, e.g. "
                                f"'{{\"anon\": true}}' ({exc})") from None
        out[name] = value
    return out


def _train(config: Optional[Path] = None, nproc_per_node: int = 1, **options: Any) -> None:
    """Train a CLOC model (CLIP + region-text + grounding losses) on region-text shards."""
    import yaml

    from vesl.pretrain.train import load_config, train

    cfg = load_config(config, **_overrides(options))
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


def _train_command() -> Callable[..., None]:
    """``_train`` with a signature typer reads as one option per TrainConfig field."""

    def command(**kwargs: Any) -> None:
        _train(**kwargs)

    options = train_options()
    command.__doc__ = _train.__doc__
    command.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
         for n, (kind, opt) in options.items()])
    command.__annotations__ = {n: kind for n, (kind, _) in options.items()}
    return command


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


def _probe_mllm(
    tower: str = typer.Argument(..., help="vision tower: a `vesl export-model --format hf` folder or any "
                                "CLIPVisionModel folder"),
    data: str = typer.Option(..., "--data", help="LLaVA-format training JSON (`vesl export --format llava`)"),
    eval_data: str = typer.Option(..., "--eval", help="LLaVA-format held-out JSON"),
    lm: Optional[str] = typer.Option(None, "--lm", help="a local causal LM folder (default: a small Llama built "
                                     "from a config, with a tokenizer made from --data)"),
    steps: int = typer.Option(300, "--steps", help="training steps of the projector and LM"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    pool: int = typer.Option(0, "--pool", help="average-pool the patch grid by this factor (0: to at most 8x8)"),
    feature_layer: int = typer.Option(-2, "--feature-layer", help="LLaVA's vision_feature_layer"),
    max_eval: int = typer.Option(0, "--max-eval", help="score only the first N --eval questions (0: all)"),
    question_first: bool = typer.Option(True, "--question-first/--image-first", help="the question's words "
                                        "before the image tokens, or after them (LLaVA's training order)"),
    seeds: int = typer.Option(1, "--seeds", help="probe runs, with seeds --seed, --seed+1, ...: the mean, min "
                              "and max of each metric (one run's grounding turns on its seed)"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0: torch's default)"),
    out: Optional[str] = typer.Option(None, "--out", help="write the results JSON here"),
) -> None:
    """Train a small LLaVA on TOWER (frozen) and score grounding, referring and a control task (docs/mllm-probe.md)."""
    from vesl.pretrain.mllm_probe import ProbeConfig, probe_seeds

    cfg = ProbeConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, pool=pool, feature_layer=feature_layer,
                      max_eval=max_eval, threads=threads, question_first=question_first)
    probe_seeds(tower, data, eval_data, cfg, seeds, lm=lm, out=out, echo=typer.echo)
    if out:
        typer.echo(f"results: {out}")


def register(app: typer.Typer) -> None:
    app.command("probe-mllm")(_probe_mllm)
    app.command("train")(_train_command())
    app.command("eval")(_eval)
    app.command("export-model")(_export)
