"""Where weights come from: a hub that can't be reached means the local cache, at once, not minutes of retries."""

from __future__ import annotations

import socket
import time

import pytest

from vesl.errors import UserError
from vesl.labelers import hub
from vesl.labelers.captioners import make_captioner
from vesl.labelers.detectors import make_detector
from vesl.schemas.config import CaptionerConfig, DetectorConfig


def _closed_port() -> int:
    """A local port nothing listens on (connections are refused at once)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def unreachable_hub(monkeypatch, tmp_path):
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    hub.hub_reachable.cache_clear()
    yield
    hub.hub_reachable.cache_clear()


def test_reachability_is_a_quick_tcp_check_and_proxies_defer_to_the_loaders(monkeypatch):
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    hub.hub_reachable.cache_clear()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert hub.hub_reachable(f"http://127.0.0.1:{server.getsockname()[1]}")
    assert not hub.hub_reachable(f"http://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    hub.hub_reachable.cache_clear()
    assert hub.hub_reachable(f"http://127.0.0.1:{_closed_port()}")
    hub.hub_reachable.cache_clear()


def test_unreachable_hub_loads_from_the_cache_only(unreachable_hub, tiny_vlm_dir):
    assert hub.cache_only("some-org/some-model")
    kw, commit = hub.pretrained_kwargs("some-org/some-model", None)
    assert kw == {"revision": None, "local_files_only": True}
    assert commit is None
    assert not hub.cache_only(str(tiny_vlm_dir))  # a local folder never asks the hub
    assert hub.pretrained_kwargs(str(tiny_vlm_dir), None) == ({}, None)


def test_unreachable_hub_gives_a_one_line_error_within_seconds(unreachable_hub):
    t = time.perf_counter()
    with pytest.raises(UserError) as cap:
        make_captioner(CaptionerConfig(spec="hf:vesl-tests/no-such-vlm")).setup()
    with pytest.raises(UserError) as det:
        make_detector(DetectorConfig(spec="owlv2:vesl-tests/no-such-owlv2")).setup()
    assert time.perf_counter() - t < 30  # huggingface_hub's retries took 2 min 45 s before this check
    for err in (cap, det):
        msg = str(err.value)
        assert "can't be reached" in msg
        assert "--profile demo" in msg
        assert "\n" not in msg
