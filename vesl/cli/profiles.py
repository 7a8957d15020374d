"""Named labeling profiles and config resolution.

A profile is a partial config (plain data): the built-in ones below, or an installed package's, declared
in the ``vesl.profiles`` entry-point group. The final ``LabelConfig`` is built with the precedence
CLI flags > ``--config`` YAML file > ``--profile`` > built-in defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vesl.errors import UserError

if TYPE_CHECKING:  # imported where a config is built, so that listing the profiles for `--help` stays light
    from vesl.pipeline.config import LabelConfig

PAPER = {
    # CLOC's VESL setting: VeCap-style recaption, NP chunking, OWLv2 CLIP L/14 (ST+FT) with score > 0.1.
    "captioner": {"spec": "hf:Qwen/Qwen2.5-VL-3B-Instruct"},
    "phrases": {"mode": "paper", "max_phrases": 20},
    "detector": {"spec": "owlv2:google/owlv2-large-patch14-ensemble", "threshold": 0.1, "nms": "per_phrase"},
}

DEFAULT = {
    # Production default: a real VLM recaptioner and OWLv2 from the hub (offline: a local model path, or an installed plugin's profile).
    "captioner": {"spec": "hf:Qwen/Qwen2.5-VL-3B-Instruct"},
    "phrases": {"mode": "paper"},
    "detector": {"spec": "owlv2:google/owlv2-base-patch16-ensemble", "threshold": 0.1},
}

GRIT = {
    # Kosmos-2 GRIT: alt-text captions, spaCy noun chunks expanded to referring expressions,
    # a grounding detector with NMS across phrases, score > 0.65.
    "captioner": {"spec": "alt_text"},
    "phrases": {"mode": "noun_chunks", "expand_referring": True},
    "detector": {
        "spec": "grounding-dino:IDEA-Research/grounding-dino-base",
        "threshold": 0.65,
        "nms": "class_agnostic",
    },
}


PROFILE_GROUP = "vesl.profiles"  # entry points: ``name = "package.module:attr"``, a dict or a function returning one
BUILT_IN = {"default": DEFAULT, "paper": PAPER, "grit": GRIT}


def _plugins() -> dict[str, Any]:
    """Installed packages' profiles by name; a built-in name cannot be taken over."""
    from importlib.metadata import entry_points

    return {ep.name: ep for ep in entry_points(group=PROFILE_GROUP) if ep.name not in BUILT_IN}


def profile_names() -> list[str]:
    return sorted([*BUILT_IN, *_plugins()])


def profile(name: str) -> dict[str, Any]:
    """The partial config of profile ``name`` (a fresh copy)."""
    if name in BUILT_IN:
        return copy.deepcopy(BUILT_IN[name])
    ep = _plugins().get(name)
    if ep is None:
        raise UserError(f"unknown profile {name!r}: use one of {', '.join(profile_names())}")
    try:
        found = ep.load()
        data = found() if callable(found) else copy.deepcopy(found)
    except Exception as exc:
        raise UserError(f"profile {name!r} ({ep.value}) failed to load: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise UserError(f"profile {name!r} ({ep.value}) must give a mapping of LabelConfig fields, "
                        f"got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` wins; nested dicts merge key by key (so a YAML file can set one detector field)."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found: pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise UserError(f"config file {p} is not valid YAML{at}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must be a YAML mapping of LabelConfig fields, got {type(data).__name__}")
    return data


def resolve_config(
    profile_name: str | None = "default", yaml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> LabelConfig:
    """Build the job config: CLI ``overrides`` > YAML file > profile > defaults.

    Unknown keys anywhere raise pydantic's ValidationError (the CLI prints it as one line).
    """
    from vesl.pipeline.config import LabelConfig

    merged = profile(profile_name or "default")
    if yaml_path is not None:
        merged = deep_merge(merged, load_yaml(yaml_path))
    merged = deep_merge(merged, overrides or {})
    return LabelConfig.model_validate(merged)
