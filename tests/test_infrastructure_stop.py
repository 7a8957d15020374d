"""A job whose captioner server is down stops early on every engine, commits nothing, and reports the same
failure: the shard that hit it, and every other shard as not finished (a rerun retries them all).

The captioner is the real OpenAI-compatible client pointed at a closed port on 127.0.0.1.
"""

from __future__ import annotations

import pytest

from tests.test_hardening import _free_port, cli
from vesl.pipeline.config import LabelConfig

pytest.importorskip("apache_beam")
pytest.importorskip("ray")

SHARDS = 4
NOT_FINISHED = "not finished; rerun to resume"


@pytest.fixture(scope="module")
def dead_server() -> str:
    return f"openai:http://127.0.0.1:{_free_port()}/v1#m"


def _cfg(out, dead: str, engine: str, **captioner) -> LabelConfig:
    return LabelConfig(inputs=[f"synth://{2 * SHARDS}?seed=2&shard_size=2"], output=str(out), engine=engine,
                       captioner={"spec": dead, "max_retries": 0, "timeout_s": 2, **captioner},
                       detector={"spec": "none"})


def _run(cfg: LabelConfig) -> dict:
    from vesl.pipeline.engines import run

    return run(cfg, progress=False)


@pytest.fixture(scope="module")
def local_failure(tmp_path_factory, dead_server) -> str:
    """The local engine's message for the shard that hit the failure: what every engine must report."""
    summary = _run(_cfg(tmp_path_factory.mktemp("local") / "out", dead_server, "local"))
    [hit] = [f["error"] for f in summary["failed"] if f["error"] != NOT_FINISHED]
    assert "hit an infrastructure failure in stage caption" in hit
    return hit


@pytest.mark.parametrize("engine", ["local-2-workers", "beam", "ray", "ray-split-pools"])
def test_a_job_whose_captioner_server_is_down_stops_within_one_batch_committing_nothing(
    engine, tmp_path, request, dead_server, local_failure
):
    if engine.startswith("ray"):
        request.getfixturevalue("ray_session")
    name = engine.split("-")[0]
    # a captioner pool of its own size puts Ray on its split layout (samples travel between actor pools)
    cfg = _cfg(tmp_path / "out", dead_server, name, **({"concurrency": 2} if engine == "ray-split-pools" else {}))
    if engine == "local-2-workers":
        cfg = cfg.model_copy(update={"workers": 2})
    summary = _run(cfg)
    failed = summary["failed"]
    assert [f["shard"] for f in failed] == [f"part-{i:05d}" for i in range(SHARDS)]  # each reported once
    # a shard another worker had not finished when the job stopped is "not finished (...)": with 2 local
    # workers, which shard hits the failure first depends on scheduling
    hits = [f["error"] for f in failed if not f["error"].startswith("not finished")]
    assert hits
    assert hits[0] == local_failure
    if engine in ("beam", "ray"):  # one shard at a time reaches the captioner: only the first one ran
        assert len(hits) == 1
    assert summary["shards_written"] == 0
    assert not list((tmp_path / "out").glob("*.stats.json"))


def test_beam_cli_exits_non_zero_with_the_failure_line(tmp_path, monkeypatch, capsys, dead_server, local_failure):
    c = tmp_path / "c.yaml"
    c.write_text("captioner: {max_retries: 0, timeout_s: 2}\n")
    rc, text, err = cli(monkeypatch, capsys, "label", f"synth://{2 * SHARDS}?seed=2&shard_size=2", "-o", tmp_path / "out",
                        "--engine", "beam", "--captioner", dead_server, "--detector", "none", "--no-progress",
                        "--config", c)
    assert rc == 1, text + err
    assert "0 shards written" in text
    assert f"failed: part-00000: {local_failure}" in err.splitlines()
    assert f"{SHARDS} shard(s) not committed; rerun the same command to retry them" in err
    assert "Traceback" not in err
