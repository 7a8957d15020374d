"""Shared fixtures. Heavy ones (tiny models, the Ray session) are session-scoped and built once."""

from __future__ import annotations

import os
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("HF_MODULES_CACHE", tempfile.mkdtemp(prefix="vesl-test-hf-modules-"))  # remote code tests


@pytest.fixture(scope="session")
def tiny_vlm_dir(tmp_path_factory):
    """A tiny Qwen2-VL saved with save_pretrained (config, weights, trained tokenizer, processor)."""
    from tests.tiny_vlm import build_tiny_vlm

    return build_tiny_vlm(tmp_path_factory.mktemp("tiny_vlm"))


@pytest.fixture(scope="session")
def tiny_owlv2_dir(tmp_path_factory):
    from tests.tiny_detectors import build_tiny_owlv2

    return build_tiny_owlv2(tmp_path_factory.mktemp("tiny_owlv2"))


@pytest.fixture(scope="session")
def tiny_grounding_dino_dir(tmp_path_factory):
    from tests.tiny_detectors import build_tiny_grounding_dino

    return build_tiny_grounding_dino(tmp_path_factory.mktemp("tiny_gdino"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray session for the whole test run (ray.init costs ~20 s)."""
    ray = pytest.importorskip("ray")
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    yield ray
    ray.shutdown()
