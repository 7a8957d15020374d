"""Export a trained model as an open_clip ``local-dir`` folder, with the CLOC heads beside it.

Layout::

    OUT/open_clip_config.json          {"model_cfg": ..., "preprocess_cfg": ...}  (open_clip's format)
    OUT/open_clip_model.safetensors    the CLIP towers only
    OUT/vesl_heads.safetensors         Prompter + grounding head
    OUT/vesl_config.json               model name and Prompter settings

``open_clip.create_model("local-dir:OUT")`` or ``open_clip.create_model(NAME, pretrained=OUT/
open_clip_model.safetensors)`` gives the CLIP model; ``vesl.pretrain.load(OUT)`` gives the full model.

``format="hf"`` writes a transformers ``CLIPModel`` folder instead (see ``vesl.pretrain.hf``);
``vesl.pretrain.load`` reads both layouts.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from vesl.errors import UserError

CLIP_WEIGHTS = "open_clip_model.safetensors"
HEADS_WEIGHTS = "vesl_heads.safetensors"
VESL_CONFIG = "vesl_config.json"
OPEN_CLIP_CONFIG = "open_clip_config.json"


def _checkpoint_dir(path: Path) -> Path:
    from vesl.pretrain.checkpoint import checkpoint_dirs

    if (path / "state.json").exists():
        return path
    found = checkpoint_dirs(path)
    if not found:
        raise UserError(f"{path} holds no checkpoint (state.json) or export ({VESL_CONFIG}); pass a run directory, "
                        "a checkpoints/step-* folder, or an export folder")
    return found[-1]


def load(path: str | os.PathLike, device: str = "cpu"):
    """The full CLOC model from an export folder, a run directory (latest checkpoint) or a checkpoint."""
    import torch

    from vesl.pretrain.checkpoint import REEXPORT, read_safetensors
    from vesl.pretrain.model import CLOCModel, PrompterConfig, create_model

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if (p / VESL_CONFIG).exists():
        import open_clip

        cfg = json.loads((p / VESL_CONFIG).read_text())
        if cfg.get("layout") == "transformers":
            from vesl.pretrain.hf import load_open_clip_from_hf

            return load_open_clip_from_hf(p, device=device)
        read_safetensors(p / CLIP_WEIGHTS, REEXPORT)  # open_clip would read it with a traceback when unusable
        clip = open_clip.create_model(f"local-dir:{p.resolve()}", device=device)
        model = CLOCModel(clip, f"local-dir:{p.resolve()}", PrompterConfig.from_saved(cfg["prompter"]))
        heads = read_safetensors(p / HEADS_WEIGHTS, REEXPORT)
        missing = model.load_state_dict(heads, strict=False)
        if missing.unexpected_keys or any(not k.startswith("clip.") for k in missing.missing_keys):
            raise UserError(f"{p / HEADS_WEIGHTS} does not match the model; re-export it with `vesl export-model`")
        return model.to(device).eval()
    ck = _checkpoint_dir(p)
    meta = json.loads((ck / "state.json").read_text())["model"]
    model = create_model(meta["model_name"], None, PrompterConfig.from_saved(meta["prompter"]), seed=None, device=device)
    with torch.no_grad():
        model.load_state_dict(read_safetensors(ck / "model.safetensors", "pass another checkpoint (checkpoints/step-*)",
                                               device))
    return model.eval()


FORMATS = ("open_clip", "hf")
# every file either layout writes: --overwrite removes them first, so two layouts never mix in one folder
_EXPORT_FILES = (CLIP_WEIGHTS, HEADS_WEIGHTS, VESL_CONFIG, OPEN_CLIP_CONFIG, "config.json", "model.safetensors",
                 "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                 "vocab.json", "merges.txt")


def _model_cfg(model) -> tuple[dict, str]:
    """(open_clip model config, model name) of a loaded CLOC model, following local-dir exports to their name."""
    from open_clip.factory import get_model_config

    from vesl.pretrain.model import register_model_configs

    register_model_configs()
    if model.model_name.startswith("local-dir:"):
        src = Path(model.model_name[len("local-dir:"):])
        model_cfg = json.loads((src / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
        name = json.loads((src / VESL_CONFIG).read_text())["model_name"]
    else:
        model_cfg, name = get_model_config(model.model_name), model.model_name
    if model_cfg is None:
        raise UserError(f"no open_clip config for {model.model_name!r}; export needs a named or local-dir model")
    return model_cfg, name


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; pass a new --out folder (or --overwrite to replace the export in it)")


def _clear_out(out: Path) -> None:
    if out.exists():
        for name in _EXPORT_FILES:
            (out / name).unlink(missing_ok=True)


def export_model(source: str | os.PathLike, out_dir: str | os.PathLike, format: str = "open_clip",
                 overwrite: bool = False) -> Path:
    """Checkpoint, run directory or export -> an open_clip folder (``format="open_clip"``) or a transformers
    ``CLIPModel`` folder (``format="hf"``), with the CLOC heads beside it. A non-empty ``out_dir`` is refused
    unless ``overwrite``."""
    from safetensors.torch import save_file

    from vesl.pretrain.model import preprocess_cfg

    if format not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {format!r}")
    out = Path(out_dir)
    _check_out(out, overwrite)
    model = load(source)
    model_cfg, name = _model_cfg(model)
    if format == "hf":
        from vesl.pretrain.hf import check_mappable, export_hf

        check_mappable(model.clip)  # the one-line reason before anything in --out is touched
        _clear_out(out)
        return export_hf(model, out, model_cfg, name)
    _clear_out(out)
    out.mkdir(parents=True, exist_ok=True)
    pp = preprocess_cfg(model)
    oc = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": pp["mean"], "std": pp["std"], "size": pp["size"]}}
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(oc, indent=2))
    clip_sd = {k: v.detach().contiguous() for k, v in model.clip.state_dict().items()}
    save_file(clip_sd, str(out / CLIP_WEIGHTS))
    heads = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    save_file(heads, str(out / HEADS_WEIGHTS))
    cfg = {"format": 1, "model_name": name, "prompter": model.config_dict()["prompter"]}
    (out / VESL_CONFIG).write_text(json.dumps(cfg, indent=2))
    return out
