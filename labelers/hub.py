"""Where a labeler's weights come from: a local folder, the local Hugging Face cache, or the hub.

One rule for every ``from_pretrained`` load: a local folder loads as it is; a hub id is pinned to one commit
while the hub can be reached, and loads from the local cache only (``local_files_only``) when
``HF_HUB_OFFLINE`` is set or the hub does not answer. Without that check an unreachable hub costs minutes:
huggingface_hub retries every request with backoff before transformers falls back to the cache.
"""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

DEFAULT_ENDPOINT = "https://huggingface.co"
_PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def is_local(model_id: str) -> bool:
    return Path(model_id).expanduser().exists()


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT


@functools.lru_cache(maxsize=8)
def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``endpoint`` opens within ``timeout`` seconds (once per process).

    Behind a proxy a direct connection proves nothing, so the answer is then True and the loaders decide.
    """
    if any(os.environ.get(v) for v in _PROXY_VARS):
        return True
    url = urlparse(endpoint)
    if not url.hostname:
        return True
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


def cache_only(model_id: str) -> bool:
    """Load ``model_id`` from the local cache only: it is a hub id and the hub is off or out of reach."""
    return not is_local(model_id) and (offline_mode() or not hub_reachable(hub_endpoint()))


def _hide_weight_loading_bar(factory: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    if kwargs.get("desc") == "Loading weights":
        kwargs = {**kwargs, "disable": True}
    return factory(*args, **kwargs)


def quiet_weight_loading() -> None:
    """Hide transformers' "Loading weights" bar, drawn for every model load between a job's own progress
    lines; download bars stay. Shown again when transformers' verbosity is INFO (``vesl --verbose``)."""
    from transformers.utils import logging as hf_logging

    if hf_logging.get_verbosity() > hf_logging.INFO and getattr(hf_logging, "_tqdm_hook", None) is None:
        hf_logging.set_tqdm_hook(_hide_weight_loading_bar)


def pretrained_kwargs(model_id: str, revision: str | None) -> tuple[dict[str, Any], str | None]:
    """``from_pretrained`` keyword arguments for ``model_id``, and the commit they pin (None when unknown).

    Pinning resolves the revision once so that every file of the load comes from the same commit. Every
    load asks for these first, so this is also where the per-load weight bar is hidden.
    """
    quiet_weight_loading()
    if is_local(model_id):
        return ({"revision": revision} if revision else {}), None
    if cache_only(model_id):
        return {"revision": revision, "local_files_only": True}, None
    try:
        from transformers.utils.hub import resolve_revision
    except ImportError:  # older transformers resolve on their own
        return ({"revision": revision} if revision else {}), None
    pinned = resolve_revision(model_id, revision)
    return {"revision": pinned}, getattr(pinned, "resolved", None)


def unavailable_reason() -> str | None:
    """Why a hub id that failed to load could not come from the hub, if the reason is the hub itself."""
    if offline_mode():
        return "HF_HUB_OFFLINE is set and it is not in the local cache"
    if not hub_reachable(hub_endpoint()):
        return f"{hub_endpoint()} can't be reached and it is not in the local cache"
    return None
