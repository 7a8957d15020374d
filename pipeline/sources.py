"""Input sources: turn what the user named into numbered shards, and shards into Samples.

Four kinds of input, all read through fsspec (local paths here; ``s3://``/``gs://`` once the user
installs that fsspec driver):

- ``wds``: WebDataset tars exactly as img2dataset writes them (``key.jpg|png|webp`` plus ``key.txt``
  and/or ``key.json``);
- ``parquet``: an image-bytes column (also HF image datasets' ``{bytes, path}`` struct) or a path
  column, as img2dataset's parquet output and HF datasets lay them out;
- ``folder``: images with sidecar ``.txt`` captions; one folder is one shard;
- a URI scheme with its own reader (a :class:`SourceScheme`): an installed package declares it as an entry
  point in the ``vesl.sources`` group (``name = "package.module:attribute"`` reads inputs ``name://...``),
  or code registers it with :func:`register_source`.

Shard numbering: ``list_shards`` returns shards in a stable order (each input's expansion sorted,
inputs in the order given, duplicates dropped) and a shard's index is its position in that list. The
output name ``part-00042`` comes from the index, so adding, removing or reordering inputs renumbers
shards: keep the input list fixed across a job and its resumes, and start a new output directory for
new inputs.

Bad records never raise: they come out as Samples with ``error`` set (stage ``read``). What lives
here and what lives in decode: read checks what only the raw bytes can tell (is the caption valid
UTF-8, is there an image at all, does a path stay inside the input); decode checks the content
policy (empty or over-long captions, image validity), since that is configured by ``DecodeConfig``.

Longer than 400 lines on purpose: one reader per format, sharing the listing, the confinement of paths
to the input root and the error-row rules; each reader is short.
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import posixpath
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import fsspec
from fsspec.core import url_to_fs
from fsspec.implementations.local import LocalFileSystem

from vesl.errors import UserError
from vesl.pipeline.config import SourceConfig
from vesl.schemas.stage import SOURCE_PATH_KEY, Sample, fail

READ_STAGE = "read"
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
PARQUET_BATCH_ROWS = 256  # rows per read batch: memory stays bounded by one batch, not one file


@dataclass(frozen=True)
class ShardRef:
    """One input shard. ``index`` names the output shard; ``uri`` is what gets read.

    ``root`` is what the user named (a directory, a glob's fixed directory, or the file itself):
    nothing outside it is read, and ``source`` (what the output rows and stats record) is the
    shard's path relative to the root's parent, so a published dataset never shows the
    publisher's file system.
    """

    index: int
    uri: str
    kind: str  # "wds" | "parquet" | "vesl" | "folder" | a registered scheme's kind
    root: str = field(default="", compare=False)
    # a registered scheme's reader as "module:attribute", imported where the shard is read (any process)
    reader: str = field(default="", compare=False)

    @property
    def name(self) -> str:
        return f"part-{self.index:05d}"

    @property
    def source(self) -> str:
        """The shard as the output records it: relative to the parent of the input root (a local path),
        else the URI without credentials."""
        return source_label(self.uri, self.root)


def source_label(uri: str, root: str) -> str:
    """``/data/in/x.tar`` named through ``/data/in`` -> ``in/x.tar``; remote URIs lose only credentials."""
    if "://" in uri:
        return _strip_credentials(uri)
    if not root:
        return posixpath.basename(uri.rstrip("/")) or uri
    parent = posixpath.dirname(posixpath.normpath(root).rstrip("/"))
    rel = posixpath.relpath(posixpath.normpath(uri), parent or "/")
    return rel if rel != "." and not rel.startswith("..") else posixpath.basename(uri.rstrip("/")) or uri


def _strip_credentials(uri: str) -> str:
    import re

    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", uri)


def inside(real_root: str, path: str) -> bool:
    """Whether ``path`` (already resolved) is ``real_root`` or lies under it."""
    return path == real_root or path.startswith(real_root.rstrip("/") + "/")


def _escapes(fs: fsspec.AbstractFileSystem, root: str, path: str) -> bool:
    """A local path whose real location (symlinks followed) is outside the real ``root``."""
    if not root or not isinstance(fs, LocalFileSystem):
        return False
    return not inside(os.path.realpath(root), os.path.realpath(path))


# ---------------------------------------------------------------- registered URI schemes


@dataclass(frozen=True)
class SourceScheme:
    """An input kind reached through a URI scheme, registered with :func:`register_source`.

    ``expand`` turns what the user named into shard URIs; ``read`` yields one shard's Samples (given the
    shard URI and the source label its rows record); ``count`` gives a shard's sample count when cheap.
    """

    kind: str
    expand: Callable[[str], list[str]]
    read: Callable[[str, str], Iterator[Sample]]
    count: Callable[[str], int | None] | None = None


SOURCE_GROUP = "vesl.sources"  # entry points: ``name = "package.module:attribute"`` of a SourceScheme
_REGISTERED: dict[str, str] = {}  # URI prefix ("name://") -> "module:attribute", from register_source


def register_source(prefix: str, target: str) -> None:
    """Make inputs starting with ``prefix`` readable through the :class:`SourceScheme` at ``target``
    ("module:attribute"), in this process. It is imported by name wherever a shard is read, so engine workers
    in other processes find it without registering anything themselves."""
    _REGISTERED[prefix] = target


@functools.cache
def _installed_schemes() -> dict[str, str]:
    """The ``vesl.sources`` entry points of the installed packages, read once per process."""
    from importlib.metadata import entry_points

    return {f"{ep.name}://": f"{ep.module}:{ep.attr}" for ep in entry_points(group=SOURCE_GROUP)}


def _schemes() -> dict[str, str]:
    return {**_installed_schemes(), **_REGISTERED}


def _load_scheme(target: str) -> SourceScheme:
    module, _, attr = target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as exc:
        raise UserError(f"input source {target} failed to load ({type(exc).__name__}: {exc}): check the package "
                        "that declares it") from None


def _scheme_of(ref: ShardRef) -> SourceScheme | None:
    if ref.reader:
        return _load_scheme(ref.reader)
    for target in _schemes().values():
        scheme = _load_scheme(target)
        if scheme.kind == ref.kind:
            return scheme
    return None


def _schemes_hint() -> str:
    return "".join(f" or {prefix}N" for prefix in sorted(_schemes()))


# ---------------------------------------------------------------- listing


def list_shards(inputs: list[str], cfg: SourceConfig) -> list[ShardRef]:
    """Expand inputs (files, directories, globs, URIs of a registered scheme) into numbered shards.

    A directory expands, recursively, to its tars if it holds any (img2dataset writes a
    metadata-only ``.parquet`` next to every tar; those are not shards), else to its parquet files,
    else to one ``folder`` shard per directory that directly holds images.
    """
    if not inputs:
        raise UserError(f"no inputs given: name at least one tar, parquet file, image folder, glob{_schemes_hint()}")
    found: list[tuple[str, str, str, str]] = []
    for raw in inputs:
        found += _expand(str(raw), cfg)
    seen: set[str] = set()
    refs: list[ShardRef] = []
    for uri, kind, root, reader in found:
        if uri in seen:
            continue
        seen.add(uri)
        refs.append(ShardRef(len(refs), uri, kind, root, reader))
    if not refs:
        raise UserError(f"inputs {inputs} contain no shards: expected .tar, .parquet, image folders{_schemes_hint()}")
    first_parquet = next((r for r in refs if r.kind == "parquet"), None)
    if first_parquet is not None:  # a wrong column name is a config mistake: say so before any work starts
        _parquet_columns(first_parquet.uri, cfg)
    return refs


def _uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """Local files keep a plain absolute path (same in every worker); remote ones keep their protocol."""
    return path if isinstance(fs, LocalFileSystem) else fs.unstrip_protocol(path)


def _kind_of_file(path: str) -> str | None:
    low = path.lower()
    if low.endswith(TAR_SUFFIXES):
        return "wds"
    if low.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _labeled_kind(fs: fsspec.AbstractFileSystem, path: str, kind: str | None) -> str | None:
    """``vesl`` for a committed shard of a labeled vesl dataset (its ``.stats.json`` sits beside it): such a
    dataset is itself an input, e.g. to re-ground its stored captions (``--captioner keep``)."""
    if kind != "parquet":
        return kind
    if path.lower().endswith(".errors.parquet"):
        return None  # a labeled dataset's error rows are never input
    return "vesl" if fs.exists(path[: -len(".parquet")] + ".stats.json") else kind


def glob_root(path: str) -> str:
    """The fixed directory of a glob: ``/data/in/*/x*.tar`` -> ``/data/in``."""
    head = path[: min(path.index(c) for c in "*?[" if c in path)]
    return posixpath.dirname(head) if not head.endswith("/") else head.rstrip("/") or "/"


def _expand(raw: str, cfg: SourceConfig) -> list[tuple[str, str, str, str]]:
    """(uri, kind, root, reader) of every shard ``raw`` names; links that lead out of the root are skipped."""
    for prefix, target in _schemes().items():
        if raw.startswith(prefix):
            scheme = _load_scheme(target)
            return [(u, scheme.kind, "", target) for u in scheme.expand(raw)]
    return [(u, k, root, "") for u, k, root in _expand_path(raw, cfg)]


def _expand_path(raw: str, cfg: SourceConfig) -> list[tuple[str, str, str]]:
    """(uri, kind, root) of every shard a path, directory or glob names."""
    try:
        fs, path = url_to_fs(raw)
    except ValueError as exc:  # an unknown protocol: neither fsspec nor a registered scheme reads it
        raise UserError(f"don't know how to read {raw!r} ({exc}): give a .tar, .parquet, an image folder"
                        f"{_schemes_hint()}, or install the fsspec driver for that protocol") from None
    if any(c in path for c in "*?["):
        root = glob_root(path)
        matches = sorted(fs.glob(path))
        if not matches:
            raise UserError(f"glob {raw!r} matches nothing: check the pattern")
        out: list[tuple[str, str, str]] = []
        for m in matches:
            if _escapes(fs, root, m):
                continue  # a symlink out of the glob's directory: never read
            if fs.isdir(m):
                out += [(u, k, root) for u, k in _expand_dir(fs, m, cfg, root)]
            elif (kind := _labeled_kind(fs, m, _kind_of_file(m))) is not None:
                out.append((_uri(fs, m), kind, root))
        return out
    if fs.isdir(path):
        out = [(u, k, path) for u, k in _expand_dir(fs, path, cfg, path)]
        if not out:
            raise UserError(f"directory {raw!r} holds no .tar, .parquet or images ({', '.join(cfg.image_extensions)})")
        return out
    if not fs.exists(path):
        raise UserError(f"input {raw!r} does not exist: check the path")
    kind = _labeled_kind(fs, path, _kind_of_file(path))
    if kind is None:
        raise UserError(f"don't know how to read {raw!r}: give a .tar, .parquet, an image folder{_schemes_hint()}")
    return [(_uri(fs, path), kind, path)]


def _is_image(name: str, cfg: SourceConfig) -> bool:
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    return ext in {e.lower().lstrip(".") for e in cfg.image_extensions}


def _expand_dir(fs: fsspec.AbstractFileSystem, path: str, cfg: SourceConfig, confine: str) -> list[tuple[str, str]]:
    """Shards under ``path``; files and folders whose real location leaves ``confine`` are skipped."""
    tars, parquets, image_dirs = [], [], []
    visited: set[str] = set()
    for root, dirs, files in fs.walk(path):
        real = os.path.realpath(root) if isinstance(fs, LocalFileSystem) else root
        if _escapes(fs, confine, root) or real in visited:  # a link out of the input, or a link loop
            dirs[:] = []
            continue
        visited.add(real)
        names = sorted(f for f in files if not _escapes(fs, confine, posixpath.join(root, f)))
        tars += [posixpath.join(root, f) for f in names if _kind_of_file(f) == "wds"]
        parquets += [posixpath.join(root, f) for f in names if _kind_of_file(f) == "parquet"]
        if any(_is_image(f, cfg) for f in names):
            image_dirs.append(root)
    if tars:
        return [(_uri(fs, p), "wds") for p in sorted(tars)]
    labeled = [(p, _labeled_kind(fs, p, "parquet")) for p in sorted(parquets)]
    if any(k == "vesl" for _, k in labeled):  # a labeled dataset: its committed shards only
        return [(_uri(fs, p), k) for p, k in labeled if k == "vesl"]
    if parquets:
        return [(_uri(fs, p), k) for p, k in labeled if k is not None]
    return [(_uri(fs, p), "folder") for p in sorted(image_dirs)]


# ---------------------------------------------------------------- reading


def read_shard(ref: ShardRef, cfg: SourceConfig, limit: int | None = None) -> Iterator[Sample]:
    """Yield the shard's samples in source order; ``Sample.index`` is the position in the shard.

    ``limit`` stops after that many samples (error samples count too, so the cut is stable).
    """
    readers = {"wds": _read_tar, "parquet": _read_parquet, "vesl": _read_labeled, "folder": _read_folder}
    scheme = None if ref.kind in readers else _scheme_of(ref)
    if ref.kind not in readers and scheme is None:
        raise UserError(f"unknown shard kind {ref.kind!r} for {ref.uri}")
    if limit is not None and limit <= 0:
        return
    samples = readers[ref.kind](ref, cfg) if scheme is None else scheme.read(ref.uri, ref.source)
    for n, sample in enumerate(samples, start=1):
        yield sample
        if limit is not None and n >= limit:
            return


def count_samples(ref: ShardRef, cfg: SourceConfig) -> int | None:
    """The shard's sample count when it is cheap to know (for a progress total), else None.

    Parquet: the footer's row count. A registered scheme: its own ``count``. A local uncompressed tar: its member
    headers, grouped into keys as the reader groups them (the data is seeked over, never read).
    Compressed or remote tars and image folders: None, since counting them costs a read.
    """
    try:
        if ref.kind not in ("wds", "parquet", "vesl", "folder"):
            scheme = _scheme_of(ref)
            return scheme.count(ref.uri) if scheme is not None and scheme.count is not None else None
        if ref.kind in ("parquet", "vesl"):
            import pyarrow.parquet as pq

            with fsspec.open(ref.uri, "rb") as f:
                return pq.ParquetFile(f).metadata.num_rows
        if ref.kind == "wds" and urlsplit(ref.uri).scheme in ("", "file"):
            keys, last = 0, None
            with tarfile.open(url_to_fs(ref.uri)[1], "r:") as tar:  # ReadError when compressed
                for member in tar:
                    k, ext = _split_member(member.name)
                    if member.isfile() and ext and not posixpath.basename(k).startswith(".") and k != last:
                        keys, last = keys + 1, k
            return keys
    except Exception:  # a progress total is never worth failing a job: the reader reports real faults
        return None
    return None


def _error_sample(key: str, ref: ShardRef, index: int, error_type: str, message: str, **kw: Any) -> Sample:
    return fail(Sample(key=key, source_shard=ref.source, index=index, **kw), READ_STAGE, message, error_type)


def _decode_caption(raw: bytes | str | None) -> str:
    """Captions must be UTF-8; surrounding whitespace (trailing newlines of .txt files) is dropped."""
    if raw is None:
        return ""
    if isinstance(raw, str):
        return raw.strip()
    return raw.decode("utf-8").strip()


def _caption_error(raw: bytes, exc: UnicodeDecodeError) -> str:
    return f"caption is not valid UTF-8 ({exc.reason} at byte {exc.start}): {raw[:60]!r}"


# ---- WebDataset tars (img2dataset layout)


def _split_member(name: str) -> tuple[str, str]:
    """WebDataset convention: key is the path up to the first dot of the basename; the rest is the part."""
    name = name[2:] if name.startswith("./") else name
    dirname, base = posixpath.split(name)
    stem, _, ext = base.partition(".")
    return posixpath.join(dirname, stem) if dirname else stem, ext.lower()


def _read_tar(ref: ShardRef, cfg: SourceConfig) -> Iterator[Sample]:
    """Members are grouped by consecutive key, as tar writers (img2dataset, webdataset) emit them."""
    image_exts = [e.lower().lstrip(".") for e in cfg.image_extensions]
    seen: set[str] = set()
    index = 0
    key: str | None = None
    parts: dict[str, bytes] = {}
    too_big: str | None = None
    with fsspec.open(ref.uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            k, ext = _split_member(member.name)
            if not ext or posixpath.basename(k).startswith("."):
                continue  # no part name (stray file) or hidden file: not a sample part
            if k != key:
                if key is not None:
                    yield _tar_sample(ref, index, key, parts, image_exts, seen, too_big)
                    index += 1
                key, parts, too_big = k, {}, None
            if member.size > cfg.max_file_bytes:  # checked on the header: the member is skipped, never read
                too_big = too_big or _too_big_message(member.name, member.size, cfg)
                continue
            fobj = tar.extractfile(member)
            parts[ext] = fobj.read() if fobj is not None else b""
        if key is not None:
            yield _tar_sample(ref, index, key, parts, image_exts, seen, too_big)


def _tar_sample(
    ref: ShardRef, index: int, key: str, parts: dict[str, bytes], image_exts: list[str], seen: set[str],
    too_big: str | None = None,
) -> Sample:
    if key in seen:
        return _error_sample(key, ref, index, "DuplicateKey", f"key {key!r} appears twice in the tar (members not grouped)")
    seen.add(key)
    if too_big is not None:
        return _error_sample(key, ref, index, "FileTooLarge", too_big)
    meta: dict[str, Any] = {}
    if "json" in parts:
        try:
            meta["json"] = json.loads(parts["json"])
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            why = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
            return _error_sample(key, ref, index, "BadJson", f"{key}.json is not valid JSON: {why}")
    try:
        if "txt" in parts:
            alt_text = _decode_caption(parts["txt"])
        else:
            j = meta.get("json")
            cap = j.get("caption") if isinstance(j, dict) else None
            alt_text = _decode_caption(cap if isinstance(cap, str) else None)
    except UnicodeDecodeError as exc:
        return _error_sample(key, ref, index, "CaptionEncoding", _caption_error(parts["txt"], exc))
    ext = next((e for e in image_exts if e in parts), None)
    if ext is None:
        return _error_sample(
            key, ref, index, "MissingImage",
            f"{key} has {sorted(parts)} but no image ({'/'.join(image_exts)})", alt_text=alt_text, meta=meta,
        )
    meta["format"] = ext
    return Sample(key=key, source_shard=ref.source, index=index, image_bytes=parts[ext], alt_text=alt_text, meta=meta)


# ---- Parquet (img2dataset parquet output, HF image datasets, path columns)


def _parquet_columns(uri: str, cfg: SourceConfig) -> tuple[str, str, str | None]:
    """(image-or-path column, caption column, key column or None), or a UserError naming the fix."""
    import pyarrow.parquet as pq

    with fsspec.open(uri, "rb") as f:
        names = pq.ParquetFile(f).schema_arrow.names
    image_col = cfg.path_column or cfg.image_column
    if image_col not in names:
        which = "path_column" if cfg.path_column else "image_column"
        raise UserError(
            f"{uri} has no column {image_col!r} (columns: {names}); set source.{which} in the config "
            f"(HF image datasets use image_column: image)"
        )
    if cfg.caption_column not in names:
        raise UserError(f"{uri} has no caption column {cfg.caption_column!r} (columns: {names}); set source.caption_column")
    return image_col, cfg.caption_column, cfg.key_column if cfg.key_column in names else None


def _caption_values(col: Any) -> list[bytes | None]:
    """Captions as raw bytes, so invalid UTF-8 in a file becomes an error row instead of a crash."""
    import pyarrow as pa

    t = col.type
    if pa.types.is_string(t):
        col = col.cast(pa.binary())
    elif pa.types.is_large_string(t):
        col = col.cast(pa.large_binary())
    elif not (pa.types.is_binary(t) or pa.types.is_large_binary(t)):
        return [None if v is None else str(v).encode() for v in col.to_pylist()]
    return col.to_pylist()


def resolve_inside(base_dir: str, path: str) -> str | None:
    """``path`` joined to ``base_dir`` and normalized, or None if it would leave ``base_dir``.

    Nothing reads paths outside what the user named: absolute paths elsewhere and ``..`` escapes are refused.
    """
    base = posixpath.normpath(base_dir)
    joined = posixpath.normpath(path if posixpath.isabs(path) else posixpath.join(base, path))
    return joined if joined.startswith(base.rstrip("/") + "/") else None


def _resolve_row_path(fs: fsspec.AbstractFileSystem, base_dir: str, raw: str) -> str | None:
    if "://" in raw:
        other_fs, raw = url_to_fs(raw)
        if other_fs.protocol != fs.protocol:
            return None
    resolved = resolve_inside(base_dir, raw)
    if resolved is not None and isinstance(fs, LocalFileSystem):
        real_base = os.path.realpath(base_dir)
        real = os.path.realpath(resolved)
        if not real.startswith(real_base.rstrip("/") + "/"):
            return None  # a symlink pointing outside
    return resolved


def _read_parquet(ref: ShardRef, cfg: SourceConfig) -> Iterator[Sample]:
    import pyarrow.parquet as pq

    image_col, caption_col, key_col = _parquet_columns(ref.uri, cfg)
    fs, path = url_to_fs(ref.uri)
    base_dir = posixpath.dirname(path)
    stem = posixpath.basename(path)
    stem = stem[: -len(".parquet")] if stem.lower().endswith(".parquet") else stem
    columns = list(dict.fromkeys(c for c in (image_col, caption_col, key_col) if c))
    row = 0
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            images = batch.column(image_col).to_pylist()
            captions = _caption_values(batch.column(caption_col))
            keys = batch.column(key_col).to_pylist() if key_col else [None] * batch.num_rows
            for img, cap, k in zip(images, captions, keys, strict=True):
                key = str(k) if k not in (None, "") else f"{stem}-{row:06d}"
                yield _parquet_sample(ref, cfg, fs, base_dir, row, key, img, cap)
                row += 1


def _parquet_sample(
    ref: ShardRef, cfg: SourceConfig, fs: Any, base_dir: str, row: int, key: str, img: Any, cap: bytes | None
) -> Sample:
    try:
        alt_text = _decode_caption(cap)
    except UnicodeDecodeError as exc:
        return _error_sample(key, ref, row, "CaptionEncoding", _caption_error(cap or b"", exc))
    meta: dict[str, Any] = {"row": row}
    data: bytes | None = None
    rel: str | None = None
    if cfg.path_column:
        rel = img if isinstance(img, str) else None
    elif isinstance(img, dict):  # HF image feature: {"bytes": ..., "path": ...}
        data = img.get("bytes")
        if not data and img.get("path"):
            rel = img["path"]
    elif isinstance(img, (bytes, bytearray)):
        data = bytes(img)
    if data is None and rel is None:
        return _error_sample(key, ref, row, "MissingImage", f"row {row} has no image in column {cfg.path_column or cfg.image_column!r}", alt_text=alt_text)
    uri = None
    if rel is not None:
        resolved = _resolve_row_path(fs, base_dir, rel)
        if resolved is None:
            return _error_sample(
                key, ref, row, "PathOutsideInput",
                f"image path {rel!r} leaves the parquet file's directory {source_label(base_dir, ref.root)}; "
                "only files under it are read",
                alt_text=alt_text,
            )
        uri = _uri(fs, resolved)
        if _too_big(fs, resolved, cfg):
            return _error_sample(key, ref, row, "FileTooLarge", _too_big_message(rel, fs.size(resolved), cfg), alt_text=alt_text)
        try:
            with fs.open(resolved, "rb") as f:
                data = f.read()
        except OSError as exc:
            return _error_sample(key, ref, row, "ReadError", f"cannot read image {rel!r}: {_os_reason(exc)}", alt_text=alt_text)
    if uri is not None:
        meta[SOURCE_PATH_KEY] = source_label(uri, ref.root)
    return Sample(key=key, source_shard=ref.source, index=row, image_bytes=data, image_uri=uri, alt_text=alt_text, meta=meta)


# ---- labeled vesl datasets (re-grounding their stored captions)

KEPT_CAPTION_KEY = "kept_caption"  # Sample.meta: (caption, caption_source) of the labeled row


def _read_labeled(ref: ShardRef, cfg: SourceConfig) -> Iterator[Sample]:
    """Rows of a labeled shard: the stored image bytes and alt-text, the stored caption in the meta, and the
    row's own ``source_shard`` (where the image came from). A row stored without image bytes reads its image
    again from its source shard, when that shard is one of the inputs named in ``cfg.image_sources``."""
    import pyarrow.parquet as pq

    fs, path = url_to_fs(ref.uri)
    columns = ["key", "source_shard", "image", "alt_text", "caption", "caption_source"]
    originals: dict[str, _SourceImages] = {}
    row = 0
    with fs.open(path, "rb") as f:
        for batch in pq.ParquetFile(f).iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=columns):
            for r in batch.to_pylist():
                kept = {KEPT_CAPTION_KEY: (r["caption"], r["caption_source"])}
                image, uri, problem = r["image"], None, None
                if not image:
                    image, uri, problem = _original_image(r["key"], r["source_shard"], cfg, originals)
                if problem:
                    yield _error_sample(r["key"], ref, row, "MissingImage", problem, alt_text=r["alt_text"] or "")
                else:
                    yield Sample(key=r["key"], source_shard=r["source_shard"] or ref.source, index=row,
                                 image_bytes=image, image_uri=uri, alt_text=r["alt_text"] or "", meta=kept)  # fmt: skip
                row += 1


class _SourceImages:
    """The samples of one original input shard, read in order and looked up by key.

    A labeled shard holds its input shard's rows in the same order (less the failed ones), so a lookup
    usually only moves the reader forward; rows passed over wait in a dict in case they come later.
    """

    def __init__(self, ref: ShardRef, cfg: SourceConfig) -> None:
        self.samples = read_shard(ref, cfg)
        self.waiting: dict[str, Sample] = {}

    def get(self, key: str) -> Sample | None:
        if key in self.waiting:
            return self.waiting.pop(key)
        for s in self.samples:
            if s.key == key:
                return s
            self.waiting[s.key] = s
        return None


@functools.lru_cache(maxsize=8)
def _named_inputs(image_sources: tuple[str, ...]) -> dict[str, ShardRef]:
    """``source_shard`` label -> shard, over the inputs the user named for re-reading images."""
    return {ref.source: ref for ref in list_shards(list(image_sources), SourceConfig())}


def _original_image(key: str, source_shard: str | None, cfg: SourceConfig,
                    originals: dict[str, _SourceImages]) -> tuple[bytes | None, str | None, str | None]:
    """(image bytes, image uri, None) of a labeled row from its original input shard, or (None, None, why not)."""
    if not cfg.image_sources:
        return None, None, ("the labeled row stores no image bytes (decode.keep_image_bytes was false): pass its "
                            "original input with --image-source to read it from its source shard")
    ref = _named_inputs(tuple(cfg.image_sources)).get(source_shard or "")
    if ref is None:
        return None, None, f"source shard {source_shard!r} is not one of the --image-source inputs"
    if source_shard not in originals:
        originals.clear()  # one original shard open at a time: a labeled shard comes from one input shard
        originals[source_shard] = _SourceImages(ref, cfg)
    s = originals[source_shard].get(key)
    if s is None:
        return None, None, f"key {key!r} is not in its source shard {source_shard!r}"
    if s.error is not None:
        return None, None, f"its source row cannot be read: {s.error.message}"
    return s.image_bytes, s.image_uri, None


# ---- image folders with sidecar .txt


def _read_folder(ref: ShardRef, cfg: SourceConfig) -> Iterator[Sample]:
    """Images in one folder, captions from ``stem.txt`` next to them; key is ``folder/stem``.

    A file whose real location (symlinks followed) is outside the input root is never read: it
    becomes a ``PathOutsideInput`` error row, as a Parquet path column's escapes do.
    """
    fs, path = url_to_fs(ref.uri)
    folder = posixpath.basename(path.rstrip("/"))
    groups: dict[str, dict[str, str]] = {}
    sizes: dict[str, int] = {}
    for entry in fs.ls(path, detail=True):
        full = entry["name"]
        name = posixpath.basename(full)
        if name.startswith(".") or entry.get("type") == "directory":
            continue
        stem, _, ext = name.rpartition(".")
        if not stem:
            continue
        ext = ext.lower()
        if ext == "txt" or _is_image(name, cfg):
            groups.setdefault(stem, {})
            groups[stem][ext] = full
            sizes[full] = int(entry.get("size") or 0)
    for index, stem in enumerate(sorted(groups)):
        parts = groups[stem]
        key = f"{folder}/{stem}"
        outside = sorted(posixpath.basename(p) for p in parts.values() if _escapes(fs, ref.root or path, p))
        if outside:
            yield _error_sample(
                key, ref, index, "PathOutsideInput",
                f"{outside[0]} is a link to a file outside the input {source_label(ref.root or path, '')}; only files under it are read",
            )
            continue
        too_big = [p for p in parts.values() if _too_big(fs, p, cfg, sizes.get(p))]
        if too_big:
            yield _error_sample(key, ref, index, "FileTooLarge", _too_big_message(posixpath.basename(too_big[0]), fs.size(too_big[0]), cfg))
            continue
        images = sorted(e for e in parts if e != "txt")
        alt_text = ""
        if "txt" in parts:
            raw = fs.cat_file(parts["txt"])
            try:
                alt_text = _decode_caption(raw)
            except UnicodeDecodeError as exc:
                yield _error_sample(key, ref, index, "CaptionEncoding", _caption_error(raw, exc))
                continue
        if not images:
            yield _error_sample(key, ref, index, "MissingImage", f"{stem}.txt has no image next to it", alt_text=alt_text)
            continue
        if len(images) > 1:
            yield _error_sample(
                key, ref, index, "DuplicateKey", f"several images share the stem {stem!r}: {images}", alt_text=alt_text
            )
            continue
        img_path = parts[images[0]]
        try:
            data = fs.cat_file(img_path)
        except OSError as exc:
            yield _error_sample(key, ref, index, "ReadError", f"cannot read {posixpath.basename(img_path)}: {_os_reason(exc)}", alt_text=alt_text)
            continue
        yield Sample(
            key=key, source_shard=ref.source, index=index, image_bytes=data, image_uri=_uri(fs, img_path),
            alt_text=alt_text, meta={"format": images[0], SOURCE_PATH_KEY: source_label(img_path, ref.root or path)},
        )


def _os_reason(exc: OSError) -> str:
    """An OSError without the absolute path it names (error rows are published)."""
    return exc.strerror or type(exc).__name__


def _too_big(fs: fsspec.AbstractFileSystem, path: str, cfg: SourceConfig, size: int | None = None) -> bool:
    if size is None or (size == 0 and isinstance(fs, LocalFileSystem)):
        try:
            size = fs.size(path)
        except OSError:
            return False  # the read reports it
    return (size or 0) > cfg.max_file_bytes


def _too_big_message(name: str, size: int | None, cfg: SourceConfig) -> str:
    return f"{name} is {size} bytes, over the limit of {cfg.max_file_bytes} (source.max_file_bytes); it was not read"
