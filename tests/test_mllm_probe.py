"""The LLaVA export and the MLLM probe: the export read back as a LLaVA reader does, the answer parser, a tiny
end-to-end probe on an exported CLOC tower, and the one-line error for a folder that is no CLIPVisionModel."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from tests.region_dataset import write_synth_region_dataset
from vesl.errors import UserError
from vesl.pipeline.exporters import export
from vesl.pretrain.mllm_probe import ProbeConfig, load_tower, normalize, probe, score, summarize, word_f1
from vesl.schemas.llava import IMAGE_TOKEN, box_text, grounding_phrase, is_eval, parse_box, row_records


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_synth_region_dataset(tmp_path_factory.mktemp("llava") / "ds", n_images=24, seed=3, n_shards=2)


@pytest.fixture(scope="module")
def llava_dir(dataset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("llava-out") / "llava"
    export(dataset, "llava", out, seed=1, eval_fraction=0.25, max_questions=3)
    return out


def _rows(d: Path) -> dict[str, dict]:
    return {r["key"]: r for r in pq.read_table(sorted(d.glob("part-*[0-9].parquet"))).to_pylist()}


def test_llava_export_round_trips(dataset, llava_dir):
    from PIL import Image

    rows = _rows(dataset)
    train = json.loads((llava_dir / "train.json").read_text())
    evals = json.loads((llava_dir / "eval.json").read_text())
    assert train
    assert evals
    # split by image: no image in both files, and the split is the documented hash
    assert not {r["image"] for r in train} & {r["image"] for r in evals}
    assert all(is_eval(r["key"], 1, 0.25) for r in evals)
    assert not any(is_eval(r["key"], 1, 0.25) for r in train)
    ids = [r["id"] for r in train + evals]
    assert len(ids) == len(set(ids))
    tasks = set()
    for rec in train + evals:
        # the LLaVA reader contract: id, image (relative to the folder), human then gpt, <image> in turn one
        assert set(rec) >= {"id", "image", "conversations"}
        conv = rec["conversations"]
        assert [t["from"] for t in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith(IMAGE_TOKEN + "\n")
        assert conv[0]["value"].count(IMAGE_TOKEN) == 1
        assert IMAGE_TOKEN not in conv[1]["value"]
        with Image.open(llava_dir / rec["image"]) as im:
            im.load()
        row = rows[rec["key"]]
        boxes = {box_text(r["box"]): r["phrase"] for r in row["regions"]}
        phrases = [r["phrase"] for r in row["regions"]]
        q, a = conv[0]["value"], conv[1]["value"]
        tasks.add(rec["task"])
        if rec["task"] == "grounding":
            box = parse_box(a)
            assert box is not None
            assert all(0 <= v <= 1 for v in box)
            phrase = q.removeprefix(IMAGE_TOKEN + "\nWhere is ").removesuffix("?")
            named = [r for r in row["regions"] if box_text(r["box"]) == a]
            assert [grounding_phrase(r, row["regions"]) for r in named] == [phrase]
        elif rec["task"] == "referring":
            box = parse_box(q)
            assert box is not None
            assert a in phrases
            assert boxes[box_text(box)] == a
        else:
            assert a == str(len(row["regions"]))
    assert tasks == {"grounding", "referring", "control"}


def test_grounding_names_one_of_two_look_alikes_by_its_side_and_skips_three():
    def region(phrase, box):
        return {"phrase": phrase, "box": box, "span": [0, 1]}

    left, right = region("a red circle", [0.1, 0.4, 0.2, 0.5]), region("a red circle", [0.7, 0.1, 0.9, 0.3])
    lone = region("a blue square", [0.4, 0.4, 0.5, 0.5])
    trio = [region("a green star", [x, 0.8, x + 0.1, 0.9]) for x in (0.1, 0.4, 0.7)]
    regions = [left, right, lone, *trio]
    assert grounding_phrase(left, regions) == "a red circle on the left"
    assert grounding_phrase(right, regions) == "a red circle on the right"
    assert grounding_phrase(lone, regions) == "a blue square"
    assert [grounding_phrase(r, regions) for r in trio] == [None, None, None]
    stacked = [region("a dot", [0.1, 0.1, 0.2, 0.2]), region("a dot", [0.05, 0.05, 0.25, 0.25])]
    assert grounding_phrase(stacked[0], stacked) is None  # one centre: no side tells them apart
    records = row_records({"key": "k", "regions": regions}, "images/k.jpg", "k", ("grounding",), 10, seed=0)
    asked = {r["conversations"][0]["value"].split("Where is ")[1]: r["conversations"][1]["value"] for r in records}
    assert asked == {"a red circle on the left?": box_text(left["box"]), "a red circle on the right?":
                     box_text(right["box"]), "a blue square?": box_text(lone["box"])}


def test_llava_export_is_deterministic_and_checks_options(dataset, llava_dir, tmp_path):
    again = tmp_path / "again"
    export(dataset, "llava", again, seed=1, eval_fraction=0.25, max_questions=3)
    for name in ("train.json", "eval.json"):
        assert (again / name).read_bytes() == (llava_dir / name).read_bytes()
    only = json.loads((export(dataset, "llava", tmp_path / "g", tasks="grounding", eval_fraction=0.0).out
                       / "train.json").read_text())
    assert {r["task"] for r in only} == {"grounding"}
    captions = json.loads((export(dataset, "llava", tmp_path / "c", tasks="caption,control", eval_fraction=0.0).out
                           / "train.json").read_text())
    rows = _rows(dataset)
    described = [r for r in captions if r["task"] == "caption"]
    assert len(described) == len(rows)
    for rec in described:
        assert rec["conversations"][0]["value"] == f"{IMAGE_TOKEN}\nDescribe the image briefly."
        assert rec["conversations"][1]["value"] == rows[rec["key"]]["caption"].strip()
    # the probe trains on caption turns and never scores them
    from vesl.pretrain.mllm_probe import load_records

    assert {r["task"] for r in load_records(tmp_path / "c" / "train.json", "--data", train=True)} == {"caption", "control"}
    assert {r["task"] for r in load_records(tmp_path / "c" / "train.json", "--eval")} == {"control"}
    for bad in ({"tasks": "grounding,summary"}, {"eval_fraction": 1.5}, {"max_questions": 0}):
        with pytest.raises(UserError) as err:
            export(dataset, "llava", tmp_path / "bad", **bad)
        assert "\n" not in str(err.value)


def test_export_cli_writes_llava(dataset, tmp_path):
    from vesl.cli import app

    res = CliRunner().invoke(app, ["export", str(dataset), "--format", "llava", "--out", str(tmp_path / "o"),
                                   "--tasks", "referring,control", "--eval-fraction", "0.5"])
    assert res.exit_code == 0, res.output
    assert "llava: 24 images" in res.output
    assert "questions" in res.output
    recs = json.loads((tmp_path / "o" / "train.json").read_text())
    assert {r["task"] for r in recs} == {"referring", "control"}


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("[0.12,0.40,0.33,0.61]", [0.12, 0.40, 0.33, 0.61]),
        ("[ 0.12 , 0.40 , 0.33 , 0.61 ]", [0.12, 0.40, 0.33, 0.61]),  # the word tokenizer's decoded spacing
        ("it is at [0,0.5,1,1] .", [0.0, 0.5, 1.0, 1.0]),
        ("[0.12,0.40,0.33]", None),  # three values
        ("[0.12,0.40,0.33,0.61", None),  # unclosed
        ("0.12 0.40 0.33 0.61", None),  # no brackets
        ("[0.12,0.40,1.33,0.61]", None),  # out of range
        ("[-0.10,0.40,0.33,0.61]", None),  # negative
        ("[0.50,0.40,0.30,0.61]", None),  # x0 > x1: empty box
        ("[0.10,0.40,0.30,0.40]", None),  # zero height
        ("red circle", None),
        ("", None),
    ],
)
def test_parse_box(text, want):
    got = parse_box(text)
    assert got == (None if want is None else pytest.approx(want))


def test_scores():
    ref = "[0.10,0.10,0.50,0.50]"
    near = score("grounding", "[ 0.12 , 0.10 , 0.50 , 0.52 ]", ref)
    assert near == {"ok": 1.0, "iou": pytest.approx(0.38 * 0.40 / (0.16 + 0.38 * 0.42 - 0.38 * 0.40)),
                    "pointing": 1.0, "parse_fail": 0.0}
    # centred inside the reference but too large for IoU 0.5: it points, it does not ground
    assert score("grounding", "[0.00,0.00,0.70,0.70]", ref) == {"ok": 0.0, "iou": pytest.approx(0.16 / 0.49),
                                                                "pointing": 1.0, "parse_fail": 0.0}
    assert score("grounding", "[0.50,0.50,0.90,0.90]", ref) == {"ok": 0.0, "iou": 0.0, "pointing": 0.0,
                                                                "parse_fail": 0.0}
    assert score("grounding", "[0.1,0.1,0.5", ref) == {"ok": 0.0, "iou": 0.0, "pointing": 0.0, "parse_fail": 1.0}
    assert score("referring", "the Red circle", "red circle") == {"ok": 1.0, "soft": 1.0, "parse_fail": 0.0}
    assert score("referring", "large red circle", "red circle")["ok"] == 0.0
    assert score("referring", "large red circle", "red circle")["soft"] == 1.0  # F1 0.8
    assert score("referring", "blue square", "red circle")["soft"] == 0.0
    assert score("referring", "", "red circle")["parse_fail"] == 1.0
    assert word_f1("a red circle", "red circle") == 1.0
    assert score("control", "3", "3") == {"ok": 1.0, "parse_fail": 0.0}
    assert score("control", "three", "3") == {"ok": 0.0, "parse_fail": 1.0}


def test_refexp_questions_join_the_eval_as_look_alike_grounding(tmp_path):
    from PIL import Image

    from vesl.demo.synth import make_refexp_relative, write_refexp
    from vesl.schemas.llava import refexp_grounding_records
    from vesl.schemas.referring import RELATIVE_WORDS

    jsonl = write_refexp((make_refexp_relative(5, i) for i in range(6)), tmp_path / "relrec")
    lines = [json.loads(x) for x in jsonl.read_text().splitlines()]
    from vesl.pretrain.eval import read_refexp

    items, errors = read_refexp(jsonl)
    assert errors == []
    recs = refexp_grounding_records(items, tmp_path / "llava", "lookalike", lookalike=True)
    assert len(recs) == len(lines)
    for rec, line in zip(recs, lines, strict=True):
        q, a = (t["value"] for t in rec["conversations"])
        assert q == f"{IMAGE_TOKEN}\nWhere is {line['expression']}?"
        assert q.removesuffix("?").endswith(RELATIVE_WORDS)
        x, y, w, h = line["bbox"]
        with Image.open(tmp_path / "llava" / rec["image"]) as im:
            assert im.size == (line["width"], line["height"])
        assert parse_box(a) == pytest.approx([x / im.width, y / im.height, (x + w) / im.width, (y + h) / im.height],
                                             abs=0.005)
        assert rec["lookalike"] is True
        assert rec["task"] == "grounding"
    # the probe scores them apart from the other grounding questions
    rows = [("grounding", "[0.10,0.10,0.50,0.50]", "[0.10,0.10,0.50,0.50]"),
            ("grounding", "[0.60,0.60,0.90,0.90]", "[0.10,0.10,0.50,0.50]"), ("control", "3", "3")]
    m = summarize(rows, [True, False, False])
    assert m["grounding"]["ok"] == 0.0
    assert m["grounding"]["n"] == 1
    assert m["grounding_lookalike"] == {"ok": 1.0, "iou": 1.0, "pointing": 1.0, "parse_fail": 0.0, "n": 1}
    assert "grounding_lookalike" not in summarize(rows)


def _tower(tmp: Path) -> Path:
    import torch
    from safetensors.torch import save_file

    from vesl.pretrain.export import export_model
    from vesl.pretrain.model import create_model

    model = create_model("vesl-tiny-vit", seed=0).eval()
    ck = tmp / "run" / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"))
    (ck / "state.json").write_text(json.dumps({"model": model.config_dict()}))
    torch.manual_seed(0)
    return export_model(tmp / "run", tmp / "hf", format="hf")


def test_tiny_probe_end_to_end_writes_json(llava_dir, tmp_path):
    tower = _tower(tmp_path)
    out = tmp_path / "probe.json"
    lines: list[str] = []
    res = probe(tower, llava_dir / "train.json", llava_dir / "eval.json", ProbeConfig(steps=6, batch_size=8, hidden=32),
                out=out, echo=lines.append)
    saved = json.loads(out.read_text())
    assert saved["metrics"] == res.metrics
    assert set(saved["metrics"]) == {"grounding", "referring", "control"}
    for task, m in saved["metrics"].items():
        assert 0 <= m["ok"] <= 1
        assert 0 <= m["parse_fail"] <= 1
        assert m["n"] == saved["n_eval"][task]
    assert set(saved["trivial"]) == set(saved["metrics"])
    assert saved["settings"]["image_tokens"] == 64  # 8x8 patches of the 64-px tiny ViT, no pooling needed
    assert any("ETA" in line for line in lines)
    # the same seed gives the same answers
    again = probe(tower, llava_dir / "train.json", llava_dir / "eval.json", ProbeConfig(steps=6, batch_size=8, hidden=32),
                  echo=lambda _: None)
    assert again.metrics == res.metrics
    assert again.samples == res.samples
    # every answer is kept, in the order of the eval records, and re-scores to the reported metrics
    evals = json.loads((llava_dir / "eval.json").read_text())
    assert len(saved["answers"]) == len(evals)
    rows = [(r["task"], a, r["conversations"][1]["value"]) for r, a in zip(evals, saved["answers"], strict=True)]
    assert summarize(rows) == saved["metrics"]


def test_not_a_clip_vision_folder_is_one_line(tmp_path, llava_dir):
    from transformers import LlamaConfig

    (tmp_path / "empty").mkdir()
    LlamaConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, vocab_size=10).save_pretrained(tmp_path / "llama")
    for folder in (tmp_path / "empty", tmp_path / "llama", tmp_path / "missing"):
        with pytest.raises(UserError) as err:
            load_tower(folder)
        assert "\n" not in str(err.value)
        assert "CLIPVisionModel" in str(err.value)
    from vesl.cli import app

    res = CliRunner().invoke(app, ["probe-mllm", str(tmp_path / "llama"), "--data", str(llava_dir / "train.json"),
                                   "--eval", str(llava_dir / "eval.json")])
    assert res.exit_code != 0
    assert isinstance(res.exception, UserError)  # the entry point prints it as one line, no traceback
    assert "not a CLIPVisionModel" in str(res.exception)


def test_word_tokenizer_knows_every_training_word(llava_dir):
    """Every piece of a question or answer is in the vocabulary: an <unk> decodes to nothing, which once made
    every referring answer empty and every grounding question phrase-blind."""
    from vesl.pretrain.mllm_probe import load_records, make_tokenizer

    recs = load_records(llava_dir / "train.json", "--data")
    tok = make_tokenizer(recs)
    for r in recs:
        for text in (r["question"], r["answer"]):
            ids = tok(text, add_special_tokens=False)["input_ids"]
            assert tok.unk_token_id not in ids, text
            assert normalize(tok.decode(ids, skip_special_tokens=True)) == normalize(text)
    assert parse_box(tok.decode(tok("[0.12,0.40,0.33,0.61]", add_special_tokens=False)["input_ids"])) == \
        pytest.approx([0.12, 0.40, 0.33, 0.61])


@pytest.mark.parametrize("question_first", [False, True])
def test_probe_overfits_a_handful_of_questions(llava_dir, tmp_path, question_first):
    """A few questions trained on long enough come back word for word, referring phrases included: the
    training labels, the prompt at generation and the decoding agree, in either order of image and question."""
    recs = json.loads((llava_dir / "train.json").read_text())
    few: list[dict] = []
    for task in ("grounding", "referring", "control"):
        few += [r for r in recs if r["task"] == task][:3]
    (tmp_path / "images").symlink_to(llava_dir / "images")
    (tmp_path / "few.json").write_text(json.dumps(few))
    res = probe(_tower(tmp_path), tmp_path / "few.json", tmp_path / "few.json",
                ProbeConfig(steps=150, batch_size=9, lr=3e-3, warmup=5, hidden=64, threads=1,
                            question_first=question_first), echo=lambda _: None)
    for s in res.samples:
        assert s["generated"].replace(" ", "") == s["answer"].replace(" ", ""), s
    assert res.metrics["referring"]["ok"] == 1.0
    assert res.metrics["grounding"]["ok"] == 1.0


def test_question_first_puts_the_image_tokens_after_the_question(llava_dir):
    from vesl.pretrain.mllm_probe import IMAGE_TOKEN, _prompt, load_records, make_tokenizer

    tok = make_tokenizer(load_records(llava_dir / "train.json", "--data"))
    image = tok.convert_tokens_to_ids(IMAGE_TOKEN)
    first, last = _prompt(tok, 4, "Where is a red circle?", False), _prompt(tok, 4, "Where is a red circle?", True)
    assert sorted(first) == sorted(last)  # the same tokens, in another order
    assert first[1:5] == [image] * 4
    words = tok.convert_ids_to_tokens(last)
    assert words[words.index(IMAGE_TOKEN) - 1] == "?"
    assert words[-2:] == ["ASSISTANT", ":"]
    assert last[-6:-2] == [image] * 4


def test_coordinate_code_keeps_neighbours_close():
    """Coordinate tokens start from this code: 0.41 must start nearer 0.42 than 0.90."""
    import torch

    from vesl.pretrain.mllm_probe import coordinate_code

    code = coordinate_code([0.41, 0.42, 0.90], 64)
    assert code.shape == (3, 64)
    cos = torch.nn.functional.cosine_similarity(code[:1], code)
    assert cos[1] > 0.5 > cos[2]


def test_max_eval_scores_the_first_questions(llava_dir, tmp_path):
    tower = _tower(tmp_path)
    res = probe(tower, llava_dir / "train.json", llava_dir / "eval.json",
                ProbeConfig(steps=1, batch_size=4, hidden=32, max_eval=5), echo=lambda _: None)
    assert sum(res.n_eval.values()) == 5
    with pytest.raises(UserError) as err:
        probe(tower, llava_dir / "train.json", llava_dir / "eval.json", ProbeConfig(max_eval=-1))
    assert "\n" not in str(err.value)


def test_split_by_length_cuts_where_padding_is_least():
    from vesl.pretrain.mllm_probe import split_by_length

    assert split_by_length([5]) == [[0]]
    assert split_by_length([40, 40, 40]) == [[0, 1, 2]]  # nothing to save
    assert split_by_length([39, 58, 38, 41, 60]) == [[2, 0, 3], [1, 4]]
    groups = split_by_length([30, 31, 29, 31, 30, 32, 72])
    assert groups == [[2, 0, 4, 1, 3, 5], [6]]


def test_a_step_in_length_groups_has_the_whole_batch_gradient(llava_dir, tmp_path):
    """``train_step`` backpropagates each length group apart, weighted by its answer tokens: the gradient must be
    the one of the whole padded batch (LLaVA's mean over every answer token)."""
    import torch

    from vesl.pretrain.mllm_probe import (
        _embed,
        _prompt,
        build_llava,
        load_records,
        make_tokenizer,
        train_step,
    )

    torch.manual_seed(0)
    recs = load_records(llava_dir / "train.json", "--data", train=True)
    tok = make_tokenizer(recs)
    tower, _ = load_tower(_tower(tmp_path))
    llava = build_llava(tower, tok, ProbeConfig(hidden=64), None)
    n_image = 4
    pick = [r for r in recs if r["task"] == "control"][:3] + [r for r in recs if r["task"] == "grounding"][:3]
    examples = [(_prompt(tok, n_image, r["question"], True), tok(r["answer"], add_special_tokens=False)["input_ids"]
                 + [tok.eos_token_id]) for r in pick]
    assert len({len(p) + len(a) for p, a in examples}) > 1  # the groups differ, or the test shows nothing
    feats = [torch.randn(n_image, tower.config.hidden_size) for _ in pick]
    params = [p for p in llava.parameters() if p.requires_grad]

    loss = train_step(llava, examples, feats, tok.pad_token_id)
    split = [p.grad.clone() for p in params]
    llava.zero_grad(set_to_none=True)
    width = max(len(p) + len(a) for p, a in examples)
    ids = torch.full((len(examples), width), tok.pad_token_id)
    labels = torch.full((len(examples), width), -100)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for j, (p, a) in enumerate(examples):
        ids[j, : len(p) + len(a)] = torch.tensor(p + a)
        labels[j, len(p) : len(p) + len(a)] = torch.tensor(a)
        mask[j, : len(p) + len(a)] = 1
    whole = llava(inputs_embeds=_embed(llava, ids, torch.stack(feats)), attention_mask=mask, labels=labels).loss
    whole.backward()
    torch.testing.assert_close(loss, whole.detach(), rtol=1e-5, atol=1e-6)
    for a, b in zip(split, (p.grad for p in params), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_several_probe_seeds_report_each_run_and_their_mean(llava_dir, tmp_path):
    """`vesl probe-mllm --seeds 2`: two runs with seeds 5 and 6 (each as a one-seed run would be), and the mean,
    min and max of every metric in the JSON."""
    from vesl.cli import app

    tower = _tower(tmp_path)
    out = tmp_path / "probe.json"
    args = ["probe-mllm", str(tower), "--data", str(llava_dir / "train.json"), "--eval", str(llava_dir / "eval.json"),
            "--steps", "6", "--batch-size", "8", "--threads", "1"]
    res = CliRunner().invoke(app, [*args, "--seed", "5", "--seeds", "2", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "mean over probe seeds 5..6" in res.output
    saved = json.loads(out.read_text())
    assert saved["seeds"] == [5, 6]
    runs = saved["runs"]
    one = tmp_path / "one.json"
    assert CliRunner().invoke(app, [*args, "--seed", "6", "--out", str(one)]).exit_code == 0
    assert json.loads(one.read_text())["answers"] == runs[1]["answers"]
    for task, m in saved["metrics"].items():
        for key, v in m.items():
            vals = [r["metrics"][task][key] for r in runs]
            assert v == pytest.approx(sum(vals) / 2)
            assert saved["min"][task][key] == min(vals)
            assert saved["max"][task][key] == max(vals)
    bad = CliRunner().invoke(app, [*args, "--seeds", "0"])
    assert isinstance(bad.exception, UserError)  # the entry point prints a UserError as one line
    assert "--seeds must be at least 1" in str(bad.exception)
