"""Open-vocabulary grounding: images + the phrases of each image -> regions (phrase, span, box, score).

Backends (``DetectorConfig.spec``):

- ``owlv2:<hub id or path>``: ``Owlv2ForObjectDetection``. On a GPU all images of a batch go through ONE
  forward; on a CPU one image per forward (``DetectorConfig.forward``: batching buys nothing there, and a
  row then never depends on its batch-mates, so a deduplicated run equals a full run). In a batched forward
  each image's phrase set is padded to the batch's largest set (padded queries are masked). Each box is
  labeled with its best-scoring phrase and kept when that score > ``threshold`` (0.1 in the paper).
- ``grounding-dino:<hub id or path>``: ``GroundingDinoForObjectDetection``. An image's phrases are joined
  into one prompt ("a cat. a remote control."); tokens are mapped back to phrases through the tokenizer's
  char offsets, so multi-token phrases are scored as a whole. ``threshold`` is the box threshold,
  ``text_threshold`` the phrase threshold.
- ``none``: no detector; ``make_detector`` returns ``None``.

The model-output -> regions steps are pure functions on tensors (``owlv2_regions``,
``grounding_dino_regions``, ``phrase_token_map``) so they are tested with controlled outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vesl.errors import UserError, first_line
from vesl.labelers.devices import resolve_device, resolve_dtype
from vesl.labelers.hub import is_local, pretrained_kwargs, unavailable_reason
from vesl.schemas.config import DetectorConfig
from vesl.schemas.stage import Phrase, Region, Sample, StageResources, fail

if TYPE_CHECKING:  # torch (and torchvision, through the box math) load in setup(), in the process that labels:
    import torch  # a driver that only builds the stages to plan the job starts its workers seconds sooner

    from vesl.labelers.boxes import PostProcess

BACKENDS = ("owlv2", "grounding-dino")


def parse_spec(spec: str) -> tuple[str, str]:
    """``"owlv2:google/owlv2-base-patch16-ensemble"`` -> ``("owlv2", "google/owlv2-base-patch16-ensemble")``."""
    kind, sep, model = spec.partition(":")
    if kind == "none" and not sep:
        return "none", ""
    if not sep or kind not in BACKENDS or not model:
        raise UserError(
            f"unknown detector spec {spec!r}: use none, owlv2:<hub id or path> or grounding-dino:<hub id or path>"
        )
    return kind, model


def make_detector(cfg: DetectorConfig, trust_remote_code: bool = False):
    """The detector stage for ``cfg.spec``, or ``None`` for ``"none"``. Models load in ``setup()``."""
    kind, model = parse_spec(cfg.spec)
    if kind == "none":
        return None
    trust = bool(trust_remote_code or cfg.trust_remote_code)
    if cfg.also or cfg.tta:  # several looks, fused: the plain detector's rows are left exactly as they were
        from vesl.labelers.grounding import FusedDetector

        one = {"also": [], "tta": []}
        detectors = [make_detector(cfg.model_copy(update={**one, "spec": s}), trust) for s in [cfg.spec, *cfg.also]]
        if any(d is None for d in detectors):
            raise UserError("detector.also lists more detectors; none is not one (drop it)")
        return FusedDetector(cfg, detectors)
    cls = Owlv2Detector if kind == "owlv2" else GroundingDinoDetector
    return cls(cfg, model, trust_remote_code=trust)


# ----------------------------------------------------------------------------------------------
# Pure post-processing: model outputs -> regions
# ----------------------------------------------------------------------------------------------


def _regions(
    phrases: Sequence[Phrase], boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor
) -> list[Region]:
    out = []
    for box, score, label in zip(boxes.tolist(), scores.tolist(), labels.tolist(), strict=True):
        p = phrases[label]
        out.append(Region(p.text, p.char_start, p.char_end, tuple(float(v) for v in box), float(score)))
    return out


def owlv2_regions(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    phrases: Sequence[Sequence[Phrase]],
    sizes: Sequence[tuple[int, int]],
    threshold: float,
    pp: PostProcess,
    model_sizes: Sequence[tuple[int, int]] | None = None,
) -> list[list[Region]]:
    """OWLv2 outputs -> regions per image.

    ``logits``: ``[B, P, Q]`` (P box predictions, Q = padded query count); only the first
    ``len(phrases[i])`` queries of image ``i`` are real. ``pred_boxes``: ``[B, P, 4]`` cxcywh normalized
    to the padded square input. ``sizes``: original ``(width, height)`` of each image (used for the
    minimum box size). ``model_sizes``: ``(width, height)`` of the image given to the processor, whose
    aspect ratio sets the square-padding correction (defaults to ``sizes``).
    """
    import torch
    from torchvision.ops import box_convert

    from vesl.labelers.boxes import postprocess, square_pad_to_image

    logits, pred_boxes = logits.detach().float().cpu(), pred_boxes.detach().float().cpu()
    out: list[list[Region]] = []
    for i, ph in enumerate(phrases):
        if not ph:
            out.append([])
            continue
        scores, labels = torch.sigmoid(logits[i, :, : len(ph)]).max(dim=-1)
        keep = scores > threshold
        mw, mh = (model_sizes or sizes)[i]
        boxes = square_pad_to_image(box_convert(pred_boxes[i][keep], "cxcywh", "xyxy"), mw, mh)
        w, h = sizes[i]
        out.append(_regions(ph, *postprocess(boxes, scores[keep], labels[keep], w, h, pp, [p.count for p in ph])))
    return out


def grounding_dino_prompt(phrases: Sequence[Phrase]) -> tuple[str, list[tuple[int, int]]]:
    """Join phrases into one Grounding DINO prompt; returns it with each phrase's char range in it.

    Text is lowercased (as Grounding DINO was trained) and ``.``/``?`` inside a phrase become spaces,
    because the model splits its prompt into phrases at those tokens.
    """
    parts, ranges, pos = [], [], 0
    for p in phrases:
        t = p.text.lower().replace(".", " ").replace("?", " ")
        parts.append(t)
        ranges.append((pos, pos + len(t)))
        pos += len(t) + 2  # ". "
    return ". ".join(parts) + ".", ranges


def phrase_token_map(offsets: torch.Tensor, ranges: Sequence[tuple[int, int]], length: int) -> torch.Tensor:
    """``[n_phrases, length]`` bool: token ``k`` belongs to phrase ``j`` when its char offsets lie inside
    phrase ``j``'s range of the prompt. Special and padding tokens (empty offsets) belong to none."""
    import torch

    tok_map = torch.zeros(len(ranges), length, dtype=torch.bool)
    offsets = offsets[:length].long()
    starts, ends = offsets[:, 0], offsets[:, 1]
    real = ends > starts
    for j, (s, e) in enumerate(ranges):
        tok_map[j, : len(offsets)] = real & (starts >= s) & (ends <= e)
    return tok_map


def grounding_dino_regions(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    token_maps: Sequence[torch.Tensor],
    phrases: Sequence[Sequence[Phrase]],
    sizes: Sequence[tuple[int, int]],
    box_threshold: float,
    text_threshold: float,
    pp: PostProcess,
) -> list[list[Region]]:
    """Grounding DINO outputs -> regions per image.

    ``logits``: ``[B, N, T]`` token logits per box query (``-inf`` past the prompt); ``pred_boxes``:
    ``[B, N, 4]`` cxcywh normalized to the (unpadded) image. ``token_maps[i]``: ``[n_i, T']`` from
    ``phrase_token_map``. A box is kept when its best phrase token prob > ``box_threshold``; it is labeled
    with the phrase whose tokens have the highest MEAN prob (a multi-token phrase counts as a whole, so
    "a remote control" is not won by its "a"), which must exceed ``text_threshold``. Score: the box's
    best phrase-token prob (Grounding DINO's box confidence).
    """
    import torch
    from torchvision.ops import box_convert

    from vesl.labelers.boxes import postprocess

    logits, pred_boxes = logits.detach().float().cpu(), pred_boxes.detach().float().cpu()
    out: list[list[Region]] = []
    for i, ph in enumerate(phrases):
        tmap = token_maps[i]
        if not ph or tmap.numel() == 0:
            out.append([])
            continue
        t = min(tmap.shape[1], logits.shape[-1])
        m = tmap[:, :t].float()  # [n, t]
        probs = torch.sigmoid(logits[i, :, :t])  # [N, t]; -inf -> 0
        has_tokens = m.sum(-1) > 0  # phrases cut off by truncation have no tokens
        mean = (probs @ m.T) / m.sum(-1).clamp(min=1)  # [N, n]
        mean[:, ~has_tokens] = -1.0
        masked = probs[:, None, :].masked_fill(m[None] == 0, 0.0)  # [N, n, t]
        box_score = masked.amax(dim=(1, 2))  # [N]
        phrase_score, labels = mean.max(dim=-1)
        keep = (box_score > box_threshold) & (phrase_score > text_threshold)
        boxes = box_convert(pred_boxes[i][keep], "cxcywh", "xyxy")
        w, h = sizes[i]
        out.append(_regions(ph, *postprocess(boxes, box_score[keep], labels[keep], w, h, pp, [p.count for p in ph])))
    return out


# ----------------------------------------------------------------------------------------------
# Stages
# ----------------------------------------------------------------------------------------------


class _HFDetector:
    """Shared loading, batching and provenance for the transformers detectors."""

    name = "detect"
    kind = ""

    def __init__(self, cfg: DetectorConfig, model: str, trust_remote_code: bool = False):
        self.cfg = cfg
        self.model_id = model
        self.trust_remote_code = trust_remote_code
        self.resources = StageResources(
            batch_size=cfg.batch_size, concurrency=cfg.concurrency, num_gpus=cfg.num_gpus
        )
        self.model = None
        self.processor = None
        self.device: torch.device | None = None
        self.dtype: torch.dtype | None = None
        self._commit: str | None = None

    @property
    def pp(self) -> PostProcess:
        """The box post-processing settings, from the config."""
        from vesl.labelers.boxes import PostProcess

        c = self.cfg
        return PostProcess(c.nms, c.nms_iou, c.min_box_size, c.max_regions, c.boxes_per_phrase, c.box_voting_iou)

    def __getstate__(self) -> dict:
        # Engines pickle stages to ship them to workers; the loaded model stays behind (setup() reloads).
        return {k: (None if k in ("model", "processor") else v) for k, v in self.__dict__.items()}

    def _classes(self):
        raise NotImplementedError

    def teardown(self) -> None:
        """Nothing to release: models go with the worker."""

    def setup(self) -> None:
        if self.model is not None:
            return
        model_cls, proc_cls = self._classes()
        self.device = resolve_device(self.cfg.device)
        self.dtype = resolve_dtype(self.cfg.dtype, self.device)
        src = str(Path(self.model_id).expanduser()) if is_local(self.model_id) else self.model_id
        try:
            kw, self._commit = pretrained_kwargs(src, self.cfg.revision)
            if self.trust_remote_code:
                kw["trust_remote_code"] = True
            self.processor = proc_cls.from_pretrained(src, **kw)
            self.model = model_cls.from_pretrained(src, dtype=self.dtype, **kw).to(self.device).eval()
        except (OSError, ValueError) as exc:
            if is_local(self.model_id):
                raise UserError(
                    f"can't load {self.kind} detector from {src}: {first_line(exc)} "
                    f"(the folder must hold a save_pretrained model and processor)"
                ) from exc
            why = unavailable_reason() or first_line(exc, 300)
            raise UserError(
                f"detector model {self.model_id!r} can't be loaded ({why}): use `--profile demo` or a local "
                f"path (detector spec {self.kind}:/path/to/model)"
            ) from exc

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        import torch

        self.setup()
        todo = []
        for s in batch:
            s.regions = []
            if s.image is None:
                fail(s, self.name, "no decoded image reached the detector", "MissingImage")
                continue
            s.queried = True
            if s.phrases:
                todo.append(s)
        step = max(1, self.cfg.batch_size) if self.batched else 1
        for k in range(0, len(todo), step):
            chunk = todo[k : k + step]
            with torch.inference_mode():
                regions = self.detect(
                    [s.image for s in chunk], [s.phrases for s in chunk], [_size(s) for s in chunk]
                )
            for s, r in zip(chunk, regions, strict=True):
                s.regions = r
        return batch

    @property
    def batched(self) -> bool:
        """Whether a batch goes through the model in one forward (see ``DetectorConfig.forward``)."""
        if self.cfg.forward == "auto":
            return self.device is not None and self.device.type != "cpu"
        return self.cfg.forward == "batch"

    def detect(self, images, phrases, sizes) -> list[list[Region]]:
        raise NotImplementedError

    def provenance(self) -> dict[str, str]:
        prov = {
            "detector.backend": self.kind,
            "detector.model": self.model_id,
            "detector.revision": self._commit
            or self.cfg.revision
            or ("local" if is_local(self.model_id) else "main"),
            "detector.threshold": str(self.cfg.threshold),
            "detector.nms": self.cfg.nms,
            "detector.nms_iou": str(self.cfg.nms_iou),
            "detector.min_box_size": str(self.cfg.min_box_size),
            "detector.max_regions": str(self.cfg.max_regions),
            "detector.boxes_per_phrase": str(self.cfg.boxes_per_phrase),
            "detector.boxes_per_phrase_scope": "per mention",  # a phrase named k times keeps k x boxes_per_phrase
            "detector.box_voting_iou": str(self.cfg.box_voting_iou),
        }
        if self.model is not None:
            prov["detector.dtype"] = str(self.dtype).removeprefix("torch.")
        return prov


def _size(s: Sample) -> tuple[int, int]:
    w, h = s.image.size
    return (s.width or w, s.height or h)


class Owlv2Detector(_HFDetector):
    kind = "owlv2"

    def _classes(self):
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        return Owlv2ForObjectDetection, Owlv2Processor

    def encode_queries(self, phrases: Sequence[Sequence[Phrase]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Queries of all images as ``[B * Q, L]`` ids/mask, image-major as OWLv2 expects; padded query
        rows are all-zero ids (the model masks a query whose first id is 0) with one attended position."""
        import torch

        tok = self.processor.tokenizer
        max_len = self.model.config.text_config.max_position_embeddings
        texts = sorted({p.text.lower() for ph in phrases for p in ph})
        enc = tok(texts, padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
        row = {t: r for r, t in enumerate(texts)}
        q = max(len(ph) for ph in phrases)
        ids = torch.zeros(len(phrases) * q, enc["input_ids"].shape[1], dtype=torch.long)
        mask = torch.zeros_like(ids)
        mask[:, 0] = 1
        for i, ph in enumerate(phrases):
            for j, p in enumerate(ph):
                r = row[p.text.lower()]
                ids[i * q + j] = enc["input_ids"][r]
                mask[i * q + j] = enc["attention_mask"][r]
        return ids, mask

    def preprocess(self, images, phrases):
        pixel_values = self.processor.image_processor(images=list(images), return_tensors="pt")[
            "pixel_values"
        ]
        ids, mask = self.encode_queries(phrases)
        return {
            "pixel_values": pixel_values.to(self.device, self.dtype),
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
        }

    def forward(self, inputs):
        out = self.model(**inputs)
        return out.logits, out.pred_boxes

    def postprocess(self, outputs, phrases, sizes, model_sizes):
        logits, pred_boxes = outputs
        return owlv2_regions(logits, pred_boxes, phrases, sizes, self.cfg.threshold, self.pp, model_sizes)

    def detect(self, images, phrases, sizes):
        outputs = self.forward(self.preprocess(images, phrases))
        return self.postprocess(outputs, phrases, sizes, [im.size for im in images])


class GroundingDinoDetector(_HFDetector):
    kind = "grounding-dino"

    def _classes(self):
        from transformers import GroundingDinoForObjectDetection, GroundingDinoProcessor

        return GroundingDinoForObjectDetection, GroundingDinoProcessor

    def preprocess(self, images, phrases):
        prompts, ranges = zip(*(grounding_dino_prompt(ph) for ph in phrases), strict=True)
        enc = self.processor.tokenizer(
            list(prompts),
            padding="longest",
            truncation=True,
            max_length=self.model.config.max_text_len,
            return_offsets_mapping=True,
            return_token_type_ids=True,
            return_tensors="pt",
        )
        length = enc["input_ids"].shape[1]
        token_maps = [
            phrase_token_map(enc["offset_mapping"][i], ranges[i], length) for i in range(len(phrases))
        ]
        img = self.processor.image_processor(images=list(images), return_tensors="pt")
        inputs = {
            "pixel_values": img["pixel_values"].to(self.device, self.dtype),
            "pixel_mask": img["pixel_mask"].to(self.device),
            "input_ids": enc["input_ids"].to(self.device),
            "attention_mask": enc["attention_mask"].to(self.device),
            "token_type_ids": enc["token_type_ids"].to(self.device),
        }
        return inputs, token_maps

    def forward(self, inputs):
        out = self.model(**inputs)
        return out.logits, out.pred_boxes

    def postprocess(self, outputs, token_maps, phrases, sizes):
        logits, pred_boxes = outputs
        return grounding_dino_regions(
            logits,
            pred_boxes,
            token_maps,
            phrases,
            sizes,
            self.cfg.threshold,
            self.cfg.text_threshold,
            self.pp,
        )

    def detect(self, images, phrases, sizes):
        inputs, token_maps = self.preprocess(images, phrases)
        return self.postprocess(self.forward(inputs), token_maps, phrases, sizes)

    def provenance(self) -> dict[str, str]:
        prov = super().provenance()
        prov["detector.text_threshold"] = str(self.cfg.text_threshold)
        return prov
