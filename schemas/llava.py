"""The LLaVA instruction format of region-text rows (`vesl export --format llava`), and its answer parser.

One documented text format for boxes, shared by the exporter (which writes it) and the MLLM probe (which
parses generated answers): Shikra-style normalized ``[x0,y0,x1,y1]`` with two decimals, 0 <= x0 < x1 <= 1.

Tasks, each from the regions vesl labeled:

- ``grounding``: "Where is {phrase}?" -> the box, for a phrase that occurs once in the row; a phrase that
  occurs twice (two look-alikes) is asked RefCOCO-style with its side against the other one, "Where is {phrase}
  on the left?" (:func:`vesl.schemas.referring.relative_position_word`); three or more have no single answer;
- ``referring``: "What is at {box}?" -> the phrase;
- ``control``: "How many objects are there?" -> the number of regions; it needs no localization, so a gain
  on the first two that also shows here is a general gain, not a localized one;
- ``caption`` (asked for, not by default): "Describe the image briefly." -> the row's caption, the brief
  description of LLaVA's first stage; the probe trains on it and never scores it.

Each record is what LLaVA's training scripts read (``id``, ``image`` relative to the output folder,
``conversations`` with ``<image>`` in the first human turn) plus ``task`` and ``key`` for the probe, and
``lookalike: true`` on a grounding question that names one of two look-alikes by its side.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any

from vesl.errors import UserError
from vesl.schemas.referring import relative_position_word

TASKS = ("grounding", "referring", "control")  # the tasks the probe scores
EXPORT_TASKS = (*TASKS, "caption")
LOOKALIKE = "grounding_lookalike"  # the probe's name for the grounding questions marked ``lookalike``
IMAGE_TOKEN = "<image>"
TRAIN_FILE, EVAL_FILE = "train.json", "eval.json"
GROUNDING_Q = "Where is {phrase}?"
REFERRING_Q = "What is at {box}?"
CONTROL_Q = "How many objects are there?"
CAPTION_Q = "Describe the image briefly."
_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_BOX_RE = re.compile(r"\[" + ",".join([_NUM] * 4) + r"\]")


def box_text(box: Any) -> str:
    """``[x0,y0,x1,y1]`` normalized, two decimals, clipped to [0, 1]."""
    vals = [min(max(float(v), 0.0), 1.0) for v in box]
    return "[" + ",".join(f"{v:.2f}" for v in vals) + "]"


def parse_box(text: str) -> list[float] | None:
    """The first ``[x0,y0,x1,y1]`` in ``text`` (spaces allowed); None when there is none, a value lies
    outside [0, 1], or the box is empty (x0 >= x1 or y0 >= y1): such an answer counts as wrong."""
    m = _BOX_RE.search(text)
    if m is None:
        return None
    x0, y0, x1, y1 = (float(v) for v in m.groups())
    if not all(0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)) or x0 >= x1 or y0 >= y1:
        return None
    return [x0, y0, x1, y1]


def parse_tasks(tasks: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``grounding,referring`` -> a tuple of known task names (one-line error otherwise)."""
    names = [t.strip() for t in (tasks.split(",") if isinstance(tasks, str) else tasks) if t.strip()]
    bad = [t for t in names if t not in EXPORT_TASKS]
    if bad or not names:
        raise UserError(f"--tasks {','.join(names) or '(empty)'}: choose from {','.join(EXPORT_TASKS)}")
    return tuple(dict.fromkeys(names))


def is_eval(key: str, seed: int, fraction: float) -> bool:
    """Whether an image goes to the eval file: a hash of (seed, key), so the split is by image, stable
    across runs and independent of row order."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def grounding_phrase(region: dict[str, Any], regions: list[dict[str, Any]]) -> str | None:
    """The phrase that names ``region`` alone among ``regions``: its own when no other region shares it, its own
    plus its side against its one look-alike ("a red circle on the left"), else None (no single answer)."""
    twins = [o for o in regions if o is not region and o["phrase"] == region["phrase"]]
    if not twins:
        return region["phrase"]
    if len(twins) > 1:
        return None
    (a, b), (c, d) = _centre(region["box"]), _centre(twins[0]["box"])
    if abs(a - c) < 1e-9 and abs(b - d) < 1e-9:
        return None  # the same centre: no side tells them apart
    return f"{region['phrase']} {relative_position_word(region['box'], twins[0]['box'])}"


def _centre(box: Any) -> tuple[float, float]:
    return (box[0] + box[2]) / 2, (box[1] + box[3]) / 2


def _record(rid: str, image: str, task: str, key: str, question: str, answer: str,
            lookalike: bool = False) -> dict[str, Any]:
    """One LLaVA record: ``<image>`` opens the human turn; ``lookalike`` only where it is true."""
    turns = [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]
    return {"id": rid, "image": image, "task": task, "key": key, "conversations": turns} | (
        {"lookalike": True} if lookalike else {})


def row_records(row: dict[str, Any], image: str, stem: str, tasks: tuple[str, ...], max_questions: int,
                seed: int) -> list[dict[str, Any]]:
    """The instruction records of one row (at most ``max_questions`` per task, picked with a seeded rng)."""
    rng = random.Random(f"{seed}:{row['key']}")
    regions = list(row.get("regions") or [])
    out: list[dict[str, Any]] = []

    def add(task: str, q: str, a: str, lookalike: bool = False) -> None:
        out.append(_record(f"{stem}-{task}-{len([o for o in out if o['task'] == task])}", image, task, row["key"],
                           q, a, lookalike))

    for task in tasks:
        if task == "control":
            add(task, CONTROL_Q, str(len(regions)))
            continue
        if task == "caption":
            if (row.get("caption") or "").strip():
                add(task, CAPTION_Q, row["caption"].strip())
            continue
        named = {id(r): grounding_phrase(r, regions) for r in regions} if task == "grounding" else {}
        pool = [r for r in regions if task == "referring" or named[id(r)] is not None]
        for r in rng.sample(pool, min(max_questions, len(pool))):
            b = box_text(r["box"])
            if task == "grounding":
                add(task, GROUNDING_Q.format(phrase=named[id(r)]), b, lookalike=named[id(r)] != r["phrase"])
            else:
                add(task, REFERRING_Q.format(box=b), r["phrase"])
    return out


def write_llava(out: Path, train: list[dict], evals: list[dict]) -> list[Path]:
    paths = [out / TRAIN_FILE, out / EVAL_FILE]
    for path, recs in zip(paths, (train, evals), strict=True):
        write_records(path, recs)
    return paths


def write_records(path: Path, recs: list[dict]) -> None:
    """One LLaVA JSON file (a list of records)."""
    path.write_text(json.dumps(recs, ensure_ascii=False, indent=0), encoding="utf-8")


def refexp_grounding_records(items: list[dict[str, Any]], out: Path, stem: str,
                             lookalike: bool = False) -> list[dict[str, Any]]:
    """Grounding records from the checked lines of a referring-expression JSONL (``vesl.pretrain.eval.
    read_refexp``: ``path`` of the image, ``expression``, ``bbox`` in pixels xywh; ``width`` and ``height`` as
    ``vesl synth --format refexp`` writes them), the images copied under ``out/images/{stem}-*``, so that a
    RefCOCO-style set joins a probe's held-out questions."""
    import shutil

    (out / "images").mkdir(parents=True, exist_ok=True)
    recs = []
    for i, e in enumerate(items):
        image = f"images/{stem}-{Path(e['path']).name}"
        shutil.copyfile(e["path"], out / image)
        x, y, w, h = e["bbox"]
        box = [x / e["width"], y / e["height"], (x + w) / e["width"], (y + h) / e["height"]]
        recs.append(_record(f"{stem}-grounding-{i}", image, "grounding", f"{stem}-{i}",
                            GROUNDING_Q.format(phrase=e["expression"]), box_text(box), lookalike))
    return recs
