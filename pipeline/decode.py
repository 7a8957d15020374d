"""Decode stage: image bytes -> RGB PIL image with the orientation a viewer would show.

Every way an input can be bad ends as an error row with a reason, never as a crash:
zero-byte and non-image files, truncated data, decompression bombs, and captions that are empty
or too long (non-UTF-8 captions are caught earlier, by the source reader, which still has the bytes).

Empty alt-text: web data often has none, and a VLM recaptioner can work without it, but the
alt-text captioner would write an empty caption and no regions. The default therefore treats an
empty caption as an error; ``decode.allow_empty_alt_text: true`` admits such images.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageCms, ImageOps, UnidentifiedImageError

from vesl.pipeline.config import DecodeConfig
from vesl.schemas.stage import Sample, StageResources, fail

# Web image formats only: Pillow also opens EPS (runs Ghostscript), PSD, FITS and more, none of
# which belong in a web-scale labeling job.
WEB_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF", "JPEG2000", "PPM", "TGA", "ICO", "QOI")
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I;16BS")
_WITH_ALPHA = ("RGBA", "LA", "PA", "La", "RGBa")


class DecodeError(Exception):
    """A sample whose bytes are not a usable image; ``kind`` becomes the error row's error_type."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def _to_uint8(arr: np.ndarray, mode: str) -> np.ndarray:
    """Scale one-channel integer/float pixels to 0..255 without clipping (Pillow's convert clips I;16 at 255)."""
    a = arr.astype(np.float64)
    if mode in _SIXTEEN_BIT:
        scaled = a / 257.0
    else:
        finite = a[np.isfinite(a)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if mode == "F" and lo >= 0.0 and hi <= 1.0:
            scaled = a * 255.0  # float images in [0, 1]
        elif lo >= 0.0 and hi <= 255.0:
            scaled = a  # 8-bit values in a wide container
        elif lo >= 0.0 and hi <= 65535.0:
            scaled = a / 257.0  # 16-bit values (e.g. 16-bit PNG opened as I)
        else:
            scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
    return np.clip(np.nan_to_num(np.rint(scaled)), 0, 255).astype(np.uint8)


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode to RGB: CMYK through its ICC profile, alpha flattened on white, high bit depths scaled."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode == "CMYK":
        icc = im.info.get("icc_profile")
        if icc:
            try:
                src = ImageCms.ImageCmsProfile(io.BytesIO(icc))
                return ImageCms.profileToProfile(im, src, ImageCms.createProfile("sRGB"), outputMode="RGB")
            except (ImageCms.PyCMSError, OSError, ValueError):
                pass  # broken profile: fall back to Pillow's plain conversion
        return im.convert("RGB")
    if mode in _SIXTEEN_BIT or mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im), mode), mode="L").convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    elif mode in _WITH_ALPHA:
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    return im.convert("RGB")


def decode_image(data: bytes | None, max_pixels: int) -> Image.Image:
    """Bytes -> upright RGB image, or DecodeError saying why not.

    The pixel limit is checked on the header size before any pixel is decoded. Pillow's global
    MAX_IMAGE_PIXELS is never changed (other code in the process may rely on it); it still applies
    as an outer ceiling at twice its value.
    """
    if not data:
        raise DecodeError("EmptyFile", "image file is empty (0 bytes)")
    try:
        im = Image.open(io.BytesIO(data), formats=_formats())
    except UnidentifiedImageError as exc:
        raise DecodeError("NotAnImage", f"not an image in a supported format ({', '.join(WEB_FORMATS)}): {exc}") from exc
    except Image.DecompressionBombError as exc:
        raise DecodeError("DecompressionBomb", str(exc)) from exc
    except Exception as exc:
        raise DecodeError("CorruptImage", f"image header is unreadable: {type(exc).__name__}: {exc}") from exc
    w, h = im.size
    if w <= 0 or h <= 0:
        raise DecodeError("CorruptImage", f"image has size {w}x{h}")
    if w * h > max_pixels:
        raise DecodeError(
            "DecompressionBomb",
            f"image is {w}x{h} = {w * h} pixels, over the limit of {max_pixels} (decode.max_image_pixels)",
        )
    try:
        im.load()
    except Exception as exc:
        raise DecodeError("TruncatedImage", f"image data is truncated or corrupt: {type(exc).__name__}: {exc}") from exc
    try:
        upright = ImageOps.exif_transpose(im)
    except Exception:  # a broken EXIF block is not worth losing the image over: keep it as stored
        upright = im
    try:
        return to_rgb(upright)
    except Exception as exc:
        raise DecodeError("UnsupportedMode", f"cannot convert mode {upright.mode} to RGB: {exc}") from exc


def _formats() -> tuple[str, ...]:
    Image.init()
    return tuple(f for f in WEB_FORMATS if f in Image.OPEN)


class DecodeStage:
    """First stage of every job: checks captions, decodes images, records the upright size."""

    name = "decode"

    def __init__(self, cfg: DecodeConfig | None = None):
        self.cfg = cfg or DecodeConfig()
        self.resources = StageResources(batch_size=self.cfg.batch_size)

    def teardown(self) -> None:
        """Nothing to release: models go with the worker."""

    def setup(self) -> None:
        Image.init()  # register all plugins once per worker, not on the first sample

    def provenance(self) -> dict[str, str]:
        return {
            "decode.max_image_pixels": str(self.cfg.max_image_pixels),
            "decode.max_caption_chars": str(self.cfg.max_caption_chars),
            "decode.allow_empty_alt_text": str(self.cfg.allow_empty_alt_text).lower(),
        }

    def check_caption(self, alt_text: str) -> DecodeError | None:
        if len(alt_text) > self.cfg.max_caption_chars:
            return DecodeError(
                "CaptionTooLong",
                f"caption has {len(alt_text)} characters, over the limit of {self.cfg.max_caption_chars} (decode.max_caption_chars)",
            )
        if not alt_text.strip() and not self.cfg.allow_empty_alt_text:
            return DecodeError("EmptyCaption", "caption (alt-text) is empty; set decode.allow_empty_alt_text to keep such images")
        return None

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        for sample in batch:
            if not sample.ok:
                continue
            problem = self.check_caption(sample.alt_text or "")
            if problem is None:
                try:
                    sample.image = decode_image(sample.image_bytes, self.cfg.max_image_pixels)
                except DecodeError as exc:
                    problem = exc
            if problem is not None:
                fail(sample, self.name, str(problem), problem.kind)
                continue
            sample.width, sample.height = sample.image.size
            if not self.cfg.keep_image_bytes:
                sample.image_bytes = None
        return batch
