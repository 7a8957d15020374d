"""The LLaVA instruction format of region-text rows (`vesl export --format llava`), and its answer parser.

One documented text format for boxes, shared by the exporter (which writes it) and the MLLM probe (which
parses generated answers): Shikra-style normalized ``[x0,y0,x1,y1]`` with two decimals, 0 <= x0 < x1 <= 1.

Tasks, each from the regions vesl labeled:

- ``grounding``: "Where is {phrase}?" -> the box (phrases that occur once in the row only: an ambiguous
  question has no single answer);
- ``referring``: "What is at {box}?" -> the phrase;
- ``control``: "How many objects are there?" -> the number of regions; it needs no localization, so a gain
  on the first two that also shows here is a general gain, not a localized one.

Each record is what LLaVA's training scripts read (``id``, ``image`` relative to the output folder,
``conversations`` with ``<image>`` in the first human turn) plus ``task`` and ``key`` for the probe.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any

from vesl.errors import UserError

TASKS = ("grounding", "referring", "control")
IMAGE_TOKEN = "<image>"
TRAIN_FILE, EVAL_FILE = "train.json", "eval.json"
GROUNDING_Q = "Where is {phrase}?"
REFERRING_Q = "What is at {box}?"
CONTROL_Q = "How many objects are there?"
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
    bad = [t for t in names if t not in TASKS]
    if bad or not names:
        raise UserError(f"--tasks {','.join(names) or '(empty)'}: choose from {','.join(TASKS)}")
    return tuple(dict.fromkeys(names))


def is_eval(key: str, seed: int, fraction: float) -> bool:
    """Whether an image goes to the eval file: a hash of (seed, key), so the split is by image, stable
    across runs and independent of row order."""
    h = int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")
    return h / 2**64 < fraction


def _turns(question: str, answer: str) -> list[dict[str, str]]:
    return [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"}, {"from": "gpt", "value": answer}]


def row_records(row: dict[str, Any], image: str, stem: str, tasks: tuple[str, ...], max_questions: int,
                seed: int) -> list[dict[str, Any]]:
    """The instruction records of one row (at most ``max_questions`` per task, picked with a seeded rng)."""
    rng = random.Random(f"{seed}:{row['key']}")
    regions = list(row.get("regions") or [])
    counts = Counter(r["phrase"] for r in regions)
    out: list[dict[str, Any]] = []

    def add(task: str, q: str, a: str) -> None:
        out.append({"id": f"{stem}-{task}-{len([o for o in out if o['task'] == task])}", "image": image,
                    "task": task, "key": row["key"], "conversations": _turns(q, a)})

    for task in tasks:
        if task == "control":
            add(task, CONTROL_Q, str(len(regions)))
            continue
        pool = [r for r in regions if task == "referring" or counts[r["phrase"]] == 1]
        for r in rng.sample(pool, min(max_questions, len(pool))):
            b = box_text(r["box"])
            if task == "grounding":
                add(task, GROUNDING_Q.format(phrase=r["phrase"]), b)
            else:
                add(task, REFERRING_Q.format(box=b), r["phrase"])
    return out


def write_llava(out: Path, train: list[dict], evals: list[dict]) -> list[Path]:
    paths = [out / TRAIN_FILE, out / EVAL_FILE]
    for path, recs in zip(paths, (train, evals), strict=True):
        path.write_text(json.dumps(recs, ensure_ascii=False, indent=0), encoding="utf-8")
    return paths
