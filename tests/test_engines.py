"""Local, Beam (DirectRunner) and Ray (local) run the same stages and write the same shards.

One input of several shards (synthetic scenes written as img2dataset tars, plus a shard with broken
images) is labeled with the tiny VLM captioner and tiny OWLv2 detector on all three engines.
"""

from __future__ import annotations

import io
import json
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.shard_checks import stats_without_timings
from vesl.demo import ASSETS_DIR
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.engines.distributed import StageRunner
from vesl.pipeline.wiring import build_stages
from vesl.schemas.config import CaptionerConfig, DetectorConfig, VerifierConfig

pytest.importorskip("apache_beam")
pytest.importorskip("ray")

N_SHARDS = 3
PER_SHARD = 3
BROKEN = {"b-truncated": "TruncatedImage", "b-text": "NotAnImage", "b-empty": "EmptyFile"}


def _write_input(root: Path) -> Path:
    """Tars as img2dataset writes them: three of synthetic scenes, one mixing good and broken images."""
    from vesl.demo.synth import make_scenes, write_webdataset

    scenes = list(make_scenes(N_SHARDS * PER_SHARD, seed=5))
    write_webdataset(scenes, root, shard_size=PER_SHARD)
    good = scenes[0].image
    members = [
        ("a-good", good, "a scene"),
        ("b-empty", b"", "zero bytes"),
        ("b-text", b"definitely not an image\n" * 4, "a text file"),
        ("b-truncated", good[: len(good) // 2], "half a jpeg"),
    ]
    with tarfile.open(root / f"{N_SHARDS:05d}.tar", "w") as tar:
        for key, img, cap in members:
            for ext, data in (("jpg", img), ("txt", cap.encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return root


def _cfg(inputs: Path, out: Path, vlm: Path, owl: Path, **kw) -> LabelConfig:
    return LabelConfig(
        inputs=[str(inputs)],
        output=str(out),
        captioner=CaptionerConfig(spec=f"hf:{vlm}", max_new_tokens=12, batch_size=4, device="cpu"),
        detector=DetectorConfig(spec=f"owlv2:{owl}", threshold=0.0, max_regions=5, batch_size=4, device="cpu"),
        # the verification stage too (the demo's tiny CLIP): its drops must be the same on every engine
        verify=VerifierConfig(spec=f"clip:{ASSETS_DIR / 'verifier'}", min_score=0.0, min_margin=0.0, device="cpu"),
        **kw,
    )


def _shard_files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}




def _assert_same_dataset(a: Path, b: Path) -> None:
    assert _shard_files(a) == _shard_files(b)  # rows and errors files, byte for byte
    assert stats_without_timings(a) == stats_without_timings(b)  # stats identical apart from timings
    assert (a / "manifest.json").read_bytes() == (b / "manifest.json").read_bytes()


@pytest.fixture(scope="module")
def engines_input(tmp_path_factory) -> Path:
    return _write_input(tmp_path_factory.mktemp("engines_input"))


@pytest.fixture(scope="module")
def reference(engines_input, tmp_path_factory, tiny_vlm_dir, tiny_owlv2_dir) -> Path:
    """The uninterrupted local-engine dataset everything is compared with."""
    from vesl.pipeline.engines.local import run_local

    out = tmp_path_factory.mktemp("ref")
    summary = run_local(_cfg(engines_input, out, tiny_vlm_dir, tiny_owlv2_dir), progress=False)
    assert summary["failed"] == []
    assert summary["shards_written"] == N_SHARDS + 1
    return out


def test_reference_has_rows_regions_and_error_rows(reference):
    rows = pq.read_table(reference / f"part-{N_SHARDS:05d}.parquet").to_pylist()
    errors = pq.read_table(reference / f"part-{N_SHARDS:05d}.errors.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["a-good"]
    assert {e["key"]: e["error_type"] for e in errors} == BROKEN
    all_rows = [r for p in sorted(reference.glob("part-*.parquet")) if "errors" not in p.name for r in pq.read_table(p).to_pylist()]
    assert len(all_rows) == N_SHARDS * PER_SHARD + 1
    assert all(r["caption_source"] == "vlm" for r in all_rows)
    assert sum(len(r["regions"]) for r in all_rows) > 0


def test_beam_direct_runner_matches_local(engines_input, reference, tmp_path, tiny_vlm_dir, tiny_owlv2_dir):
    from vesl.pipeline.engines.beam_engine import run_beam

    summary = run_beam(_cfg(engines_input, tmp_path, tiny_vlm_dir, tiny_owlv2_dir, engine="beam"), progress=False)
    assert summary["failed"] == []
    assert summary["errors"] == len(BROKEN)  # broken samples became error rows; the job finished
    _assert_same_dataset(reference, tmp_path)
    assert "apache_beam.runners.portability.prism_runner" not in sys.modules  # no Prism (binary download) attempted


def test_ray_local_matches_local(engines_input, reference, tmp_path, tiny_vlm_dir, tiny_owlv2_dir, ray_session):
    from vesl.pipeline.engines.ray_engine import _fits_one_pool, _pool_groups, _stage_pools, run_ray

    cfg = _cfg(engines_input, tmp_path, tiny_vlm_dir, tiny_owlv2_dir, engine="ray")
    stages = build_stages(cfg)
    assert _fits_one_pool(stages, _pool_groups(stages, _stage_pools(stages, cfg.workers)))  # the shard-actor layout
    summary = run_ray(cfg, progress=False)
    assert summary["failed"] == []
    assert summary["errors"] == len(BROKEN)
    _assert_same_dataset(reference, tmp_path)
    assert ray_session.is_initialized()  # reused the session, did not stop it
    # stamped with this engine
    assert {json.loads(p.read_text())["timings"]["engine"] for p in tmp_path.glob("part-*.stats.json")} == {"ray"}


def test_ray_matches_local_at_two_stage_threads(engines_input, tmp_path, tiny_vlm_dir, tiny_owlv2_dir, ray_session):
    """Byte identity holds for any equal ``stage_threads``, not only the default of one, and on Ray's other
    layout too: a detector pool of its own size splits the stages over two actor pools (samples then travel
    between pools and to the driver, which commits), where the test above runs them all in one."""
    from vesl.pipeline.engines.local import run_local
    from vesl.pipeline.engines.ray_engine import _fits_one_pool, _pool_groups, _stage_pools, run_ray

    cfg = _cfg(engines_input, tmp_path / "local", tiny_vlm_dir, tiny_owlv2_dir, stage_threads=2)
    assert run_local(cfg, progress=False)["failed"] == []
    detector = cfg.detector.model_copy(update={"concurrency": 2})
    verify = cfg.verify.model_copy(update={"concurrency": 2})  # the verifier shares the detector's pool
    ray_cfg = cfg.model_copy(update={"output": str(tmp_path / "ray"), "engine": "ray", "detector": detector,
                                     "verify": verify})
    stages = build_stages(ray_cfg)
    groups = _pool_groups(stages, _stage_pools(stages, ray_cfg.workers))
    assert len(groups) == 2
    assert not _fits_one_pool(stages, groups)
    summary = run_ray(ray_cfg, progress=False)
    assert summary["failed"] == []
    assert summary["errors"] == len(BROKEN)
    _assert_same_dataset(tmp_path / "local", tmp_path / "ray")


class _InterruptAt:
    """Wraps a stage (same name and provenance); raises KeyboardInterrupt on a sample of one input shard,
    as a Ctrl-C or a dying worker would stop the job there."""

    def __init__(self, stage, shard_suffix: str) -> None:
        self.stage, self.shard_suffix = stage, shard_suffix
        self.name, self.resources = stage.name, stage.resources

    def setup(self) -> None:
        self.stage.setup()

    def provenance(self):
        return self.stage.provenance()

    def __call__(self, batch):
        if any(s.source_shard.endswith(self.shard_suffix) for s in batch):
            raise KeyboardInterrupt
        return self.stage(batch)


def test_started_on_local_interrupted_finished_on_beam(engines_input, reference, tmp_path, tiny_vlm_dir, tiny_owlv2_dir):
    from vesl.pipeline.engines.beam_engine import run_beam
    from vesl.pipeline.engines.local import run_local

    def interrupting(cfg):
        stages = build_stages(cfg)
        stages[-1] = _InterruptAt(stages[-1], "00002.tar")
        return stages

    cfg = _cfg(engines_input, tmp_path, tiny_vlm_dir, tiny_owlv2_dir)
    with pytest.raises(KeyboardInterrupt):
        run_local(cfg, stages_factory=interrupting, progress=False)
    committed = sorted(p.name for p in tmp_path.glob("*.stats.json"))
    assert "part-00002.stats.json" not in committed
    assert "part-00003.stats.json" not in committed

    summary = run_beam(cfg.model_copy(update={"engine": "beam"}), progress=False)
    assert summary["shards_skipped"] == len(committed)
    assert summary["shards_written"] == N_SHARDS + 1 - len(committed)
    _assert_same_dataset(reference, tmp_path)


def test_started_on_beam_interrupted_finished_on_ray(engines_input, reference, tmp_path, tiny_vlm_dir, tiny_owlv2_dir, ray_session):
    """A Beam job covers the first two shards (``--limit``); then the state a killed job leaves under the
    commit protocol (one shard's stats, the marker, gone; a stray temp file); Ray finishes the whole job."""
    from vesl.pipeline.engines.beam_engine import run_beam
    from vesl.pipeline.engines.ray_engine import run_ray

    cfg = _cfg(engines_input, tmp_path, tiny_vlm_dir, tiny_owlv2_dir, engine="beam", limit=2 * PER_SHARD)
    summary = run_beam(cfg, progress=False)
    assert summary["shards_written"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.stats.json")) == ["part-00000.stats.json", "part-00001.stats.json"]
    (tmp_path / "part-00000.stats.json").unlink()
    (tmp_path / ".part-00000.parquet.deadbeef.tmp").write_bytes(b"half a file")

    summary = run_ray(cfg.model_copy(update={"engine": "ray", "limit": None}), progress=False)
    assert summary["shards_skipped"] == 1
    assert summary["shards_written"] == N_SHARDS
    assert not list(tmp_path.glob(".*.tmp"))
    _assert_same_dataset(reference, tmp_path)
    keys = [r["key"] for p in sorted(tmp_path.glob("part-*.parquet")) if "errors" not in p.name for r in pq.read_table(p).to_pylist()]
    assert len(keys) == len(set(keys)) == N_SHARDS * PER_SHARD + 1  # nothing lost, nothing duplicated


def test_ray_pool_groups_keep_gpu_stages_apart():
    from vesl.pipeline.engines.ray_engine import _pool_groups
    from vesl.schemas.stage import StageResources

    class S:
        def __init__(self, name, gpus=0.0):
            self.name, self.resources = name, StageResources(num_gpus=gpus)

    cpu_only = [S("decode"), S("caption"), S("phrases"), S("detect")]
    assert _pool_groups(cpu_only, [1, 1, 1, 1]) == [[0, 1, 2, 3]]
    assert _pool_groups(cpu_only, [1, 2, 1, 1]) == [[0], [1], [2, 3]]
    gpu = [S("decode"), S("caption", 1.0), S("phrases"), S("detect", 0.5)]
    assert _pool_groups(gpu, [1, 1, 1, 1]) == [[0], [1], [2], [3]]


def test_stage_runner_records_provenance_on_end_marker():
    from vesl.pipeline.engines.distributed import ShardEnd, read_items
    from vesl.pipeline.job import ShardTask
    from vesl.pipeline.sources import list_shards

    cfg = LabelConfig(inputs=["synth://3?seed=1&shard_size=3"], output="unused")
    (ref,) = list_shards(cfg.inputs, cfg.source)
    items = list(read_items(ShardTask(ref), cfg, batch_size=2))
    assert [len(b) for b in items[:-1]] == [2, 1]  # read batches inside the shard, as the local engine reads
    assert isinstance(items[-1], ShardEnd)
    assert items[-1].count == 3
    runner = StageRunner(cfg, build_stages, 0, last=False).setup()
    runner(items)
    assert items[-1].provenance == {"decode": runner.provenance}
    samples = [s for b in items[:-1] for s in b]
    assert all(s.image is not None for s in samples)
    assert all(s.meta["_vesl_stage_seconds"]["decode"] >= 0 for s in samples)


def test_beam_local_runner_is_fnapi_and_unknown_runner_is_a_user_error(tmp_path):
    from apache_beam.options.pipeline_options import PipelineOptions
    from apache_beam.runners.portability.fn_api_runner import FnApiRunner

    from vesl.errors import UserError
    from vesl.pipeline.engines.beam_engine import _runner, run_beam

    assert isinstance(_runner("DirectRunner", PipelineOptions([])), FnApiRunner)  # not the Prism-probing default
    cfg = LabelConfig(inputs=["synth://2"], output=str(tmp_path), engine="beam", beam_runner="NoSuchRunner")
    with pytest.raises(UserError, match="NoSuchRunner"):
        run_beam(cfg, progress=False)


class _ThreadProbe:
    """Writes the torch intra-op thread count its worker runs with into each caption."""

    name = "caption"

    def __init__(self) -> None:
        from vesl.schemas.stage import StageResources

        self.resources = StageResources(batch_size=2)

    def setup(self) -> None:
        import torch  # noqa: F401  (a model stage imports torch in setup)

    def provenance(self):
        return {}

    def __call__(self, batch):
        import torch

        for s in batch:
            s.caption, s.caption_source = f"threads={torch.get_num_threads()}", "vlm"
        return batch


def _probe_stages(cfg):
    return [build_stages(cfg)[0], _ThreadProbe()]


@pytest.mark.parametrize("engine", ["local", "local-2-workers", "beam", "ray"])
def test_every_engine_runs_stages_with_the_configured_threads(engine, tmp_path, request):
    """The numerical set-up is the config's, never the engine's or the machine's (Ray actors start with one
    thread, the local process with one per core): the guarantee behind byte-identical shards."""
    from vesl.pipeline.engines.beam_engine import run_beam
    from vesl.pipeline.engines.local import run_local
    from vesl.pipeline.engines.ray_engine import run_ray

    if engine == "ray":
        request.getfixturevalue("ray_session")
    run = {"local": run_local, "beam": run_beam, "ray": run_ray}[engine.split("-")[0]]
    cfg = LabelConfig(
        inputs=["synth://4?seed=2&shard_size=2"],
        output=str(tmp_path),
        engine=engine.split("-")[0],
        workers=2 if engine == "local-2-workers" else 1,
        stage_threads=3,
    )
    import torch

    before = torch.get_num_threads()
    driver = 1 if before != 1 else 2
    torch.set_num_threads(driver)  # the driver's own count must not leak into the stages
    try:
        summary = run(cfg, stages_factory=_probe_stages, progress=False)
        after = torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
    assert after == driver  # nor the stages' into the driver (in-process engines pin it while they run)
    assert summary["failed"] == []
    assert summary["rows"] == 4
    captions = {r["caption"] for p in tmp_path.glob("part-*.parquet") if "errors" not in p.name for r in pq.read_table(p).to_pylist()}
    assert captions == {"threads=3"}


class _ProbeStage:
    """A caption stage for engine probes; ``marks`` is a folder it leaves files in (workers may be other processes)."""

    name = "caption"

    def __init__(self, marks: str) -> None:
        from vesl.schemas.stage import StageResources

        self.marks = marks
        self.resources = StageResources(batch_size=2)

    def setup(self) -> None:
        pass

    def provenance(self):
        return {}


class _TeardownProbe(_ProbeStage):
    """Leaves a file named after its process when torn down."""

    def teardown(self) -> None:
        import os
        import uuid

        Path(self.marks, f"{os.getpid()}-{uuid.uuid4().hex}").touch()

    def __call__(self, batch):
        for s in batch:
            s.caption, s.caption_source = "probe", "vlm"
        return batch


class _TeardownStages:
    def __init__(self, marks: str) -> None:
        self.marks = marks

    def __call__(self, cfg):
        return [build_stages(cfg)[0], _TeardownProbe(self.marks)]


@pytest.mark.parametrize("engine", ["local", "local-2-workers", "beam", "ray"])
def test_every_engine_tears_its_stages_down(engine, tmp_path, request):
    """Each worker that set a stage up calls its ``teardown()`` once it is done (in-process, spawned workers,
    Beam's DoFn teardown, Ray actors at the pool's end)."""
    import time

    from vesl.pipeline.engines.beam_engine import run_beam
    from vesl.pipeline.engines.local import run_local
    from vesl.pipeline.engines.ray_engine import run_ray

    if engine == "ray":
        request.getfixturevalue("ray_session")
    marks = tmp_path / "marks"
    marks.mkdir()
    run = {"local": run_local, "beam": run_beam, "ray": run_ray}[engine.split("-")[0]]
    cfg = LabelConfig(inputs=["synth://4?seed=2&shard_size=2"], output=str(tmp_path / "out"),
                      engine=engine.split("-")[0], workers=2 if engine == "local-2-workers" else 1)  # fmt: skip
    summary = run(cfg, stages_factory=_TeardownStages(str(marks)), progress=False)
    assert summary["failed"] == []
    assert summary["rows"] == 4
    deadline = time.monotonic() + 30  # Ray tears an actor down when its pool ends, after the results arrive
    while not any(marks.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.2)
    torn = list(marks.iterdir())
    assert torn, f"{engine}: no stage was torn down"
    if engine == "local-2-workers":
        assert len({p.name.split("-")[0] for p in torn}) == 2  # each spawned worker tears its own stages down


class _DiesOnce(_ProbeStage):
    """A caption stage whose process exits the first time it sees shard 1 (a marker file says it already did,
    across processes): an actor lost mid-call, after shard 0 of the same call committed, as when a node is
    preempted or a worker is OOM-killed."""

    def __call__(self, batch):
        import os

        marker = Path(self.marks, "died")
        if any(s.source_shard.endswith("part=1") for s in batch) and not marker.exists():
            marker.touch()
            os._exit(1)
        for s in batch:
            s.caption, s.caption_source = "survived", "vlm"
        return batch


class _DiesAlways(_DiesOnce):
    """Kills every process that sees shard 1: a poison shard."""

    def __call__(self, batch):
        import os

        if any(s.source_shard.endswith("part=1") for s in batch):
            Path(self.marks, f"died-{os.getpid()}").touch()
            os._exit(1)
        return super().__call__(batch)


class _DiesOnceStages:
    def __init__(self, marks: str, stage=_DiesOnce) -> None:
        self.marks, self.stage = marks, stage

    def __call__(self, cfg):
        return [build_stages(cfg)[0], self.stage(self.marks)]


class _SetupFails:
    def __call__(self, cfg):
        from vesl.errors import UserError

        class _Bad(_ProbeStage):
            def setup(self) -> None:
                raise UserError("no model at /nowhere: check --captioner")

        return [build_stages(cfg)[0], _Bad("/nowhere")]


def test_ray_shard_actor_lost_mid_call_is_replaced_and_its_shards_still_commit(tmp_path, ray_session):
    from vesl.pipeline.engines.ray_engine import run_ray

    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = LabelConfig(inputs=["synth://16?seed=2&shard_size=2"], output=str(tmp_path / "out"), engine="ray",
                      workers=1)  # 8 shards: 2 per call
    summary = run_ray(cfg, stages_factory=_DiesOnceStages(str(marks)), progress=False)
    assert (marks / "died").exists()  # the actor really died once
    assert summary["failed"] == []
    assert summary["rows"] == 16
    rows = [r for p in (tmp_path / "out").glob("part-*.parquet") if "errors" not in p.name for r in pq.read_table(p).to_pylist()]
    assert sorted({r["caption"] for r in rows}) == ["survived"]
    assert len(rows) == 16


def test_ray_shard_that_kills_every_actor_is_reported_after_three_tries_and_the_rest_commit(tmp_path, ray_session):
    from vesl.pipeline.engines.ray_engine import MAX_SHARD_ATTEMPTS, run_ray

    marks = tmp_path / "marks"
    marks.mkdir()
    cfg = LabelConfig(inputs=["synth://16?seed=2&shard_size=2"], output=str(tmp_path / "out"), engine="ray",
                      workers=1)  # 8 shards, 2 per call: shard 1 shares its first call with shard 0
    summary = run_ray(cfg, stages_factory=_DiesOnceStages(str(marks), _DiesAlways), progress=False)
    assert len(list(marks.glob("died-*"))) == MAX_SHARD_ATTEMPTS == 3
    assert [f["shard"] for f in summary["failed"]] == ["part-00001"]
    assert "rerun to resume" in summary["failed"][0]["error"]
    assert summary["rows"] == 14
    assert not (tmp_path / "out" / "part-00001.stats.json").exists()


def test_ray_stage_setup_error_is_the_users_one_line_error(tmp_path, ray_session):
    from vesl.errors import UserError
    from vesl.pipeline.engines.ray_engine import run_ray

    cfg = LabelConfig(inputs=["synth://4?seed=2&shard_size=2"], output=str(tmp_path / "out"), engine="ray", workers=1)
    with pytest.raises(UserError, match="no model at /nowhere: check --captioner"):
        run_ray(cfg, stages_factory=_SetupFails(), progress=False)
