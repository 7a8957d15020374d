"""The openai backend against real HTTP servers: `transformers serve` with the tiny VLM, and small local
`http.server` servers that misbehave on purpose (500 then success, 429, slow, malformed, down, 401).

Every case ends as a caption or as an error row, never as a crashed batch; the API key never leaks.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from PIL import Image

from vesl.labelers.captioners import OpenAICaptioner, make_captioner
from vesl.pipeline.apply import apply_stage
from vesl.schemas.config import CaptionerConfig
from vesl.schemas.stage import Sample

SECRET = "sk-vesl-test-3f9c2a7d1e"
KEY_ENV = "VESL_TEST_OPENAI_KEY"
SERVE_START_TIMEOUT_S = 180  # ~15 s on an idle machine; generous for a loaded CI box


def _free_port() -> int:
    """A port that was free a moment ago: only for a server that reports a failed bind (it is retried)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _refusing_port():
    """A port bound to a socket that never listens: connections are refused, and no one else can take it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]


def _samples(n: int = 3) -> list[Sample]:
    sizes = [(64, 48), (96, 160), (120, 120), (40, 200)]
    colors = ["red", "blue", "green", "white"]
    return [Sample(key=f"k{i}", source_shard="s0", index=i, image=Image.new("RGB", sizes[i % 4], colors[i % 4]),
                   alt_text=f"a {colors[i % 4]} thing") for i in range(n)]


def _stage(base_url: str, **cfg) -> OpenAICaptioner:
    cfg = {"max_new_tokens": 8, "api_key_env": KEY_ENV, **cfg}
    stage = make_captioner(CaptionerConfig(spec=f"openai:{base_url}#tiny", **cfg), seed=1)
    stage.client.backoff_base_s = 0.05  # keep retries fast; the backoff law itself is tested below
    return stage


@pytest.fixture(autouse=True)
def _api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


# --------------------------------------------------------------------------- transformers serve


@pytest.fixture(scope="module")
def served_vlm(tiny_vlm_dir, tmp_path_factory):
    """`transformers serve DIR` on 127.0.0.1, started once for the module and always killed."""
    pytest.importorskip("fastapi")
    pytest.importorskip("uvicorn")
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    env.pop(KEY_ENV, None)
    attempts = 3  # the port may be taken between choosing it and the server's bind: then another one

    def start() -> tuple[subprocess.Popen, int]:
        port = _free_port()
        cmd = [sys.executable, "-m", "transformers.cli.transformers", "serve", str(tiny_vlm_dir),
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"]
        with open(log_path, "wb") as log:
            return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), port

    proc, port = start()
    try:
        deadline = time.monotonic() + SERVE_START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                attempts -= 1
                if attempts and "address already in use" in log_path.read_text().lower():
                    proc, port = start()
                    continue
                pytest.fail(f"transformers serve exited early:\n{log_path.read_text()[-3000:]}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"transformers serve not ready in {SERVE_START_TIMEOUT_S}s:\n"
                            f"{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1", str(tiny_vlm_dir)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_captions_from_transformers_serve(served_vlm, caplog):
    base_url, model = served_vlm
    caplog.set_level(logging.DEBUG)
    stage = make_captioner(
        CaptionerConfig(spec=f"openai:{base_url}#{model}", max_new_tokens=8, api_key_env=KEY_ENV,
                        max_concurrent_requests=2, timeout_s=60),
    )
    stage.setup()
    batch = apply_stage(stage, _samples(4))
    stage.teardown()
    assert [s.error for s in batch] == [None] * 4
    assert all(isinstance(s.caption, str) and s.caption and s.caption == s.caption.strip() for s in batch)
    assert {s.caption_source for s in batch} == {"vlm"}
    prov = stage.provenance()
    assert prov["captioner.backend"] == "openai"
    assert prov["captioner.model"] == model
    assert prov["captioner.base_url"] == base_url
    assert SECRET not in caplog.text
    assert SECRET not in json.dumps(prov)


# ----------------------------------------------------------------------- misbehaving servers


def _completion(text: str) -> bytes:
    return json.dumps({
        "id": "x", "object": "chat.completion", "model": "tiny",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
    }).encode()


class _Server:
    """A real HTTP server on 127.0.0.1 whose reply to the n-th POST comes from ``script(n, handler)``."""

    def __init__(self, script):
        self.script = script
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with outer.lock:
                    outer.requests.append({"path": self.path, "auth": self.headers.get("authorization"),
                                           "json": json.loads(body)})
                    n = len(outer.requests)
                status, payload, headers = outer.script(n, self)
                try:
                    self.send_response(status)
                    for k, v in {"content-type": "application/json", **headers}.items():
                        self.send_header(k, v)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def test_500_then_success_is_retried(caplog):
    script = lambda n, h: (500, b'{"error": "boom"}', {}) if n == 1 else (200, _completion(" a red square. "), {})  # noqa: E731
    with _Server(script) as srv, caplog.at_level(logging.WARNING):
        [s] = apply_stage(_stage(srv.url, max_retries=3), _samples(1))
    assert s.ok, s.error
    assert s.caption == "a red square."
    assert len(srv.requests) == 2
    req = srv.requests[0]
    assert req["path"] == "/v1/chat/completions"
    assert req["auth"] == f"Bearer {SECRET}"  # the key is sent ...
    content = req["json"]["messages"][0]["content"]
    assert content[0]["image_url"]["url"].startswith("data:image/jpeg;base64,")
    assert 'alt-text, which may be noisy or uninformative, is: "a red thing"' in content[1]["text"]
    assert req["json"]["max_tokens"] == 8
    assert "retry 1/3" in caplog.text
    assert SECRET not in caplog.text  # ... and never logged


def test_429_honours_retry_after_then_succeeds():
    script = lambda n, h: (429, b"slow down", {"retry-after": "0.3"}) if n == 1 else (200, _completion("ok"), {})  # noqa: E731
    with _Server(script) as srv:
        t0 = time.monotonic()
        [s] = apply_stage(_stage(srv.url, max_retries=2), _samples(1))
        elapsed = time.monotonic() - t0
    assert s.caption == "ok"
    assert len(srv.requests) == 2
    assert elapsed >= 0.3


def test_persistent_5xx_is_an_infrastructure_failure_after_max_retries():
    """5xx after every retry is the server's failure, not the sample's: marked so the shard won't commit."""
    with _Server(lambda n, h: (503, b"overloaded", {})) as srv:
        batch = apply_stage(_stage(srv.url, max_retries=2), _samples(2))
    assert [s.error.error_type for s in batch] == ["HTTP503", "HTTP503"]
    assert all(s.error.infrastructure for s in batch)
    assert all("after 3 attempts" in s.error.message for s in batch)
    assert len(srv.requests) == 6


def test_timeout_becomes_error_row():
    def slow(n, handler):
        time.sleep(3.0)
        return 200, _completion("too late"), {}

    with _Server(slow) as srv:
        [s] = apply_stage(_stage(srv.url, timeout_s=0.3, max_retries=1), _samples(1))
    assert s.error is not None  # without the 0.3 s timeout the 3 s answer would have become the caption
    assert s.error.stage == "caption"
    assert s.error.error_type == "ReadTimeout"
    assert s.error.infrastructure
    assert len(srv.requests) == 2  # a timeout is retried like a connection error


@pytest.mark.parametrize(
    "payload",
    [b"this is not json", b'{"choices": []}', b'{"choices": [{"message": {"content": 42}}]}', b"[1, 2]"],
)
def test_malformed_response_becomes_error_row(payload):
    with _Server(lambda n, h: (200, payload, {})) as srv:
        [s] = apply_stage(_stage(srv.url, max_retries=3), _samples(1))
    assert s.error.error_type == "BadResponse"
    assert s.caption is None
    assert len(srv.requests) == 1  # a malformed answer is not retried


def test_empty_completion_becomes_error_row():
    with _Server(lambda n, h: (200, _completion("   "), {})) as srv:
        [s] = apply_stage(_stage(srv.url), _samples(1))
    assert s.error.error_type == "EmptyCaption"


def test_server_down_is_an_infrastructure_failure_not_a_crash():
    with _refusing_port() as port:
        stage = _stage(f"http://127.0.0.1:{port}/v1", max_retries=1, timeout_s=2)
        batch = apply_stage(stage, _samples(3))
    assert [s.error.error_type for s in batch] == ["ConnectError"] * 3
    assert all(s.error.infrastructure for s in batch)  # the shard will not commit
    assert all(s.caption is None for s in batch)


def test_circuit_breaker_stops_requests_to_a_dead_server():
    """After `breaker_failures` requests in a row failed, the rest fail at once without a request."""
    with _Server(lambda n, h: (503, b"down", {})) as srv:
        stage = _stage(srv.url, max_retries=1, max_concurrent_requests=1, breaker_failures=2)
        batch = apply_stage(stage, _samples(6))
        assert len(srv.requests) == 4  # 2 requests x 2 attempts, then the circuit is open
        assert all(s.error.infrastructure for s in batch)
        assert "HTTP 503" in stage.client.breaker.open_because()
        again = apply_stage(stage, _samples(2))  # still open: no request at all
        assert len(srv.requests) == 4
        assert all(s.error.infrastructure for s in again)


def test_url_credentials_are_never_sent_and_only_the_configured_key_is():
    """user:password in the URL would make httpx send Basic auth (and drop the Bearer key)."""
    seen = []

    def echo(n, handler):
        seen.append(handler.headers.get("authorization"))
        return 400, f'{{"echo": "{handler.headers.get("authorization")}"}}'.encode(), {}

    with _Server(echo) as srv:
        url = srv.url.replace("http://", "http://user:secretpw@") + "?api_key=querysecret"
        stage = _stage(url)
        [s] = apply_stage(stage, _samples(1))
    assert seen == [f"Bearer {SECRET}"]
    for leaked in ("secretpw", "querysecret", SECRET, "dXNlcjpzZWNyZXRwdw"):
        assert leaked not in s.error.message
        assert leaked not in json.dumps(stage.provenance())


def test_spec_without_model_does_not_print_the_password():
    from vesl.errors import UserError

    with pytest.raises(UserError) as e:
        make_captioner(CaptionerConfig(spec="openai:http://user:secretpw@host:1/v1?api_key=k123"))
    assert "secretpw" not in str(e.value)
    assert "k123" not in str(e.value)


def test_api_key_never_in_error_messages_or_logs(caplog):
    """A server that echoes the Authorization header back in its 401 body: the row must not keep it."""

    def echo_auth(n, handler):
        return 401, f'{{"error": "invalid key {handler.headers.get("authorization")}"}}'.encode(), {}

    with _Server(echo_auth) as srv, caplog.at_level(logging.DEBUG):
        stage = _stage(srv.url, max_retries=3)
        [s] = apply_stage(stage, _samples(1))
    assert len(srv.requests) == 1  # 401 is not retried
    assert s.error.error_type == "HTTP401"
    assert "invalid key Bearer ***" in s.error.message
    assert SECRET not in s.error.message
    assert SECRET not in caplog.text
    assert SECRET not in json.dumps(stage.provenance())
    assert SECRET not in repr(s.error)


def test_no_key_env_sends_no_authorization(monkeypatch):
    monkeypatch.delenv(KEY_ENV)
    with _Server(lambda n, h: (200, _completion("fine"), {})) as srv:
        [s] = apply_stage(_stage(srv.url), _samples(1))
    assert s.caption == "fine"
    assert srv.requests[0]["auth"] is None


def test_concurrency_is_bounded():
    state = {"now": 0, "peak": 0}
    lock = threading.Lock()

    def counting(n, handler):
        with lock:
            state["now"] += 1
            state["peak"] = max(state["peak"], state["now"])
        time.sleep(0.3)
        with lock:
            state["now"] -= 1
        return 200, _completion(f"caption {n}"), {}

    with _Server(counting) as srv:
        batch = apply_stage(_stage(srv.url, max_concurrent_requests=2), _samples(6))
    assert all(s.ok for s in batch)
    assert len(srv.requests) == 6
    assert state["peak"] == 2


def test_backoff_is_exponential_capped_and_seeded():
    import random

    client = make_captioner(CaptionerConfig(spec="openai:http://127.0.0.1:1/v1#m"), seed=3).client
    delays = [client.backoff(a, random.Random("3:k")) for a in range(8)]
    again = [client.backoff(a, random.Random("3:k")) for a in range(8)]
    assert delays == again
    for a, d in enumerate(delays):
        full = min(client.backoff_max_s, client.backoff_base_s * 2**a)
        assert full / 2 <= d <= full
    assert client.backoff(0, random.Random(0), retry_after=5.0) == 5.0
    assert client.backoff(0, random.Random(0), retry_after=1e9) == client.backoff_max_s


def test_label_end_to_end_through_transformers_serve(served_vlm, tmp_path):
    from tests.test_captioners import _label_end_to_end

    base_url, model = served_vlm
    cfg = CaptionerConfig(spec=f"openai:{base_url}#{model}", max_new_tokens=6, api_key_env=KEY_ENV)
    rows = _label_end_to_end(cfg, tmp_path)
    assert len(rows) == 4
    assert {r["caption_source"] for r in rows} == {"vlm"}
    assert all(r["caption"] for r in rows)
    assert SECRET not in (tmp_path / "manifest.json").read_text()
