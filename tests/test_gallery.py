"""`vesl show`: boxes drawn where the boxes are, captions highlighted from char spans (escaped),
--query filtering, and a page that headless Chromium renders."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from tests.region_dataset import write_region_dataset
from vesl.errors import UserError
from vesl.pipeline.gallery import (
    box_to_pixels,
    caption_html,
    phrase_matches,
    region_color,
    render_gallery,
    render_image,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_region_dataset(tmp_path_factory.mktemp("gal") / "ds", n_images=12, n_shards=2)


@pytest.fixture(scope="module")
def gallery(dataset, tmp_path_factory) -> tuple[Path, Path]:
    return render_gallery(dataset, tmp_path_factory.mktemp("out") / "gallery", n=50)


def _rows(d: Path) -> list[dict]:
    return pq.read_table(sorted(d.glob("part-*[0-9].parquet"))).to_pylist()


def _close(a, b, tol=8) -> bool:
    return all(abs(x - y) <= tol for x, y in zip(a, b, strict=True))


class _Marks(HTMLParser):
    """Collects the text inside each <mark>, per <figure>."""

    def __init__(self) -> None:
        super().__init__()
        self.figures: list[dict] = []
        self._in_mark = False

    def handle_starttag(self, tag, attrs):
        if tag == "figure":
            self.figures.append({"key": dict(attrs)["data-key"], "marks": [], "text": ""})
        elif tag == "mark":
            self._in_mark = True
            self.figures[-1]["marks"].append("")

    def handle_endtag(self, tag):
        if tag == "mark":
            self._in_mark = False

    def handle_data(self, data):
        if self.figures:
            self.figures[-1]["text"] += data
            if self._in_mark:
                self.figures[-1]["marks"][-1] += data


def test_box_outlines_are_drawn_at_the_box_edges(dataset, gallery):
    page, _ = gallery
    rows = _rows(dataset)
    checked = 0
    for k, row in enumerate(rows):
        img = Image.open(page.parent / "images" / f"{k:05d}.png").convert("RGB")
        original = Image.open(__import__("io").BytesIO(row["image"])).convert("RGB")
        sx, sy = img.width / original.width, img.height / original.height
        for i, r in enumerate(row["regions"]):
            color = region_color(i)
            x0, y0, x1, y1 = box_to_pixels(r["box"], img.width, img.height)
            my = (y0 + y1) // 2
            mx = (x0 + x1) // 2
            # the outline sits on the left, right and bottom edges (the label may cover the top)
            for px in ((x0 + 1, my), (x1 - 1, my), (mx, y1 - 1)):
                assert img.getpixel(px) == color, (row["key"], i, px)
            # inside: the drawn shape's own color, untouched by the outline
            inside = img.getpixel((mx, my))
            assert not _close(inside, color, 30)
            assert _close(inside, original.getpixel((int(mx / sx), int(my / sy))), 12)
            # outside, left of the box: the background
            if x0 - 8 >= 0:
                outside = img.getpixel((x0 - 8, my))
                assert not _close(outside, color, 30)
            checked += 1
    assert checked == sum(len(r["regions"]) for r in rows) > 10


def test_render_image_without_regions_is_the_image(dataset):
    row = next(r for r in _rows(dataset) if not r["regions"])
    img = render_image(row, max_side=row["width"])
    original = Image.open(__import__("io").BytesIO(row["image"])).convert("RGB")
    assert img.size == original.size
    assert img.tobytes() == original.tobytes()


def test_contact_sheet_shows_every_image_with_boxes(dataset, gallery):
    _, png = gallery
    sheet = Image.open(png).convert("RGB")
    assert sheet.width > 500
    assert sheet.height > 300
    colors = sheet.getcolors(maxcolors=1 << 20)
    near = lambda c: sum(n for n, px in colors if _close(px, c, 40))  # noqa: E731
    assert near(region_color(0)) > 100  # first-region boxes and labels survive the thumbnailing
    assert near(region_color(2)) > 20


def test_caption_highlights_grounded_phrases_and_escapes_html(dataset, gallery):
    page, _ = gallery
    doc = page.read_text(encoding="utf-8")
    parser = _Marks()
    parser.feed(doc)
    rows = {r["key"]: r for r in _rows(dataset)}
    assert [f["key"] for f in parser.figures] == list(rows)
    for fig in parser.figures:
        row = rows[fig["key"]]
        assert fig["marks"] == [r["phrase"] for r in row["regions"]]
        assert row["caption"] in fig["text"]  # the caption comes back intact after HTML unescaping
    assert "&lt;b&gt;&amp;&lt;/b&gt;" in doc
    assert "<b>&</b>" not in doc


def test_caption_html_handles_overlapping_spans():
    regions = [
        {"phrase": "red ball", "char_start": 2, "char_end": 10, "score": 0.9},
        {"phrase": "ball", "char_start": 6, "char_end": 10, "score": 0.5},
    ]
    out = caption_html("a red ball <x>", regions)
    parser = _Marks()
    parser.feed(f'<figure data-key="k">{out}</figure>')
    assert parser.figures[0]["marks"] == ["red ", "ball"]
    assert parser.figures[0]["text"] == "a red ball <x>"
    assert 'data-regions="0,1"' in out  # the overlap names both regions


def test_query_filters_images(dataset, tmp_path):
    rows = _rows(dataset)
    wanted = [r["key"] for r in rows if any(phrase_matches(x["phrase"], "square") for x in r["regions"])]
    assert 0 < len(wanted) < len(rows)
    page, _ = render_gallery(dataset, tmp_path / "q", n=50, query="Square")
    parser = _Marks()
    parser.feed(page.read_text(encoding="utf-8"))
    assert [f["key"] for f in parser.figures] == wanted
    page, _ = render_gallery(dataset, tmp_path / "q2", n=2, query="square")
    parser = _Marks()
    parser.feed(page.read_text(encoding="utf-8"))
    assert [f["key"] for f in parser.figures] == wanted[:2]
    assert len(list((tmp_path / "q2" / "images").glob("*.png"))) == 2
    with pytest.raises(UserError, match="no image"):
        render_gallery(dataset, tmp_path / "q3", query="zebra")
    assert phrase_matches("red circle", "circle")
    assert not phrase_matches("red circles", "circle")


def test_cli_show_prints_the_paths(dataset, tmp_path):
    from vesl.cli import app

    res = CliRunner().invoke(app, ["show", str(dataset), "--n", "3", "--out", str(tmp_path / "g")])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines == [str(tmp_path / "g" / "index.html"), str(tmp_path / "g" / "contact_sheet.png")]
    assert Path(lines[0]).exists()
    assert Path(lines[1]).exists()


def _chromium(budget_s: float = 240.0) -> str | None:
    """Debian's chromium; installed here (root only, at most ``budget_s`` in all) when missing."""
    for name in ("chromium", "chromium-browser"):
        if shutil.which(name):
            return shutil.which(name)
    if os.name != "posix" or os.geteuid() != 0 or not shutil.which("apt-get"):
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    deadline = time.monotonic() + budget_s
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    try:
        for cmd in (install, ["apt-get", "update", "-q"], install):  # update only if the first try fails
            left = deadline - time.monotonic()
            if left < 5:
                return None
            done = subprocess.run(cmd, capture_output=True, timeout=left, env=env).returncode == 0
            if done and cmd is install:
                break
    except (subprocess.TimeoutExpired, OSError):
        return None
    return shutil.which("chromium")


def test_html_renders_in_headless_chromium(gallery, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("Debian's chromium is absent and could not be installed here (needs root, apt-get and network to the Debian mirror, within 240 s); install it with `apt-get install -y chromium`")
    page, _ = gallery
    shot = tmp_path / "shot.png"
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
           f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,900",
           f"--screenshot={shot}", page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert shot.exists(), proc.stderr[-2000:]
    img = Image.open(shot).convert("RGB")
    assert img.size == (1200, 900)
    colors = img.getcolors(maxcolors=1 << 22)
    assert len(colors) > 50  # not a blank page
    near = sum(n for n, px in colors if _close(px, region_color(0), 40))
    assert near > 50  # the images with their box outlines were loaded and painted
