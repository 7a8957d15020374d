"""The VeCap-style captioning prompt: a template in which the alt-text is only a hint to the VLM.

The template's sha256 goes into provenance, so two datasets made with different prompts never look alike.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

ALT_TEXT_FIELD = "{alt_text}"
MAX_ALT_TEXT_CHARS = 1000  # web alt-texts can be whole pages; a hint never needs more


def clean_alt_text(alt_text: str | None, max_chars: int = MAX_ALT_TEXT_CHARS) -> str:
    """Collapse whitespace and cap the length, so a noisy alt-text can't blow up the prompt."""
    return " ".join((alt_text or "").split())[:max_chars]


def strip_control_tokens(text: str, control_tokens: Iterable[str]) -> str:
    """Remove a model's control tokens ("<image>", "<|im_end|>", ...) from untrusted text.

    Processors expand image placeholders by string search before tokenizing, so one such token in a
    web alt-text would break the image count or end the user turn. Repeats until stable, so removing
    one token can't leave another behind ("<im<image>age>").
    """
    tokens = sorted({t for t in control_tokens if t}, key=len, reverse=True)
    for _ in range(len(text) + 1):
        cleaned = text
        for t in tokens:
            cleaned = cleaned.replace(t, "")
        if cleaned == text:
            break
        text = cleaned
    return text


def render_prompt(template: str, alt_text: str | None, control_tokens: Iterable[str] = ()) -> str:
    """Insert the alt-text by plain replacement: braces in alt-texts or templates never break formatting."""
    alt = clean_alt_text(strip_control_tokens(alt_text or "", control_tokens))
    return template.replace(ALT_TEXT_FIELD, alt)


def prompt_hash(template: str) -> str:
    """sha256 of the template text (hex)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()
