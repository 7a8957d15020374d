"""Small region-text shards for the trainer tests: Pillow-drawn coloured shapes with exact boxes and spans."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from vesl.schemas.region_text import region_text_schema

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (30, 80, 230), "yellow": (240, 210, 0)}
SHAPES = ("circle", "square", "triangle")


def make_scene(seed: int, index: int, size: tuple[int, int] = (80, 64), max_objects: int = 3) -> dict:
    """One schema-v1 row: 1..max_objects non-overlapping shapes on a grey background."""
    rng = random.Random(seed * 1_000_003 + index)
    w, h = size
    img = Image.new("RGB", (w, h), (rng.randint(100, 140),) * 3)
    draw = ImageDraw.Draw(img)
    cats = rng.sample([(c, s) for c in COLORS for s in SHAPES], rng.randint(1, max_objects))
    placed: list[tuple[int, int, int, int]] = []
    objs = []
    for color, shape in cats:
        for _ in range(50):
            side = rng.randint(int(0.25 * min(w, h)), int(0.45 * min(w, h)))
            x0, y0 = rng.randint(0, w - side), rng.randint(0, h - side)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[2] <= p[0] or box[0] >= p[2] or box[3] <= p[1] or box[1] >= p[3] for p in placed):
                break
        else:
            continue
        placed.append(box)
        fill = COLORS[color]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
        objs.append((f"a {color} {shape}", box))
    caption, regions = "", []
    for i, (phrase, box) in enumerate(objs):
        if i:
            caption += " and "
        start = len(caption)
        caption += phrase
        regions.append({"phrase": phrase, "char_start": start, "char_end": len(caption),
                        "box": [box[0] / w, box[1] / h, box[2] / w, box[3] / h], "score": 1.0})
    caption += "."
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return {"key": f"s{seed}-{index:06d}", "source_shard": "synthetic", "image": buf.getvalue(), "image_uri": None,
            "width": w, "height": h, "alt_text": "IMG_0001.jpg", "caption": caption, "caption_source": "vlm",
            "regions": regions}


def write_shards(out_dir: str | Path, n_images: int, n_files: int = 2, row_group_size: int = 8, seed: int = 0,
                 size: tuple[int, int] = (80, 64), start: int = 0) -> list[Path]:
    """``n_images`` scenes split over ``n_files`` schema-v1 shards with ``row_group_size``-row groups."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [make_scene(seed, start + i, size) for i in range(n_images)]
    per = -(-n_images // n_files)
    paths = []
    for f in range(n_files):
        chunk = rows[f * per:(f + 1) * per]
        if not chunk:
            continue
        table = pa.Table.from_pylist(chunk, schema=region_text_schema())
        p = out / f"part-{f:05d}.parquet"
        pq.write_table(table, p, row_group_size=row_group_size, compression="zstd")
        paths.append(p)
    return paths


def write_coco(out_dir: str | Path, n_images: int, seed: int = 1, size: tuple[int, int] = (80, 64)) -> Path:
    """COCO instances JSON + images folder for the same world (category = ``color shape``)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cats = [f"{c} {s}" for c in COLORS for s in SHAPES]
    images, anns = [], []
    for i in range(n_images):
        row = make_scene(seed, i, size)
        name = f"{row['key']}.png"
        (out / "images" / name).write_bytes(row["image"])
        images.append({"id": i + 1, "file_name": name, "width": row["width"], "height": row["height"]})
        for r in row["regions"]:
            x0, y0, x1, y1 = r["box"]
            bw, bh = (x1 - x0) * row["width"], (y1 - y0) * row["height"]
            anns.append({"id": len(anns) + 1, "image_id": i + 1, "category_id": cats.index(r["phrase"][2:]) + 1,
                         "bbox": [x0 * row["width"], y0 * row["height"], bw, bh], "area": bw * bh, "iscrowd": 0})
    ann_path = out / "instances.json"
    ann_path.write_text(json.dumps({"images": images, "annotations": anns,
                                    "categories": [{"id": i + 1, "name": c} for i, c in enumerate(cats)]}))
    return ann_path


def scenes_to_shards(scenes, out_dir: str | Path, rows_per_file: int = 256, row_group_size: int = 32) -> list[Path]:
    """``vesl.demo.synth`` scenes with their ground-truth regions -> schema-v1 region-text shards."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"key": s.key, "source_shard": "synth", "image": s.image, "image_uri": None, "width": s.width,
             "height": s.height, "alt_text": s.alt_text, "caption": s.caption, "caption_source": "vlm",
             "regions": [{"phrase": r.phrase, "char_start": r.char_start, "char_end": r.char_end, "box": list(r.box),
                          "score": float(r.score)} for r in s.regions]} for s in scenes]
    paths = []
    for f in range(0, len(rows), rows_per_file):
        p = out / f"part-{f // rows_per_file:05d}.parquet"
        pq.write_table(pa.Table.from_pylist(rows[f:f + rows_per_file], schema=region_text_schema()), p,
                       row_group_size=row_group_size, compression="zstd")
        paths.append(p)
    return paths
