"""Hostile inputs and user mistakes from the fault and security review (issue 14).

Each test builds its fixture here (no file from outside the repository) and checks the guarantee:
the input is never overwritten, links never lead out of it, one writer per output, a resume runs the
job that wrote the shards, infrastructure failures never become data, and every mistake is one line.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vesl.cli import main

CHEAP = ("--captioner", "alt_text", "--detector", "none", "--no-progress")


def cli(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`vesl ARGS` in this process: (exit code, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["vesl", *map(str, args)])
    with pytest.raises(SystemExit) as e:
        main()
    out = capsys.readouterr()
    return int(e.value.code or 0), out.out, out.err


def one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ")
    for n in needles:
        assert n in lines[0], lines[0]


def _png(color=(200, 30, 30), size=(32, 24)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


def _synth(monkeypatch, capsys, out: Path, fmt: str = "wds", n: int = 6, size: int = 3) -> Path:
    rc, _, err = cli(monkeypatch, capsys, "synth", "--n", n, "--seed", 3, "--out", out, "--format", fmt, "--shard-size", size)
    assert rc == 0, err
    return out


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ defect 1: output = input


def test_output_equal_to_input_is_refused_and_the_input_kept(tmp_path, monkeypatch, capsys):
    s = _synth(monkeypatch, capsys, tmp_path / "s", "parquet", n=6, size=6)
    c = tmp_path / "c"
    c.mkdir()
    (c / "part-00000.parquet").write_bytes((s / "00000.parquet").read_bytes())
    before = _tree(c)
    rc, _, err = cli(monkeypatch, capsys, "label", c, "--output", c, *CHEAP)
    one_line_error(rc, err, "inside the input directory")
    assert _tree(c) == before  # nothing replaced, nothing added
    # the input named as a file, output its folder
    rc, _, err = cli(monkeypatch, capsys, "label", c / "part-00000.parquet", "--output", c, *CHEAP)
    one_line_error(rc, err, "inside --output")
    assert _tree(c) == before


def test_output_inside_a_parquet_input_folder_is_refused(tmp_path, monkeypatch, capsys):
    c = _synth(monkeypatch, capsys, tmp_path / "c", "parquet", n=6, size=3)
    before = _tree(c)
    rc, _, err = cli(monkeypatch, capsys, "label", c, "--output", c / "out", *CHEAP)
    one_line_error(rc, err, "inside the input directory")
    assert _tree(c) == before
    assert not (c / "out").exists()


# ------------------------------------------------------------------ defect 2: links out of the input


def test_image_folder_never_follows_links_out_of_the_input(tmp_path, monkeypatch, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("the secret caption")
    (outside / "secret.png").write_bytes(_png((1, 2, 3)))
    tars = _synth(monkeypatch, capsys, tmp_path / "tars", "wds", n=3, size=3)
    imgs = tmp_path / "in" / "imgs"
    imgs.mkdir(parents=True)
    (imgs / "a.png").write_bytes(_png())
    (imgs / "a.txt").write_text("a red square")
    (imgs / "b.png").write_bytes(_png((0, 0, 255)))
    os.symlink(outside / "secret.txt", imgs / "b.txt")  # caption through a link
    os.symlink(outside / "secret.png", imgs / "c.png")  # image through a link
    (imgs / "c.txt").write_text("an outside image")
    os.symlink(outside, imgs / "linked_dir")  # a folder of images through a link
    os.symlink(next(tars.glob("*.tar")), tmp_path / "in" / "linked.tar")  # a tar through a link

    from vesl.pipeline.config import SourceConfig
    from vesl.pipeline.sources import list_shards, read_shard

    refs = list_shards([str(tmp_path / "in")], SourceConfig())
    assert [(r.kind, r.source) for r in refs] == [("folder", "in/imgs")]  # no linked tar, no linked folder
    samples = {s.key: s for s in read_shard(refs[0], SourceConfig())}
    assert samples["imgs/a"].ok
    assert samples["imgs/a"].alt_text == "a red square"
    for key in ("imgs/b", "imgs/c"):
        assert samples[key].error.error_type == "PathOutsideInput"
        assert samples[key].image_bytes is None
    assert all("secret caption" not in (s.alt_text or "") for s in samples.values())

    out = tmp_path / "out"
    rc, _, err = cli(monkeypatch, capsys, "label", tmp_path / "in", "--output", out, *CHEAP)
    assert rc == 0, err
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert [r["key"] for r in rows] == ["imgs/a"]
    assert (outside / "secret.png").read_bytes() not in [r["image"] for r in rows]
    errors = pq.read_table(out / "part-00000.errors.parquet").to_pylist()
    assert sorted(e["error_type"] for e in errors) == ["PathOutsideInput", "PathOutsideInput"]
    assert all("secret caption" not in e["message"] for e in errors)


def test_glob_matches_never_follow_links_out_of_the_glob_directory(tmp_path, monkeypatch, capsys):
    tars = _synth(monkeypatch, capsys, tmp_path / "elsewhere", "wds", n=6, size=3)
    data = tmp_path / "data"
    data.mkdir()
    (data / "00000.tar").write_bytes((tars / "00000.tar").read_bytes())
    os.symlink(tars / "00001.tar", data / "00001.tar")

    from vesl.pipeline.config import SourceConfig
    from vesl.pipeline.sources import list_shards

    refs = list_shards([str(data / "*.tar")], SourceConfig())
    assert [r.source for r in refs] == ["data/00000.tar"]


# ------------------------------------------------------------------ defect 0: settings, infrastructure, publish


def test_rerun_with_other_settings_is_refused_naming_the_difference(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data")
    out = tmp_path / "out"
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)
    assert rc == 0, err
    committed = _tree(out)
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP, "--seed", "7")
    one_line_error(rc, err, "seed is 0 there, 7 in this job", "--overwrite")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode:\n  keep_image_bytes: false\ndetector:\n  threshold: 0.5\n")
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP, "--config", cfg)
    one_line_error(rc, err, "decode.keep_image_bytes is True there, False in this job", "and 1 more")
    assert _tree(out) == committed
    # the same settings resume; --overwrite relabels with the new ones
    rc, out_text, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)
    assert rc == 0, err
    assert "0 shards written, 2 already committed" in out_text
    rc, out_text, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP, "--seed", "7", "--overwrite")
    assert rc == 0, err
    assert "2 shards written" in out_text


def test_model_path_change_is_refused_though_only_its_name_is_published(tmp_path, monkeypatch, capsys):
    from vesl.errors import UserError
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.job import check_same_paths, job_provenance, write_job_file

    a = tmp_path / "models_a" / "captioner"
    a.mkdir(parents=True)
    out = tmp_path / "out"
    cfg = LabelConfig(inputs=["synth://3"], output=str(out), captioner={"spec": f"hf:{a}"},
                      detector={"spec": f"owlv2:{tmp_path}/models_a/detector"})
    prov = json.dumps(job_provenance(cfg, []))
    assert str(tmp_path) not in prov
    assert '"spec": "hf:captioner"' in prov
    out.mkdir()
    write_job_file(cfg)
    (out / "part-00000.stats.json").write_text("{}")  # a committed shard
    other = cfg.model_copy(update={"captioner": cfg.captioner.model_copy(update={"spec": f"hf:{tmp_path}/b/captioner"})})
    with pytest.raises(UserError, match="captioner.spec"):
        check_same_paths(other)
    check_same_paths(cfg)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_server_fails_the_shard_and_the_rerun_retries(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data", n=6, size=3)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("captioner:\n  max_retries: 0\n  timeout_s: 2\n")
    dead = f"openai:http://127.0.0.1:{_free_port()}/v1#m"
    out = tmp_path / "out"
    args = ("label", data, "-o", out, "--captioner", dead, "--detector", "none", "--no-progress", "--config", cfg)
    rc, text, err = cli(monkeypatch, capsys, *args)
    assert rc == 1, text + err
    assert "ConnectError" in err
    assert not list(out.glob("*.stats.json"))  # nothing committed: no shard of ConnectError rows
    assert "0 shards written" in text
    rc, text, err = cli(monkeypatch, capsys, *args)  # the rerun retries (still down)
    assert rc == 1
    assert "0 shards written, 0 already committed" in text


def test_publish_refuses_a_shard_whose_bytes_do_not_match_its_stats(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data")
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)[0] == 0
    shard = out / "part-00001.parquet"
    pq.write_table(pq.read_table(shard).slice(0, 1), shard)  # valid rows, other bytes
    rc, _, err = cli(monkeypatch, capsys, "validate", out)
    assert rc == 1
    rc, _, err = cli(monkeypatch, capsys, "publish", out, "--name", "x", "--license", "MIT")
    assert rc == 2
    assert "sha256" in err
    assert not (out / "README.md").exists()


# ------------------------------------------------------------------ defect 3: one writer, damaged shards redone


def test_a_second_job_on_a_held_output_is_refused(tmp_path, monkeypatch, capsys):
    from vesl.pipeline.lock import LOCK_NAME

    data = _synth(monkeypatch, capsys, tmp_path / "data")
    out = tmp_path / "out"
    out.mkdir()
    (out / ".part-00000.parquet.0123.tmp").write_bytes(b"the other job's temp file")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "run_id": "abc123", "started": 0}
    (out / LOCK_NAME).write_text(json.dumps(holder))
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)
    one_line_error(rc, err, "another vesl job", f"pid {os.getpid()}", "run abc123")
    assert (out / ".part-00000.parquet.0123.tmp").exists()  # its temp file is left alone
    assert not list(out.glob("*.stats.json"))

    # a lock left by a dead process is taken over
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (out / LOCK_NAME).write_text(json.dumps({**holder, "pid": int(dead.stdout)}))
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)
    assert rc == 0, err
    assert not (out / LOCK_NAME).exists()  # released at the end
    assert len(list(out.glob("*.stats.json"))) == 2


def test_two_concurrent_jobs_one_is_refused(tmp_path, monkeypatch, capsys):
    from vesl.errors import UserError
    from vesl.pipeline.lock import acquire, release

    out = tmp_path / "out"
    path, run_id = acquire(str(out))
    with pytest.raises(UserError, match="another vesl job"):
        acquire(str(out))
    release(path, run_id)
    path2, run_id2 = acquire(str(out))
    assert run_id2 != run_id
    release(path2, run_id2)


def test_rerun_redoes_a_committed_shard_whose_bytes_changed(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data")
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)[0] == 0
    good = (out / "part-00000.parquet").read_bytes()
    pq.write_table(pq.read_table(out / "part-00000.parquet").slice(0, 1), out / "part-00000.parquet")
    rc, text, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)
    assert rc == 0, err
    assert "1 shards written, 1 already committed" in text
    assert (out / "part-00000.parquet").read_bytes() == good
    assert cli(monkeypatch, capsys, "validate", out)[0] == 0


# ------------------------------------------------------------------ defects 6, 7: config ranges, output paths


@pytest.mark.parametrize(
    "yaml_text",
    [
        "phrases:\n  batch_size: -3\n",
        "decode:\n  max_image_pixels: -1\n",
        "decode:\n  max_caption_chars: -1\n",
        "source:\n  image_extensions: []\n",
        "decode:\n  batch_size: 0\n",
        "captioner:\n  batch_size: 0\n",
        "detector:\n  batch_size: -1\n",
        "detector:\n  threshold: .nan\n",
        "detector:\n  threshold: 1e400\n",
        "captioner:\n  max_concurrent_requests: -4\n",
        "phrases:\n  max_phrases: -1\n",
    ],
)
def test_out_of_range_config_is_one_line_before_anything_is_written(tmp_path, monkeypatch, capsys, yaml_text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml_text)
    out = tmp_path / "out"
    rc, _, err = cli(monkeypatch, capsys, "label", "synth://3", "-o", out, *CHEAP, "--config", cfg)
    one_line_error(rc, err, "invalid config")
    assert not out.exists()


def test_limit_out_of_range_is_one_line(tmp_path, monkeypatch, capsys):
    for value in ("1e20", "100000000000000000000", "0"):
        rc, _, err = cli(monkeypatch, capsys, "label", "synth://3", "-o", tmp_path / "out", *CHEAP, "--limit", value)
        one_line_error(rc, err, "--limit")


def test_output_path_mistakes_are_one_line_before_any_work(tmp_path, monkeypatch, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = cli(monkeypatch, capsys, "label", "synth://3", "-o", afile / "sub", *CHEAP)
    one_line_error(rc, err, "is a file")
    rc, _, err = cli(monkeypatch, capsys, "synth", "--n", "2", "--out", afile)
    one_line_error(rc, err, "is a file")
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o500)
        try:
            rc, _, err = cli(monkeypatch, capsys, "label", "synth://3", "-o", ro / "out", *CHEAP)
            one_line_error(rc, err, "not writable")
        finally:
            ro.chmod(0o700)


def test_show_and_export_to_an_existing_file_are_one_line(tmp_path, monkeypatch, capsys):
    from tests.region_dataset import write_synth_region_dataset

    d = write_synth_region_dataset(tmp_path / "d", n_images=3)
    afile = tmp_path / "afile"
    afile.write_text("x")
    rc, _, err = cli(monkeypatch, capsys, "show", d, "--out", afile)
    one_line_error(rc, err, "is a file")
    rc, _, err = cli(monkeypatch, capsys, "export", d, "--format", "coco", "--out", afile)
    one_line_error(rc, err, "is a file")


def test_bad_model_spec_leaves_no_output_directory(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    rc, _, err = cli(monkeypatch, capsys, "label", "synth://3", "-o", out, "--captioner", "nope:x", "--detector", "none",
                     "--no-progress")
    one_line_error(rc, err, "captioner")
    assert not out.exists()


# ------------------------------------------------------------------ defects 5, 8: hostile samples, corrupt datasets


def _tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_deeply_nested_sidecar_is_an_error_row_and_the_rest_commit(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _tar(data / "00000.tar", [
        ("a.png", _png()), ("a.txt", b"a red square"),
        ("b.png", _png()), ("b.json", b"[" * 100_000),
        ("c.png", _png()), ("c.txt", b"a blue square"),
    ])
    out = tmp_path / "out"
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)
    assert rc == 0, err
    assert [r["key"] for r in pq.read_table(out / "part-00000.parquet").to_pylist()] == ["a", "c"]
    [e] = pq.read_table(out / "part-00000.errors.parquet").to_pylist()
    assert (e["key"], e["error_type"]) == ("b", "BadJson")


def test_oversized_tar_member_is_skipped_unread(tmp_path):
    from vesl.pipeline.config import SourceConfig
    from vesl.pipeline.sources import list_shards, read_shard

    _tar(tmp_path / "x.tar", [("a.png", _png()), ("a.txt", b"x" * 5000), ("b.png", _png()), ("b.txt", b"fine")])
    cfg = SourceConfig(max_file_bytes=4096)
    [ref] = list_shards([str(tmp_path / "x.tar")], cfg)
    a, b = read_shard(ref, cfg)
    assert a.error.error_type == "FileTooLarge"
    assert "5000 bytes" in a.error.message
    assert b.ok
    assert b.alt_text == "fine"


def test_truncated_parquet_is_a_finding_for_validate_and_one_line_elsewhere(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data")
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)[0] == 0
    shard = out / "part-00000.parquet"
    shard.write_bytes(shard.read_bytes()[:100])
    from vesl.schemas import validation

    kinds = {v.kind for v in validation.validate(out)}
    assert {"unreadable", "sha256"} <= kinds
    rc, text, _ = cli(monkeypatch, capsys, "validate", out)
    assert rc == 1
    assert "[unreadable]" in text
    rc, _, err = cli(monkeypatch, capsys, "validate", out / "part-00000.stats.json")
    assert rc == 1
    for cmd in (("inspect", out), ("publish", out, "--name", "x", "--license", "MIT"),
                ("export", out, "--format", "coco", "--out", tmp_path / "coco")):
        rc, _, err = cli(monkeypatch, capsys, *cmd)
        assert rc == 2, (cmd, err)
        assert "Traceback" not in err
        assert err.strip().splitlines()[-1].startswith("error: ")
    shard.unlink()
    assert "missing_file" in {v.kind for v in validation.validate(out)}
    rc, _, err = cli(monkeypatch, capsys, "inspect", out)
    one_line_error(rc, err, "part-00000.parquet")


def test_truncated_tar_with_limit_is_one_line(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data")
    tar = data / "00000.tar"
    tar.write_bytes(tar.read_bytes()[:700])
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", tmp_path / "out", *CHEAP, "--limit", "4")
    assert rc in (1, 2), err
    assert "Traceback" not in err
    assert len([ln for ln in err.splitlines() if ln.startswith("error: ")]) <= 1


# ------------------------------------------------------------------ no local paths in what is published


def test_published_files_show_no_local_path(tmp_path, monkeypatch, capsys):
    data = _synth(monkeypatch, capsys, tmp_path / "data")
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)[0] == 0
    rc, _, err = cli(monkeypatch, capsys, "publish", out, "--name", "x", "--license", "MIT")
    assert rc == 0, err
    rows = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert {r["source_shard"] for r in rows} == {"data/00000.tar"}
    needle = str(tmp_path).encode()
    leaks = [p.name for p in out.rglob("*") if p.is_file() and not p.name.startswith(".") and needle in p.read_bytes()]
    assert leaks == []
    assert str(tmp_path) not in json.dumps(pq.read_schema(out / "part-00000.parquet").metadata[b"vesl.provenance"].decode())


def test_card_escapes_html_and_markdown(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data"
    data.mkdir()
    _tar(data / "00000.tar", [("a.png", _png()), ("a.txt", b"the red circle</td></tr><script>alert(1)</script> | x")])
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", data, "-o", out, *CHEAP)[0] == 0
    rc, _, err = cli(monkeypatch, capsys, "publish", out, "--name", "<script>alert(2)</script>", "--license", "MIT")
    assert rc == 0, err
    card = (out / "README.md").read_text()
    body = card.split("---", 2)[2]
    assert "<script>" not in body
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in body


def test_card_tables_escape_hostile_phrases_and_error_types(tmp_path):
    from vesl.pipeline.publish import publish
    from vesl.pipeline.writer import write_manifest, write_shard
    from vesl.schemas.stage import Region, Sample, SampleError

    hostile = "the red circle</td></tr><script>alert(1)</script>"
    caption = f"{hostile} | and more"
    samples = [
        Sample(key="a", source_shard="in/x.tar", index=0, image_bytes=_png(), width=32, height=24, alt_text="x",
               caption=caption, caption_source="vlm", regions=[Region(hostile, 0, len(hostile), (0.1, 0.1, 0.5, 0.5), 0.9)]),
        Sample(key="b", source_shard="in/x.tar", index=1,
               error=SampleError("decode", "<img src=x onerror=alert(3)>", "bad")),
    ]
    write_shard(tmp_path, "part-00000", "in/x.tar", samples, {"captioner": {"spec": "<b>x</b>"}})
    write_manifest(tmp_path)
    card = publish(tmp_path, name="n", license_id="MIT").card.read_text()
    body = card.split("---", 2)[2]
    for raw in ("<script>", "</td>", "<img", "<b>"):
        assert raw not in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body


# ------------------------------------------------------------------ risks: image_uri confinement in show/export


def test_show_and_export_read_image_uris_only_inside_the_dataset_and_its_inputs(tmp_path, monkeypatch, capsys):
    from vesl.pipeline.writer import write_manifest, write_shard
    from vesl.schemas.stage import Sample

    outside = tmp_path / "outside.png"
    outside.write_bytes(_png((9, 9, 9)))
    d = tmp_path / "d"
    d.mkdir()
    (d / "inside.png").write_bytes(_png((1, 200, 1)))
    uris = [str(d / "inside.png"), str(outside), f"http://127.0.0.1:{_free_port()}/x.png"]
    samples = [Sample(key=f"k{i}", source_shard="x", index=i, image_uri=u, width=32, height=24, alt_text="a",
                      caption="a", caption_source="alt_text") for i, u in enumerate(uris)]
    write_shard(d, "part-00000", "x", samples, {}, keep_image_bytes=False)
    write_manifest(d)
    rc, text, err = cli(monkeypatch, capsys, "export", d, "--format", "coco", "--out", tmp_path / "coco")
    assert rc == 0, err
    assert "1 images" in text
    assert [p.read_bytes() for p in (tmp_path / "coco" / "images").iterdir()] == [(d / "inside.png").read_bytes()]
    rc, text, err = cli(monkeypatch, capsys, "export", d, "--format", "coco", "--out", tmp_path / "coco2",
                        "--allow-any-image-uri")
    assert rc == 0, err
    assert "2 images" in text  # the outside file now; the URL is unreachable

    # a job's own inputs are allowed: an image folder labeled without keeping the bytes
    imgs = tmp_path / "in" / "imgs"
    imgs.mkdir(parents=True)
    (imgs / "a.png").write_bytes(_png())
    (imgs / "a.txt").write_text("a red square")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode:\n  keep_image_bytes: false\n")
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", tmp_path / "in", "-o", out, *CHEAP, "--config", cfg)[0] == 0
    rc, text, err = cli(monkeypatch, capsys, "export", out, "--format", "wds", "--out", tmp_path / "wds")
    assert rc == 0, err
    assert "1 images" in text


# ------------------------------------------------------------------ defects 4, 9: the trainer


def _train_cfg(root: Path, **kw):
    from vesl.pretrain.train import TrainConfig

    base = {"data": str(root / "data"), "out": str(root / "run"), "model": "vesl-micro-vit", "batch_size": 4,
            "workers": 0, "epochs": 1, "lr": 1e-3, "warmup": 0, "log_every": 1, "save_every": 1000,
            "tensorboard": False}
    return TrainConfig(**{**base, **kw})


def test_usable_box_drops_non_finite_inverted_and_out_of_range():
    from vesl.pretrain.data import usable_box

    assert usable_box([0.1, 0.1, 0.5, 0.5])
    for bad in ([0, 0, float("inf"), 1], [0, 0, float("nan"), 1], [0.5, 0, 0.1, 1], [0, 0, 1e30, 1],
                [-1e30, 0, 0.5, 1], [0.2, 0.2, 0.2, 0.5], None):
        assert not usable_box(bad)


def test_trainer_never_trains_on_an_inf_box(tmp_path):
    import torch
    from safetensors.torch import load_file

    from tests.pretrain_data import write_shards
    from vesl.pretrain.train import train

    torch.set_num_threads(1)
    [p] = write_shards(tmp_path / "data", 8, n_files=1, row_group_size=8)
    rows = pq.read_table(p).to_pylist()
    rows[0]["regions"][0]["box"] = [0.0, 0.0, float("inf"), 1.0]
    pq.write_table(pq.read_table(p).from_pylist(rows, schema=pq.read_schema(p)), p)
    run = train(_train_cfg(tmp_path, max_steps=2))
    logged = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert all(np_finite(r["loss"]) for r in logged)
    [ck] = list((run / "checkpoints").iterdir())
    weights = load_file(str(ck / "model.safetensors"))
    assert all(bool(torch.isfinite(t).all()) for t in weights.values())


def np_finite(v: float) -> bool:
    import math

    return math.isfinite(v)


def test_a_non_finite_loss_stops_with_one_line_and_no_checkpoint(tmp_path):
    import torch

    from tests.pretrain_data import write_shards
    from vesl.errors import UserError
    from vesl.pretrain.train import train

    torch.set_num_threads(1)
    write_shards(tmp_path / "data", 16, n_files=1, row_group_size=4)
    with pytest.raises(UserError, match="not finite") as e:
        # past the config's range (lr <= 1e6) on purpose, so that the loss surely overflows on any CPU: the guard
        # under test is the loop's, for a loss that blows up at a valid rate
        train(_train_cfg(tmp_path, max_steps=4, grad_clip=0).model_copy(update={"lr": 1e38}))
    assert len(str(e.value).splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_trainer_input_errors_are_one_line(tmp_path):
    import pickle

    import torch

    from tests.pretrain_data import write_shards
    from vesl.errors import UserError
    from vesl.pretrain.checkpoint import load_optimizer_state, load_weights
    from vesl.pretrain.train import train

    [p] = write_shards(tmp_path / "data", 4, n_files=1)
    good = p.read_bytes()
    p.write_bytes(good[: len(good) // 2])
    with pytest.raises(UserError, match="not a readable Parquet file") as e:
        train(_train_cfg(tmp_path, max_steps=1))
    assert str(p) in str(e.value)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"w": Payload()}))
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_weights(torch.nn.Linear(2, 2), fake)
    opt = tmp_path / "optimizer.pt"
    torch.save({"optimizer": Payload()}, opt)
    with pytest.raises(UserError, match="tensors-only optimizer state"):
        load_optimizer_state(opt, "cpu")
    assert not (tmp_path / "pwned").exists()


def test_distributed_writer_never_commits_a_shard_hit_by_an_infrastructure_failure(tmp_path):
    """Beam and Ray commit through write_items: an infrastructure failure leaves the shard uncommitted."""
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.engines.distributed import ShardEnd, write_items
    from vesl.pipeline.job import ShardTask
    from vesl.pipeline.sources import ShardRef
    from vesl.schemas.stage import Sample, SampleError

    cfg = LabelConfig(inputs=["synth://2"], output=str(tmp_path / "out"))
    task = ShardTask(ShardRef(0, "synth://2?seed=0&shard_size=2&part=0", "synth"))
    ok = Sample(key="a", source_shard="s", index=0, width=4, height=4, caption="a", caption_source="alt_text")
    down = Sample(key="b", source_shard="s", index=1,
                  error=SampleError("caption", "ConnectError", "connection refused", infrastructure=True))
    result = write_items(cfg, "part-00000", [[ok, down], ShardEnd(task, 2)], "ray")
    assert not result["ok"]
    assert "infrastructure failure" in result["error"]
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.stats.json"))


def test_show_fetches_no_url_unless_allowed(tmp_path, monkeypatch, capsys):
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from vesl.pipeline.writer import write_manifest, write_shard
    from vesl.schemas.stage import Sample

    hits = []
    png = _png((5, 5, 250))

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(png)

        def log_message(self, *a):
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        d = tmp_path / "d"
        url = f"http://127.0.0.1:{srv.server_address[1]}/x.png"
        write_shard(d, "part-00000", "x", [Sample(key="k", source_shard="x", image_uri=url, width=32, height=24,
                                                 alt_text="a", caption="a", caption_source="alt_text")], {},
                    keep_image_bytes=False)
        write_manifest(d)
        rc, _, err = cli(monkeypatch, capsys, "show", d, "--out", tmp_path / "g")
        assert rc == 0, err
        assert hits == []
        rc, _, err = cli(monkeypatch, capsys, "show", d, "--out", tmp_path / "g2", "--allow-any-image-uri")
        assert rc == 0, err
        assert hits
        assert set(hits) == {"/x.png"}
    finally:
        srv.shutdown()


def test_cuda_out_of_memory_on_one_sample_fails_the_shard_not_the_sample():
    """OOM on a batch is retried per sample; OOM on a single sample is the device's failure."""
    import torch

    from vesl.pipeline.apply import apply_stage
    from vesl.schemas.stage import Sample, StageResources, infrastructure_failure

    class Stage:
        name = "detect"
        resources = StageResources(batch_size=4)

        def __init__(self, max_ok: int):
            self.max_ok = max_ok

        def __call__(self, batch):
            if len(batch) > self.max_ok:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
            for s in batch:
                s.caption = "done"
            return batch

    samples = [Sample(key=f"k{i}", source_shard="s", index=i) for i in range(3)]
    apply_stage(Stage(max_ok=1), samples)  # the batch is too big, one at a time fits
    assert all(s.ok and s.caption == "done" for s in samples)
    assert infrastructure_failure(samples) is None

    samples = [Sample(key=f"k{i}", source_shard="s", index=i) for i in range(3)]
    apply_stage(Stage(max_ok=0), samples)  # not even one sample fits
    broken = infrastructure_failure(samples)
    assert broken is not None
    assert broken.error_type == "OutOfMemoryError"
    assert all(s.error.infrastructure for s in samples)


def test_image_folder_rows_show_no_local_path_when_bytes_are_kept(tmp_path, monkeypatch, capsys):
    imgs = tmp_path / "in" / "imgs"
    imgs.mkdir(parents=True)
    (imgs / "a.png").write_bytes(_png())
    (imgs / "a.txt").write_text("a red square")
    out = tmp_path / "out"
    assert cli(monkeypatch, capsys, "label", tmp_path / "in", "-o", out, *CHEAP)[0] == 0
    [row] = pq.read_table(out / "part-00000.parquet").to_pylist()
    assert (row["source_shard"], row["image_uri"]) == ("in/imgs", "in/imgs/a.png")
    needle = str(tmp_path).encode()
    assert [p.name for p in out.iterdir() if not p.name.startswith(".") and needle in p.read_bytes()] == []
    # without the bytes the row keeps the full path: loading the image needs it
    cfg = tmp_path / "c.yaml"
    cfg.write_text("decode:\n  keep_image_bytes: false\n")
    assert cli(monkeypatch, capsys, "label", tmp_path / "in", "-o", tmp_path / "out2", *CHEAP, "--config", cfg)[0] == 0
    [row] = pq.read_table(tmp_path / "out2" / "part-00000.parquet").to_pylist()
    assert row["image"] is None
    assert row["image_uri"] == str(imgs / "a.png")


def test_query_and_url_credentials_never_reach_provenance_or_the_job_file(tmp_path):
    from vesl.labelers.captioners import make_captioner
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.job import job_provenance, write_job_file

    spec = "openai:https://user:secretpw@host:8443/v1?api_key=querysecret&x=1#m"
    cfg = LabelConfig(inputs=["synth://3"], output=str(tmp_path), captioner={"spec": spec})
    text = json.dumps(job_provenance(cfg, [make_captioner(cfg.captioner)]))
    write_job_file(cfg)
    text += (tmp_path / ".vesl-job.json").read_text()
    assert "secretpw" not in text
    assert "querysecret" not in text
    assert "api_key=***" in text
