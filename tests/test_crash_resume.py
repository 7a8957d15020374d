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
from vesl.schemas.dataset import committed_shards
from vesl.schemas.manifest import check_dataset
from vesl.schemas.validation import validate

VESL = str(Path(sys.executable).parent / "vesl")
INPUT = "synth://120?seed=5&shard_size=12"  # 10 input shards
SHARDS = 10


# `vesl label` with os.replace wrapped: the process SIGKILLs itself just before the rename whose source name
# starts with KILL_BEFORE, i.e. at a chosen point of the commit protocol, with no timing involved.
KILL_AT_RENAME = """
import os, signal, sys
from vesl.cli import main
real, prefix = os.replace, os.environ["KILL_BEFORE"]
def replace(src, dst, *a, **kw):
    if os.path.basename(str(src)).startswith(prefix):
        os.kill(os.getpid(), signal.SIGKILL)
    return real(src, dst, *a, **kw)
os.replace = replace
sys.argv[0] = "vesl"
main()
"""


def _start(out: Path, *extra: str, kill_before: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [VESL] if kill_before is None else [sys.executable, "-c", KILL_AT_RENAME]
    if kill_before is not None:
        env["KILL_BEFORE"] = kill_before
    return subprocess.Popen(
        [*cmd, "label", INPUT, "--output", str(out), "--no-progress", "--captioner", "alt_text", "--detector", "none", *extra],
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
    # 1. with shard 1's parquet written and fsynced under its temp name, before its rename
    proc = _start(out, kill_before=".part-00001.parquet.")
    assert proc.wait(timeout=240) == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    _wait_group_gone(proc.pid)
    assert committed_shards(out) == ["part-00000"]
    assert any(n.startswith(".part-00001.parquet.") and n.endswith(".tmp") for n in os.listdir(out))
    _consistent(out)
    # 2. with shard 2's parquet files renamed into place but its stats (the commit marker) not yet written
    proc = _start(out, kill_before=".part-00002.stats.json.")
    assert proc.wait(timeout=240) == -signal.SIGKILL, proc.stderr.read().decode()[-3000:]
    _wait_group_gone(proc.pid)
    assert committed_shards(out) == ["part-00000", "part-00001"]
    assert (out / "part-00002.parquet").exists()
    _consistent(out)
    # 3. right after a commit, mid-way through the next shard
    assert _kill_when(_start(out), out, lambda names: _n_committed(names) >= 4)
    _consistent(out)
    # 4. with two worker processes running (their shards in flight); how many more they commit in the
    # moment before they notice the parent is gone depends on the machine, so nothing is asserted on that
    assert _kill_when(_start(out, "--workers", "2"), out, lambda names: _n_committed(names) >= 5)
    _consistent(out)

    # 5. finish
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
