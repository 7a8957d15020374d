"""Credential redaction: what the user configured as a secret never reaches a log line, an error row,
provenance, the manifest or a dataset card.

Covers every form a credential takes in a URL or spec: ``user:password@`` userinfo, query
parameters that carry keys or tokens (``?api_key=...``, ``&token=...``, signed-URL signatures),
and ``Authorization`` values (Bearer and Basic) echoed back by a server.
"""

from __future__ import annotations

import re

REDACTED = "***"
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^/?#@\s]*@")
_SECRET_PARAM = re.compile(
    r"(?i)([?&;](?:api[_-]?key|apikey|key|token|access[_-]?token|auth|password|passwd|secret|sig|signature|"
    r"x-amz-signature|x-amz-credential|x-amz-security-token|client[_-]?secret)=)[^&#\s\"']*"
)
_AUTH_HEADER = re.compile(r"(?i)\b(bearer|basic)\s+[a-z0-9._~+/=-]{4,}")


def redact(text: str, *secrets: str | None) -> str:
    """``text`` with URL userinfo, secret query parameters, Authorization values and each of
    ``secrets`` (and its base64 Basic-auth forms) replaced by ``***``."""
    if not text:
        return text
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    text = _USERINFO.sub(r"\1", text)
    text = _SECRET_PARAM.sub(rf"\1{REDACTED}", text)
    return _AUTH_HEADER.sub(rf"\1 {REDACTED}", text)
