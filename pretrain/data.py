"""Region-text Parquet loader: units of (file, row group), exact mid-epoch resume.

Each epoch permutes all units with ``seed + epoch``; unit ``j`` of the permutation goes to global worker
``j % G`` where the global worker id is ``rank * num_workers + worker_id`` and ``G = world_size *
num_workers``. A worker streams its units in order and yields ready batches tagged with its logical id and
its cursor (next unit, next row). The main process keeps the cursor of the last batch it consumed from
each worker, plus which worker is due next; that small dict is the loader state saved in checkpoints. On
resume, physical worker ``p`` plays logical worker ``(p + next_worker) % num_workers`` so the DataLoader's
round-robin continues in the same order.

Ranks can own different numbers of rows. Every rank runs the same number of steps per epoch (computed
from Parquet metadata alone); a rank that runs out yields empty batches whose rows are all invalid, so
every sample is seen exactly once per epoch and DDP stays in lockstep.

Which files, row groups and columns a dataset has is ``vesl.schemas.dataset``'s to say; this module only
orders and batches them.
"""

from __future__ import annotations

import io
import math
import multiprocessing
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from vesl.errors import UserError
from vesl.schemas.dataset import TRAINING_COLUMNS, read_row_group, row_group_sizes, training_shards, url_fs
from vesl.schemas.referring import relative_position_word


@dataclass(frozen=True)
class Unit:
    path: str
    row_group: int
    num_rows: int


# ---- box math (pure) --------------------------------------------------------------------------------


def letterbox_geometry(width: int, height: int, size: int) -> tuple[float, int, int]:
    """Long side to ``size``, aspect kept, image placed top-left: (scale, new_w, new_h)."""
    scale = size / max(width, height)
    return scale, max(1, round(width * scale)), max(1, round(height * scale))


def letterbox_box(box: Any, width: int, height: int, size: int) -> list[float]:
    """A box normalized to the original image -> normalized to the padded ``size`` x ``size`` canvas."""
    _, nw, nh = letterbox_geometry(width, height, size)
    sx, sy = nw / size, nh / size
    x0, y0, x1, y1 = (float(v) for v in box)
    return [x0 * sx, y0 * sy, x1 * sx, y1 * sy]


def unletterbox_box(box: Any, width: int, height: int, size: int) -> list[float]:
    """Inverse of :func:`letterbox_box`, clipped to [0, 1]."""
    _, nw, nh = letterbox_geometry(width, height, size)
    sx, sy = nw / size, nh / size
    x0, y0, x1, y1 = (float(v) for v in box)
    return [min(max(v, 0.0), 1.0) for v in (x0 / sx, y0 / sy, x1 / sx, y1 / sy)]


# ---- image preprocessing ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocess:
    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_model(cls, model) -> Preprocess:
        from vesl.pretrain.model import preprocess_cfg

        cfg = preprocess_cfg(model)
        return cls(int(cfg["size"][0]), tuple(cfg["mean"]), tuple(cfg["std"]))

    def __call__(self, img: Image.Image) -> torch.Tensor:
        """RGB image -> normalized (3, size, size) tensor; padding is the mean colour (0 after normalizing)."""
        img = img.convert("RGB")
        _, nw, nh = letterbox_geometry(img.width, img.height, self.size)
        canvas = Image.new("RGB", (self.size, self.size), tuple(int(round(m * 255)) for m in self.mean))
        canvas.paste(img.resize((nw, nh), Image.BICUBIC), (0, 0))
        arr = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0).permute(2, 0, 1)
        mean = torch.tensor(self.mean).view(3, 1, 1)
        std = torch.tensor(self.std).view(3, 1, 1)
        return (arr - mean) / std


# ---- shards and units -------------------------------------------------------------------------------


def scan_units(paths: list[str], storage_options: dict | None = None) -> list[Unit]:
    """Every non-empty (file, row group) of the shards, in file order then row-group order."""
    return [Unit(p, i, n) for p in paths for i, n in enumerate(row_group_sizes(p, storage_options)) if n > 0]


def assign_units(units: list[Unit], seed: int, epoch: int, world_size: int, num_workers: int) -> list[list[Unit]]:
    """Units for every global worker ``rank * num_workers + worker_id`` after the epoch permutation."""
    g = world_size * max(num_workers, 1)
    if len(units) < g:
        raise UserError(
            f"only {len(units)} data units (row groups) for {g} loader workers (world_size {world_size} x "
            f"num_workers {max(num_workers, 1)}); every worker needs at least one: lower --workers or the number of "
            "processes, or write shards with more files / smaller row groups"
        )
    order = np.random.default_rng(seed + epoch).permutation(len(units))
    out: list[list[Unit]] = [[] for _ in range(g)]
    for j, u in enumerate(order):
        out[j % g].append(units[int(u)])
    return out


# ---- samples and batches ----------------------------------------------------------------------------


def usable_box(box: Any) -> bool:
    """A box a loss can take: four finite values in [0, 1] with x0 < x1 and y0 < y1 (NaN, inf, inverted,
    empty and out-of-range boxes are dropped, never trained on)."""
    if box is None or len(box) != 4:
        return False
    x0, y0, x1, y1 = (float(v) for v in box)
    if not all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in (x0, y0, x1, y1)):
        return False
    return x1 > x0 and y1 > y0


def sample_regions(key: str, regions: list[dict], m: int, seed: int, epoch: int) -> list[dict]:
    """Up to ``m`` regions, drawn deterministically from (seed, epoch, key) so any rank layout agrees."""
    good = [r for r in regions if usable_box(r["box"])]
    if len(good) <= m:
        return good
    rng = np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])
    return [good[int(i)] for i in rng.choice(len(good), size=m, replace=False)]


# Where a box sits, on a 3x3 grid of the image: (row, column) of its centre -> words.
POSITION_WORDS = {
    (0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
    (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
    (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right",
}  # fmt: skip


def position_words(box: Any) -> str:
    """Normalized ``x0, y0, x1, y1`` -> where its centre lies on a 3x3 grid, in words ("at the top left")."""
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    return POSITION_WORDS[(min(max(int(cy * 3), 0), 2), min(max(int(cx * 3), 0), 2))]


def _centre(box: Any) -> tuple[float, float]:
    return (float(box[0]) + float(box[2])) / 2, (float(box[1]) + float(box[3])) / 2


PHRASE_CACHE_SIZE = 65_536  # distinct region phrases kept tokenized per loader process (about 40 MB at 77 tokens)


class BatchBuilder:
    """Row dicts -> one padded batch (fixed shapes; masks say which rows are real)."""

    def __init__(self, tokenizer, preprocess: Preprocess, batch_size: int, regions_per_image: int,
                 text_field: str = "caption", seed: int = 0, storage_options: dict | None = None,
                 with_regions: bool = True, position_share: float = 0.0, unmatched_negatives: int = 0,
                 relative_share: float = 0.0):
        self.unmatched_negatives = unmatched_negatives  # up to this many unmatched phrases per image, as negatives
        self.position_share = position_share  # share of region texts that get their box's position words
        self.relative_share = relative_share  # share of look-alike region texts that get their side of the twin
        self.with_regions = with_regions  # False (CLIP-only training): skip region sampling and phrase tokenizing
        self.tokenizer, self.pre, self.text_field = tokenizer, preprocess, text_field
        self.b, self.m = batch_size, regions_per_image  # the batch's fixed shape: images, regions per image
        self.seed, self.storage_options = seed, storage_options
        self._phrase_cache: dict[str, torch.Tensor] = {}  # phrase -> token ids (see _phrase_tokens)

    def _image(self, row: dict) -> Image.Image:
        if row.get("image") is not None:
            return Image.open(io.BytesIO(row["image"]))
        if row.get("image_uri"):
            fs, root = url_fs(row["image_uri"], self.storage_options)
            with fs.open(root, "rb") as f:
                return Image.open(io.BytesIO(f.read()))
        raise ValueError("row has neither image bytes nor image_uri")

    def build(self, rows: list[dict], epoch: int) -> dict[str, Any]:
        b, m, s = self.b, self.m, self.pre.size
        images = torch.zeros(b, 3, s, s)
        image_valid = torch.zeros(b, dtype=torch.bool)
        boxes = torch.zeros(b, m, 4)
        boxes[..., 2:] = 1.0
        region_valid = torch.zeros(b, m, dtype=torch.bool)
        sizes = torch.ones(b, 2, dtype=torch.long)
        texts, phrases, keys, bad = [""] * b, [""] * (b * m), [], 0
        n_neg = self.unmatched_negatives
        negatives, negative_valid = [""] * (b * n_neg), torch.zeros(b, n_neg, dtype=torch.bool)
        for i, row in enumerate(rows):
            keys.append(row["key"])
            try:
                images[i] = self.pre(self._image(row))
            except Exception:  # a broken image becomes an invalid row, counted in "bad"
                bad += 1
                continue
            image_valid[i] = True
            sizes[i] = torch.tensor([row["width"], row["height"]])
            texts[i] = row.get(self.text_field) or row.get("caption") or ""
            regions = sample_regions(row["key"], row.get("regions") or [], m, self.seed, epoch) if self.with_regions else []
            where = self._with_position(row["key"], epoch, len(regions))
            side = self._relative_words(row, regions, epoch)
            for j, r in enumerate(regions):
                phrases[i * m + j] = (f"{r['phrase']} {side[j]}" if side[j] else
                                      f"{r['phrase']} {position_words(r['box'])}" if where[j] else r["phrase"])
            if regions:
                boxes[i, : len(regions)] = torch.tensor([letterbox_box(r["box"], row["width"], row["height"], s)
                                                         for r in regions])
                region_valid[i, : len(regions)] = True
            for j, text in enumerate(self._negatives(row, epoch) if n_neg and regions else []):
                negatives[i * n_neg + j] = text
                negative_valid[i, j] = True
        return {
            "images": images,
            "texts": self.tokenizer(texts),
            "image_valid": image_valid,
            "region_boxes": boxes,
            "region_texts": self._phrase_tokens(phrases, b, m),
            "region_valid": region_valid,
            "image_sizes": sizes,
            "keys": keys,
            "bad": bad,
            **({"negative_texts": self._phrase_tokens(negatives, b, n_neg), "negative_valid": negative_valid}
               if n_neg else {}),
        }

    def _negatives(self, row: dict, epoch: int) -> list[str]:
        """Up to ``unmatched_negatives`` of the row's unmatched phrases (none in a shard older than schema 1.2),
        drawn from (seed, epoch, key) like the regions; a text that is also one of its regions' is left out."""
        have = {r["phrase"] for r in row.get("regions") or []}
        texts = list(dict.fromkeys(p["text"] for p in row.get("unmatched_phrases") or [] if p["text"] not in have))
        if len(texts) > self.unmatched_negatives:
            rng = np.random.default_rng([self.seed, epoch, zlib.crc32(row["key"].encode()), 2])
            texts = [texts[k] for k in sorted(rng.choice(len(texts), self.unmatched_negatives, replace=False))]
        return texts

    def _with_position(self, key: str, epoch: int, n: int) -> list[bool]:
        """Which of a row's ``n`` regions get position words, drawn from (seed, epoch, key) like the regions."""
        if self.position_share <= 0 or n == 0:
            return [False] * n
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(key.encode()), 1])
        return (rng.random(n) < self.position_share).tolist()

    def _relative_words(self, row: dict, regions: list[dict], epoch: int) -> list[str | None]:
        """For each sampled region whose phrase names another region of the row too (a look-alike), drawn with
        probability ``relative_share`` from (seed, epoch, key): its side against the nearest such region ("on
        the left", :func:`vesl.schemas.referring.relative_position_word`), so the Prompter learns which of two
        look-alikes a referring expression means. None where the phrase stays as labeled."""
        out: list[str | None] = [None] * len(regions)
        if self.relative_share <= 0 or len(regions) == 0:
            return out
        rng = np.random.default_rng([self.seed, epoch, zlib.crc32(row["key"].encode()), 2])
        draws = rng.random(len(regions))
        every = [r for r in row.get("regions") or [] if usable_box(r["box"])]
        for j, r in enumerate(regions):
            key = r["phrase"].strip().lower()
            twins = [o for o in every if o is not r and o["phrase"].strip().lower() == key
                     and [float(v) for v in o["box"]] != [float(v) for v in r["box"]]]
            if not twins or draws[j] >= self.relative_share:
                continue
            c = _centre(r["box"])
            near = min(twins, key=lambda o: sum((a - b) ** 2 for a, b in zip(_centre(o["box"]), c, strict=True)))
            out[j] = relative_position_word(r["box"], near["box"])
        return out

    def _phrase_tokens(self, phrases: list[str], b: int, m: int) -> torch.Tensor:
        """Token ids (b, m, L) of the region phrases, each distinct phrase tokenized once per process.

        Why a cache: noun phrases repeat across images far more than captions do, and the CLIP tokenizer
        (ftfy, regex, BPE in Python) was the loader's largest cost after image decoding. A tokenizer encodes
        each text on its own, padded to its context length, so a cached row is the row a fresh call gives.
        """
        if not self.with_regions:
            return torch.zeros(b, m, 1, dtype=torch.long)
        cache = self._phrase_cache
        distinct = list(dict.fromkeys(phrases))
        new = [p for p in distinct if p not in cache]
        if len(cache) + len(new) > PHRASE_CACHE_SIZE:  # full: start over with this batch's phrases
            cache.clear()
            new = distinct
        if new:
            rows = self.tokenizer(new)
            if cache and next(iter(cache.values())).shape != rows.shape[1:]:  # a tokenizer that pads per call
                cache.clear()
                rows, new = self.tokenizer(distinct), distinct
            cache.update(zip(new, rows.clone().unbind(0), strict=True))
        return torch.stack([cache[p] for p in phrases]).view(b, m, -1)

    def empty(self) -> dict[str, Any]:
        return self.build([], 0)


class _WorkerStream(torch.utils.data.IterableDataset):
    """What one DataLoader worker runs: its units from its cursor on, as ready batches.

    The loader's workers persist across epochs, so each epoch's plan (epoch, worker offset, each logical
    worker's start cursor) reaches them through ``plan``, a small shared-memory array the main process fills
    before it starts the epoch; each worker reads it when its epoch begins.
    """

    def __init__(self, units: list[Unit], seed: int, world_size: int, rank: int, num_workers: int,
                 builder: BatchBuilder, storage_options: dict | None, plan):
        self.units, self.seed, self.world_size, self.rank = units, seed, world_size, rank
        self.num_workers = num_workers
        self.builder = builder
        self.storage_options = storage_options
        self.plan = plan  # [epoch, offset, upos_0, row_0, upos_1, row_1, ...] (one pair per logical worker)

    def _read(self, unit: Unit) -> list[dict]:
        extra = ("unmatched_phrases",) if self.builder.unmatched_negatives else ()
        return read_row_group(unit.path, unit.row_group, self.storage_options, columns=(*TRAINING_COLUMNS, *extra))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        n = max(self.num_workers, 1)
        epoch, offset = int(self.plan[0]), int(self.plan[1])
        w = ((info.id if info else 0) + offset) % n
        upos, row = int(self.plan[2 + 2 * w]), int(self.plan[3 + 2 * w])
        units = assign_units(self.units, self.seed, epoch, self.world_size, self.num_workers)[self.rank * n + w]
        buf: list[dict] = []
        while upos < len(units):
            rows = self._read(units[upos])
            while row < len(rows):
                buf.append(rows[row])
                row += 1
                if len(buf) == self.builder.b:
                    nxt = (upos + 1, 0) if row == len(rows) else (upos, row)
                    yield {**self.builder.build(buf, epoch), "worker": w, "cursor": list(nxt)}
                    buf = []
            upos, row = upos + 1, 0
        if buf:
            yield {**self.builder.build(buf, epoch), "worker": w, "cursor": [len(units), 0]}


class RegionTextLoader:
    """Per-rank loader over region-text shards with a resumable state (see the module docstring)."""

    def __init__(self, data: str | list[str], *, batch_size: int, tokenizer, preprocess: Preprocess,
                 regions_per_image: int = 4, num_workers: int = 2, rank: int = 0, world_size: int = 1,
                 seed: int = 0, text_field: str = "caption", storage_options: dict | None = None,
                 with_regions: bool = True, pin_memory: bool = False, position_share: float = 0.0,
                 unmatched_negatives: int = 0, relative_share: float = 0.0):
        self.pin_memory = pin_memory  # page-locked batches (CUDA), so the trainer's non_blocking copies overlap
        self.paths = training_shards(data, storage_options)
        self.units = scan_units(self.paths, storage_options)
        self.num_rows = sum(u.num_rows for u in self.units)
        self.batch_size, self.num_workers, self.seed = batch_size, num_workers, seed
        self.rank, self.world_size = rank, world_size  # this process's place among the ranks
        self.storage_options = storage_options
        self.builder = BatchBuilder(tokenizer, preprocess, batch_size, regions_per_image, text_field, seed, storage_options,
                                    with_regions, position_share, unmatched_negatives, relative_share)
        assign_units(self.units, seed, 0, world_size, num_workers)  # fail early with a clear message
        self.state: dict[str, Any] = {}
        self._plan = multiprocessing.Array("q", 2 + 2 * self.n_logical, lock=False)
        self._stream = _WorkerStream(self.units, seed, world_size, rank, num_workers, self.builder, storage_options,
                                     self._plan)
        self._loader: torch.utils.data.DataLoader | None = None  # made at the first epoch; its workers persist

    @property
    def n_logical(self) -> int:
        return max(self.num_workers, 1)

    def steps_per_epoch(self, epoch: int = 0) -> int:
        """Steps every rank runs in this epoch: the largest rank's batch count."""
        every = assign_units(self.units, self.seed, epoch, self.world_size, self.num_workers)
        n = self.n_logical
        per_rank = [
            sum(math.ceil(sum(u.num_rows for u in every[r * n + w]) / self.batch_size) for w in range(n))
            for r in range(self.world_size)
        ]
        return max(per_rank)

    def epoch(self, epoch: int, resume: dict | None = None) -> Iterator[dict]:
        """Exactly ``steps_per_epoch(epoch)`` batches; ``self.state`` always describes what was consumed."""
        n = self.n_logical
        if resume is not None and (resume.get("epoch") != epoch or len(resume.get("cursors", [])) != n):
            raise UserError(
                f"loader state was saved with {len(resume.get('cursors', []))} workers per rank; resume with the same "
                "--workers and number of processes as the interrupted run"
            )
        cursors = [list(c) for c in resume["cursors"]] if resume else [[0, 0] for _ in range(n)]
        nxt = resume["next_worker"] if resume else 0
        step = resume["step"] if resume else 0
        total = self.steps_per_epoch(epoch)
        self.state = {"epoch": epoch, "step": step, "cursors": [list(c) for c in cursors], "next_worker": nxt}
        self._plan[:] = [epoch, nxt, *(v for c in cursors for v in c)]  # before the workers start this epoch
        if self.num_workers > 0:
            if self._loader is None:
                self._loader = torch.utils.data.DataLoader(self._stream, batch_size=None, num_workers=self.num_workers,
                                                           prefetch_factor=2, persistent_workers=True,
                                                           pin_memory=self.pin_memory)
            it = iter(self._loader)
        else:
            it = iter(self._stream)
        for batch in it:
            w = batch.pop("worker")
            cursors[w] = list(batch.pop("cursor"))
            step += 1
            nxt = (w + 1) % n
            self.state = {"epoch": epoch, "step": step, "cursors": [list(c) for c in cursors], "next_worker": nxt}
            yield batch
        while step < total:
            step += 1
            self.state = {**self.state, "step": step}
            yield self.builder.empty()

    def close(self) -> None:
        """Stop the persistent worker processes (they would otherwise live until the loader is collected)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None:
            it._shutdown_workers()
