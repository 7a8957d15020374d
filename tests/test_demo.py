"""`vesl demo` end to end at reduced sizes: synth -> label (--profile demo) -> inspect -> gallery (-> train -> eval)."""

from __future__ import annotations

import json
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from vesl.demo.runner import generate_input, results_table, run_demo, run_full_demo


def test_generate_input_is_deterministic_and_reused(tmp_path):
    a = generate_input(tmp_path / "a", n=5, seed=3, shard_size=2)
    b = generate_input(tmp_path / "b", n=5, seed=3, shard_size=2)
    assert [p.name for p in a] == ["00000.tar", "00001.tar", "00002.tar"]
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
    mtime = a[0].stat().st_mtime_ns
    assert generate_input(tmp_path / "a", n=5, seed=3, shard_size=2) == a  # same sample: not rewritten
    assert a[0].stat().st_mtime_ns == mtime
    assert len(generate_input(tmp_path / "a", n=3, seed=3, shard_size=2)) == 2  # different sample: rewritten


def test_results_table_says_how_many_seeds_it_judges():
    metrics = {"clip_roi_align_macc": 0.02, "clip_crop_macc": 0.10, "cloc_prompter_macc": 0.20, "cloc_grounding_acc": 0.02}
    one, _ = results_table(metrics)
    assert "one training seed, 0" in one
    assert "--seeds 3" in one
    three, met = results_table(metrics, (0, 1, 2), (16.9, 5.0, 5.6))
    assert not met  # judged on the means: +10.0
    assert "+10.0 points: NOT MET" in three
    assert "margin per seed 0: +16.9, 1: +5.0, 2: +5.6" in three


def test_results_table_goal():
    table, met = results_table(
        {
            "clip_roi_align_macc": 0.30,
            "clip_crop_macc": 0.42,
            "cloc_prompter_macc": 0.60,
            "cloc_grounding_acc": 0.5,
        }
    )
    assert met
    assert "CLOC Prompter" in table
    assert "+18.0 points: MET" in table
    _, met = results_table(
        {
            "clip_roi_align_macc": 0.50,
            "clip_crop_macc": 0.42,
            "cloc_prompter_macc": 0.60,
            "cloc_grounding_acc": 0.5,
        }
    )
    assert not met


def test_demo_labels_sample_end_to_end(tmp_path, capsys):
    from vesl.cli.profiles import resolve_config
    from vesl.schemas.manifest import check_dataset

    lines: list[str] = []
    res = run_demo(tmp_path, n=6, gallery_n=4, echo=lines.append, progress=False)
    assert res.summary["rows"] + res.summary["errors"] == 6
    assert res.summary["rows"] >= 5
    assert check_dataset(res.labeled_dir) == []
    rows = [
        r for p in sorted(res.labeled_dir.glob("part-*[0-9].parquet")) for r in pq.read_table(p).to_pylist()
    ]
    spec = resolve_config("demo").captioner.spec
    assert {r["caption_source"] for r in rows} == {"alt_text" if spec == "alt_text" else "vlm"}
    assert res.inspect["rows"] == res.summary["rows"]
    if resolve_config("demo").detector.spec != "none":
        assert sum(len(r["regions"]) for r in rows) > 0
    assert res.gallery_html.exists()
    assert res.gallery_png.stat().st_size > 0
    text = "\n".join(lines)
    assert "regions per image" in capsys.readouterr().out  # the `vesl inspect` summary
    assert "[3/3] gallery" in text
    assert str(res.labeled_dir) in text


def test_cli_rejects_bad_size_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "from vesl.cli import main; main()",
            "demo",
            "--n",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: --n must be at least 1")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_full_demo_tiny(tmp_path):
    lines: list[str] = []
    res = run_full_demo(
        tmp_path, n=40, eval_n=10, steps=5, echo=lines.append, progress=False, train_kwargs={"workers": 0},
        train_seed=3, seeds=2, probe_steps=2,
    )
    probe_keys = {f"probe_{who}_{k}" for who in ("clip", "cloc", "trivial")
                  for k in ("grounding", "grounding_pointing", "grounding_lookalike", "referring", "referring_soft", "control")}
    assert set(res.metrics) - probe_keys == {
        "clip_roi_align_macc",
        "clip_crop_macc",
        "cloc_prompter_macc",
        "cloc_grounding_acc",
        "rec_clip_roi_align",
        "rec_clip_crop",
        "rec_cloc_prompter",
        "rec_cloc_ground",
        "rec_chance",
        *(f"relrec_{k}" for k in ("clip_roi_align", "clip_crop", "cloc_prompter", "cloc_ground", "chance")),
    }
    assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
    saved = json.loads((tmp_path / "full" / "results.json").read_text())
    assert saved["metrics"] == res.metrics
    assert saved["train_seeds"] == [3, 4]
    assert [r["train_seed"] for r in saved["per_seed"]] == [3, 4]
    from vesl.demo.synth import TEST_SEEDS

    assert saved["eval_split"] == "test"
    assert [r["eval_seed"] for r in saved["per_seed"]] == list(TEST_SEEDS[:2])  # a fresh sealed world per seed
    for key, mean in res.metrics.items():  # the table shows the means of the two seeds' figures
        assert mean == pytest.approx((res.per_seed[0][key] + res.per_seed[1][key]) / 2)
    assert (tmp_path / "full" / "cloc-seed4").is_dir()
    assert "goal: CLOC Prompter" in "\n".join(lines)
    assert "CLOC Prompter ranking" in "\n".join(lines)
    assert "REC: CLOC Prompter vs best CLIP ranking" in "\n".join(lines)
    assert "relative REC: CLOC Prompter vs best CLIP ranking" in "\n".join(lines)
    assert saved["relrec_margin_points"] == pytest.approx(
        100 * (res.metrics["relrec_cloc_prompter"] - max(res.metrics["relrec_clip_roi_align"], res.metrics["relrec_clip_crop"])))
    assert len((tmp_path / "full" / f"eval_relrec-{TEST_SEEDS[0]}" / "refexp.jsonl").read_text().splitlines()) == 10
    assert len((tmp_path / "full" / f"eval_refexp-{TEST_SEEDS[0]}" / "refexp.jsonl").read_text().splitlines()) == 10
    assert "means over training seeds 3, 4" in "\n".join(lines)
    assert probe_keys <= set(res.metrics)
    assert "MLLM probe" in "\n".join(lines)
    assert (tmp_path / "full" / "cloc-seed4-hf" / "config.json").is_file()
    # the probe's held-out questions include one look-alike grounding question per relative REC expression
    evals = json.loads((tmp_path / "full" / f"llava-eval-{TEST_SEEDS[1]}" / "eval.json").read_text())
    assert sum(bool(r.get("lookalike")) for r in evals) == 10
    train = json.loads((tmp_path / "full" / "llava-train" / "train.json").read_text())
    assert {r["task"] for r in train} == {"grounding", "referring", "control", "caption"}  # captions train the probe
    probe = json.loads((tmp_path / "full" / "cloc-seed4-hf-probe.json").read_text())
    assert probe["metrics"]["grounding_lookalike"]["n"] == 10


def test_full_demo_refuses_a_bad_split_in_one_line(tmp_path):
    from vesl.errors import UserError

    with pytest.raises(UserError, match="--eval-split"):
        run_full_demo(tmp_path, n=4, eval_n=2, steps=1, eval_split="train", echo=lambda _: None)
    with pytest.raises(UserError, match="one per training seed"):
        run_full_demo(tmp_path, n=4, eval_n=2, steps=1, seeds=99, echo=lambda _: None)


def test_world_seed_splits_are_disjoint():
    from vesl.demo.synth import TEST_SEEDS, TRAINING_SEEDS, VALIDATION_SEEDS

    assert not set(TRAINING_SEEDS) & set(VALIDATION_SEEDS)
    assert not set(TRAINING_SEEDS) & set(TEST_SEEDS)
    assert not set(VALIDATION_SEEDS) & set(TEST_SEEDS)


def test_ground_truth_labels_go_through_the_engine(tmp_path):
    from vesl.demo.ground_truth import label_ground_truth
    from vesl.demo.synth import make_scene
    from vesl.schemas.manifest import check_dataset

    generate_input(tmp_path / "in", n=5, seed=7, shard_size=3)
    summary = label_ground_truth(tmp_path / "in", tmp_path / "gt", seed=7, progress=False)
    assert summary["rows"] == 5
    assert check_dataset(tmp_path / "gt") == []
    rows = [
        r for p in sorted((tmp_path / "gt").glob("part-*[0-9].parquet")) for r in pq.read_table(p).to_pylist()
    ]
    assert len(rows) == 5
    for r in rows:
        scene = make_scene(7, int(r["key"]))
        assert r["caption"] == scene.caption
        assert [g["phrase"] for g in r["regions"]] == [o.phrase for o in scene.objects]
        assert r["regions"][0]["box"] == pytest.approx(list(scene.regions[0].box), abs=1e-6)


def test_caption_precision_counts_invented_and_repeated_objects():
    from vesl.demo.recipes.quality import named_categories
    from vesl.demo.synth import COLORS, SHAPES

    cap = "A large red circle, two red circles and a blue star. The Green Heart is small."
    assert named_categories(cap, list(COLORS), SHAPES) == ["red circle", "red circle", "blue star", "green heart"]
    assert named_categories("a reddish circle, a red squares", list(COLORS), SHAPES) == ["red square"]
