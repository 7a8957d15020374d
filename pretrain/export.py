"""Export a trained model as an open_clip ``local-dir`` folder, with the CLOC heads beside it.

Layout::

    OUT/open_clip_config.json          {"model_cfg": ..., "preprocess_cfg": ...}  (open_clip's format)
    OUT/open_clip_model.safetensors    the CLIP towers only
    OUT/vesl_heads.safetensors         Prompter + grounding head
    OUT/vesl_config.json               model name and Prompter settings

``open_clip.create_model("local-dir:OUT")`` or ``open_clip.create_model(NAME, pretrained=OUT/
open_clip_model.safetensors)`` gives the CLIP model; ``vesl.pretrain.load(OUT)`` gives the full model.
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
    from vesl.pretrain.train import checkpoint_dirs

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
    from safetensors.torch import load_file

    from vesl.pretrain.model import CLOCModel, PrompterConfig, create_model

    p = Path(path)
    if not p.exists():
        raise UserError(f"{p} does not exist")
    if (p / VESL_CONFIG).exists():
        import open_clip

        cfg = json.loads((p / VESL_CONFIG).read_text())
        clip = open_clip.create_model(f"local-dir:{p.resolve()}", device=device)
        model = CLOCModel(clip, f"local-dir:{p.resolve()}", PrompterConfig.from_saved(cfg["prompter"]))
        heads = load_file(str(p / HEADS_WEIGHTS))
        missing = model.load_state_dict(heads, strict=False)
        if missing.unexpected_keys or any(not k.startswith("clip.") for k in missing.missing_keys):
            raise UserError(f"{p / HEADS_WEIGHTS} does not match the model; re-export it with `vesl export-model`")
        return model.to(device).eval()
    ck = _checkpoint_dir(p)
    meta = json.loads((ck / "state.json").read_text())["model"]
    model = create_model(meta["model_name"], None, PrompterConfig.from_saved(meta["prompter"]), seed=None, device=device)
    with torch.no_grad():
        model.load_state_dict(load_file(str(ck / "model.safetensors"), device=str(device)))
    return model.eval()


def export_model(source: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Checkpoint (or run directory) -> open_clip-compatible folder plus the CLOC heads."""
    from open_clip.factory import get_model_config
    from safetensors.torch import save_file

    from vesl.pretrain.model import preprocess_cfg, register_model_configs

    model = load(source)
    register_model_configs()
    if model.model_name.startswith("local-dir:"):
        model_cfg = json.loads((Path(model.model_name[len("local-dir:"):]) / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    else:
        model_cfg = get_model_config(model.model_name)
    if model_cfg is None:
        raise UserError(f"no open_clip config for {model.model_name!r}; export needs a named or local-dir model")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pp = preprocess_cfg(model)
    oc = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": pp["mean"], "std": pp["std"], "size": pp["size"]}}
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(oc, indent=2))
    clip_sd = {k: v.detach().contiguous() for k, v in model.clip.state_dict().items()}
    save_file(clip_sd, str(out / CLIP_WEIGHTS))
    heads = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    save_file(heads, str(out / HEADS_WEIGHTS))
    name = model.model_name if not model.model_name.startswith("local-dir:") else json.loads(
        (Path(model.model_name[len("local-dir:"):]) / VESL_CONFIG).read_text())["model_name"]
    cfg = {"format": 1, "model_name": name, "prompter": model.config_dict()["prompter"]}
    (out / VESL_CONFIG).write_text(json.dumps(cfg, indent=2))
    return out
