"""The VeCap-style captioning prompt: a template in which the alt-text is only a hint to the VLM.

The template's sha256 goes into provenance, so two datasets made with different prompts never look alike.
"""

from __future__ import annotations

import hashlib

ALT_TEXT_FIELD = "{alt_text}"
MAX_ALT_TEXT_CHARS = 1000  # web alt-texts can be whole pages; a hint never needs more


def clean_alt_text(alt_text: str | None, max_chars: int = MAX_ALT_TEXT_CHARS) -> str:
    """Collapse whitespace and cap the length, so a noisy alt-text can't blow up the prompt."""
    return " ".join((alt_text or "").split())[:max_chars]


def render_prompt(template: str, alt_text: str | None) -> str:
    """Insert the alt-text by plain replacement: braces in alt-texts or templates never break formatting."""
    return template.replace(ALT_TEXT_FIELD, clean_alt_text(alt_text))


def prompt_hash(template: str) -> str:
    """sha256 of the template text (hex)."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()
