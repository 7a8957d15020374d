"""Near-duplicate detection before labeling (`vesl dedup`), and what `vesl label --duplicates` reads of it.

The pass is an ordinary job (``DedupConfig``: the labeling job's inputs, engines, confinement, locking and
resume rules) whose stages are decode -> :class:`HashStage`, so it runs on local, Beam and Ray through the
same Stage seam. Each input shard commits one *hash shard* (``part-00042.parquet``: key, source_shard,
index, hash; errors and stats beside it, stats last), and the driver then groups all hashes:

- **Hash.** ``imagehash.phash`` at ``hash_size`` 16 (256 bits): a DCT of a 64x64 grey thumbnail, so it keeps
  the layout of an image and ignores what JPEG re-encoding and resizing change (fine texture, size). On the
  validation worlds a copy sits at most 20 bits from its original and distinct scenes at least 50 bits apart;
  the 64-bit phash overlapped (copies up to 8, distinct scenes from 4), dhash and whash were worse.
- **Grouping.** Two images are one when their hashes differ in at most ``threshold`` bits (31, chosen on the
  validation worlds); groups are the connected components of that relation. Candidates come from band-wise
  bucketing: the 256 bits split into ``threshold + 1`` bands, and by the pigeonhole principle two hashes
  within ``threshold`` bits agree exactly on at least one band. Each band is bucketed on its own (a sort of
  one small column), and only pairs sharing a bucket get the exact Hamming check, so no all-pairs table is
  ever built; the candidate pairs found are all there are (no approximation).
- **Memory.** The driver holds the distinct hashes (32 bytes each) and two int32 positions per image, one
  band column at a time, plus the edges found; keys are read back only for representatives. Past that
  (billions of images), each band's bucketing is a sort by band value that splits by value range: run the
  ranges one at a time (or as a distributed group-by), keep the edges, and union them at the end.
- **Representative.** The first image of a group in input order: the smallest (output shard name, position
  in the shard). Deterministic, so every engine writes the same table.

The output directory ``DUPS`` holds the hash shards, ``duplicates.parquet`` (key, source_shard, hash,
representative_key, representative_shard; one row per hashed image) and ``summary.json``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from vesl.errors import UserError
from vesl.pipeline.config import DedupConfig, DedupSettings, LabelConfig
from vesl.schemas.stage import Sample, StageResources

HASH_KEY = "dedup_hash"  # Sample.meta: the hex hash, set by HashStage
TABLE_NAME = "duplicates.parquet"
SUMMARY_NAME = "summary.json"
DEDUP_META_KEY = "vesl.dedup"
HASH_SCHEMA_FIELDS = [
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_shard", pa.string(), nullable=False),
    pa.field("index", pa.int32(), nullable=False),
    pa.field("hash", pa.string(), nullable=False),
]
TABLE_SCHEMA = pa.schema([
    pa.field("key", pa.string(), nullable=False),
    pa.field("source_shard", pa.string(), nullable=False),
    pa.field("hash", pa.string(), nullable=False),
    pa.field("representative_key", pa.string(), nullable=False),
    pa.field("representative_shard", pa.string(), nullable=False),
])  # fmt: skip


class HashStage:
    """The perceptual hash of each decoded image (``Sample.meta[HASH_KEY]``, hex), with the maintained ``imagehash``."""

    name = "hash"
    resources = StageResources(batch_size=64)  # a hash costs far less than a decode: large batches

    def __init__(self, cfg: DedupSettings) -> None:
        self.cfg = cfg

    def setup(self) -> None:
        import imagehash  # noqa: F401  (fail at setup, not on the first batch)

    def teardown(self) -> None:
        pass

    def provenance(self) -> dict[str, str]:
        import imagehash

        return {"hash": f"imagehash.{self.cfg.hash}", "hash_size": str(self.cfg.hash_size), "imagehash": imagehash.__version__}

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        import imagehash

        for s in batch:
            s.meta[HASH_KEY] = str(imagehash.phash(s.image, hash_size=self.cfg.hash_size))
            s.image = None
        return batch


def build_dedup_stages(cfg: DedupConfig) -> list:
    """decode -> hash. An image without alt-text still gets a hash: the hash never reads the text."""
    from vesl.pipeline.decode import DecodeStage

    return [DecodeStage(cfg.decode.model_copy(update={"allow_empty_alt_text": True})), HashStage(cfg.dedup)]


def write_hash_shard(cfg: DedupConfig, name: str, source_uri: str, samples: list[Sample], provenance: dict[str, Any],
                     timings: dict[str, Any] | None, sample_limit: int | None) -> dict[str, Any]:
    """Commit one hash shard with the labeling writer's protocol (temp names, stats last)."""
    from vesl.pipeline.writer import commit_files, errors_table, parquet_bytes, shard_stats
    from vesl.schemas.region_text import PROVENANCE_KEY, SCHEMA_VERSION, SCHEMA_VERSION_KEY

    ok = sorted((s for s in samples if s.ok), key=lambda s: s.index)
    meta = {SCHEMA_VERSION_KEY: SCHEMA_VERSION, PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)}
    rows = [{"key": s.key, "source_shard": s.source_shard, "index": s.index, "hash": s.meta[HASH_KEY]} for s in ok]
    data = parquet_bytes(pa.Table.from_pylist(rows, schema=pa.schema(HASH_SCHEMA_FIELDS, metadata=meta)))
    stats = shard_stats(name, source_uri, samples, provenance, sample_limit)
    return commit_files(cfg.output, name, data, errors_table(samples), stats, timings)


# ---------------------------------------------------------------- grouping


def _bits(hexes: Iterable[str], nbits: int) -> np.ndarray:
    """Hex hashes -> (n, nbits) bool array, most significant bit first (imagehash's order)."""
    nbytes = nbits // 8
    raw = b"".join(bytes.fromhex(h) for h in hexes)
    return np.unpackbits(np.frombuffer(raw, dtype=np.uint8).reshape(-1, nbytes), axis=1).astype(bool)


def bands(nbits: int, threshold: int) -> list[tuple[int, int]]:
    """``threshold + 1`` contiguous bit ranges covering the hash (pigeonhole: a pair within ``threshold`` bits
    agrees exactly on at least one)."""
    n = threshold + 1
    if n > nbits:
        raise UserError(f"dedup threshold {threshold} leaves no band of the {nbits}-bit hash: use a threshold under {nbits}")
    if -(-nbits // n) > 63:
        raise UserError(f"dedup threshold {threshold} is too small for a {nbits}-bit hash: use at least {-(-nbits // 63) - 1}")
    edges = [round(i * nbits / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def group(hexes: list[str], nbits: int, threshold: int, chunk: int = 256) -> np.ndarray:
    """For images in input order (hex hashes), the position of each one's representative: the first image of its
    group, where a group is a connected component of "at most ``threshold`` bits apart"."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(hexes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inverse = np.unique(np.array(hexes), return_inverse=True)  # identical hashes are one node
    bits = _bits(uniq.tolist(), nbits)
    packed = np.packbits(bits, axis=1)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    for lo, hi in bands(nbits, threshold):
        weights = (1 << np.arange(hi - lo - 1, -1, -1, dtype=np.uint64)).astype(np.uint64)
        values = bits[:, lo:hi].astype(np.uint64) @ weights
        order = np.argsort(values, kind="stable")
        sv = values[order]
        starts = np.flatnonzero(np.r_[True, sv[1:] != sv[:-1]])
        ends = np.r_[starts[1:], len(sv)]
        for s, e in zip(starts, ends, strict=True):
            if e - s < 2:
                continue
            members = order[s:e]
            for c in range(0, len(members), chunk):  # exact Hamming checks inside the bucket, a block at a time
                a = members[c : c + chunk]
                d = np.bitwise_count(packed[a][:, None, :] ^ packed[members][None, :, :]).sum(axis=2)
                i, j = np.nonzero(d <= threshold)
                keep = a[i] < members[j]
                rows.append(a[i][keep])
                cols.append(members[j][keep])
    m = len(uniq)
    r = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    c = np.concatenate(cols) if cols else np.zeros(0, dtype=np.int64)
    _, comp = connected_components(coo_matrix((np.ones(len(r), dtype=np.int8), (r, c)), shape=(m, m)), directed=False)
    item_comp = comp[inverse]
    first = np.full(comp.max() + 1, n, dtype=np.int64)
    np.minimum.at(first, item_comp, np.arange(n))
    return first[item_comp]


def write_table(cfg: DedupConfig, names: list[str], engine: str, wall_s: float) -> dict[str, Any]:
    """Group the committed hash shards ``names`` (in this order = input order) into ``duplicates.parquet``
    and ``summary.json``; returns the summary."""
    from vesl.pipeline.writer import atomic_write_bytes, parquet_bytes
    from vesl.schemas.dataset import read_stats

    out = cfg.output.rstrip("/")
    tables = [pq.read_table(f"{out}/{n}.parquet", columns=["key", "source_shard", "hash"]) for n in names]
    table = pa.concat_tables(tables) if tables else pa.Table.from_pylist([], schema=TABLE_SCHEMA.remove(4).remove(3))
    hexes = table["hash"].to_pylist()
    nbits = cfg.dedup.hash_size**2
    rep = group(hexes, nbits, cfg.dedup.threshold)
    keys, shards = table["key"].to_pylist(), table["source_shard"].to_pylist()
    result = pa.table({
        "key": keys, "source_shard": shards, "hash": hexes,
        "representative_key": [keys[i] for i in rep], "representative_shard": [shards[i] for i in rep],
    }, schema=TABLE_SCHEMA)  # fmt: skip
    settings = {"hash": cfg.dedup.hash, "hash_size": cfg.dedup.hash_size, "threshold": cfg.dedup.threshold,
                "bands": cfg.dedup.threshold + 1}  # fmt: skip
    data = parquet_bytes(result.replace_schema_metadata({DEDUP_META_KEY: json.dumps(settings, sort_keys=True)}))
    atomic_write_bytes(cfg.output, TABLE_NAME, data)
    dups = int(np.sum(rep != np.arange(len(rep))))
    errors = sum((read_stats(cfg.output, n) or {}).get("errors", 0) for n in names)
    summary = {
        **settings, "engine": engine, "shards": len(names), "images": len(hexes), "errors": errors,
        "groups": int(len(np.unique(rep))), "duplicates": dups,
        "duplicate_fraction": round(dups / len(hexes), 4) if hexes else 0.0,
        "table": TABLE_NAME, "table_sha256": hashlib.sha256(data).hexdigest(), "wall_s": round(wall_s, 3),
    }  # fmt: skip
    atomic_write_bytes(cfg.output, SUMMARY_NAME, (json.dumps(summary, sort_keys=True, indent=2) + "\n").encode())
    return summary


# ---------------------------------------------------------------- what `vesl label --duplicates` reads


def table_path(path: str) -> str:
    """The table of a `vesl dedup` output directory, or the table file itself."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(path)
    if fs.isdir(root):
        return f"{path.rstrip('/')}/{TABLE_NAME}"
    return path


def resolve_duplicates(cfg: LabelConfig) -> None:
    """Fill in the table's sha256 and threshold (what the provenance records and a resume compares)."""
    d = cfg.duplicates
    if not d.table:
        return
    path = table_path(d.table)
    try:
        import fsspec

        with fsspec.open(path, "rb") as f:
            data = f.read()
        schema = pq.read_schema(pa.BufferReader(data))
        settings = json.loads((schema.metadata or {})[DEDUP_META_KEY.encode()])
    except (OSError, KeyError, ValueError, pa.ArrowException) as exc:
        raise UserError(f"--duplicates {d.table}: not a `vesl dedup` table ({type(exc).__name__}); "
                        "pass the --output directory of `vesl dedup`") from None
    d.table_sha256 = hashlib.sha256(data).hexdigest()
    d.threshold = int(settings["threshold"])


@functools.lru_cache(maxsize=2)
def duplicates_of(path: str, sha256: str) -> dict[tuple[str, str], tuple[str, str]]:
    """(source_shard, key) -> (representative_shard, representative_key) for every non-representative row;
    one read per process and table (``sha256`` keys the cache)."""
    t = pq.read_table(table_path(path), columns=["key", "source_shard", "representative_key", "representative_shard"])
    out = {}
    for k, s, rk, rs in zip(*(t[c].to_pylist() for c in t.column_names), strict=True):
        if (k, s) != (rk, rs):
            out[(s, k)] = (rs, rk)
    return out


def mark_duplicates(cfg: LabelConfig, samples: Iterable[Sample]) -> Iterable[Sample]:
    """Set ``duplicate_of`` on the samples the table names as duplicates (the model stages then skip them)."""
    d = cfg.duplicates
    if not d.table:
        yield from samples
        return
    dups = duplicates_of(d.table, d.table_sha256)
    for s in samples:
        rep = dups.get((s.source_shard, s.key))
        if rep is not None:
            s.duplicate_of = rep[1]
            s.meta["duplicate_shard"] = rep[0]
        yield s


def _row_sample(row: dict[str, Any], index: int) -> Sample:
    from vesl.schemas.stage import Phrase, Region

    regions = [Region(r["phrase"], r["char_start"], r["char_end"], tuple(r["box"]), r["score"]) for r in row["regions"]]
    # the phrases the writer needs to write the same unmatched_phrases again: the unmatched ones, in their order
    unmatched = row.get("unmatched_phrases")
    phrases = [Phrase(p["text"], p["char_start"], p["char_end"]) for p in unmatched or []]
    phrases += [Phrase(r.phrase, r.char_start, r.char_end) for r in regions]
    return Sample(key=row["key"], source_shard=row["source_shard"], index=index, image_bytes=row.get("image"),
                  image_uri=row.get("image_uri"), alt_text=row["alt_text"], width=row["width"], height=row["height"],
                  caption=row["caption"], caption_source=row["caption_source"], regions=regions,
                  duplicate_of=row.get("duplicate_of"), phrases=phrases, queried=unmatched is not None)  # fmt: skip


def fill_duplicates(cfg: LabelConfig, names: list[str]) -> int:
    """The second phase of ``--duplicates`` (copy): rewrite each committed shard of ``names`` whose duplicate rows
    wait, copying caption, caption source and regions from the representative's committed row (boxes are
    normalized, so they fit a resized copy). A duplicate whose representative has no row (it failed, or is not
    in this job) becomes an error row. Returns the shards rewritten. Runs in the driver, after every shard
    committed, so no shard waits on another while it is labeled; a rerun finishes what a killed run left."""
    from vesl.pipeline.writer import write_shard
    from vesl.schemas.dataset import committed_shards, read_shard_provenance, read_stats
    from vesl.schemas.stage import SampleError

    out = cfg.output.rstrip("/")
    committed = {n: st for n in committed_shards(out) if (st := read_stats(out, n))}
    pending = [(n, committed[n]) for n in names if n in committed and committed[n].get("duplicates_pending")]
    if not pending:
        return 0
    by_source = {st["source_uri"]: n for n, st in committed.items()}
    dups = duplicates_of(cfg.duplicates.table, cfg.duplicates.table_sha256)

    @functools.lru_cache(maxsize=64)
    def labels(name: str) -> dict[str, dict[str, Any]]:
        path = f"{out}/{name}.parquet"
        cols = ["key", "caption", "caption_source", "regions", "duplicate_of", "unmatched_phrases"]
        names = set(pq.read_schema(path).names)  # a shard of schema < 1.2 has no unmatched_phrases
        t = pq.read_table(path, columns=[c for c in cols if c in names])
        return {r["key"]: r for r in t.to_pylist() if r["duplicate_of"] is None}

    for name, stats in pending:
        rows = pq.read_table(f"{out}/{name}.parquet").to_pylist()
        samples = [_row_sample(r, i) for i, r in enumerate(rows)]
        for j, e in enumerate(pq.read_table(f"{out}/{name}.errors.parquet").to_pylist()):
            samples.append(Sample(key=e["key"], source_shard=e["source_shard"], index=len(rows) + j,
                                  error=SampleError(e["stage"], e["error_type"], e["message"])))  # fmt: skip
        for s in samples:
            if s.duplicate_of is None or not s.ok:
                continue
            rep_shard, rep_key = dups.get((s.source_shard, s.key), ("", s.duplicate_of))
            rep = labels(by_source[rep_shard]).get(rep_key) if rep_shard in by_source else None
            if rep is None:
                s.error = SampleError("duplicates", "RepresentativeMissing",
                                      f"its representative {rep_key!r} of {rep_shard} has no row (failed, or not in this job)")
                continue
            src = _row_sample({**rep, "source_shard": "", "alt_text": "", "width": 0, "height": 0}, 0)
            s.caption, s.caption_source, s.regions = src.caption, src.caption_source, src.regions
            s.phrases, s.queried = src.phrases, src.queried
        prov = read_shard_provenance(out, stats["files"]["parquet"]["name"])
        write_shard(out, name, stats["source_uri"], samples, prov, stats.get("timings"),
                    keep_image_bytes=cfg.decode.keep_image_bytes, sample_limit=stats.get("sample_limit"),
                    extra_stats={"duplicates_pending": 0})  # fmt: skip
    return len(pending)
