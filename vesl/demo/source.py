"""``synth://N?seed=S&shard_size=K``: the synthetic world as a labeling input, declared to the product as the
``synth`` entry point of the ``vesl.sources`` group (``pyproject.toml``)."""

from __future__ import annotations

from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit

from vesl.errors import UserError
from vesl.pipeline.sources import SourceScheme
from vesl.schemas.stage import Sample

PREFIX = "synth://"
DEFAULT_SHARD_SIZE = 100


def params(uri: str) -> tuple[int, int, int, int | None]:
    """``synth://N?seed=S&shard_size=K[&part=P]`` -> (N, S, K, P)."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query)
    unknown = set(query) - {"seed", "shard_size", "part"}
    try:
        if unknown:
            raise ValueError(f"unknown parameter(s) {sorted(unknown)}")
        n = int(parts.netloc)
        seed = int(query.get("seed", ["0"])[0])
        size = int(query.get("shard_size", [str(DEFAULT_SHARD_SIZE)])[0])
        part = int(query["part"][0]) if "part" in query else None
        if n <= 0 or size <= 0:
            raise ValueError("N and shard_size must be positive")
    except ValueError as exc:
        raise UserError(f"bad synthetic input {uri!r} ({exc}): write synth://N?seed=S&shard_size=K") from exc
    return n, seed, size, part


def expand(uri: str) -> list[str]:
    """One shard URI per ``shard_size`` scenes (or the one ``part`` named)."""
    n, seed, size, part = params(uri)
    parts = range((n + size - 1) // size) if part is None else [part]
    return [f"synth://{n}?seed={seed}&shard_size={size}&part={p}" for p in parts]


def _indices(uri: str) -> range:
    n, _, size, part = params(uri)
    start = (part or 0) * size
    return range(start, min(start + size, n))


def read(uri: str, source: str) -> Iterator[Sample]:
    from vesl.demo.synth import make_scene

    _, seed, _, _ = params(uri)
    for index, i in enumerate(_indices(uri)):
        scene = make_scene(seed, i)
        yield Sample(key=scene.key, source_shard=source, index=index, image_bytes=scene.image, alt_text=scene.alt_text)


def count(uri: str) -> int:
    return len(_indices(uri))


SYNTH = SourceScheme(kind="synth", expand=expand, read=read, count=count)
