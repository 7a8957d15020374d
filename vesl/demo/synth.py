"""A synthetic scene world: Pillow images of coloured shapes with web-like alt-text and ground truth.

vesl has no network and no downloadable models here, so the demo, the tests, the benchmarks and the
tiny shipped models all live in this small world. Every scene carries three things:

- a noisy web-like ``alt_text`` (often uninformative, sometimes naming one object), which is what a
  web crawl would give us;
- a ground-truth detailed ``caption`` naming every object with size, colour, shape and position, in
  a small regular grammar (``There is a large red circle at the top left, a small blue square in the
  center and a large green star at the bottom right.``);
- ground-truth ``regions``: one per object, whose phrase is exactly the caption slice of the object
  noun phrase (``a large red circle``), so the paper's chunker ``NP: {<DT>?<JJ.*>*<NN.*>+}`` finds it.

Colours are saturated and far apart; backgrounds are muted (low saturation) so they never look like an
object colour. Each scene has 2-5 objects with distinct ``color shape`` categories, so a phrase names one
object only. Scenes are deterministic: the same ``(seed, index)`` gives the same bytes.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import json
import math
import random
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from vesl.schemas.boxes import box_iou
from vesl.schemas.referring import relative_position_word
from vesl.schemas.stage import Region

# Which world seeds serve which purpose, so that no reported figure was tuned on. A figure is reported only on
# TEST_SEEDS (the mean over them, with the spread); every tuning decision (thresholds, steps, templates, loss
# weights) looks at VALIDATION_SEEDS only. Seeds 1002 and 1003 were the reported held-out worlds until the
# settings were found to have been tuned on them, so they are validation worlds now.
TRAINING_SEEDS = (0, 1, 1000, 1001)  # the recipes (0, 1), `make demo` input (1000), demo --full training (1001)
VALIDATION_SEEDS = (1002, 1003, 2001, 2002, 2003, 5001, 5002, 5003, 5004)  # 5001-5004: the grounding sweep
TEST_SEEDS = (7001, 7002, 7003, 7004, 7005)  # sealed: reporting only

# Saturated, well separated object colours (RGB). Backgrounds never exceed saturation 0.2.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 25, 30),
    "orange": (250, 130, 0),
    "yellow": (245, 215, 0),
    "green": (25, 165, 50),
    "blue": (25, 75, 230),
    "purple": (145, 35, 195),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "ring", "cross", "heart", "diamond")
SIZES: dict[str, tuple[float, float]] = {  # side as a fraction of min(width, height)
    "small": (0.15, 0.22),
    "large": (0.30, 0.40),
}
MIN_SIDE, MAX_SIDE = 224, 448
MAX_IOU = 0.1
JPEG_QUALITY = 90

# 3x3 grid of positions (row, col) -> words used in the caption.
_POSITIONS = {
    (0, 0): "at the top left",
    (0, 1): "at the top",
    (0, 2): "at the top right",
    (1, 0): "on the left",
    (1, 1): "in the center",
    (1, 2): "on the right",
    (2, 0): "at the bottom left",
    (2, 1): "at the bottom",
    (2, 2): "at the bottom right",
}

_UNINFORMATIVE = (
    "IMG_{n4} stock vector",
    "IMG_{n4}.JPG",
    "Free download png",
    "shutterstock_{n9}",
    "DSC{n5}",
    "abstract background",
    "geometric shapes illustration",
    "stock photo {hex}",
    "untitled-{n2}",
    "image",
    "Download free vector art {n5}",
    "{hex}.jpg",
    "wallpaper hd {n4}",
    "clipart png transparent",
)
_INFORMATIVE = (
    "{color} {shape} on {bg}",
    "{color} {shape} icon",
    "{size} {color} {shape} vector illustration",
    "{color} {shape} clipart png",
    "{color} {shape} shape stock image {n4}",
    "{color} {shape}s and other shapes",
)
INFORMATIVE_RATE = 0.4


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``box`` is the normalized xyxy of its drawn pixels."""

    color: str
    shape: str
    size: str
    box: tuple[float, float, float, float]

    @property
    def category(self) -> str:
        return f"{self.color} {self.shape}"

    @property
    def phrase(self) -> str:
        """The noun phrase naming this object in the caption (also the region phrase)."""
        return f"a {self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """One synthetic image with web-like alt-text and ground truth; ``objects[i]`` is ``regions[i]``."""

    key: str
    image: bytes
    image_format: str  # file extension: "jpg"
    width: int
    height: int
    alt_text: str
    caption: str
    regions: list[Region]
    objects: list[SceneObject]
    duplicate_of: str | None = None  # a near-duplicate copy (re-encoded, resized) of this scene key
    look_alike_of: str | None = None  # a distinct scene with the same objects as this key, moved


def categories() -> list[str]:
    """All ``color shape`` category names, in a fixed order (COCO category ids are 1 + position)."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


# ----------------------------------------------------------------------------- drawing


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape inscribed in the square of half-side ``r``; None for shapes drawn otherwise."""
    if shape == "triangle":
        return [(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        return pts
    if shape == "cross":
        w = r * 0.36
        return [
            (cx - w, cy - r), (cx + w, cy - r), (cx + w, cy - w), (cx + r, cy - w),
            (cx + r, cy + w), (cx + w, cy + w), (cx + w, cy + r), (cx - w, cy + r),
            (cx - w, cy + w), (cx - r, cy + w), (cx - r, cy - w), (cx - w, cy - w),
        ]  # fmt: skip
    if shape == "heart":
        pts = []
        for k in range(64):
            t = 2 * math.pi * k / 64
            x = 16 * math.sin(t) ** 3
            y = -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t))
            pts.append((x, y))
        y0, y1 = min(p[1] for p in pts), max(p[1] for p in pts)
        scale = 2 * r / max(y1 - y0, 32.0)  # fit the curve's height (and its width of 32) in the square
        return [(cx + x * scale, cy + (y - (y0 + y1) / 2) * scale) for x, y in pts]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r * 0.65, cy), (cx, cy + r), (cx - r * 0.65, cy)]
    return None


def _draw_mask(shape: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> Image.Image:
    mask = Image.new("L", size, 0)
    d = ImageDraw.Draw(mask)
    box = [cx - r, cy - r, cx + r, cy + r]
    if shape == "circle":
        d.ellipse(box, fill=255)
    elif shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "ring":
        d.ellipse(box, fill=255)
        ri = r * 0.55
        d.ellipse([cx - ri, cy - ri, cx + ri, cy + ri], fill=0)
    else:
        poly = _shape_polygon(shape, cx, cy, r)
        if poly is None:
            raise ValueError(f"unknown shape {shape!r}")
        d.polygon(poly, fill=255)
    return mask


def _draw_random(rng: random.Random, shape: str, size: str, w: int, h: int) -> tuple[tuple, Image.Image] | None:
    """One ``shape`` of ``size`` at a random place on a ``w`` x ``h`` canvas: (normalized xyxy box, mask), or
    None when the mask came out empty."""
    lo, hi = SIZES[size]
    return _draw_at_random_place(rng, shape, rng.uniform(lo, hi) * min(w, h) / 2, w, h)


def _draw_at_random_place(rng: random.Random, shape: str, r: float, w: int, h: int) -> tuple[tuple, Image.Image] | None:
    """``shape`` of half-side ``r`` pixels at a random place (an exact look-alike reuses another's ``r``)."""
    cx, cy = rng.uniform(r + 2, w - r - 2), rng.uniform(r + 2, h - r - 2)
    mask = _draw_mask(shape, cx, cy, r, (w, h))
    bbox = mask.getbbox()
    if bbox is None:
        return None
    return (bbox[0] / w, bbox[1] / h, bbox[2] / w, bbox[3] / h), mask


def _muted_color(rng: random.Random) -> tuple[int, int, int]:
    h, s, v = rng.random(), rng.uniform(0.0, 0.18), rng.uniform(0.55, 0.95)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


def _background(rng: random.Random, nrng: np.random.Generator, w: int, h: int) -> tuple[np.ndarray, str]:
    """A muted background (solid, gradient, noise or stripes) and a word for it in alt-texts."""
    kind = rng.choice(("solid", "gradient", "noise", "stripes"))
    c0 = np.array(_muted_color(rng), dtype=np.float32)
    if kind == "solid":
        img = np.broadcast_to(c0, (h, w, 3)).copy()
        word = "white" if c0.min() > 215 else "grey" if c0.max() - c0.min() < 12 else "plain background"
    elif kind == "gradient":
        c1 = np.array(_muted_color(rng), dtype=np.float32)
        a = rng.uniform(0, 2 * math.pi)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        t = xx / w * math.cos(a) + yy / h * math.sin(a)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
        img = c0 * (1 - t[..., None]) + c1 * t[..., None]
        word = "gradient background"
    elif kind == "noise":
        img = c0 + nrng.normal(0.0, 10.0, size=(h, w, 3)).astype(np.float32)
        word = "textured background"
    else:
        c1 = np.array(_muted_color(rng), dtype=np.float32)
        period = rng.randint(10, 28)
        yy, xx = np.mgrid[0:h, 0:w]
        axis = rng.choice(("h", "v", "d"))
        coord = yy if axis == "h" else xx if axis == "v" else xx + yy
        on = ((coord // period) % 2 == 0)[..., None]
        img = np.where(on, c0, c1)
        word = "striped background"
    return np.clip(img, 0, 255).astype(np.uint8), word


def _compatible(
    box: tuple[float, ...], color: str, other: tuple[float, ...], other_color: str, w: int, h: int
) -> bool:
    """Limited occlusion; same-coloured objects keep a gap so they never merge into one blob."""
    if color != other_color:
        return box_iou(box, other) <= MAX_IOU
    gap_x, gap_y = 6 / w, 6 / h
    return (box[2] + gap_x <= other[0] or other[2] + gap_x <= box[0]
            or box[3] + gap_y <= other[1] or other[3] + gap_y <= box[1])  # fmt: skip


def _position(box: tuple[float, float, float, float]) -> tuple[int, int]:
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return min(int(cy * 3), 2), min(int(cx * 3), 2)


# ----------------------------------------------------------------------------- text


def _fill(template: str, rng: random.Random, **kw: str) -> str:
    return template.format(
        n2=rng.randint(1, 99),
        n4=f"{rng.randint(0, 9999):04d}",
        n5=f"{rng.randint(0, 99999):05d}",
        n9=rng.randint(100_000_000, 999_999_999),
        hex=f"{rng.getrandbits(32):08x}",
        **kw,
    )


def _alt_text(
    rng: random.Random, objects: list[SceneObject], bg_word: str, pair: tuple[SceneObject, SceneObject] | None = None
) -> str:
    if rng.random() < INFORMATIVE_RATE:
        o = rng.choice(objects)
        t = rng.choice(_INFORMATIVE)
        text = _fill(t, rng, color=o.color, shape=o.shape, size=o.size, bg=bg_word)
        if pair and any(o is q for q in pair):  # one of two look-alikes: say which one
            text += f", the one {_where(o, pair)}"
        return text
    return _fill(rng.choice(_UNINFORMATIVE), rng)


def _where(o: SceneObject, pair: tuple[SceneObject, SceneObject] | None) -> str:
    """The position words after an object's phrase: its side against its twin for one of a look-alike pair
    (which one is meant, as RefCOCO says "man on left"), else its cell of the 3x3 grid."""
    if pair and o is pair[0]:
        return relative_position_word(o.box, pair[1].box)
    if pair and o is pair[1]:
        return relative_position_word(o.box, pair[0].box)
    return _POSITIONS[_position(o.box)]


def _caption(
    objects: list[SceneObject], pair: tuple[SceneObject, SceneObject] | None = None
) -> tuple[str, list[Region]]:
    """The GT caption and one region per object whose span is exactly the object noun phrase."""
    caption = "There is "
    regions = []
    for i, o in enumerate(objects):
        if i > 0:
            caption += " and " if i == len(objects) - 1 else ", "
        start = len(caption)
        caption += o.phrase
        regions.append(Region(o.phrase, start, len(caption), o.box, 1.0))
        caption += " " + _where(o, pair)
    return caption + ".", regions


# ----------------------------------------------------------------------------- scenes


def make_scene(seed: int, index: int, moved: bool = False, twins: float = 0.0) -> Scene:
    """Scene ``index`` of the world ``seed``; the same arguments always give the same bytes.

    ``moved``: a hard negative for deduplication, the same canvas and objects (colour, shape) placed anew.
    ``twins``: the probability that one object gets an exact look-alike (same colour, shape and size) somewhere
    else; the caption then names each of the two by its side against the other ("a large red circle on the left").
    The twin's randomness comes from a stream of its own, so a scene without a twin is byte-identical to the
    scene of ``twins=0``.
    """
    rng = random.Random(f"{seed}-{index}")
    nrng = np.random.default_rng(rng.getrandbits(64))
    w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
    canvas_arr, bg_word = _background(rng, nrng, w, h)
    canvas = Image.fromarray(canvas_arr, "RGB")

    n_objects = rng.randint(2, 5)
    cats = rng.sample([(c, s) for c in COLORS for s in SHAPES], n_objects)
    if moved:  # everything after the choice of objects (sizes, places, shades, alt-text) drawn anew
        rng = random.Random(f"{seed}-{index}-moved")
    placed: list[tuple[str, str, str, tuple[float, float, float, float], Image.Image]] = []
    radius: list[float] = []
    for color, shape in cats:
        for _attempt in range(60):
            size = rng.choice(tuple(SIZES))
            lo, hi = SIZES[size]
            r = rng.uniform(lo, hi) * min(w, h) / 2
            drawn = _draw_at_random_place(rng, shape, r, w, h)
            if drawn is None:
                continue
            box, mask = drawn
            if all(_compatible(box, color, p[3], p[0], w, h) for p in placed):
                placed.append((color, shape, size, box, mask))
                radius.append(r)
                break
    twin_of = _add_twin(random.Random(f"{seed}-{index}-twin"), twins, placed, radius, w, h) if twins > 0 else None
    _paint(canvas, placed, rng)
    objects = [SceneObject(c, s, z, b) for c, s, z, b, _ in placed]
    pair = (objects[twin_of[0]], objects[twin_of[1]]) if twin_of else None
    objects.sort(key=lambda o: (*_position(o.box), o.box[0], o.box[1]))
    return _encoded_scene(index, canvas, rng, objects, bg_word, pair)


def _paint(canvas: Image.Image, placed: list, rng: random.Random) -> None:
    """Paint the placed objects in a shade of their colour; big objects first, so small ones are never hidden
    behind a large one."""
    for color, _shape, _size, _box, mask in sorted(placed, key=lambda p: -(p[3][2] - p[3][0])):
        jitter = tuple(max(0, min(255, c + rng.randint(-10, 10))) for c in COLORS[color])
        canvas.paste(jitter, (0, 0), mask)


def _encoded_scene(index: int, canvas: Image.Image, rng: random.Random, objects: list[SceneObject], bg_word: str,
                   pair: tuple[SceneObject, SceneObject] | None = None) -> Scene:
    """The Scene of a painted canvas and its objects (already in caption order): JPEG bytes, caption, alt-text."""
    caption, regions = _caption(objects, pair)
    buf = io.BytesIO()
    canvas.save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=False, progressive=False, subsampling=0)
    return Scene(
        key=f"{index:09d}",
        image=buf.getvalue(),
        image_format="jpg",
        width=canvas.width,
        height=canvas.height,
        alt_text=_alt_text(rng, objects, bg_word, pair),
        caption=caption,
        regions=regions,
        objects=objects,
    )


def _place_others(rng: random.Random, w: int, h: int, others: list[tuple[str, str]], placed: list) -> None:
    """Add one object of each other category (colour, shape) of a referring scene where it fits."""
    for c, s in others:
        p = _place(rng, w, h, c, s, rng.choice(tuple(SIZES)), placed, set())
        if p is not None:
            placed.append(p)


def _add_twin(trng: random.Random, p: float, placed: list, radius: list[float], w: int, h: int) -> tuple[int, int] | None:
    """With probability ``p``, append to ``placed`` an exact look-alike of one of its objects (same colour, shape
    and half-side) at a free place; returns (original, twin) indices in ``placed``, or None."""
    if not placed or trng.random() >= p:
        return None
    i = trng.randrange(len(placed))
    color, shape, size, _box, _mask = placed[i]
    for _attempt in range(60):
        drawn = _draw_at_random_place(trng, shape, radius[i], w, h)
        if drawn is None:
            continue
        box, mask = drawn
        if all(_compatible(box, color, q[3], q[0], w, h) for q in placed):
            placed.append((color, shape, size, box, mask))
            return i, len(placed) - 1
    return None


LOOK_ALIKE_RATE = 0.05  # hard negatives per scene of a world with duplicates


def _near_copy(scene: Scene, key: str, rng: random.Random) -> Scene:
    """``scene`` as the web serves it again: re-encoded at another JPEG quality, resized, or both."""
    img = Image.open(io.BytesIO(scene.image)).convert("RGB")
    kind = rng.choice(("reencode", "resize", "resize+reencode"))
    if kind != "reencode":
        scale = rng.uniform(0.5, 1.5)
        img = img.resize((max(32, round(img.width * scale)), max(32, round(img.height * scale))), Image.BICUBIC)
    quality = rng.randint(30, 85) if kind != "resize" else JPEG_QUALITY
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality, optimize=False, progressive=False)
    return replace(scene, key=key, image=buf.getvalue(), width=img.width, height=img.height,
                               duplicate_of=scene.key)


def make_world(n: int, seed: int, duplicates: float) -> list[Scene]:
    """``n`` items of world ``seed`` of which ``round(duplicates * n)`` are near-duplicate copies of other items
    and ``round(LOOK_ALIKE_RATE * n)`` (when ``duplicates`` > 0) are look-alikes: distinct scenes with the same
    objects moved. Originals keep their scene index as key; copies and look-alikes get the next keys. A copy
    comes after its original in the output order, a look-alike anywhere; ``Scene.duplicate_of`` and
    ``Scene.look_alike_of`` say which is which.
    """
    if not 0.0 <= duplicates < 1.0:
        raise ValueError(f"duplicates must be in [0, 1), got {duplicates}")
    n_dup = round(duplicates * n)
    n_like = round(LOOK_ALIKE_RATE * n) if n_dup else 0
    n_orig = n - n_dup - n_like
    if n_orig < 1:
        raise ValueError(f"{n} scenes leave no original for {n_dup} duplicates and {n_like} look-alikes")
    rng = random.Random(f"{seed}-world-{duplicates}")
    items: list[tuple[float, Scene]] = [(float(i), s) for i, s in enumerate(make_scenes(n_orig, seed))]
    originals = [s for _, s in items]
    next_key = n_orig
    for _ in range(n_dup):
        i = rng.randrange(n_orig)
        items.append((rng.uniform(i, n_orig), _near_copy(originals[i], f"{next_key:09d}", rng)))
        next_key += 1
    for i in sorted(rng.sample(range(n_orig), n_like)):
        moved = make_scene(seed, i, moved=True)
        items.append((rng.uniform(0, n_orig), replace(moved, key=f"{next_key:09d}", look_alike_of=originals[i].key)))
        next_key += 1
    items.sort(key=lambda t: t[0])  # stable: an original precedes copies placed at its own position
    return [s for _, s in items]


def make_scenes(n: int, seed: int, start: int = 0, twins: float = 0.0) -> Iterator[Scene]:
    """Scenes ``start .. start+n-1`` of world ``seed``; keys are the scene indices (``000000042``)."""
    for i in range(start, start + n):
        yield make_scene(seed, i, twins=twins)


# ----------------------------------------------------------------------------- writers


def _ground_truth(scene: Scene) -> dict:
    which = {k: v for k, v in (("duplicate_of", scene.duplicate_of), ("look_alike_of", scene.look_alike_of)) if v}
    return {
        **which,
        "caption": scene.caption,
        "regions": [
            {"phrase": r.phrase, "char_start": r.char_start, "char_end": r.char_end, "box": list(r.box)}
            for r in scene.regions
        ],
        "objects": [
            {"color": o.color, "shape": o.shape, "size": o.size, "category": o.category, "box": list(o.box)}
            for o in scene.objects
        ],
    }


def _meta(scene: Scene) -> dict:
    """img2dataset's per-sample json (caption = the web alt-text), plus the GT under ``vesl_synth``."""
    return {
        "url": f"https://synth.vesl.invalid/{scene.key}.{scene.image_format}",
        "key": scene.key,
        "status": "success",
        "error_message": None,
        "width": scene.width,
        "height": scene.height,
        "original_width": scene.width,
        "original_height": scene.height,
        "exif": None,
        "sha256": hashlib.sha256(scene.image).hexdigest(),
        "caption": scene.alt_text,
        "vesl_synth": _ground_truth(scene),
    }


def _chunks(scenes: Iterable[Scene], size: int) -> Iterator[list[Scene]]:
    if size < 1:
        raise ValueError("shard_size must be >= 1")
    chunk: list[Scene] = []
    for s in scenes:
        chunk.append(s)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # reproducible archives
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _write_stats(path: Path, count: int) -> None:
    stats = {"count": count, "successes": count, "failed_to_download": 0, "failed_to_resize": 0,
             "status_dict": {"success": count}}  # fmt: skip
    path.write_text(json.dumps(stats, indent=2))


def write_webdataset(scenes: Iterable[Scene], out_dir: str | Path, shard_size: int = 100) -> list[Path]:
    """WebDataset shards as img2dataset writes them: ``00000.tar`` with ``KEY.jpg|txt|json`` members.

    ``.txt`` and the json ``caption`` hold the alt-text (the web caption); the GT is in json ``vesl_synth``.
    Also writes img2dataset's ``00000_stats.json`` beside each tar.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for shard, chunk in enumerate(_chunks(scenes, shard_size)):
        path = out / f"{shard:05d}.tar"
        tmp = path.with_suffix(".tar.tmp")
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for s in chunk:  # member order as webdataset's TarWriter: sorted extensions
                _tar_add(tar, f"{s.key}.{s.image_format}", s.image)
                _tar_add(tar, f"{s.key}.json", json.dumps(_meta(s), sort_keys=True).encode())
                _tar_add(tar, f"{s.key}.txt", s.alt_text.encode())
        tmp.replace(path)
        _write_stats(out / f"{shard:05d}_stats.json", len(chunk))
        paths.append(path)
    return paths


def write_parquet(
    scenes: Iterable[Scene],
    out_dir: str | Path,
    shard_size: int = 100,
    image_column: str = "jpg",
    caption_column: str = "caption",
) -> list[Path]:
    """Parquet shards ``00000.parquet`` with image bytes, alt-text caption, key, url, size and GT json."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if image_column == caption_column:
        raise ValueError("image_column and caption_column must differ")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([
        ("key", pa.string()),
        (image_column, pa.binary()),
        (caption_column, pa.string()),
        ("url", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("status", pa.string()),
        ("gt_caption", pa.string()),
        ("gt_json", pa.string()),
    ])  # fmt: skip
    paths = []
    for shard, chunk in enumerate(_chunks(scenes, shard_size)):
        table = pa.table(
            {
                "key": [s.key for s in chunk],
                image_column: [s.image for s in chunk],
                caption_column: [s.alt_text for s in chunk],
                "url": [_meta(s)["url"] for s in chunk],
                "width": [s.width for s in chunk],
                "height": [s.height for s in chunk],
                "status": ["success"] * len(chunk),
                "gt_caption": [s.caption for s in chunk],
                "gt_json": [json.dumps(_ground_truth(s), sort_keys=True) for s in chunk],
            },
            schema=schema,
        )
        path = out / f"{shard:05d}.parquet"
        tmp = out / f"{shard:05d}.parquet.tmp"
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(path)
        paths.append(path)
    return paths


def write_coco(scenes: Iterable[Scene], out_dir: str | Path) -> Path:
    """COCO detection format for evaluation: ``images/KEY.jpg`` and ``annotations.json`` (as `vesl export` names it).

    Categories are all ``color shape`` names (ids 1..N, fixed across datasets). Boxes are pixel xywh.
    Each image entry also carries its GT ``caption`` and ``alt_text``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    cat_ids = {name: i + 1 for i, name in enumerate(categories())}
    images, annotations = [], []
    for image_id, s in enumerate(scenes, start=1):
        file_name = f"{s.key}.{s.image_format}"
        (out / "images" / file_name).write_bytes(s.image)
        images.append({"id": image_id, "file_name": file_name, "width": s.width, "height": s.height,
                       "key": s.key, "caption": s.caption, "alt_text": s.alt_text})  # fmt: skip
        for o, r in zip(s.objects, s.regions, strict=True):
            x0, y0 = round(o.box[0] * s.width), round(o.box[1] * s.height)
            x1, y1 = round(o.box[2] * s.width), round(o.box[3] * s.height)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": cat_ids[o.category],
                "bbox": [x0, y0, x1 - x0, y1 - y0],
                "area": (x1 - x0) * (y1 - y0),
                "iscrowd": 0,
                "size": o.size,
                "phrase": r.phrase,
            })  # fmt: skip
    cats = [{"id": i, "name": name, "supercategory": name.split(" ")[1],
             "color": name.split(" ")[0], "shape": name.split(" ")[1]} for name, i in cat_ids.items()]  # fmt: skip
    doc = {
        "info": {"description": "vesl synthetic scenes", "version": "1"},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": cats,
    }
    from vesl.pipeline.exporters import COCO_ANNOTATIONS

    path = out / COCO_ANNOTATIONS
    tmp = out / f"{COCO_ANNOTATIONS}.tmp"
    tmp.write_text(json.dumps(doc))
    tmp.replace(path)
    return path


# ----------------------------------------------------------------------------- referring expressions


@dataclass(frozen=True)
class RefExp:
    """One referring expression: ``scene.objects[target]`` is the object ``expression`` names."""

    scene: Scene
    target: int
    expression: str


def referring_expression(o: SceneObject) -> str:
    """``the small red circle at the top left``: size, colour, shape and the caption's position words."""
    return f"the {o.size} {o.color} {o.shape} {_POSITIONS[_position(o.box)]}"


def _place(rng: random.Random, w: int, h: int, color: str, shape: str, size: str,
           placed: list, avoid: set[tuple[str, tuple[int, int]]]) -> tuple | None:
    for _attempt in range(80):
        drawn = _draw_random(rng, shape, size, w, h)
        if drawn is None:
            continue
        box, mask = drawn
        if (size, _position(box)) in avoid:
            continue
        if all(_compatible(box, color, p[3], p[0], w, h) for p in placed):
            return color, shape, size, box, mask
    return None


def make_refexp(seed: int, index: int) -> RefExp:
    """Scene ``index`` of the REC world ``seed``: 2-3 look-alikes (same colour and shape) that differ only by
    size or position, plus 0-2 other objects; the expression names one look-alike by size and position.

    Every look-alike has its own (size, 3x3 position cell), so the expression names exactly one object; in
    about half the scenes all look-alikes have the same size and only the position words tell them apart.
    """
    for attempt in range(100):
        rng = random.Random(f"refexp-{seed}-{index}-{attempt}")
        nrng = np.random.default_rng(rng.getrandbits(64))
        w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        canvas_arr, bg_word = _background(rng, nrng, w, h)
        cats = rng.sample([(c, s) for c in COLORS for s in SHAPES], 1 + rng.randint(0, 2))
        (color, shape), others = cats[0], cats[1:]
        n_alike = rng.choice((2, 2, 3))
        same_size = rng.random() < 0.5
        sizes = [rng.choice(tuple(SIZES))] * n_alike if same_size else [rng.choice(tuple(SIZES)) for _ in range(n_alike)]
        placed: list = []
        taken: set = set()
        for size in sizes:
            p = _place(rng, w, h, color, shape, size, placed, taken)
            if p is not None:
                placed.append(p)
                taken.add((size, _position(p[3])))
        if len(placed) < 2:
            continue
        _place_others(rng, w, h, others, placed)
        canvas = Image.fromarray(canvas_arr, "RGB")
        _paint(canvas, placed, rng)
        objects = [SceneObject(c, s, z, b) for c, s, z, b, _ in placed]
        target_obj = objects[rng.randrange(sum(o.category == f"{color} {shape}" for o in objects))]
        objects.sort(key=lambda o: (*_position(o.box), o.box[0], o.box[1]))
        scene = _encoded_scene(index, canvas, rng, objects, bg_word)
        return RefExp(scene, objects.index(target_obj), referring_expression(target_obj))
    raise RuntimeError(f"could not place look-alikes for refexp scene {seed}/{index}")  # pragma: no cover


RELATIVE_MIN_RATIO = 1.5  # the pair's offset along the named axis is at least this times the other axis's


def make_refexp_relative(seed: int, index: int) -> RefExp:
    """Scene ``index`` of the relative REC world ``seed``: the target and one exact look-alike (same colour,
    shape and size, drawn from one half-side), plus 0-2 objects of other categories. The expression names
    colour, shape and the target's side against its twin ("the red circle on the left"), wherever the pair
    sits in the image, so only the relative position tells the two apart (RefCOCO's "man on left").

    The pair is placed so that one axis clearly dominates (:data:`RELATIVE_MIN_RATIO`), so the side is never a
    judgement call on a diagonal.
    """
    for attempt in range(200):
        rng = random.Random(f"refexp-relative-{seed}-{index}-{attempt}")
        nrng = np.random.default_rng(rng.getrandbits(64))
        w, h = rng.randint(MIN_SIDE, MAX_SIDE), rng.randint(MIN_SIDE, MAX_SIDE)
        canvas_arr, bg_word = _background(rng, nrng, w, h)
        cats = rng.sample([(c, s) for c in COLORS for s in SHAPES], 1 + rng.randint(0, 2))
        (color, shape), others = cats[0], cats[1:]
        size = rng.choice(tuple(SIZES))
        lo, hi = SIZES[size]
        r = rng.uniform(lo, hi) * min(w, h) / 2
        placed: list = []
        for _ in range(2):
            for _try in range(80):
                drawn = _draw_at_random_place(rng, shape, r, w, h)
                if drawn is not None and all(_compatible(drawn[0], color, p[3], p[0], w, h) for p in placed):
                    placed.append((color, shape, size, *drawn))
                    break
        if len(placed) < 2:
            continue
        a, b = placed[0][3], placed[1][3]
        dx, dy = abs(a[0] + a[2] - b[0] - b[2]), abs(a[1] + a[3] - b[1] - b[3])
        if max(dx, dy) < RELATIVE_MIN_RATIO * min(dx, dy):
            continue
        _place_others(rng, w, h, others, placed)
        canvas = Image.fromarray(canvas_arr, "RGB")
        _paint(canvas, placed, rng)
        objects = [SceneObject(c, s, z, b) for c, s, z, b, _ in placed]
        t = rng.randrange(2)
        target_obj, twin = objects[t], objects[1 - t]
        pair = (objects[0], objects[1])
        objects.sort(key=lambda o: (*_position(o.box), o.box[0], o.box[1]))
        scene = _encoded_scene(index, canvas, rng, objects, bg_word, pair)
        expression = f"the {color} {shape} {relative_position_word(target_obj.box, twin.box)}"
        return RefExp(scene, objects.index(target_obj), expression)
    raise RuntimeError(f"could not place a look-alike pair for relative refexp scene {seed}/{index}")  # pragma: no cover


# Referring sets of `vesl synth --format refexp --refexp-split`: absolute (size and 3x3 grid words, look-alikes
# of other sizes) and relative (an exact look-alike pair told apart by side only).
REFEXP_SPLITS = {"absolute": make_refexp, "relative": make_refexp_relative}


def _pixel_xywh(box: tuple[float, ...], w: int, h: int) -> list[int]:
    x0, y0, x1, y1 = round(box[0] * w), round(box[1] * h), round(box[2] * w), round(box[3] * h)
    return [x0, y0, x1 - x0, y1 - y0]


def write_refexp(refexps: Iterable[RefExp], out_dir: str | Path) -> Path:
    """RefCOCO-style JSONL for referring-expression comprehension: ``images/KEY.jpg`` and ``refexp.jsonl``.

    One line per expression: ``image`` (path relative to the JSONL), ``expression``, ``bbox`` (pixel
    ``[x, y, w, h]`` of the target), ``candidates`` (every object box of the image, the target included),
    plus ``id``, ``width``, ``height`` and the target's ``category``.
    """
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for r in refexps:
        s = r.scene
        file_name = f"{s.key}.{s.image_format}"
        (out / "images" / file_name).write_bytes(s.image)
        lines.append(json.dumps({
            "id": int(s.key), "image": f"images/{file_name}", "expression": r.expression,
            "bbox": _pixel_xywh(s.objects[r.target].box, s.width, s.height),
            "candidates": [_pixel_xywh(o.box, s.width, s.height) for o in s.objects],
            "width": s.width, "height": s.height, "category": s.objects[r.target].category,
        }))  # fmt: skip
    path = out / "refexp.jsonl"
    tmp = out / "refexp.jsonl.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(path)
    return path
