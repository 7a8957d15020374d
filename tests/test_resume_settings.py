"""A resume never mixes settings: every field of the label config either cannot change a row (marked
``NOT_IN_ROWS`` on its model) or a change to it refuses a rerun into an output that holds committed shards.

The walk covers every field of every config model in ``LabelConfig`` (top level, source, decode,
captioner, phrases, detector), so an option added later is covered without editing this file.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from tests.test_hardening import _tree, cli, one_line_error
from vesl.errors import UserError
from vesl.pipeline.config import LabelConfig
from vesl.schemas.config import row_changing

INPUT = "synth://4?seed=2&shard_size=2"
# changing these changes what the job is, not how its shards are labeled: checked elsewhere
NOT_A_RESUME = {"inputs", "output", "limit", "overwrite", "duplicates.table"}  # the table: by its sha256


def _fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted name, FieldInfo) of every leaf field, nested config models walked."""
    out = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _fields(ann, f"{prefix}{name}.")
        else:
            out.append((f"{prefix}{name}", info))
    return out


def _other(path: str, info: Any, value: Any) -> Any:
    """A valid value different from ``value`` for the field's type."""
    ann = info.annotation
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if path == "verify.spec":  # a verifier where there was none: refused like another detector
        return "clip:some-model"
    if typing.get_origin(ann) is Literal:
        return next(a for a in args if a != value)
    if ann is bool:
        return not value
    if ann is int or args == [int]:
        return (value or 0) + 1
    if ann is float:
        return value + 0.1 if value + 0.1 <= 1 else value - 0.1
    if path == "detector.tta":  # a valid look, as the config checks them
        return [*value, "hflip"]
    if typing.get_origin(ann) is list and args == [str]:
        return [*value, "x"]
    if ann is str or args == [str]:
        return (value or "") + "x"
    raise AssertionError(f"{path}: give this test a changed value for type {ann}")


def _changed(cfg: LabelConfig, path: str, info: Any) -> LabelConfig:
    data = cfg.model_dump()
    *parents, leaf = path.split(".")
    node = data
    for p in parents:
        node = node[p]
    node[leaf] = _other(path, info, node[leaf])
    return LabelConfig.model_validate(data)


@pytest.fixture(scope="module")
def labeled(tmp_path_factory) -> LabelConfig:
    """A small real labeled output (alt-text captions, paper phrases, no detector)."""
    from vesl.pipeline.engines.local import run_local

    cfg = LabelConfig(inputs=[INPUT], output=str(tmp_path_factory.mktemp("labeled") / "out"))
    assert run_local(cfg, progress=False)["shards_written"] == 2
    return cfg


FIELDS = _fields(LabelConfig)


def test_the_walk_covers_every_stage_model_and_marking_a_field_is_a_visible_decision():
    names = {p for p, _ in FIELDS}
    for expected in ("seed", "stage_threads", "decode.keep_image_bytes", "captioner.prompt_template",
                     "captioner.timeout_s", "phrases.max_phrases", "detector.boxes_per_phrase",
                     "detector.box_voting_iou", "source.caption_column", "verify.spec", "verify.min_margin",
                     "detector.tta", "detector.also", "detector.fusion.threshold", "detector.fusion.iou_thr"):
        assert expected in names
    stage = {"batch_size", "concurrency", "num_gpus", "device"}
    requests = {"api_key_env", "max_concurrent_requests", "timeout_s", "max_retries", "breaker_failures",
                "breaker_cooldown_s"}
    assert {p for p, info in FIELDS if not row_changing(info)} == {
        *NOT_A_RESUME, "engine", "workers", "beam_runner", "beam_options", "ray_address", "source.image_sources",
        "decode.batch_size", "phrases.batch_size", "detector.forward", *(f"detector.{f}" for f in stage),
        *(f"captioner.{f}" for f in stage | requests), *(f"verify.{f}" for f in stage),
    }


@pytest.mark.parametrize(("path", "info"), FIELDS, ids=[p for p, _ in FIELDS])
def test_every_field_is_marked_or_a_change_to_it_refuses_the_resume(labeled, path, info):
    from vesl.pipeline.job import plan_shards

    if path in NOT_A_RESUME:
        assert not row_changing(info), f"{path} is part of the job, not of its rows: mark it NOT_IN_ROWS"
        return
    cfg = _changed(labeled, path, info)
    if row_changing(info):
        with pytest.raises(UserError) as e:
            plan_shards(cfg)
        message = str(e.value)
        assert "\n" not in message
        assert path in message, message  # names the setting (the prompt by its hash's name)
        assert "--overwrite" in message
    else:  # placement, pacing, retries: the committed shards are resumed as they are
        todo, skipped = plan_shards(cfg)
        assert (todo, len(skipped)) == ([], 2), path


def test_provenance_shows_settings_without_local_paths_or_credentials(tmp_path):
    import json

    from vesl.pipeline.job import job_provenance

    cfg = LabelConfig(inputs=[INPUT], output=str(tmp_path), phrases={"spacy_model": str(tmp_path / "my_spacy")},
                      captioner={"spec": "openai:https://u:pw@host/v1?api_key=sekrit#m", "timeout_s": 5},
                      detector={"boxes_per_phrase": 1, "box_voting_iou": 0.3, "batch_size": 3})
    prov = job_provenance(cfg, [])
    assert prov["detector"]["boxes_per_phrase"] == 1
    assert prov["detector"]["box_voting_iou"] == 0.3
    assert prov["phrases"]["spacy_model"] == "my_spacy"
    assert "batch_size" not in prov["detector"]
    assert "timeout_s" not in prov["captioner"]
    text = json.dumps(prov)
    assert str(tmp_path) not in text
    assert "sekrit" not in text
    assert ":pw@" not in text


def test_rerun_with_other_boxes_per_phrase_or_box_voting_is_refused_and_writes_nothing(tmp_path, monkeypatch, capsys):
    """The issue's reproduction: 16 images labeled with the demo profile (candidate boxes per phrase, box voting),
    then reruns whose YAML changes one of those detector options."""
    rc, _, err = cli(monkeypatch, capsys, "synth", "--n", 16, "--seed", 3, "--out", tmp_path / "in", "--format", "wds",
                     "--shard-size", 8)
    assert rc == 0, err
    out = tmp_path / "out"
    args = ("label", tmp_path / "in", "-o", out, "--profile", "demo", "--captioner", "alt_text", "--no-progress")
    rc, text, err = cli(monkeypatch, capsys, *args)
    assert rc == 0, err
    assert "2 shards written" in text
    committed = _tree(out)
    for yaml, needle in (("detector: {boxes_per_phrase: 0}", "detector.boxes_per_phrase is 5 there, 0 in this job"),
                         ("detector: {box_voting_iou: 0.5}", "detector.box_voting_iou is 0.3 there, 0.5 in this job")):
        c = tmp_path / "c.yaml"
        c.write_text(yaml + "\n")
        rc, _, err = cli(monkeypatch, capsys, *args, "--config", c)
        one_line_error(rc, err, needle, "--overwrite")
        assert _tree(out) == committed  # nothing written, nothing removed
