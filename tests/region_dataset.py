"""A small, valid region-text dataset directory for tests (the layout the shard writer produces).

Images are flat-colored backgrounds with filled shapes exactly at the region boxes, so a test can check
pixels against boxes. Uses only pyarrow + Pillow, not the product writer, so the publish/show/export
tests don't depend on the labeling pipeline.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from vesl.pipeline.writer import provenance_sha256, write_manifest
from vesl.schemas.region_text import ERRORS_SCHEMA, region_text_schema

PROVENANCE = {
    "vesl_version": "0.1.0",
    "captioner": {"model": "tiny-vlm", "revision": "abc123", "prompt_hash": "sha256:0f1e2d"},
    "detector": {"model": "tiny-owlv2", "revision": "def456", "threshold": 0.1},
    "phrases": {"mode": "paper", "max_phrases": 20},
}

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle")
BACKGROUNDS = {"gray": (128, 128, 128), "white": (245, 245, 245), "black": (20, 20, 20)}


def _scene(rng: random.Random, idx: int, width: int, height: int, fmt: str) -> dict:
    bg_name = rng.choice(sorted(BACKGROUNDS))
    img = Image.new("RGB", (width, height), BACKGROUNDS[bg_name])
    draw = ImageDraw.Draw(img)
    n_obj = idx % 4  # 0..3 objects: some images have no regions
    objects = []
    for k in range(n_obj):
        # non-overlapping horizontal slots keep shapes apart
        slot_w = width / 3
        x0 = int(k * slot_w + rng.uniform(2, slot_w * 0.3))
        x1 = int(min((k + 1) * slot_w - 2, x0 + rng.uniform(slot_w * 0.4, slot_w * 0.65)))
        y0 = int(rng.uniform(2, height * 0.4))
        y1 = int(min(height - 2, y0 + rng.uniform(height * 0.25, height * 0.55)))
        color = rng.choice(sorted(COLORS))
        shape = rng.choice(SHAPES)
        fill = COLORS[color]
        if shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        objects.append((f"{color} {shape}", (x0 / width, y0 / height, x1 / width, y1 / height)))

    caption = "a picture"
    regions = []
    for k, (phrase, box) in enumerate(objects):
        caption += " with " if k == 0 else " and "
        start = len(caption) + 2  # after "a "
        caption += f"a {phrase}"
        regions.append(
            {
                "phrase": phrase,
                "char_start": start,
                "char_end": start + len(phrase),
                "box": [float(v) for v in box],
                "score": round(rng.uniform(0.1, 0.99), 3),
            }
        )
    caption += f" on a {bg_name} background <b>&</b>" if idx % 5 == 0 else f" on a {bg_name} background"
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return {"image": buf.getvalue(), "caption": caption, "regions": regions}


def write_region_dataset(
    out_dir: str | Path,
    n_images: int = 12,
    n_shards: int = 2,
    seed: int = 0,
    size: tuple[int, int] = (160, 120),
    with_errors: bool = True,
) -> Path:
    """Write ``part-0000k.parquet`` + ``.errors.parquet`` + ``.stats.json`` per shard and a manifest."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    width, height = size
    schema = region_text_schema(PROVENANCE)
    per_shard = (n_images + n_shards - 1) // n_shards
    for shard in range(n_shards):
        name = f"part-{shard:05d}"
        rows = []
        for i in range(shard * per_shard, min(n_images, (shard + 1) * per_shard)):
            fmt = "JPEG" if i % 3 == 2 else "PNG"
            scene = _scene(rng, i, width, height, fmt)
            rows.append(
                {
                    "key": f"img.{i:04d}",  # a dot in the key: exporters must cope
                    "source_shard": f"input-{shard:05d}.tar",
                    "image": scene["image"],
                    "image_uri": None,
                    "width": width,
                    "height": height,
                    "alt_text": f"IMG_{2000 + i} stock photo",
                    "caption": scene["caption"],
                    "caption_source": "vlm",
                    "regions": scene["regions"],
                }
            )
        pq.write_table(pa.Table.from_pylist(rows, schema=schema), out / f"{name}.parquet", compression="zstd")
        errors = []
        if with_errors:
            errors = [
                {"key": f"bad.{shard}.0", "source_shard": f"input-{shard:05d}.tar", "stage": "decode",
                 "error_type": "UnidentifiedImageError", "message": "cannot identify image file"},
                {"key": f"bad.{shard}.1", "source_shard": f"input-{shard:05d}.tar", "stage": "caption",
                 "error_type": "EmptyCaption", "message": "caption is empty"},
            ][: shard + 1]
        pq.write_table(pa.Table.from_pylist(errors, schema=ERRORS_SCHEMA), out / f"{name}.errors.parquet")
        stats = {"shard": name, "rows": len(rows), "errors": len(errors),
                 "regions": sum(len(r["regions"]) for r in rows), "source_uri": f"input-{shard:05d}.tar",
                 "sample_limit": None, "provenance_sha256": provenance_sha256(PROVENANCE),
                 "files": {kind: {"name": f.name, "bytes": f.stat().st_size,
                                  "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
                           for kind, f in (("parquet", out / f"{name}.parquet"),
                                           ("errors", out / f"{name}.errors.parquet"))}}
        (out / f"{name}.stats.json").write_text(json.dumps(stats, sort_keys=True))
    write_manifest(out)  # the commit files `vesl label` writes, so publish's dataset checks pass
    return out


def write_synth_region_dataset(out_dir: str | Path, n_images: int = 8, seed: int = 0, n_shards: int = 1) -> Path:
    """Synthetic scenes (``vesl.demo.synth``) with their ground-truth regions, written by the product
    shard writer (``vesl.pipeline.writer``): the exact on-disk layout `vesl label` produces.

    One sample per shard fails on purpose so the errors files are exercised too.
    """
    from vesl.demo.synth import make_scenes
    from vesl.pipeline.writer import shard_name, write_shard
    from vesl.schemas.stage import Sample, SampleError

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    scenes = list(make_scenes(n_images, seed))
    per_shard = (n_images + n_shards - 1) // n_shards
    provenance = {**PROVENANCE, "captioner": {"model": "ground-truth"}, "detector": {"model": "ground-truth"}}
    for shard in range(n_shards):
        chunk = scenes[shard * per_shard : (shard + 1) * per_shard]
        samples = [
            Sample(key=s.key, source_shard=f"synth-{shard:05d}", index=i, image_bytes=s.image, alt_text=s.alt_text,
                   width=s.width, height=s.height, caption=s.caption, caption_source="vlm", regions=list(s.regions))
            for i, s in enumerate(chunk)
        ]
        samples.append(Sample(key=f"broken-{shard}", source_shard=f"synth-{shard:05d}", index=len(chunk),
                              error=SampleError("decode", "UnidentifiedImageError", "cannot identify image file")))
        write_shard(out, shard_name(shard), f"synth-{shard:05d}", samples, provenance)
    write_manifest(out)
    return out
