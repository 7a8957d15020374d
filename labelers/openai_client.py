"""An OpenAI-compatible chat-completions client: retries with seeded backoff, Retry-After, a circuit breaker,
and no credential in anything it sends by mistake, logs or raises.

Its own httpx loop, not the ``openai`` SDK: the SDK's backoff (0.5 s start, 8 s cap, unseeded jitter) is fixed
in private methods and its retries run inside one call, while vesl's backoff is configurable and seeded per
sample, and the breaker is asked before every attempt.

It knows nothing of samples or stages: ``complete(key, body)`` returns the answer's text or raises
``RequestFailed``; ``key`` only seeds the jitter and names the request in logs.
"""

from __future__ import annotations

import base64
import io
import logging
import os
import random
import threading
import time
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from vesl.redact import redact

log = logging.getLogger(__name__)


class RequestFailed(Exception):
    """A request that still failed after its retries; ``error_type`` names the last cause.

    ``infrastructure``: the server was unreachable, timed out or answered 429/5xx to every attempt,
    so the failure says nothing about the sample (its shard is not committed; a rerun retries it).
    """

    def __init__(self, message: str, error_type: str, infrastructure: bool = False):
        super().__init__(message)
        self.error_type = error_type
        self.infrastructure = infrastructure


def strip_userinfo(url: str) -> str:
    """Drop user:password from a URL: never sent (httpx would turn it into Basic auth) nor shown."""
    parts = urlsplit(url)
    if parts.username or parts.password:
        netloc = parts.hostname or ""
        if parts.port:
            netloc += f":{parts.port}"
        return urlunsplit(parts._replace(netloc=netloc))
    return url


def redact_url(url: str) -> str:
    """A URL fit for provenance and logs: no userinfo, no secret query parameters."""
    return redact(strip_userinfo(url))


def image_data_url(image, format: str = "JPEG", **save_kwargs: Any) -> str:
    """A base64 data URL of the image, the form OpenAI-style ``image_url`` content takes."""
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format=format, **save_kwargs)
    return f"data:image/{format.lower()};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def user_message(image_url: str, text: str) -> list[dict]:
    """One user turn of an image and a text, in the OpenAI chat format."""
    content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": text}]
    return [{"role": "user", "content": content}]


def message_text(data: Any) -> str:
    """``choices[0].message.content`` of a chat completion; raises on any other shape."""
    content = data["choices"][0]["message"]["content"]
    if isinstance(content, list):  # some servers return content parts
        content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
    if content is not None and not isinstance(content, str):
        raise TypeError(f"message content is {type(content).__name__}, not text")
    return content or ""


def retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header; None when absent or an HTTP date (our own backoff applies)."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


class Breaker:
    """Circuit breaker: after ``threshold`` requests in a row failed for the infrastructure (each after
    its retries), further requests fail at once for ``cooldown_s``; then one is let through again."""

    def __init__(self, threshold: int, cooldown_s: float):
        self.threshold = max(1, int(threshold))
        self.cooldown_s = cooldown_s
        self._failures = 0
        self._opened_at: float | None = None
        self._last = ""
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"threshold": self.threshold, "cooldown_s": self.cooldown_s}  # a worker starts closed

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["threshold"], state["cooldown_s"])

    def open_because(self) -> str | None:
        with self._lock:
            if self._opened_at is None:
                return None
            if time.monotonic() - self._opened_at >= self.cooldown_s:
                self._opened_at = None  # half-open: the next request probes the server
                self._failures = self.threshold - 1
                return None
            return self._last

    def failure(self, message: str) -> None:
        with self._lock:
            self._failures += 1
            self._last = message
            if self._failures >= self.threshold:
                self._opened_at = time.monotonic()

    def success(self) -> None:
        with self._lock:
            self._failures = 0
            self._opened_at = None


class ChatClient:
    """Chat completions at ``base_url``: retries 429, 5xx, timeouts and connection errors with exponential
    backoff and seeded jitter (honouring Retry-After); other 4xx and malformed answers fail at once.

    The API key is read from the environment variable ``api_key_env`` in ``open()`` (on the worker, never
    pickled) and is scrubbed from every message; credentials in the URL are dropped, never sent.
    """

    def __init__(self, base_url: str, *, api_key_env: str, timeout_s: float, max_connections: int,
                 max_retries: int, seed: int, breaker: Breaker, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 30.0):
        self.base_url = strip_userinfo(base_url.rstrip("/"))
        self.url = self.base_url + "/chat/completions"
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_connections = max(1, max_connections)
        self.max_retries = max(0, max_retries)
        self.seed = seed
        self.breaker = breaker
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self._http = None
        self._secret: str | None = None

    def __getstate__(self) -> dict:
        # the HTTP client and the key stay on the machine that opened them; a worker opens its own
        return {k: (None if k in ("_http", "_secret") else v) for k, v in self.__dict__.items()}

    def open(self) -> None:
        if self._http is not None:
            return
        import httpx

        self._secret = os.environ.get(self.api_key_env) or None
        headers = {"Authorization": f"Bearer {self._secret}"} if self._secret else {}
        n = self.max_connections
        self._http = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(self.timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
        )

    def close(self) -> None:
        if self._http is not None:
            self._http.close()
            self._http = None

    def scrub(self, text: str) -> str:
        """No credential of any form (the key, Basic/Bearer values a server echoes, URL secrets)."""
        return redact(text, self._secret)

    def backoff(self, attempt: int, rng: random.Random, retry_after: float | None = None) -> float:
        """Exponential backoff with 'equal jitter'; a server's Retry-After wins when it asks for longer."""
        delay = min(self.backoff_max_s, self.backoff_base_s * (2**attempt))
        delay = delay / 2 + rng.uniform(0, delay / 2)
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.backoff_max_s))
        return delay

    def complete(self, key: str, body: dict) -> str:
        """One chat completion with retries; returns the answer's text or raises RequestFailed."""
        import httpx

        rng = random.Random(f"{self.seed}:{key}")  # per-request jitter: deterministic and thread-safe
        attempts = self.max_retries + 1
        for attempt in range(attempts):
            open_because = self.breaker.open_because()
            if open_because is not None:  # every recent request failed: don't hammer a dead server
                raise RequestFailed(
                    f"circuit open: the last {self.breaker.threshold} requests failed ({open_because})",
                    "CircuitOpen", infrastructure=True,
                )
            wait = None
            try:
                resp = self._http.post(self.url, json=body)
            except httpx.TransportError as exc:  # refused, reset, timeouts
                error_type, message = type(exc).__name__, f"{type(exc).__name__}: {exc}"
            else:
                if resp.is_success:
                    self.breaker.success()
                    return self._parse(resp)
                error_type = f"HTTP{resp.status_code}"
                message = f"HTTP {resp.status_code} from {redact_url(self.url)}: {resp.text[:300]}"
                if resp.status_code != 429 and resp.status_code < 500:
                    self.breaker.success()  # the server answered: it is up
                    raise RequestFailed(self.scrub(message), error_type)
                wait = retry_after(resp.headers.get("retry-after"))
            message = self.scrub(message)
            if attempt + 1 >= attempts:
                self.breaker.failure(message[:200])
                raise RequestFailed(f"{message} (after {attempts} attempts)", error_type, infrastructure=True)
            delay = self.backoff(attempt, rng, wait)
            log.warning("chat request for %s failed (%s); retry %d/%d in %.2fs",
                        key, message[:200], attempt + 1, attempts - 1, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _parse(self, resp) -> str:
        try:
            return message_text(resp.json())
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise RequestFailed(
                self.scrub(f"malformed chat completion ({type(exc).__name__}: {exc}): {resp.text[:200]}"),
                "BadResponse",
            ) from None
