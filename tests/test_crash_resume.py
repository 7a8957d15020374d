"""Crash safety: SIGKILL `vesl label` at several points, rerun, and get the uninterrupted result.

The final dataset must equal a run that was never interrupted: the same shard bytes, the same
rows, no duplicate and no missing keys, and no temp files left behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq

from tests.shard_checks import stats_without_timings
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.engines.local import run_local
from vesl.pipeline.writer import committed_shards
from vesl.schemas.manifest import check_dataset
from vesl.schemas.region_text import validate

VESL = str(Path(sys.executable).parent / "vesl")
INPUT = "synth://120?seed=5&shard_size=12"  # 10 input shards
SHARDS = 10


def _start(out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        [VESL, "label", INPUT, "--output", str(out), "--no-progress", "--captioner", "alt_text", "--detector", "none", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        start_new_session=True,  # its own process group, so the test can see every process it left
    )


def _kill_when(proc: subprocess.Popen, out: Path, cond: Callable[[list[str]], bool], timeout: float = 240) -> bool:
    """SIGKILL the labeling process (only it, like the OOM killer) once ``cond(listing)`` holds.
    Returns whether it was killed (False: it finished first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        names = os.listdir(out) if out.exists() else []
        if cond(names):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            _wait_group_gone(proc.pid)
            return True
        time.sleep(0.002)
    proc.kill()
    raise AssertionError("labeling never reached the kill point")


def _wait_group_gone(pgid: int, timeout: float = 30) -> None:
    """Workers must exit on their own when their parent is killed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    raise AssertionError("worker processes outlived the killed parent")


def _n_committed(names: list[str]) -> int:
    return sum(n.endswith(".stats.json") for n in names)


def _consistent(out: Path) -> None:
    """After any crash: every committed shard is whole (hashes match its stats)."""
    bad = [v for v in check_dataset(out) if v.kind not in ("uncommitted", "manifest")]
    assert bad == []




def test_sigkill_at_several_points_then_resume_equals_uninterrupted_run(tmp_path):
    ref = tmp_path / "ref"
    run_local(LabelConfig(inputs=[INPUT], output=str(ref)), progress=False)
    assert len(committed_shards(ref)) == SHARDS

    out = tmp_path / "out"
    # 1. right after the first commit (mid-way through the next shard)
    assert _kill_when(_start(out), out, lambda names: _n_committed(names) >= 1)
    _consistent(out)
    # 2. while a file is being written under its temp name (or, if that window is missed, after 3 commits)
    killed = _kill_when(_start(out), out, lambda names: any(n.endswith(".tmp") for n in names) or _n_committed(names) >= 3)
    assert killed
    _consistent(out)
    # 3. with two worker processes, after 6 commits
    assert _kill_when(_start(out, "--workers", "2"), out, lambda names: _n_committed(names) >= 6)
    _consistent(out)
    assert len(committed_shards(out)) < SHARDS

    # 4. finish
    proc = _start(out)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()

    assert sorted(os.listdir(out)) == sorted(os.listdir(ref))  # no temp files, nothing extra
    for p in sorted(ref.iterdir()):
        if not p.name.endswith(".stats.json"):
            assert (out / p.name).read_bytes() == p.read_bytes(), p.name
    assert stats_without_timings(out) == stats_without_timings(ref)
    keys: list[str] = []
    for name in committed_shards(out):
        keys += pq.read_table(out / f"{name}.parquet", columns=["key"]).column("key").to_pylist()
        keys += pq.read_table(out / f"{name}.errors.parquet", columns=["key"]).column("key").to_pylist()
    assert len(keys) == len(set(keys)) == 120
    assert validate(out) == []
    assert check_dataset(out) == []
