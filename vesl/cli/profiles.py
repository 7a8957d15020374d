"""Named labeling profiles and config resolution.

A profile is a partial config (plain data). The final ``LabelConfig`` is built with the precedence
CLI flags > ``--config`` YAML file > ``--profile`` > built-in defaults.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from vesl.errors import UserError
from vesl.pipeline.config import LabelConfig

PAPER = {
    # CLOC's VESL setting: VeCap-style recaption, NP chunking, OWLv2 CLIP L/14 (ST+FT) with score > 0.1.
    "captioner": {"spec": "hf:Qwen/Qwen2.5-VL-3B-Instruct"},
    "phrases": {"mode": "paper", "max_phrases": 20},
    "detector": {"spec": "owlv2:google/owlv2-large-patch14-ensemble", "threshold": 0.1, "nms": "per_phrase"},
}

DEFAULT = {
    # Production default: a real VLM recaptioner and OWLv2 from the hub (offline: use --profile demo).
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


def _demo() -> dict[str, Any]:
    """The demo world's profile (its bundled offline models); the demo world is optional."""
    try:
        from vesl.demo import demo_profile
    except ModuleNotFoundError as exc:
        if exc.name not in ("vesl.demo", "vesl"):
            raise
        raise UserError("--profile demo needs the demo world (vesl/demo/), which this install lacks") from None
    return demo_profile()


def profile_names() -> list[str]:
    return ["default", "demo", "grit", "paper"]


def profile(name: str) -> dict[str, Any]:
    """The partial config of profile ``name`` (a fresh copy)."""
    table = {"default": DEFAULT, "paper": PAPER, "grit": GRIT}
    if name == "demo":
        return _demo()
    if name not in table:
        raise UserError(f"unknown profile {name!r}: use one of {', '.join(profile_names())}")
    return copy.deepcopy(table[name])


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
    merged = profile(profile_name or "default")
    if yaml_path is not None:
        merged = deep_merge(merged, load_yaml(yaml_path))
    merged = deep_merge(merged, overrides or {})
    return LabelConfig.model_validate(merged)
