"""`vesl dedup`, `vesl label --duplicates` and `vesl synth --duplicates`: real engines, real images, real hashes."""

from __future__ import annotations

import glob
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from vesl.cli import app
from vesl.cli.profiles import resolve_config
from vesl.demo.synth import make_world, write_webdataset
from vesl.pipeline.config import DedupConfig, LabelConfig
from vesl.pipeline.dedup import group
from vesl.pipeline.engines import run
from vesl.schemas.validation import validate


def _hex(bits: np.ndarray) -> str:
    return np.packbits(bits).tobytes().hex()


def test_group_finds_planted_duplicates_and_keeps_look_alikes_apart():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, size=(50, 256)).astype(bool)
    hexes, truth = [], []
    for i, b in enumerate(base):
        hexes.append(_hex(b))
        truth.append(i)
    for i in range(0, 50, 5):  # a copy 31 bits away (the threshold) and a look-alike 40 bits away
        for flips, same in ((31, True), (40, False)):
            b = base[i].copy()
            b[rng.choice(256, flips, replace=False)] ^= True
            hexes.append(_hex(b))
            truth.append(i if same else len(truth))
    rep = group(hexes, 256, 31)
    assert [int(r) for r in rep] == truth  # representatives are the first of each group in input order


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    out = tmp_path_factory.mktemp("world")
    scenes = make_world(40, 2001, 0.3)
    write_webdataset(scenes, out / "in", shard_size=15)
    return out / "in", scenes


def _dedup(inputs, out, engine="local"):
    return run(DedupConfig(inputs=[str(inputs)], output=str(out), engine=engine), progress=False)


def _table(out):
    return pq.read_table(out / "duplicates.parquet")


def test_dedup_matches_ground_truth_and_resumes(world, tmp_path):
    inputs, scenes = world
    summary = _dedup(inputs, tmp_path / "d")
    t = _table(tmp_path / "d").to_pylist()
    truth = {s.key: s.duplicate_of or s.key for s in scenes}
    assert [r["key"] for r in t] == [s.key for s in scenes]
    assert all(r["representative_key"] == truth[r["key"]] for r in t)  # copies follow their originals
    assert summary["dedup"]["duplicates"] == sum(1 for s in scenes if s.duplicate_of)
    again = _dedup(inputs, tmp_path / "d")
    assert again["shards_skipped"] == 3
    assert _table(tmp_path / "d").equals(_table(tmp_path / "d"))


def test_dedup_tables_identical_on_local_beam_and_ray(world, tmp_path, ray_session):
    inputs, _ = world
    tables = {}
    for engine in ("local", "beam", "ray"):
        _dedup(inputs, tmp_path / engine, engine)
        tables[engine] = (tmp_path / engine / "duplicates.parquet").read_bytes()
    assert tables["local"] == tables["beam"] == tables["ray"]


def _label(inputs, out, dups=None, policy="copy", **kw):
    cfg = LabelConfig(inputs=[str(inputs)], output=str(out), phrases={"mode": "noun_chunks"}, **kw)
    if dups is not None:
        cfg.duplicates.table, cfg.duplicates.policy = str(dups), policy
    return run(cfg, progress=False)


def _rows(out):
    return {r["key"]: r for f in sorted(glob.glob(f"{out}/part-*[0-9].parquet")) for r in pq.read_table(f).to_pylist()}


def test_label_duplicates_copy_and_skip(world, tmp_path):
    inputs, scenes = world
    _dedup(inputs, tmp_path / "d")
    _label(inputs, tmp_path / "full")
    _label(inputs, tmp_path / "copy", tmp_path / "d")
    _label(inputs, tmp_path / "skip", tmp_path / "d", "skip")
    full, copy, skip = _rows(tmp_path / "full"), _rows(tmp_path / "copy"), _rows(tmp_path / "skip")
    dups = {s.key: s.duplicate_of for s in scenes if s.duplicate_of}
    assert dups
    assert set(copy) == set(full)
    assert set(skip) == set(full) - set(dups)
    for k, r in copy.items():
        if k in dups:
            rep = copy[dups[k]]
            assert r["duplicate_of"] == dups[k]
            assert (r["caption"], r["regions"]) == (rep["caption"], rep["regions"])
            assert (r["image"], r["alt_text"], r["width"]) == (full[k]["image"], full[k]["alt_text"], full[k]["width"])
        else:
            assert r == full[k]
            assert skip[k] == full[k]
    assert validate(tmp_path / "copy") == []
    stats = [json.loads(open(f).read()) for f in glob.glob(f"{tmp_path / 'copy'}/*.stats.json")]
    assert sum(s["duplicates"] for s in stats) == len(dups)
    assert not any(s["duplicates_pending"] for s in stats)
    r = CliRunner().invoke(app, ["inspect", str(tmp_path / "copy"), "--json"])
    assert json.loads(r.output)["duplicates"] == len(dups)


def test_with_models_a_deduplicated_run_equals_the_full_run(world, tmp_path):
    """The demo's real captioner and detector: every representative's row is bit-identical to the full run's,
    although skipping duplicates changes which images share a batch (the detector forwards one image at a time
    on a CPU; see ``DetectorConfig.forward``)."""
    inputs, scenes = world
    demo = resolve_config("demo", None, {"inputs": [str(inputs)]})
    models = {"captioner": demo.captioner.model_dump(), "detector": demo.detector.model_dump()}
    _dedup(inputs, tmp_path / "d")
    _label(inputs, tmp_path / "full", **models)
    _label(inputs, tmp_path / "copy", tmp_path / "d", **models)
    full, copy = _rows(tmp_path / "full"), _rows(tmp_path / "copy")
    dups = {s.key: s.duplicate_of for s in scenes if s.duplicate_of}
    assert sum(bool(r["regions"]) for r in full.values()) > len(full) // 2  # the models really label
    for k, r in copy.items():
        if k in dups:
            assert (r["caption"], r["regions"]) == (copy[dups[k]]["caption"], copy[dups[k]]["regions"])
            assert r["unmatched_phrases"] == copy[dups[k]]["unmatched_phrases"] is not None  # copied too
        else:
            assert r == full[k]  # the representative's unmatched_phrases survive the copy pass's rewrite


def test_resume_refuses_another_table(world, tmp_path):
    inputs, _ = world
    _dedup(inputs, tmp_path / "d")
    run(DedupConfig(inputs=[str(inputs)], output=str(tmp_path / "d2"), dedup={"threshold": 5}), progress=False)
    _label(inputs, tmp_path / "out", tmp_path / "d", limit=10)
    from vesl.errors import UserError

    with pytest.raises(UserError, match=r"other settings: duplicates\.t(able_sha256|hreshold) is"):
        _label(inputs, tmp_path / "out", tmp_path / "d2", limit=10)


@pytest.mark.parametrize(("args", "says"), [
    (["dedup", "{in}"], "--output"),
    (["dedup", "{in}", "-o", "{tmp}/x", "--threshold", "300"], "--threshold"),
    (["dedup", "{tmp}/nothing", "-o", "{tmp}/x"], "does not exist"),
    (["label", "{in}", "-o", "{tmp}/y", "--duplicates", "{in}"], "not a `vesl dedup` table"),
    (["label", "{in}", "-o", "{tmp}/y", "--duplicates-policy", "skip"], "needs --duplicates"),
    (["synth", "--out", "{tmp}/s", "--duplicates", "1.5"], "--duplicates"),
])  # fmt: skip
def test_bad_arguments_are_one_line(world, tmp_path, args, says):
    inputs, _ = world
    r = CliRunner().invoke(app, [a.format(**{"in": inputs, "tmp": tmp_path}) for a in args])
    assert says in _one_line(r)


def _one_line(result) -> str:
    """The message `vesl` prints as its one ``error:`` line (``vesl.cli.main`` prints a UserError's text)."""
    from vesl.cli import _one_line as line
    from vesl.errors import UserError

    if result.exit_code == 2 and result.exception is None or isinstance(result.exception, SystemExit):
        lines = result.output.strip().splitlines()
        assert len(lines) == 1 or "Usage" in result.output, result.output
        return result.output
    assert isinstance(result.exception, UserError), result.output
    text = line(result.exception)
    assert "\n" not in text
    return text


def test_v1_shard_without_duplicate_of_still_validates(tmp_path):
    from vesl.schemas.region_text import SCHEMA_VERSION_KEY, region_text_schema

    schema = region_text_schema()
    v1 = pa.schema([f for f in schema if f.name != "duplicate_of"], metadata={SCHEMA_VERSION_KEY: "1"})
    row = {"key": "k", "source_shard": "s", "image": None, "image_uri": None, "width": 4, "height": 4, "alt_text": "a",
           "caption": "a", "caption_source": "alt_text", "regions": []}
    pq.write_table(pa.Table.from_pylist([row], schema=v1), tmp_path / "part-00000.parquet")
    assert validate(tmp_path / "part-00000.parquet") == []


def test_synth_without_duplicates_unchanged_and_with_them_marked(tmp_path):
    from vesl.demo.synth import make_scenes

    assert [s.image for s in make_world(20, 7, 0.0)] == [s.image for s in make_scenes(20, 7)]
    w = make_world(40, 7, 0.3)
    assert sum(1 for s in w if s.duplicate_of) == 12
    assert sum(1 for s in w if s.look_alike_of) == 2
    keys = [s.key for s in w]
    assert all(keys.index(s.duplicate_of) < keys.index(s.key) for s in w if s.duplicate_of)
