"""Verification: a second region-text model re-scores every (phrase, box) the detector gave.

The detector labels each box with its best phrase; a tiny or confused detector gives a red circle the phrase
"a blue circle" or fires on the background. The verifier scores every region of an image against every phrase
of that image (``Scorer.score``: cosines between box and phrase embeddings) and keeps a region when

    score(box, its phrase) >= min_score   and   score(box, its phrase) - max(score(box, other phrase)) >= min_margin

(a phrase with no other phrase in its image only has to pass ``min_score``). Kept regions stay as the detector
wrote them (box and detector score); each dropped one is counted in ``Sample.verifier_dropped``, and from there
in the shard's stats (``verifier_dropped``) and ``vesl inspect``. ``rule`` decides what else happens:
``relabel`` gives a failing region a phrase that kept no box; ``pick`` treats a phrase's boxes as candidates
and keeps the best-scored passing ones per mention (``pick_mask``), so a wrong first box gives way to a right
runner-up.

Scorers (``VerifierConfig.spec`` = ``<kind>:<model>``):

- ``clip:<open_clip model>``: ``ClipScorer``, the CLIP embedding of the box crop (with ``pad`` of context
  on each side: a shape is told by its outline) against the CLIP text embedding of each phrase. The model is an
  open_clip name (``ViT-B-32``, weights from ``pretrained`` tags are not used), a local folder saved the
  open_clip way (``open_clip_config.json`` + ``open_clip_model.safetensors``) or ``hf-hub:org/name``.
- any kind installed in the ``vesl.verifiers`` entry-point group (``vesl.pretrain`` adds ``cloc``: the CLOC
  Prompter's box-prompted region embedding, no crop). A plugin class is built as ``cls(model, cfg)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from vesl.errors import UserError, first_line
from vesl.labelers.devices import resolve_device
from vesl.schemas.config import VERIFIER_GROUP, VerifierConfig
from vesl.schemas.stage import Box, Phrase, Region, Sample, StageResources, fail

if TYPE_CHECKING:
    import torch
    from PIL import Image


class Scorer(Protocol):
    """Scores boxes of one image against phrases; built by ``make_scorer``, loaded in the stage's ``setup()``."""

    kind: str

    def load(self, device: torch.device) -> None: ...

    def score(self, image: Image.Image, boxes: Sequence[Box], phrases: Sequence[str]) -> torch.Tensor:
        """``[len(boxes), len(phrases)]`` cosines; boxes are normalized ``x0, y0, x1, y1`` of ``image``."""

    def provenance(self) -> dict[str, str]: ...


# ----------------------------------------------------------------------------------------------
# Pure parts: the crop and the keep rule
# ----------------------------------------------------------------------------------------------


def padded_crop_box(box: Box, width: int, height: int, pad: float) -> tuple[int, int, int, int]:
    """Pixel box of the crop of normalized ``box``: ``pad`` x its side added on each side, clipped to the image,
    at least one pixel wide and high."""
    x0, y0, x1, y1 = box
    dx, dy = pad * (x1 - x0), pad * (y1 - y0)
    left = min(max(0, int(round((x0 - dx) * width))), width - 1)
    top = min(max(0, int(round((y0 - dy) * height))), height - 1)
    right = max(min(width, int(round((x1 + dx) * width))), left + 1)
    bottom = max(min(height, int(round((y1 + dy) * height))), top + 1)
    return left, top, right, bottom


def own_and_margin(scores: torch.Tensor, region: int, column: int) -> tuple[float, float]:
    """Region ``region``'s score for phrase ``column`` and its margin over the best other phrase of the image (inf
    when the image has one phrase): the two numbers the keep rule reads."""
    import torch

    own = float(scores[region, column])
    others = torch.cat([scores[region, :column], scores[region, column + 1 :]])
    return own, own - float(others.max()) if len(others) else float("inf")


def keep_mask(scores: torch.Tensor, labels: Sequence[int], min_score: float, min_margin: float) -> list[bool]:
    """Which regions pass: ``scores`` ``[R, P]`` cosines, ``labels[r]`` the column of region ``r``'s phrase."""
    keep = []
    for r, label in enumerate(labels):
        own, margin = own_and_margin(scores, r, label)
        keep.append(own >= min_score and margin >= min_margin)
    return keep


def relabel_map(scores: torch.Tensor, labels: Sequence[int], keep: Sequence[bool], free: Sequence[int],
                min_score: float, min_margin: float) -> dict[int, int]:
    """Region -> new phrase column for regions that fail the rule but pass it for a ``free`` column (a phrase of
    the image that kept no box). Each free phrase goes to at most one region, the one scoring it highest."""
    offers = []
    for r, label in enumerate(labels):
        if keep[r]:
            continue
        for u in free:
            if u == label:
                continue
            own, margin = own_and_margin(scores, r, u)
            if own >= min_score and margin >= min_margin:
                offers.append((own, r, u))
    taken_regions: set[int] = set()
    out: dict[int, int] = {}
    for _, r, u in sorted(offers, reverse=True):
        if r not in taken_regions and u not in out.values():
            out[r] = u
            taken_regions.add(r)
    return out


def pick_mask(scores: torch.Tensor, labels: Sequence[int], keep: Sequence[bool], per_phrase: int,
              mentions: Sequence[int]) -> list[bool]:
    """Rule ``pick``: of the regions that ``keep`` passes, phrase column ``c`` keeps the ``per_phrase x
    mentions[c]`` that score highest for it (ties: the detector's order, which is by its score); the detector's
    own per-phrase cap (``per_label_cap``) applied to the verifier's ranking."""
    import torch

    from vesl.labelers.boxes import per_label_cap

    ranked = sorted((r for r, k in enumerate(keep) if k), key=lambda r: -float(scores[r, labels[r]]))
    capped = per_label_cap(torch.tensor([labels[r] for r in ranked], dtype=torch.long), per_phrase, mentions)
    picked = {r for r, k in zip(ranked, capped.tolist(), strict=True) if k}
    return [r in picked for r in range(len(keep))]


# ----------------------------------------------------------------------------------------------
# Scorers
# ----------------------------------------------------------------------------------------------


class ClipScorer:
    """An open_clip model: the crop's image embedding against each phrase's text embedding."""

    kind = "clip"

    def __init__(self, model: str, cfg: VerifierConfig):
        self.model_id = model
        self.pad = cfg.pad
        self.model = self.preprocess = self.tokenizer = None
        self.device = None

    @property
    def _name(self) -> str:
        """The name open_clip reads: a local folder as ``local-dir:``, anything else (a name, ``hf-hub:``) as is."""
        p = Path(self.model_id).expanduser()
        return f"local-dir:{p.resolve()}" if p.exists() else self.model_id

    def load(self, device) -> None:
        import open_clip

        p = Path(self.model_id).expanduser()
        if p.exists() and not (p / "open_clip_config.json").is_file():
            raise UserError(f"verifier folder {p} is not an open_clip model (no open_clip_config.json): save one with "
                            "the open_clip layout (open_clip_config.json, open_clip_model.safetensors)")
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(self._name, device=device)
            self.tokenizer = open_clip.get_tokenizer(self._name)
        except (OSError, ValueError, RuntimeError) as exc:
            raise UserError(f"can't load the clip verifier {self.model_id!r}: {first_line(exc, 300)} (pass a local "
                            "open_clip folder, an open_clip model name or hf-hub:<id>)") from None
        self.model, self.preprocess, self.device = model.eval(), preprocess, device

    def score(self, image, boxes, phrases):
        import torch
        import torch.nn.functional as F

        w, h = image.size
        crops = torch.stack([self.preprocess(image.crop(padded_crop_box(b, w, h, self.pad))) for b in boxes])
        img = F.normalize(self.model.encode_image(crops.to(self.device)).float(), dim=-1)
        txt = F.normalize(self.model.encode_text(self.tokenizer(list(phrases)).to(self.device)).float(), dim=-1)
        return (img @ txt.T).cpu()

    def provenance(self) -> dict[str, str]:
        p = Path(self.model_id).expanduser()
        return {"verifier.model": p.name if p.exists() else self.model_id, "verifier.pad": str(self.pad)}


BUILT_IN: dict[str, Any] = {"clip": ClipScorer}


def scorer_class(kind: str) -> Any:
    """The scorer class of ``kind``: built in, or from an installed package's ``vesl.verifiers`` entry point."""
    if kind in BUILT_IN:
        return BUILT_IN[kind]
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group=VERIFIER_GROUP)}
    if kind not in eps:
        raise UserError(f"unknown verifier kind {kind!r}: use one of {', '.join(sorted({*BUILT_IN, *eps}))}")
    try:
        return eps[kind].load()
    except Exception as exc:
        raise UserError(f"verifier {kind!r} ({eps[kind].value}) failed to load: {type(exc).__name__}: {exc}") from None


def make_verifier(cfg: VerifierConfig) -> VerifierStage | None:
    """The verification stage for ``cfg.spec``, or ``None`` when it is ``off``. Models load in ``setup()``."""
    kind, _, model = cfg.spec.strip().partition(":")
    if kind == "off":
        return None
    return VerifierStage(cfg, scorer_class(kind)(model, cfg))


# ----------------------------------------------------------------------------------------------
# The stage
# ----------------------------------------------------------------------------------------------


class VerifierStage:
    """Drops the regions whose phrase the scorer does not confirm (see the module docstring).

    One image per scorer forward: a row never depends on which images share its batch (as the detector on a CPU).
    """

    name = "verify"

    def __init__(self, cfg: VerifierConfig, scorer: Scorer):
        self.cfg = cfg
        self.scorer = scorer
        self.resources = StageResources(batch_size=cfg.batch_size, concurrency=cfg.concurrency, num_gpus=cfg.num_gpus)
        self._loaded = False

    def __getstate__(self) -> dict:
        # Engines pickle stages to ship them to workers; the scorer is rebuilt unloaded there (setup() loads it).
        state = dict(self.__dict__)
        state["scorer"] = type(self.scorer)(self.scorer.model_id, self.cfg)
        state["_loaded"] = False
        return state

    def setup(self) -> None:
        if not self._loaded:
            self.scorer.load(resolve_device(self.cfg.device))
            self._loaded = True

    def teardown(self) -> None:
        """Nothing to release: the model goes with the worker."""

    def __call__(self, batch: list[Sample]) -> list[Sample]:
        import torch

        self.setup()
        for s in batch:
            s.verifier_dropped = 0
            if not s.regions:
                continue
            if s.image is None:
                fail(s, self.name, "no decoded image reached the verifier", "MissingImage")
                continue
            texts = _phrase_texts(s.phrases, s.regions)
            column = {t: j for j, t in enumerate(texts)}
            spans = {p.text: p for p in s.phrases}
            with torch.inference_mode():
                scores = self.scorer.score(s.image, [r.box for r in s.regions], texts)
            labels = [column[r.phrase] for r in s.regions]
            keep = keep_mask(scores, labels, self.cfg.min_score, self.cfg.min_margin)
            if self.cfg.rule == "pick":  # a column no phrase names (a region's own text) counts once
                mentions = [sum(p.count for p in s.phrases if p.text == t) or 1 for t in texts]
                keep = pick_mask(scores, labels, keep, self.cfg.pick_per_phrase, mentions)
            moved: dict[int, int] = {}
            if self.cfg.rule == "relabel":
                boxed = {labels[r] for r, k in enumerate(keep) if k}
                free = [j for j, t in enumerate(texts) if j not in boxed and t in spans]
                moved = relabel_map(scores, labels, keep, free, self.cfg.min_score, self.cfg.min_margin)
            s.verifier_dropped = keep.count(False) - len(moved)
            if self.cfg.rule == "relabel":
                s.verifier_relabeled = len(moved)
            s.regions = [r if k else _renamed(r, spans[texts[moved[i]]])
                         for i, (r, k) in enumerate(zip(s.regions, keep, strict=True)) if k or i in moved]
        return batch

    def provenance(self) -> dict[str, str]:
        return {
            "verifier.backend": self.scorer.kind,
            **({"verifier.rule": self.cfg.rule} if self.cfg.rule != "drop" else {}),
            **({"verifier.pick_per_phrase": str(self.cfg.pick_per_phrase)} if self.cfg.rule == "pick" else {}),
            "verifier.min_score": str(self.cfg.min_score),
            "verifier.min_margin": str(self.cfg.min_margin),
            **self.scorer.provenance(),
        }


def _renamed(region: Region, phrase: Phrase) -> Region:
    return Region(phrase=phrase.text, char_start=phrase.char_start, char_end=phrase.char_end, box=region.box,
                  score=region.score)


def _phrase_texts(phrases: Sequence[Phrase], regions: Sequence[Region]) -> list[str]:
    """The distinct phrase texts of an image, in caption order (a region's phrase is always among them)."""
    return list(dict.fromkeys([*(p.text for p in phrases), *(r.phrase for r in regions)]))
