"""Hostile evaluation and model inputs from the fault audit (issue 29, item 5): each reproduced input gets one
line or an error row, never a traceback or an out-of-memory kill, and loses nothing else."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.test_hardening import _png, cli, one_line_error
from tests.test_hf_export import _checkpoint

# ------------------------------------------------------------------ vesl eval --refexp: hostile lines


@pytest.fixture(scope="module")
def rec_set(tmp_path_factory):
    from vesl.demo.synth import make_refexp, write_refexp

    return write_refexp((make_refexp(11, i) for i in range(4)), tmp_path_factory.mktemp("rec") / "rx")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from vesl.pretrain.model import create_model

    return _checkpoint(tmp_path_factory.mktemp("run"), create_model("vesl-tiny-vit", seed=0))


def _hostile_refexp(rec_set: Path, out: Path) -> tuple[Path, dict[int, str]]:
    """The good lines of ``rec_set`` plus one hostile line per audit finding; {line number: expected error}."""
    from vesl.pretrain.eval import MAX_REFEXP_CANDIDATES

    good = [json.loads(x) for x in rec_set.read_text().splitlines()]
    base = good[0]
    hostile = [
        ({**base, "candidates": [*base["candidates"], [0, 0, 1e12, 1e12]]}, "outside the"),
        ({**base, "candidates": [[1, 1, 4, 4]] * 100_000}, f"at most {MAX_REFEXP_CANDIDATES} per line"),
        ({**base, "candidates": [[1, 1, 4, 4]] * (MAX_REFEXP_CANDIDATES + 1)}, f"at most {MAX_REFEXP_CANDIDATES}"),
        ({**base, "bbox": [float("nan"), 1, 4, 4]}, "finite"),
        ({**base, "bbox": [1, 1, float("inf"), 4]}, "finite"),
        ({**base, "bbox": [1, 1, 1e308, 4]}, "outside the"),
        ({**base, "candidates": [[1, 1, 4, float("-inf")]]}, "finite"),
        ({**base, "bbox": [True, 1, 4, 4]}, "finite"),
    ]
    lines = [json.dumps(d) for d in good]  # json writes NaN and Infinity as the tokens Python reads back
    expected = {}
    for d, err in hostile:
        lines.append(json.dumps(d))
        expected[len(lines)] = err
    path = out / "hostile.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (out / "images").symlink_to(rec_set.parent / "images")
    return path, expected


def test_hostile_refexp_lines_become_error_rows_and_good_lines_still_count(tmp_path, rec_set, tiny_run,
                                                                           monkeypatch, capsys):
    path, expected = _hostile_refexp(rec_set, tmp_path)
    out = tmp_path / "res.json"
    rc, text, err = cli(monkeypatch, capsys, "eval", tiny_run, "--refexp", path, "--out", out)
    assert rc == 0, err
    assert f"{len(expected)} bad line(s) skipped" in text
    rx = json.loads(out.read_text())["refexp"]
    assert rx["errors"] == len(expected)
    got = {e["line"]: e["error"] for e in rx["error_rows"]}
    assert set(got) == set(expected)
    for line, needle in expected.items():
        assert needle in got[line], (line, got[line])
    assert all(rx[m]["n"] == 4 for m in ("ground", "prompter", "roi_align", "crop"))  # the good lines, all counted


def test_refexp_boxes_at_the_image_edge_are_kept(tmp_path, rec_set):
    """A box on the border (or reaching a pixel past it, as rounded annotations do) is no error."""
    from PIL import Image

    from vesl.pretrain.eval import evaluate
    from vesl.pretrain.model import create_model

    d = json.loads(rec_set.read_text().splitlines()[0])
    w, h = Image.open(rec_set.parent / d["image"]).size
    d["candidates"] = [*d["candidates"], [0, 0, w, h], [-0.5, -0.5, w + 1, h + 1]]
    path = tmp_path / "edge.jsonl"
    path.write_text(json.dumps(d) + "\n")
    (tmp_path / "images").symlink_to(rec_set.parent / "images")
    res = evaluate(create_model("vesl-tiny-vit", seed=0), refexp=path)["refexp"]
    assert res["errors"] == 0
    assert res["crop"]["n"] == 1


# ------------------------------------------------------------------ vesl export-model: unusable weights


def test_export_model_of_garbage_weights_is_one_line(tmp_path, tiny_run, monkeypatch, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    weights = next(run.glob("checkpoints/step-*/model.safetensors"))
    weights.write_bytes(b"\xff" * 64)  # a header length of 2**64 - 1: "header too large"
    rc, _, err = cli(monkeypatch, capsys, "export-model", run, "--out", tmp_path / "x")
    one_line_error(rc, err, str(weights), "not a readable safetensors file")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_loading_an_export_with_garbage_weights_is_one_line(tmp_path, tiny_run, fmt, monkeypatch, capsys):
    from vesl.pretrain.export import export_model

    out = export_model(tiny_run, tmp_path / fmt, format=fmt)
    capsys.readouterr()  # transformers' progress bar while saving
    for name in ("model.safetensors", "open_clip_model.safetensors", "vesl_heads.safetensors"):
        if (out / name).exists():
            good = (out / name).read_bytes()
            (out / name).write_bytes(good[:40])  # truncated
            rc, _, err = cli(monkeypatch, capsys, "export-model", out, "--out", tmp_path / "again")
            one_line_error(rc, err, name, "re-export it")
            (out / name).write_bytes(good)


# ------------------------------------------------------------------ export / publish: images outside the dataset


def _dataset_with_an_outside_image(tmp_path: Path) -> tuple[Path, Path]:
    from vesl.pipeline.writer import write_manifest, write_shard
    from vesl.schemas.stage import Sample

    outside = tmp_path / "outside.png"
    outside.write_bytes(_png((9, 9, 9)))
    d = tmp_path / "d"
    d.mkdir()
    (d / "inside.png").write_bytes(_png((1, 200, 1)))
    samples = [Sample(key=f"k{i}", source_shard="x", index=i, image_uri=str(u), width=32, height=24, alt_text="a",
                      caption="a", caption_source="alt_text") for i, u in enumerate([d / "inside.png", outside])]
    write_shard(d, "part-00000", "x", samples, {}, keep_image_bytes=False)
    write_manifest(d)
    return d, outside


def test_export_names_images_outside_the_dataset_and_the_flag(tmp_path, monkeypatch, capsys):
    d, _ = _dataset_with_an_outside_image(tmp_path)
    rc, text, err = cli(monkeypatch, capsys, "export", d, "--format", "wds", "--out", tmp_path / "wds")
    assert rc == 0, err
    assert "(skipped: image_outside_dataset: 1)" in text
    assert "unreadable_image" not in text
    assert err.strip().splitlines() == [err.strip()]
    assert "1 row(s) have an image_uri outside the dataset" in err
    assert "--allow-any-image-uri" in err
    rc, text, err = cli(monkeypatch, capsys, "export", d, "--format", "wds", "--out", tmp_path / "wds2",
                        "--allow-any-image-uri")
    assert rc == 0, err
    assert "2 images" in text
    assert "skipped: none" in text
    assert err == ""


def test_publish_names_gallery_images_outside_the_dataset_and_the_flag(tmp_path, monkeypatch, capsys):
    from PIL import Image

    d, outside = _dataset_with_an_outside_image(tmp_path)
    rc, _, err = cli(monkeypatch, capsys, "publish", d, "--name", "t", "--license", "MIT")
    assert rc == 0, err
    assert err.strip() == ("1 gallery row(s) have an image_uri outside the dataset and the inputs its job recorded, "
                           "so their images were not read; pass --allow-any-image-uri if you trust those paths")
    grey = Image.open(next(d.glob("**/gallery/images/00001.png"))).convert("RGB").getpixel((0, 0))
    assert grey == (60, 60, 60)  # the placeholder, not the outside file's pixels
    rc, _, err = cli(monkeypatch, capsys, "publish", d, "--name", "t", "--license", "MIT", "--allow-any-image-uri")
    assert rc == 0, err
    assert err == ""
    shown = Image.open(next(d.glob("**/gallery/images/00001.png"))).convert("RGB").getpixel((10, 10))
    assert shown == (9, 9, 9)


# ------------------------------------------------------------------ the output lock: takeover and corruption


def test_a_stale_lock_taken_over_says_so_in_one_line(tmp_path, capsys):
    from vesl.pipeline.lock import LOCK_NAME, acquire, release

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    (out / LOCK_NAME).write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "run_id": "r1", "started": 0}))
    path, run_id = acquire(str(out))
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert f"took over the lock of {out}" in err[0]
    assert f"pid {pid}" in err[0]
    assert "run r1" in err[0]
    assert "1970-01-01" in err[0]
    release(path, run_id)
    path, run_id = acquire(str(out))  # a free directory: nothing to say
    assert capsys.readouterr().err == ""
    release(path, run_id)


@pytest.mark.parametrize("content", ["", "{\"pid\": 1", "[]", "{\"pid\": \"x\", \"host\": 3}", "{}"])
def test_a_corrupt_lock_is_named_corrupt_in_one_line(tmp_path, monkeypatch, capsys, content):
    from vesl.pipeline.lock import LOCK_NAME

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.png").write_bytes(_png())
    (data / "a.txt").write_text("a red square")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(content)
    rc, _, err = cli(monkeypatch, capsys, "label", data, "-o", out, "--captioner", "alt_text", "--detector", "none",
                     "--no-progress")
    one_line_error(rc, err, str(out / LOCK_NAME), "is corrupt", "delete it")
    assert "?" not in err
    assert (out / LOCK_NAME).read_text() == content  # left for the user to judge
    assert not list(out.glob("*.parquet"))


# ------------------------------------------------------------------ training: loss terms without input


def _train(tmp_path: Path, data: Path, capfd, **kw) -> list[str]:
    import torch

    from vesl.pretrain.train import TrainConfig, train

    torch.set_num_threads(1)
    cfg = TrainConfig(data=str(data), out=str(tmp_path / "run"), model="vesl-micro-vit", workers=0, log_every=1,
                      save_every=1000, **kw)
    train(cfg)
    return [x for x in capfd.readouterr().err.splitlines() if "no step since the last log" in x]


def test_training_warns_once_when_no_box_is_valid(tmp_path, capfd):
    from tests.pretrain_data import write_shards

    hostile = [[float("nan"), 0.1, 0.5, 0.5], [0.0, 0.0, float("inf"), 1.0], [0.0, 0.0, 1e308, 1.0]]
    for p in write_shards(tmp_path / "data", 8, n_files=1):
        rows = pq.read_table(p).to_pylist()
        for row in rows:
            for k, r in enumerate(row["regions"]):
                r["box"] = hostile[k % 3]
        pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(p)), p)
    warned = _train(tmp_path, tmp_path / "data", capfd, batch_size=4, epochs=2)
    assert len(warned) == 1, warned  # once, over 4 log steps
    assert "L_region" in warned[0]
    assert "L_ground" in warned[0]
    assert "L_clip" not in warned[0]
    assert warned[0].startswith("warning: ")


def test_training_on_one_row_warns_that_the_contrastive_terms_have_no_negatives(tmp_path, capfd):
    from tests.pretrain_data import write_shards

    (p,) = write_shards(tmp_path / "data", 1, n_files=1)
    rows = pq.read_table(p).to_pylist()
    rows[0]["regions"] = rows[0]["regions"][:1]
    pq.write_table(pa.Table.from_pylist(rows, schema=pq.read_schema(p)), p)
    warned = _train(tmp_path, tmp_path / "data", capfd, batch_size=4, epochs=2)
    assert len(warned) == 1, warned
    assert "L_clip" in warned[0]
    assert "L_region" in warned[0]
    assert "L_ground" not in warned[0]  # its one region has a box to regress


def test_training_on_good_data_does_not_warn(tmp_path, capfd):
    from tests.pretrain_data import write_shards

    write_shards(tmp_path / "data", 8, n_files=1)
    assert _train(tmp_path, tmp_path / "data", capfd, batch_size=4, epochs=1) == []


def test_a_live_lock_without_a_start_time_still_names_its_holder(tmp_path):
    from vesl.errors import UserError
    from vesl.pipeline.lock import LOCK_NAME, acquire

    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "run_id": "live"}))
    with pytest.raises(UserError, match=r"another vesl job \(pid \d+ on .+, run live, since \?\)"):
        acquire(str(out))


def test_a_refexp_file_whose_every_box_is_outside_its_image_is_one_line(tmp_path, rec_set, tiny_run, monkeypatch,
                                                                         capsys):
    d = json.loads(rec_set.read_text().splitlines()[0])
    path = tmp_path / "all_bad.jsonl"
    path.write_text(json.dumps({**d, "bbox": [0, 0, 1e12, 1e12]}) + "\n")
    (tmp_path / "images").symlink_to(rec_set.parent / "images")
    rc, _, err = cli(monkeypatch, capsys, "eval", tiny_run, "--refexp", path)
    one_line_error(rc, err, "no usable referring expression", "1 bad line(s)", "outside the")
