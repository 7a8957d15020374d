"""`vesl show`: look at pseudo-labels before trusting them.

Writes ``OUT/index.html`` (each image with its boxes and phrases, and its caption with the grounded
phrases highlighted from their char spans), ``OUT/images/*.png`` (the per-image renderings the HTML
shows) and ``OUT/contact_sheet.png`` (all of them on one sheet). Opens nothing; output bytes depend on
the data only.
"""

from __future__ import annotations

import html
import io
import math
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont, ImageOps

from vesl.errors import UserError

PALETTE = (
    (255, 0, 255), (0, 230, 255), (255, 140, 0), (0, 255, 0), (255, 40, 90), (120, 90, 255),
    (255, 255, 0), (0, 140, 255), (190, 255, 80), (255, 110, 200), (0, 200, 140), (255, 200, 120),
)
_TEXT_COLUMNS = ["key", "width", "height", "alt_text", "caption", "regions"]


def region_color(i: int) -> tuple[int, int, int]:
    return PALETTE[i % len(PALETTE)]


def _hex(c: tuple[int, int, int]) -> str:
    return "#{:02x}{:02x}{:02x}".format(*c)


def box_to_pixels(box: list[float], width: int, height: int) -> tuple[int, int, int, int]:
    """Normalized ``x0, y0, x1, y1`` to integer pixel corners inside a ``width`` x ``height`` image."""
    x0, y0, x1, y1 = box
    clamp = lambda v, hi: max(0, min(hi - 1, int(round(v))))  # noqa: E731
    return clamp(x0 * width, width), clamp(y0 * height, height), clamp(x1 * width, width), clamp(y1 * height, height)


def phrase_matches(phrase: str, query: str) -> bool:
    """Case-insensitive whole-word match: 'circle' matches 'red circle', not 'circles'."""
    return re.search(rf"(?<!\w){re.escape(query.strip().lower())}(?!\w)", phrase.lower()) is not None


def load_image(row: dict[str, Any]) -> Image.Image | None:
    """The row's image (bytes, else ``image_uri`` via fsspec), EXIF-oriented RGB; None if unreadable."""
    data = row.get("image")
    try:
        if data is None and row.get("image_uri"):
            import fsspec

            with fsspec.open(row["image_uri"], "rb") as f:
                data = f.read()
        if data is None:
            return None
        img = Image.open(io.BytesIO(data))
        return ImageOps.exif_transpose(img).convert("RGB")
    except Exception:  # a broken image must not stop the gallery; it shows a placeholder
        return None


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def render_image(row: dict[str, Any], max_side: int = 512, max_upscale: float = 4.0) -> Image.Image:
    """The image scaled to fit ``max_side``, with each region's box outline and a phrase/score label."""
    w, h = int(row.get("width") or 0), int(row.get("height") or 0)
    img = load_image(row)
    if img is None:
        from vesl.pipeline.confine import ALLOW_ANY_IMAGE_URI, OUTSIDE

        w, h = (w, h) if w > 0 and h > 0 else (max_side, max_side)
        img = Image.new("RGB", (w, h), (60, 60, 60))
        why = f"image outside the dataset\n({ALLOW_ANY_IMAGE_URI})" if row.get(OUTSIDE) else "image unavailable"
        ImageDraw.Draw(img).text((4, 4), why, fill=(230, 230, 230), font=_font(12))
    scale = min(max_side / max(img.size), max_upscale)
    size = (max(1, round(img.width * scale)), max(1, round(img.height * scale)))
    if size != img.size:
        img = img.resize(size, Image.Resampling.BILINEAR)
    draw = ImageDraw.Draw(img)
    line = max(2, round(min(size) / 160))
    font = _font(max(10, round(min(size) / 20)))
    regions = row.get("regions") or []
    for i, r in enumerate(regions):
        x0, y0, x1, y1 = box_to_pixels(r["box"], *size)
        draw.rectangle([x0, y0, x1, y1], outline=region_color(i), width=line)
    for i, r in enumerate(regions):  # labels after all boxes so no outline crosses a label
        x0, y0, _, _ = box_to_pixels(r["box"], *size)
        label = f"{r['phrase']} {r['score']:.2f}"
        tb = draw.textbbox((0, 0), label, font=font)
        tw, th = tb[2] - tb[0] + 4, tb[3] - tb[1] + 4
        ty = y0 - th if y0 - th >= 0 else y0 + line
        tx = min(x0, max(0, size[0] - tw))
        draw.rectangle([tx, ty, tx + tw, ty + th], fill=region_color(i))
        draw.text((tx + 2 - tb[0], ty + 2 - tb[1]), label, fill=(0, 0, 0), font=font)
    return img


def caption_html(caption: str, regions: list[dict[str, Any]]) -> str:
    """The caption as HTML with each grounded span in a <mark> of its region's color (overlaps allowed)."""
    n = len(caption)
    cuts = {0, n}
    spans = []
    for i, r in enumerate(regions):
        s, e = max(0, int(r["char_start"])), min(n, int(r["char_end"]))
        if s < e:
            spans.append((s, e, i))
            cuts.update((s, e))
    cuts_sorted = sorted(cuts)
    parts = []
    for a, b in zip(cuts_sorted, cuts_sorted[1:], strict=False):
        text = html.escape(caption[a:b])
        covering = [i for s, e, i in spans if s <= a and b <= e]
        if not covering:
            parts.append(text)
            continue
        c = region_color(covering[0])
        title = "; ".join(f"{regions[i]['phrase']} ({regions[i]['score']:.2f})" for i in covering)
        parts.append(
            f'<mark style="background:rgba({c[0]},{c[1]},{c[2]},0.35);border-bottom:3px solid {_hex(c)}" '
            f'data-regions="{",".join(map(str, covering))}" title="{html.escape(title)}">{text}</mark>'
        )
    return "".join(parts)


def _select(dataset_dir: Path, n: int, query: str | None) -> Iterator[dict[str, Any]]:
    """Rows in shard order; with a query, only rows with a matching region (images read only for those)."""
    from vesl.schemas.dataset import data_shards

    taken = 0
    for shard in data_shards(dataset_dir):
        pf = pq.ParquetFile(shard)
        names = pf.schema_arrow.names
        text_cols = [c for c in _TEXT_COLUMNS if c in names]
        for rg in range(pf.num_row_groups):
            meta = pf.read_row_group(rg, columns=text_cols).to_pylist()
            idx = [i for i, r in enumerate(meta)
                   if query is None or any(phrase_matches(x["phrase"], query) for x in r["regions"] or [])]
            if not idx:
                continue
            idx = idx[: n - taken]
            img_cols = [c for c in ("image", "image_uri") if c in names]
            imgs = pf.read_row_group(rg, columns=img_cols).take(idx).to_pylist() if img_cols else [{}] * len(idx)
            for i, extra in zip(idx, imgs, strict=True):
                yield {**meta[i], **extra}
            taken += len(idx)
            if taken >= n:
                return


def contact_sheet(tiles: list[tuple[Image.Image, str]], cell: int = 256, cols: int | None = None) -> Image.Image:
    """Thumbnails in a grid, each with a one-line label under it."""
    cols = cols or max(1, min(len(tiles), math.ceil(math.sqrt(len(tiles) * 1.5))))
    rows = max(1, math.ceil(len(tiles) / cols))
    font = _font(max(10, cell // 20))
    label_h = max(14, cell // 14)
    pad = 4
    sheet = Image.new("RGB", (cols * (cell + pad) + pad, rows * (cell + label_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (img, label) in enumerate(tiles):
        thumb = img.copy()
        thumb.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        x = pad + (k % cols) * (cell + pad)
        y = pad + (k // cols) * (cell + label_h + pad)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        text = label
        while text and draw.textlength(text, font=font) > cell:
            text = text[:-2] + "…" if len(text) > 2 else ""
        draw.text((x, y + cell + 1), text, fill=(20, 20, 20), font=font)
    return sheet


_CSS = """
body{font-family:system-ui,sans-serif;margin:16px;background:#fafafa;color:#222}
.grid{display:flex;flex-wrap:wrap;gap:16px}
figure{margin:0;width:520px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:8px}
figure img{max-width:100%;height:auto;display:block}
.key{font-family:monospace;font-size:12px;color:#666}
.caption{line-height:1.6}
.alt{font-size:12px;color:#777}
ul.regions{font-size:13px;padding-left:18px;margin:4px 0}
.sw{display:inline-block;width:10px;height:10px;margin-right:4px;border:1px solid #333}
"""


def _figure_html(k: int, row: dict[str, Any], img_rel: str, size: tuple[int, int]) -> str:
    regions = row.get("regions") or []
    items = "".join(
        f'<li><span class="sw" style="background:{_hex(region_color(i))}"></span>'
        f"{html.escape(r['phrase'])} <small>{r['score']:.2f}</small></li>"
        for i, r in enumerate(regions)
    )
    key = html.escape(str(row.get("key")))
    return (
        f'<figure id="item-{k}" data-key="{key}">'
        f'<img src="{html.escape(img_rel)}" width="{size[0]}" height="{size[1]}" alt="{key}">'
        f'<figcaption><div class="key">{key} · {len(regions)} region(s)</div>'
        f'<p class="caption">{caption_html(row.get("caption") or "", regions)}</p>'
        f'<ul class="regions">{items}</ul>'
        f'<p class="alt">alt-text: {html.escape(row.get("alt_text") or "")}</p></figcaption></figure>'
    )


def gallery_rows(dataset_dir: Path, n: int, query: str | None, allow_any_image_uri: bool) -> list[dict[str, Any]]:
    """The rows a gallery shows, confined (:func:`vesl.pipeline.confine.confine_row`) unless allowed."""
    from vesl.pipeline.confine import confine_row, image_uri_roots

    roots = None if allow_any_image_uri else image_uri_roots(dataset_dir)
    return [confine_row(r, roots) for r in _select(dataset_dir, n, query)]


def render_gallery(
    dataset_dir: str | Path,
    out_dir: str | Path,
    n: int = 50,
    query: str | None = None,
    cell: int = 256,
    max_side: int = 512,
    allow_any_image_uri: bool = False,
    rows: list[dict[str, Any]] | None = None,
) -> tuple[Path, Path]:
    """Render the first ``n`` images (with ``query``: those with a matching phrase); returns (html, png).

    A row's ``image_uri`` is read only inside the dataset and its job's inputs, unless
    ``allow_any_image_uri`` (other rows show a placeholder that says so). ``rows``: the
    :func:`gallery_rows` already selected, for a caller that also reports on them.
    """
    if n < 1:
        raise UserError(f"--n must be at least 1, got {n}")
    if query is not None and not query.strip():
        raise UserError("--query is empty; pass a phrase such as --query 'red circle', or leave it out")
    d, out = Path(dataset_dir), Path(out_dir)
    if rows is None:
        rows = gallery_rows(d, n, query, allow_any_image_uri)
    if not rows and query is None:
        raise UserError(f"{d} has no rows to show (every sample failed?); see the errors files or `vesl inspect {d}`")
    if not rows:
        raise UserError(
            f"no image in {d} has a region matching {query!r}; try a shorter phrase (`vesl inspect {d}` "
            "lists the phrases)"
        )
    (out / "images").mkdir(parents=True, exist_ok=True)
    for old in (out / "images").glob("[0-9][0-9][0-9][0-9][0-9].png"):  # a previous, larger rendering
        old.unlink()
    figures, tiles = [], []
    for k, row in enumerate(rows):
        img = render_image(row, max_side=max_side)
        rel = f"images/{k:05d}.png"
        img.save(out / rel, format="PNG")
        figures.append(_figure_html(k, row, rel, img.size))
        tiles.append((img, f"{row.get('key')} · {len(row.get('regions') or [])} regions"))
    png = out / "contact_sheet.png"
    contact_sheet(tiles, cell=cell).save(png, format="PNG", optimize=True)
    title = f"vesl gallery: {d.name}" + (f" — {query}" if query else "")
    doc = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{len(rows)} image(s); boxes and highlighted phrases share a color. "
        f'<a href="contact_sheet.png">contact sheet</a></p><div class="grid">\n'
        + "\n".join(figures)
        + "\n</div></body></html>\n"
    )
    page = out / "index.html"
    page.write_text(doc, encoding="utf-8")
    return page, png
