"""`--captioner keep`: a labeled dataset is re-grounded with new phrase and detector settings, reusing its
stored captions, with no captioner model built or loaded."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from vesl.errors import UserError
from vesl.pipeline.config import LabelConfig
from vesl.pipeline.engines import run
from vesl.schemas.config import CaptionerConfig, DetectorConfig, PhrasesConfig
from vesl.schemas.manifest import check_dataset
from vesl.schemas.region_text import PROVENANCE_KEY


def _rows(d):
    return [r for p in sorted(d.glob("part-*[0-9].parquet")) for r in pq.read_table(p).to_pylist()]


@pytest.fixture(scope="module")
def labeled(tmp_path_factory, tiny_vlm_dir):
    out = tmp_path_factory.mktemp("labeled") / "out"
    cfg = LabelConfig(inputs=["synth://6?seed=4&shard_size=3"], output=str(out),
                      captioner=CaptionerConfig(spec=f"hf:{tiny_vlm_dir}", max_new_tokens=10, device="cpu"))  # fmt: skip
    assert run(cfg, progress=False)["failed"] == []
    return out


def test_keep_regrounds_stored_captions_without_a_captioner(labeled, tmp_path, tiny_owlv2_dir, monkeypatch):
    import vesl.labelers.captioners as captioners

    def no_captioner(*a, **kw):
        raise AssertionError("--captioner keep built a captioner")

    monkeypatch.setattr(captioners, "make_captioner", no_captioner)
    out = tmp_path / "regrounded"
    cfg = LabelConfig(inputs=[str(labeled)], output=str(out), captioner=CaptionerConfig(spec="keep"),
                      phrases=PhrasesConfig(mode="noun_chunks"),
                      detector=DetectorConfig(spec=f"owlv2:{tiny_owlv2_dir}", threshold=0.0, max_regions=3, device="cpu"))  # fmt: skip
    summary = run(cfg, progress=False)
    assert summary["failed"] == []
    assert summary["shards_written"] == 2  # the labeled dataset's committed shards, not its errors files
    before, after = {r["key"]: r for r in _rows(labeled)}, {r["key"]: r for r in _rows(out)}
    assert set(after) == set(before)
    for key, r in after.items():
        assert (r["caption"], r["caption_source"]) == (before[key]["caption"], before[key]["caption_source"])
        assert r["image"] == before[key]["image"]
        assert r["source_shard"] == before[key]["source_shard"]  # where the image came from
    assert sum(len(r["regions"]) for r in after.values()) > 0  # detected anew
    assert check_dataset(out) == []
    prov = json.loads(pq.read_schema(sorted(out.glob("part-*[0-9].parquet"))[0]).metadata[PROVENANCE_KEY.encode()])
    orig = json.loads(pq.read_schema(sorted(labeled.glob("part-*[0-9].parquet"))[0]).metadata[PROVENANCE_KEY.encode()])
    assert json.loads(prov["stages"]["caption"]["captioner.kept_from"]) == orig["captioner"]  # the VLM's record stays
    assert prov["phrases"]["mode"] == "noun_chunks"
    assert run(cfg, progress=False)["shards_skipped"] == 2  # a rerun resumes like any job


def test_keep_on_an_unlabeled_input_is_one_line(tmp_path):
    cfg = LabelConfig(inputs=["synth://3?seed=1"], output=str(tmp_path / "o"), captioner=CaptionerConfig(spec="keep"))
    with pytest.raises(UserError, match="labeled vesl dataset"):
        run(cfg, progress=False)
