"""A corpus of broken and awkward inputs, generated here: each bad one is exactly one error row, every good one decodes."""

from __future__ import annotations

import io
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from vesl.pipeline.apply import apply_stage
from vesl.pipeline.config import DecodeConfig, SourceConfig
from vesl.pipeline.decode import DecodeStage, decode_image, to_rgb
from vesl.pipeline.sources import list_shards, read_shard

LIMIT = 50_000  # a small configured bomb limit: 300x300 is over it


def _save(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, fmt, **kw)
    return buf.getvalue()


def _exif_rotated() -> bytes:
    """Stored 40x20, left half red, EXIF orientation 6: a viewer shows it 20x40 with red on top."""
    im = Image.new("RGB", (40, 20), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    return _save(im, "JPEG", exif=exif.tobytes(), quality=95)


def _png_header_bomb(w: int = 30_000, h: int = 30_000) -> bytes:
    """A 900-megapixel PNG in a few hundred bytes: only the header is real."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")


def _truncated_jpeg() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = _save(Image.fromarray(noise), "JPEG", quality=90)
    return data[: len(data) // 2]


def _p_with_transparency() -> bytes:
    im = Image.new("P", (10, 10), 1)
    im.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)
    im.paste(0, (0, 0, 5, 10))
    return _save(im, "PNG", transparency=0)  # left half transparent -> white, right half green


GOOD = {
    # key: (image bytes, expected (w, h), a pixel to check, expected RGB there)
    "rgb_jpeg": (_save(Image.new("RGB", (30, 20), (250, 10, 10)), "JPEG", quality=95), (30, 20), (5, 5), (250, 10, 10)),
    "exif_rotated": (_exif_rotated(), (20, 40), (10, 5), (255, 0, 0)),
    "cmyk_jpeg": (_save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95), (16, 16), (8, 8), (255, 0, 0)),
    "la_png": (_save(Image.new("LA", (12, 12), (0, 0)), "PNG"), (12, 12), (3, 3), (255, 255, 255)),
    "p_png": (_p_with_transparency(), (10, 10), (8, 5), (0, 255, 0)),
    "p_png_transparent": (_p_with_transparency(), (10, 10), (1, 5), (255, 255, 255)),
    "i16_png": (_save(Image.fromarray(np.full((8, 8), 32768, np.uint16)), "PNG"), (8, 8), (4, 4), (128, 128, 128)),
    "f_tiff": (_save(Image.fromarray(np.full((8, 8), 0.5, np.float32)), "TIFF"), (8, 8), (4, 4), (128, 128, 128)),
    "rgba_webp": (_save(Image.new("RGBA", (8, 8), (0, 0, 255, 255)), "WEBP", lossless=True), (8, 8), (4, 4), (0, 0, 255)),
}

BAD = {
    # key: (image bytes, caption bytes, expected stage, expected error_type, a word in the message)
    "bomb_over_limit": (_save(Image.new("RGB", (300, 300)), "PNG"), b"big", "decode", "DecompressionBomb", "max_image_pixels"),
    "bomb_png_header": (_png_header_bomb(), b"bomb", "decode", "DecompressionBomb", "pixels"),
    "truncated_jpeg": (_truncated_jpeg(), b"cut", "decode", "TruncatedImage", "truncated"),
    "zero_bytes": (b"", b"empty file", "decode", "EmptyFile", "0 bytes"),
    "text_file": (b"hello, I am a text file pretending to be a jpg\n" * 5, b"text", "decode", "NotAnImage", "not an image"),
    "non_utf8_caption": (GOOD["rgb_jpeg"][0], b"caf\xe9 au lait", "read", "CaptionEncoding", "UTF-8"),
    "empty_caption": (GOOD["rgb_jpeg"][0], b"  \n", "decode", "EmptyCaption", "empty"),
    "long_caption": (GOOD["rgb_jpeg"][0], b"x" * 10_001, "decode", "CaptionTooLong", "10001"),
}


def _corpus_tar(path) -> None:
    with tarfile.open(path, "w") as tar:
        items = [(k, v[0], f"caption for {k}".encode()) for k, v in GOOD.items()]
        items += [(k, v[0], v[1]) for k, v in BAD.items()]
        for key, image, caption in sorted(items):
            for ext, data in (("jpg", image), ("txt", caption)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_broken_corpus_gives_one_error_row_each(tmp_path):
    _corpus_tar(tmp_path / "00000.tar")
    cfg = DecodeConfig(max_image_pixels=LIMIT)
    stage = DecodeStage(cfg)
    stage.setup()
    pillow_limit = Image.MAX_IMAGE_PIXELS
    (ref,) = list_shards([str(tmp_path)], SourceConfig())
    samples = list(read_shard(ref, SourceConfig()))
    assert len(samples) == len(GOOD) + len(BAD)
    for i in range(0, len(samples), 4):  # batches of 4, as an engine would
        apply_stage(stage, samples[i : i + 4])
    assert Image.MAX_IMAGE_PIXELS == pillow_limit  # no global state touched

    errors = {s.key: s.error for s in samples if not s.ok}
    assert set(errors) == set(BAD)
    for key, (_img, _cap, stage_name, error_type, word) in BAD.items():
        err = errors[key]
        assert (err.stage, err.error_type) == (stage_name, error_type), key
        assert word.lower() in err.message.lower(), (key, err.message)

    good = {s.key: s for s in samples if s.ok}
    assert set(good) == set(GOOD)
    for key, (_data, size, xy, rgb) in GOOD.items():
        s = good[key]
        assert s.image.mode == "RGB", key
        assert (s.width, s.height) == s.image.size == size, key
        assert s.image.getpixel(xy) == pytest.approx(rgb, abs=12), key
        assert s.image_bytes == GOOD[key][0]  # kept by default for the output rows
    for s in samples:
        if not s.ok:
            assert s.image is None


def test_empty_alt_text_can_be_allowed_and_bytes_dropped():
    data = GOOD["rgb_jpeg"][0]
    from vesl.schemas.stage import Sample

    stage = DecodeStage(DecodeConfig(allow_empty_alt_text=True, keep_image_bytes=False))
    s = Sample(key="k", source_shard="x", image_bytes=data, alt_text="")
    stage([s])
    assert s.ok
    assert s.image.size == (30, 20)
    assert s.image_bytes is None
    assert stage.provenance()["decode.allow_empty_alt_text"] == "true"


def test_limit_is_checked_before_pixels_are_decoded():
    # the header bomb has almost no pixel data: if it were loaded it would fail as truncated instead
    with pytest.raises(Exception, match="over the limit") as info:
        decode_image(_png_header_bomb(300, 300), max_pixels=LIMIT)
    assert info.value.kind == "DecompressionBomb"
    assert decode_image(_save(Image.new("RGB", (300, 300)), "PNG"), max_pixels=90_000).size == (300, 300)


def test_sixteen_bit_scaled_not_clipped():
    ramp = np.linspace(0, 65535, 256).astype(np.uint16).reshape(16, 16)
    rgb = np.asarray(to_rgb(Image.fromarray(ramp)))
    assert rgb.shape == (16, 16, 3)
    assert rgb[0, 0, 0] == 0
    assert rgb[-1, -1, 0] == 255
    assert 120 <= rgb[8, 0, 0] <= 136  # mid-ramp stays mid-grey (Pillow's convert would give 255)
