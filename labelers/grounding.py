"""Several looks at each image: every detector (``spec`` and ``also``) on every view (the image itself and
each ``tta`` look), boxes mapped back to the original image exactly, then fused per phrase (``fusion``).

A view is the image mirrored (``hflip``), shrunk into a canvas of its own size (``scale:S``, S < 1: objects
look smaller) or cropped to its central 1/S (S > 1: objects look larger), or both. A box found on a view maps
back through :func:`view_to_image` (the crop or canvas offset and size in exact pixels, then :func:`hflip_box`).
The fused boxes go through the detector's own post-processing once more (NMS, size filter, per-phrase cap,
``max_regions``), so the caps hold for the fused set as for one look. One detector and no ``tta`` never builds
this stage: rows are those of the plain detector.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from vesl.labelers.fusion import fuse_looks
from vesl.schemas.config import DetectorConfig, parse_look
from vesl.schemas.stage import Box, Region, Sample, StageResources, fail

if TYPE_CHECKING:
    from PIL import Image

CANVAS_FILL = (124, 116, 104)  # the ImageNet mean colour: the padding of a shrunk view looks like no object


def hflip_box(box: Box) -> Box:
    """A normalized box of a mirrored image -> the same box on the image (its own inverse)."""
    x0, y0, x1, y1 = box
    return (1.0 - x1, y0, 1.0 - x0, y1)


@dataclass(frozen=True)
class View:
    """One view of an image: ``flip`` first, then the part ``[left, left + width) x [top, top + height)`` of
    the (mirrored) image in pixels, which may reach past it (a shrunk view's canvas)."""

    flip: bool
    left: float
    top: float
    width: float
    height: float
    scale: float  # the look's scale


def make_view(look: str, width: int, height: int) -> View:
    """The view of a ``width`` x ``height`` image that ``look`` (``""``: the image itself) asks for."""
    flip, scale = parse_look(look) if look else (False, 1.0)
    if scale < 1.0:  # the image, shrunk, at the top left of a canvas of its own size
        sw, sh = max(1, round(width * scale)), max(1, round(height * scale))
        return View(flip, 0.0, 0.0, width * width / sw, height * height / sh, scale)
    if scale > 1.0:  # the central 1/S of the image
        cw, ch = max(1, round(width / scale)), max(1, round(height / scale))
        return View(flip, float((width - cw) // 2), float((height - ch) // 2), float(cw), float(ch), scale)
    return View(flip, 0.0, 0.0, float(width), float(height), 1.0)


def view_image(image: Image.Image, view: View) -> Image.Image:
    """The pixels of ``view`` of ``image``."""
    from PIL import Image as PILImage

    if view.flip:
        image = image.transpose(PILImage.Transpose.FLIP_LEFT_RIGHT)
    if view.scale < 1.0:
        small = image.resize((round(image.width * view.scale) or 1, round(image.height * view.scale) or 1),
                             PILImage.Resampling.BILINEAR)  # fmt: skip
        canvas = PILImage.new("RGB", image.size, CANVAS_FILL)
        canvas.paste(small, (0, 0))
        return canvas
    if view.scale > 1.0:
        left, top = int(view.left), int(view.top)
        return image.crop((left, top, left + int(view.width), top + int(view.height)))
    return image


def view_to_image(box: Box, view: View, width: int, height: int) -> Box:
    """A normalized box of ``view`` -> the normalized box of the ``width`` x ``height`` image (not clipped:
    the fusion clips after its own arithmetic)."""
    x0, y0, x1, y1 = box
    if (view.left, view.top, view.width, view.height) != (0, 0, width, height):
        fx, fy = view.width / width, view.height / height
        ox, oy = view.left / width, view.top / height
        x0, y0, x1, y1 = ox + x0 * fx, oy + y0 * fy, ox + x1 * fx, oy + y1 * fy
    return hflip_box((x0, y0, x1, y1)) if view.flip else (x0, y0, x1, y1)


class FusedDetector:
    """The detector stage when there are several looks: ``detectors`` (the first one is ``spec``) x views."""

    name = "detect"

    def __init__(self, cfg: DetectorConfig, detectors: list):
        self.cfg = cfg
        self.detectors = detectors
        self.looks = ["", *cfg.tta]
        self.resources = StageResources(
            batch_size=cfg.batch_size, concurrency=cfg.concurrency, num_gpus=cfg.num_gpus
        )

    def setup(self) -> None:
        for d in self.detectors:
            d.setup()

    def teardown(self) -> None:
        for d in self.detectors:
            d.teardown()

    def looks_of(self, image: Image.Image, phrases, size: tuple[int, int]) -> list[list[Region]]:
        """Every look's regions of one image, boxes on the image; (detector, view) pairs in order."""
        import torch

        out = []
        w, h = image.size
        for look in self.looks:
            view = make_view(look, w, h)
            img = view_image(image, view)
            vsize = (max(1, round(size[0] * view.width / w)), max(1, round(size[1] * view.height / h)))
            for d in self.detectors:
                with torch.inference_mode():
                    (regions,) = d.detect([img], [phrases], [vsize])
                out.append([Region(r.phrase, r.char_start, r.char_end, view_to_image(r.box, view, w, h), r.score)
                            for r in regions])  # fmt: skip
        return out

    def fuse(self, looks: list[list[Region]], phrases, size: tuple[int, int]) -> list[Region]:
        """The looks' regions fused, then the primary detector's caps applied to the fused set (a phrase the caption
        names k times keeps k x ``boxes_per_phrase``, as in each look)."""
        import torch

        from vesl.labelers.boxes import PostProcess, postprocess

        fused = fuse_looks(looks, phrases, self.cfg.fusion)
        if not fused:
            return []
        index = {(p.text, p.char_start, p.char_end): i for i, p in enumerate(phrases)}
        boxes = torch.tensor([r.box for r in fused], dtype=torch.float64)
        scores = torch.tensor([r.score for r in fused], dtype=torch.float64)
        labels = torch.tensor([index[(r.phrase, r.char_start, r.char_end)] for r in fused])
        c = self.cfg
        pp = PostProcess(c.nms, c.nms_iou, c.min_box_size, c.max_regions, c.boxes_per_phrase, 0.0)
        b, s, lab = postprocess(boxes, scores, labels, size[0], size[1], pp, [p.count for p in phrases])
        return [Region(phrases[i].text, phrases[i].char_start, phrases[i].char_end, tuple(float(v) for v in box),
                       float(sc)) for box, sc, i in zip(b.tolist(), s.tolist(), lab.tolist(), strict=True)]  # fmt: skip

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        self.setup()
        for s in batch:
            s.regions = []
            if s.image is None:
                fail(s, self.name, "no decoded image reached the detector", "MissingImage")
                continue
            s.queried = True
            if s.phrases:
                size = (s.width or s.image.width, s.height or s.image.height)
                s.regions = self.fuse(self.looks_of(s.image, s.phrases, size), s.phrases, size)
        return batch

    def provenance(self) -> dict[str, str]:
        prov = dict(self.detectors[0].provenance())
        for i, d in enumerate(self.detectors[1:], 1):
            prov.update(
                {k.replace("detector.", f"detector.also.{i}.", 1): v for k, v in d.provenance().items()}
            )
        prov["detector.tta"] = ",".join(self.cfg.tta)
        f = self.cfg.fusion
        prov["detector.fusion"] = (
            f"wbf iou_thr={f.iou_thr} skip_box_thr={f.skip_box_thr} conf_type={f.conf_type} "
            f"threshold={f.threshold}"
        )
        return prov
