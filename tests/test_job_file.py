"""``.vesl-job.json`` is part of a labeled dataset's state (what a resume compares: model paths, input roots),
kept inside the output folder. `vesl publish` never ships it and is not confused by it, even a corrupt one."""

from __future__ import annotations

import json

from tests.test_hardening import CHEAP, _synth, cli
from vesl.pipeline.confine import JOB_FILE


def test_publish_neither_ships_the_job_file_nor_is_confused_by_it(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data")
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)[0] == 0
    job_file = out / JOB_FILE
    assert str(data) in json.loads(job_file.read_text())["input_roots"]  # local paths: never to be published
    for content in (job_file.read_bytes(), b"\x00 not json {"):
        job_file.write_bytes(content)
        rc, _, err = cli(monkeypatch, capsys, "publish", out, "--name", "t", "--license", "CC-BY-4.0")
        assert rc == 0, err
        assert job_file.read_bytes() == content  # left as it was: a later resume still needs it
        listed = (out / "checksums.sha256").read_text()
        assert JOB_FILE not in listed
        assert "part-00000.parquet" in listed
        published = "".join(p.read_text(errors="replace") for p in out.rglob("*") if p.is_file() and p.suffix in (".md", ".json", ".html", ".sha256") and p.name != JOB_FILE)
        assert str(tmp_path) not in published
        assert JOB_FILE not in published
    # and a resume after publishing still runs the job that wrote the shards
    rc, text, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)
    assert rc == 0, err
    assert "0 shards written, 2 already committed" in text
