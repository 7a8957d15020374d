"""`vesl export`: region-text shards in the formats other training code already reads.

- ``wds``: WebDataset tars for open_clip-style loaders: ``KEY.jpg|png|webp`` (the original image bytes,
  never re-encoded), ``KEY.txt`` (the caption) and ``KEY.json`` (caption, size and regions).
- ``coco``: ``annotations.json`` (COCO instances: bbox in pixels ``x, y, w, h``; one category per distinct
  phrase) plus ``images/``.
- ``odvg``: ``odvg.jsonl``, the Grounding DINO fine-tuning format (Open-GroundingDino ``grounding`` mode:
  caption + regions with pixel ``x0, y0, x1, y1`` bbox, phrase and ``tokens_positive`` char spans), plus
  ``images/`` as the dataset root.
- ``llava``: ``train.json`` and ``eval.json`` (LLaVA instruction format: grounding, referring and a control
  task, split by image; see :mod:`vesl.schemas.llava`) plus ``images/``.

Keys become file names: characters other than letters, digits, ``_`` and ``-`` turn into ``_`` (a dot
would split a WebDataset key), with a numeric suffix on collisions. The original key stays in the JSON.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vesl.errors import UserError

FORMATS = ("wds", "coco", "odvg", "llava")
OUTSIDE_REASON = "image_outside_dataset"  # skip reason: the row's image_uri lies outside the dataset and its inputs
_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif", "BMP": "bmp", "TIFF": "tiff"}


@dataclass
class ExportResult:
    out: Path
    files: list[Path] = field(default_factory=list)
    images: int = 0
    regions: int = 0
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows left out

    @property
    def note(self) -> str | None:
        """One line for rows left out because their image lies outside the dataset (and the flag to allow it)."""
        from vesl.pipeline.confine import outside_note

        return outside_note(self.skipped.get(OUTSIDE_REASON, 0))


COCO_ANNOTATIONS = "annotations.json"  # the COCO file name, for `vesl export` and `vesl synth` alike


def _skip_reason(row: dict[str, Any]) -> str:
    """Why a row's image could not be exported: outside the dataset (confined) or unreadable."""
    from vesl.pipeline.confine import OUTSIDE

    return OUTSIDE_REASON if row.get(OUTSIDE) else "unreadable_image"


def _image_bytes(row: dict[str, Any]) -> tuple[bytes, str] | None:
    """Original bytes and a file extension from the decoded format; None when unreadable."""
    from PIL import Image

    data = row.get("image")
    try:
        if data is None and row.get("image_uri"):
            import fsspec

            with fsspec.open(row["image_uri"], "rb") as f:
                data = f.read()
        if not data:
            return None
        with Image.open(io.BytesIO(data)) as img:
            fmt = img.format or ""
    except Exception:  # unreadable image: counted in ExportResult.skipped, never fatal
        return None
    ext = _EXT.get(fmt)
    if ext is None:  # exotic format: re-encode once as PNG so every loader can read it
        with Image.open(io.BytesIO(data)) as img:
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"
    return data, ext


class _Keys:
    """Deterministic, collision-free file-name stems from row keys."""

    def __init__(self) -> None:
        self.used: set[str] = set()

    def __call__(self, key: str) -> str:
        stem = re.sub(r"[^A-Za-z0-9_-]", "_", key) or "x"
        out, k = stem, 1
        while out in self.used:
            out, k = f"{stem}_{k}", k + 1
        self.used.add(out)
        return out


def pixel_box(box: list[float], width: int, height: int) -> list[float]:
    """Normalized ``x0, y0, x1, y1`` to pixels (rounded to 0.01)."""
    x0, y0, x1, y1 = box
    return [round(x0 * width, 2), round(y0 * height, 2), round(x1 * width, 2), round(y1 * height, 2)]


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} is not empty; pass a new --out directory (or --overwrite to write into it)")
    out.mkdir(parents=True, exist_ok=True)


def _rows(dataset_dir: Path, allow_any_image_uri: bool = False) -> Iterator[dict[str, Any]]:
    """The dataset's rows; an ``image_uri`` outside the dataset and its job's inputs is dropped (the
    row is then skipped as ``image_outside_dataset``) unless ``allow_any_image_uri``."""
    from vesl.pipeline.confine import confine_row, image_uri_roots
    from vesl.schemas.dataset import iter_rows

    roots = None if allow_any_image_uri else image_uri_roots(dataset_dir)
    for row in iter_rows(dataset_dir):
        yield confine_row(row, roots)


def _regions_json(regions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {"phrase": r["phrase"], "char_start": r["char_start"], "char_end": r["char_end"],
         "box": [round(float(v), 6) for v in r["box"]], "score": round(float(r["score"]), 6)}
        for r in regions
    ]


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(data), 0, 0o644  # fixed metadata: same data, same tar bytes
    tar.addfile(info, io.BytesIO(data))


def export_wds(dataset_dir: str | Path, out: str | Path, shard_size: int = 1000, overwrite: bool = False, allow_any_image_uri: bool = False) -> ExportResult:
    """WebDataset tars ``00000.tar``...; each sample is image + ``.txt`` caption + ``.json`` regions."""
    out = Path(out)
    _prepare_out(out, overwrite)
    res, skipped, keys = ExportResult(out), Counter(), _Keys()
    tar, in_tar = None, 0
    try:
        for row in _rows(Path(dataset_dir), allow_any_image_uri):
            img = _image_bytes(row)
            if img is None:
                skipped[_skip_reason(row)] += 1
                continue
            if tar is None or in_tar >= shard_size:
                if tar is not None:
                    tar.close()
                path = out / f"{len(res.files):05d}.tar"
                res.files.append(path)
                tar, in_tar = tarfile.open(path, "w", format=tarfile.PAX_FORMAT), 0
            stem = keys(row["key"])
            regions = row["regions"] or []
            meta = {"key": row["key"], "caption": row["caption"], "alt_text": row["alt_text"],
                    "caption_source": row["caption_source"], "width": row["width"], "height": row["height"],
                    "box_format": "xyxy_normalized", "regions": _regions_json(regions)}
            _tar_add(tar, f"{stem}.{img[1]}", img[0])
            _tar_add(tar, f"{stem}.txt", row["caption"].encode("utf-8"))
            _tar_add(tar, f"{stem}.json", json.dumps(meta, sort_keys=True).encode("utf-8"))
            in_tar += 1
            res.images += 1
            res.regions += len(regions)
    finally:
        if tar is not None:
            tar.close()
    res.skipped = dict(skipped)
    return res


def _copy_image(row: dict, images_dir: Path, keys: _Keys, skipped: Counter) -> str | None:
    """Write the row's original image bytes under a stable file name; None (counted) when unreadable."""
    img = _image_bytes(row)
    if img is None:
        skipped[_skip_reason(row)] += 1
        return None
    fname = f"{keys(row['key'])}.{img[1]}"
    (images_dir / fname).write_bytes(img[0])
    return fname


def _start_with_images(out: str | Path, overwrite: bool) -> tuple[Path, ExportResult, Counter, _Keys]:
    """An export into ``out`` with an ``images/`` folder: the folder, its result, skip counts, image names."""
    out = Path(out)
    _prepare_out(out, overwrite)
    (out / "images").mkdir(exist_ok=True)
    return out, ExportResult(out), Counter(), _Keys()


def export_coco(dataset_dir: str | Path, out: str | Path, overwrite: bool = False, allow_any_image_uri: bool = False) -> ExportResult:
    """COCO instances JSON (``annotations.json``) with ``images/``; categories are the distinct phrases."""
    out, res, skipped, keys = _start_with_images(out, overwrite)
    images, anns = [], []
    for row in _rows(Path(dataset_dir), allow_any_image_uri):
        fname = _copy_image(row, out / "images", keys, skipped)
        if fname is None:
            continue
        image_id = len(images) + 1
        w, h = int(row["width"]), int(row["height"])
        images.append({"id": image_id, "file_name": fname, "width": w, "height": h,
                       "key": row["key"], "caption": row["caption"]})
        for r in row["regions"] or []:
            x0, y0, x1, y1 = pixel_box(r["box"], w, h)
            bw, bh = round(x1 - x0, 2), round(y1 - y0, 2)
            anns.append({"id": len(anns) + 1, "image_id": image_id, "phrase": r["phrase"],
                         "bbox": [x0, y0, bw, bh], "area": round(bw * bh, 2), "iscrowd": 0,
                         "score": round(float(r["score"]), 6), "tokens_positive": [[r["char_start"], r["char_end"]]]})
    names = sorted({a["phrase"] for a in anns})
    cat_id = {p: i + 1 for i, p in enumerate(names)}
    for a in anns:
        a["category_id"] = cat_id[a["phrase"]]
    doc = {
        "info": {"description": f"vesl region-text export of {Path(dataset_dir).name}", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": anns,
        "categories": [{"id": cat_id[p], "name": p, "supercategory": "phrase"} for p in names],
    }
    path = out / COCO_ANNOTATIONS
    path.write_text(json.dumps(doc, ensure_ascii=False), encoding="utf-8")
    res.files, res.images, res.regions, res.skipped = [path], len(images), len(anns), dict(skipped)
    return res


def export_odvg(dataset_dir: str | Path, out: str | Path, overwrite: bool = False, allow_any_image_uri: bool = False) -> ExportResult:
    """``odvg.jsonl`` (one grounding record per image with regions) and ``images/`` (the dataset root)."""
    out, res, skipped, keys = _start_with_images(out, overwrite)
    path = out / "odvg.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for row in _rows(Path(dataset_dir), allow_any_image_uri):
            regions = row["regions"] or []
            if not regions:  # a grounding record needs at least one region (Open-GroundingDino unpacks them)
                skipped["no_regions"] += 1
                continue
            fname = _copy_image(row, out / "images", keys, skipped)
            if fname is None:
                continue
            w, h = int(row["width"]), int(row["height"])
            rec = {
                "filename": fname,
                "height": h,
                "width": w,
                "grounding": {
                    "caption": row["caption"],
                    "regions": [
                        {"bbox": pixel_box(r["box"], w, h), "phrase": r["phrase"],
                         "tokens_positive": [[r["char_start"], r["char_end"]]]}
                        for r in regions
                    ],
                },
            }
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
            res.images += 1
            res.regions += len(regions)
    res.files, res.skipped = [path], dict(skipped)
    return res


def export_llava(dataset_dir: str | Path, out: str | Path, overwrite: bool = False, allow_any_image_uri: bool = False,
                 seed: int = 0, tasks: tuple[str, ...] = ("grounding", "referring", "control"),
                 max_questions: int = 3, eval_fraction: float = 0.1) -> ExportResult:
    """LLaVA-format ``train.json`` / ``eval.json`` (split by image) with ``images/``; ``res.regions`` counts
    the questions written."""
    from vesl.schemas.llava import is_eval, row_records, write_llava

    out, res, skipped, keys = _start_with_images(out, overwrite)
    train: list[dict] = []
    evals: list[dict] = []
    for row in _rows(Path(dataset_dir), allow_any_image_uri):
        fname = _copy_image(row, out / "images", keys, skipped)
        if fname is None:
            continue
        recs = row_records(row, f"images/{fname}", fname.rsplit(".", 1)[0], tasks, max_questions, seed)
        (evals if is_eval(row["key"], seed, eval_fraction) else train).extend(recs)
        res.images += 1
    res.files, res.regions, res.skipped = write_llava(out, train, evals), len(train) + len(evals), dict(skipped)
    return res


def export(
    dataset_dir: str | Path, fmt: str, out: str | Path, overwrite: bool = False, allow_any_image_uri: bool = False,
    **llava: Any,
) -> ExportResult:
    """Validate the dataset, then export it as ``fmt`` (one of :data:`FORMATS`); ``llava`` holds
    :func:`export_llava`'s options (seed, tasks, max_questions, eval_fraction)."""
    from vesl.schemas.dataset import InvalidDataset, data_shards
    from vesl.schemas.validation import validate

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r} is not one of {', '.join(FORMATS)}")
    if fmt == "llava":
        from vesl.schemas.llava import parse_tasks

        llava["tasks"] = parse_tasks(llava.get("tasks", ("grounding", "referring", "control")))
        if not 0.0 <= llava.get("eval_fraction", 0.1) <= 1.0:
            raise UserError(f"--eval-fraction must lie in [0, 1], got {llava['eval_fraction']}")
        if llava.get("max_questions", 3) < 1:
            raise UserError(f"--max-questions must be at least 1, got {llava['max_questions']}")
    data_shards(dataset_dir)  # a clear error for a wrong directory
    violations = validate(dataset_dir)
    if violations:
        raise InvalidDataset(violations, action="export")
    if fmt == "wds":
        return export_wds(dataset_dir, out, overwrite=overwrite, allow_any_image_uri=allow_any_image_uri)
    if fmt == "llava":
        return export_llava(dataset_dir, out, overwrite=overwrite, allow_any_image_uri=allow_any_image_uri, **llava)
    if fmt == "coco":
        return export_coco(dataset_dir, out, overwrite=overwrite, allow_any_image_uri=allow_any_image_uri)
    return export_odvg(dataset_dir, out, overwrite=overwrite, allow_any_image_uri=allow_any_image_uri)
