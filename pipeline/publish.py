"""`vesl publish`: turn a labeled region-text directory into a dataset others can trust and load.

It validates first and writes nothing unless the data are valid. Then it writes, next to the shards:

- ``README.md``: a Hugging Face dataset card (YAML front matter with ``configs``/``data_files``,
  ``dataset_info.features``, license, task and size categories) plus statistics, plots, a sample
  gallery, provenance and the shard checksums;
- ``card/stats.json``, ``card/plots/*.png``, ``card/gallery/`` (HTML + contact sheet);
- ``checksums.sha256`` (``sha256sum -c`` format) over every published file.

Everything is a pure function of the data: re-publishing the same shards gives the same bytes
(no dates, no library versions in PNG metadata, sorted keys everywhere).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vesl.errors import UserError
from vesl.schemas.dataset import InvalidDataset, data_shards, shard_provenance
from vesl.schemas.region_text import SCHEMA_VERSION, region_text_schema
from vesl.schemas.statistics import HIST_BINS, compute_stats
from vesl.schemas.validation import validate

DATA_FILES_PATTERN = "part-*[0-9].parquet"  # selects shards, never *.errors.parquet
CARD_DIR = "card"
CHECKSUMS_FILE = "checksums.sha256"
TASK_CATEGORIES = ("object-detection", "zero-shot-object-detection", "image-to-text")
_SPDX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.+-]*$")


# ---------------------------------------------------------------- plots


def _save_png(fig: Any, path: Path) -> None:
    # no Software/date chunks: the bytes depend on the data only
    fig.savefig(path, format="png", dpi=100, metadata={"Software": None})


def _coarse(hist: list[int], bins: int) -> list[int]:
    step = HIST_BINS // bins
    return [sum(hist[i : i + step]) for i in range(0, HIST_BINS, step)]


def write_plots(stats: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Four PNG plots (Agg canvas, no pyplot global state)."""
    import matplotlib
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}

    def new_fig(w: float = 5.0, h: float = 3.2) -> tuple[Any, Any]:
        fig = Figure(figsize=(w, h))
        FigureCanvasAgg(fig)
        return fig, fig.add_subplot(1, 1, 1)

    with matplotlib.rc_context({"font.size": 9, "axes.grid": True, "grid.alpha": 0.3}):
        fig, ax = new_fig()
        hist = stats["regions_per_image"]["histogram"]
        ax.bar([int(k) for k in hist], list(hist.values()), color="#4c72b0", width=0.8)
        ax.set_xlabel("regions per image")
        ax.set_ylabel("images")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(f"regions per image (mean {stats['regions_per_image']['mean']:.2f})")
        fig.tight_layout()
        paths["regions_per_image"] = out_dir / "regions_per_image.png"
        _save_png(fig, paths["regions_per_image"])

        for key, label, color in (("_score_hist", "detector score", "#55a868"),
                                  ("_area_hist", "box area (fraction of image)", "#c44e52")):
            fig, ax = new_fig()
            bins = 20 if key == "_score_hist" else 25
            counts = _coarse(stats[key], bins)
            ax.bar([(i + 0.5) / bins for i in range(bins)], counts, width=1 / bins * 0.95, color=color)
            ax.set_xlim(0, 1)
            ax.set_xlabel(label)
            ax.set_ylabel("regions")
            ax.set_title(label + " distribution")
            fig.tight_layout()
            name = "score_histogram" if key == "_score_hist" else "box_size"
            paths[name] = out_dir / f"{name}.png"
            _save_png(fig, paths[name])

        top = stats["top_phrases"][:20][::-1]
        fig, ax = new_fig(5.0, max(2.0, 0.22 * len(top) + 0.8))
        ax.barh([p for p, _ in top], [c for _, c in top], color="#8172b2")
        ax.set_xlabel("regions")
        ax.set_title(f"top phrases ({stats['distinct_phrases']} distinct)")
        fig.tight_layout()
        paths["top_phrases"] = out_dir / "top_phrases.png"
        _save_png(fig, paths["top_phrases"])
    return paths


# ---------------------------------------------------------------- the card


def features_yaml(schema: pa.Schema | None = None) -> list[dict[str, Any]]:
    """``dataset_info.features`` in the Hugging Face YAML form, derived from the Arrow schema."""

    def feature(t: pa.DataType) -> dict[str, Any]:
        if pa.types.is_struct(t):
            return {"struct": [{"name": f.name, **feature(f.type)} for f in t]}
        if pa.types.is_fixed_size_list(t) or pa.types.is_list(t):
            inner = feature(t.value_type)
            out: dict[str, Any] = {"list": inner.get("dtype", inner.get("struct", inner))}
            if pa.types.is_fixed_size_list(t):
                out["length"] = t.list_size
            return out
        names = {"float": "float32", "double": "float64", "halffloat": "float16"}
        return {"dtype": names.get(str(t), str(t))}

    schema = schema or region_text_schema()
    # `image` holds encoded image bytes: the Image feature makes `datasets` decode it to PIL, as on the hub
    return [{"name": f.name, **({"dtype": "image"} if f.name == "image" else feature(f.type))} for f in schema]


def size_category(n: int) -> str:
    bounds = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
              (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B")]
    for bound, label in bounds:
        if n < bound:
            return label
    return "1B<n<10B"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _flatten(d: Any, prefix: str = "") -> list[tuple[str, str]]:
    if isinstance(d, dict):
        out = []
        for k in sorted(d):
            out += _flatten(d[k], f"{prefix}.{k}" if prefix else str(k))
        return out
    return [(prefix, json.dumps(d) if not isinstance(d, str) else d)]


def _md_text(s: Any) -> str:
    """Text for a markdown heading or paragraph: HTML escaped (no raw tags reach the rendered card)."""
    import html

    return html.escape(str(s), quote=False).replace("\n", " ")


def _md_cell(s: Any) -> str:
    """Text for a markdown table cell: HTML escaped, pipes escaped, one line."""
    return _md_text(s).replace("|", "\\|")


def render_card(
    name: str,
    license_id: str,
    description: str | None,
    stats: dict[str, Any],
    provenances: list[tuple[dict[str, Any], list[str]]],
    shard_rows: list[tuple[str, int, int, str]],
    sizes: dict[str, int],
    plots: dict[str, str],
    gallery_png: str,
    gallery_html: str,
) -> str:
    """The README.md text: YAML front matter then human-readable sections."""
    import yaml

    import vesl

    front = {
        "pretty_name": name,
        "license": license_id.lower(),
        "language": ["en"],
        "task_categories": list(TASK_CATEGORIES),
        "tags": ["region-text", "grounding", "vesl", "cloc"],
        "size_categories": [size_category(stats["images"])],
        "configs": [{"config_name": "default", "data_files": [{"split": "train", "path": DATA_FILES_PATTERN}]}],
        "dataset_info": {
            "features": features_yaml(),
            "splits": [{"name": "train", "num_bytes": sizes["num_bytes"], "num_examples": stats["images"]}],
            "download_size": sizes["download_size"],
            "dataset_size": sizes["num_bytes"],
        },
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False, allow_unicode=True).rstrip(), "---", ""]
    lines += [f"# {_md_text(name)}", ""]
    if description:
        lines += [description.strip(), ""]
    lines += [
        "Region-text data made by vesl (VESL labeling, as in CLOC): each row is one image with a "
        "detailed caption and `regions`, the caption's noun phrases grounded to boxes "
        f"(schema v{SCHEMA_VERSION}; boxes are `x0, y0, x1, y1` normalized to [0, 1]; "
        "`caption[char_start:char_end] == phrase`).",
        "",
        "## Load it",
        "",
        "```python",
        "import datasets",
        'ds = datasets.load_dataset("path/to/this/dir", split="train")  # uses the configs above',
        f'ds = datasets.load_dataset("parquet", data_dir="path/to/this/dir", data_files="{DATA_FILES_PATTERN}")',
        "```",
        "",
        "```sql",
        "-- duckdb: phrase counts over all regions",
        f"SELECT r.phrase, count(*) FROM (SELECT unnest(regions) AS r FROM '{DATA_FILES_PATTERN}') GROUP BY 1;",
        "```",
        "",
        "## Statistics",
        "",
        "| | |",
        "|---|---|",
        f"| images | {stats['images']} |",
        f"| regions | {stats['regions']} |",
        f"| regions per image (mean / max) | {stats['regions_per_image']['mean']} / {stats['regions_per_image']['max']} |",
        f"| images without regions | {stats['images_without_regions']} |",
        f"| distinct phrases | {stats['distinct_phrases']} |",
        f"| shards | {stats['shards']} |",
        f"| errors (samples left out) | {stats['errors']['total']} |",
        "",
    ]
    for key, label in (("score", "detector score"), ("box_area", "box area (fraction of image)")):
        q = stats[key]
        lines += [f"**{label}**: " + ", ".join(f"{k} {v}" for k, v in q.items()), ""]
    if stats["caption_source"]:
        lines += ["**caption source**: " + ", ".join(f"{k} {v}" for k, v in stats["caption_source"].items()), ""]
    if stats["errors"]["by_type"]:
        lines += ["### Errors by type (stage/error type)", "", "| stage/type | samples |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | {v} |" for k, v in stats["errors"]["by_type"].items()]
        lines += [""]
    lines += ["### Top phrases", "", "| phrase | regions |", "|---|---|"]
    lines += [f"| {_md_cell(p)} | {c} |" for p, c in stats["top_phrases"]]
    lines += ["", "## Plots", ""]
    lines += [f"![{k.replace('_', ' ')}]({v})" for k, v in plots.items()]
    lines += ["", "## Sample gallery", "",
              f"![sample gallery]({gallery_png})", "",
              f"Boxes and phrases drawn on the images; the [HTML gallery]({gallery_html}) also shows each "
              "caption with its grounded phrases highlighted.", ""]
    lines += ["## Provenance", ""]
    if not provenances:
        lines += ["No provenance recorded in the shard metadata.", ""]
    for prov, shards in provenances:
        if len(provenances) > 1:
            lines += [f"Shards: {', '.join(shards)}", ""]
        lines += ["| key | value |", "|---|---|"]
        lines += [f"| {_md_cell(k)} | `{_md_cell(v)}` |" for k, v in _flatten(prov)]
        lines += [""]
    lines += [f"Published with vesl {vesl.__version__}; schema version {SCHEMA_VERSION}.", ""]
    lines += ["## Checksums", "",
              f"`{CHECKSUMS_FILE}` lists the sha256 of every file (`sha256sum -c {CHECKSUMS_FILE}`). Data shards:", "",
              "| file | rows | bytes | sha256 |", "|---|---|---|---|"]
    limit = 100
    lines += [f"| {f} | {r} | {b} | `{h}` |" for f, r, b, h in shard_rows[:limit]]
    if len(shard_rows) > limit:
        lines += [f"| ... {len(shard_rows) - limit} more in `{CHECKSUMS_FILE}` | | | |"]
    lines += [""]
    return "\n".join(lines)


@dataclass(frozen=True)
class PublishResult:
    card: Path
    stats: Path
    plots: dict[str, Path]
    gallery_html: Path
    gallery_png: Path
    checksums: Path
    note: str | None = None  # one line for the user: gallery rows whose image lies outside the dataset


def _check_license(license_id: str) -> None:
    if not license_id or not _SPDX_RE.match(license_id):
        raise UserError(
            f"--license {license_id!r} is not an SPDX identifier; pass one like Apache-2.0, CC-BY-4.0, MIT "
            "(or 'other')"
        )


def publish(
    dataset_dir: str | Path,
    name: str,
    license_id: str,
    description: str | None = None,
    gallery_n: int = 16,
    allow_any_image_uri: bool = False,
) -> PublishResult:
    """Validate, then write the dataset card, stats, plots, gallery and checksums into ``dataset_dir``.

    The gallery reads a row's ``image_uri`` only inside the dataset and its job's inputs unless
    ``allow_any_image_uri``; the result's ``note`` says how many it left out, and why.
    """
    from vesl.pipeline.confine import OUTSIDE, outside_note
    from vesl.pipeline.gallery import gallery_rows, render_gallery

    d = Path(dataset_dir)
    if not name or not name.strip():
        raise UserError("--name is empty; pass the dataset's display name, e.g. --name my-region-text")
    _check_license(license_id)
    shards = data_shards(d)
    uncommitted = [s.name for s in shards if not s.with_suffix(".stats.json").exists()]
    if uncommitted and len(uncommitted) < len(shards):
        raise UserError(
            f"{len(uncommitted)} shard(s) are not committed (no .stats.json), e.g. {uncommitted[0]}; "
            "re-run the same `vesl label` command to finish them before publishing"
        )
    violations = validate(d)  # rows and, for a `vesl label` output, its commit files (as `vesl validate`)
    if violations:
        raise InvalidDataset(violations)

    stats = compute_stats(d)
    if stats["images"] == 0:
        raise UserError(f"{d} has no rows to publish (every sample failed?); see its *.errors.parquet files")
    card_dir = d / CARD_DIR
    plots = write_plots(stats, card_dir / "plots")
    shown = gallery_rows(d, gallery_n, None, allow_any_image_uri)
    html, png = render_gallery(d, card_dir / "gallery", n=gallery_n, rows=shown)

    public_stats = {k: v for k, v in stats.items() if not k.startswith("_")}
    stats_path = card_dir / "stats.json"
    stats_path.write_text(json.dumps(public_stats, indent=2, sort_keys=True) + "\n")

    by_prov: dict[str, list[str]] = {}
    shard_rows = []
    sizes = {"num_bytes": 0, "download_size": 0}
    for s in shards:
        prov = shard_provenance(s)
        by_prov.setdefault(json.dumps(prov, sort_keys=True), []).append(s.name)
        meta = pq.ParquetFile(s).metadata
        shard_rows.append((s.name, meta.num_rows, s.stat().st_size, sha256_file(s)))
        # uncompressed column bytes: the Hub's notion of num_bytes (in-memory Arrow size), read off the footer
        sizes["num_bytes"] += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        sizes["download_size"] += s.stat().st_size
    provenances = [(json.loads(k), v) for k, v in by_prov.items() if k != "{}"]

    rel = lambda p: p.relative_to(d).as_posix()  # noqa: E731
    card = render_card(
        name, license_id, description, public_stats, provenances, shard_rows, sizes,
        {k: rel(p) for k, p in plots.items()}, rel(png), rel(html),
    )
    card_path = d / "README.md"
    card_path.write_text(card, encoding="utf-8")

    files = [p for p in d.rglob("*") if p.is_file() and p.name != CHECKSUMS_FILE and not p.name.startswith(".")]
    lines = [f"{sha256_file(p)}  {rel(p)}" for p in sorted(files, key=rel)]
    checksums = d / CHECKSUMS_FILE
    checksums.write_text("\n".join(lines) + "\n")
    note = outside_note(sum(bool(r.get(OUTSIDE)) for r in shown), "gallery row(s)")
    return PublishResult(card_path, stats_path, plots, html, png, checksums, note)
