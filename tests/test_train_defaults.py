"""`vesl train` on small data and with common mistakes: it runs, or says what to do in one line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from tests.pretrain_data import write_shards

MODEL = "vesl-micro-vit"


@pytest.fixture(scope="module")
def small_data(tmp_path_factory) -> Path:
    """16 images in ONE row group: a single data unit, fewer than the default 2 loader workers."""
    root = tmp_path_factory.mktemp("small")
    write_shards(root / "data", 16, n_files=1, row_group_size=16, seed=4)
    return root / "data"


def _cli(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    from vesl.cli import main

    monkeypatch.setattr(sys, "argv", ["vesl", "train", *args])
    with pytest.raises(SystemExit) as exc:
        main()
    return exc.value.code, capsys.readouterr().err.strip()


def test_defaults_train_on_one_row_group_and_say_what_they_changed(small_data, tmp_path, capsys):
    from vesl.pretrain.train import TrainConfig, train

    torch.set_num_threads(1)
    run = train(TrainConfig(data=str(small_data), out=str(tmp_path / "run"), model=MODEL, batch_size=4, max_steps=3,
                            tensorboard=False))  # default --workers 2 and --warmup 100
    err = capsys.readouterr().err
    assert "using --workers 1" in err
    assert "--warmup 100 is longer than half the run (3 steps); warming up over 1 step instead" in err
    log = [json.loads(x) for x in (run / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3]
    assert log[0]["lr"] == pytest.approx(5e-4)  # warmed up after one step, not at 1% of the peak


def test_an_existing_run_is_refused_unless_resume_or_overwrite(small_data, tmp_path, monkeypatch, capsys):
    from vesl.pretrain.train import TrainConfig, train

    torch.set_num_threads(1)
    base = {"data": str(small_data), "out": str(tmp_path / "run"), "model": MODEL, "batch_size": 4, "max_steps": 2,
            "workers": 0, "warmup": 1, "tensorboard": False}
    run = train(TrainConfig(**base))
    before = (run / "log.jsonl").read_text()
    capsys.readouterr()
    code, err = _cli(monkeypatch, capsys, "--data", str(small_data), "--out", str(run), "--model", MODEL)
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "already holds a run" in err
    assert "--resume latest" in err
    assert "--overwrite" in err
    assert (run / "log.jsonl").read_text() == before  # nothing touched
    train(TrainConfig(**{**base, "max_steps": 3}, overwrite=True))
    steps = [json.loads(x)["step"] for x in (run / "log.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]  # a fresh log, not appended to the old one
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-00000003"]


def test_a_typo_in_the_model_name_suggests_close_names(small_data, tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "--data", str(small_data), "--out", str(tmp_path / "r"), "--model",
                     "vesl-tiny-vt")
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "did you mean vesl-tiny-vit" in err
    assert len(err) < 200
    assert not (tmp_path / "r").exists()


def test_unusable_pretrained_weights_give_one_line_and_leave_no_run_behind(small_data, tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "--data", str(small_data), "--out", str(tmp_path / "r"), "--model", MODEL,
                     "--pretrained", "openai")
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith(f"error: open_clip could not load {MODEL} with --pretrained openai")
    assert not (tmp_path / "r" / "config.yaml").exists()


def test_config_errors_point_to_the_train_help(small_data, tmp_path, monkeypatch, capsys):
    code, err = _cli(monkeypatch, capsys, "--data", str(small_data), "--out", str(tmp_path / "r"), "--lr", "-1")
    assert code == 2
    assert len(err.splitlines()) == 1
    assert "lr" in err
    assert "`vesl train --help`" in err
