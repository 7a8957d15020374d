"""Label quality of captioner + detector against the synthetic world's ground truth.

Everything runs through the product stages (decode -> ``hf:`` captioner -> paper phrases -> ``owlv2:``
detector, as ``vesl label`` builds them), so the figures describe what a labeling job really writes.
Used by ``benchmarks/label_quality.py`` and ``tests/test_demo_models.py``.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from vesl.schemas.boxes import box_iou

_POSITIONS = ("at the top left", "at the top right", "at the bottom left", "at the bottom right",
              "at the top", "at the bottom", "on the left", "on the right", "in the center")  # fmt: skip


def mentions(caption: str, color: str, shape: str) -> bool:
    """Whether the caption names ``color shape`` (e.g. "red circle", adjectives in between not allowed)."""
    return re.search(rf"\b{re.escape(color)} {re.escape(shape)}s?\b", caption.lower()) is not None


def named_categories(caption: str, colors: Sequence[str], shapes: Sequence[str]) -> list[str]:
    """Every ``color shape`` the caption names, in order, with repeats: "a red circle and two red circles"
    -> ["red circle", "red circle"]. What caption precision counts against the scene's objects."""
    pattern = rf"\b({'|'.join(map(re.escape, colors))}) ({'|'.join(map(re.escape, shapes))})s?\b"
    return [f"{c} {s}" for c, s in re.findall(pattern, caption.lower())]


def greedy_match(
    preds: Sequence[tuple[Sequence[float], float, str]],
    gts: Sequence[tuple[Sequence[float], str]],
    iou_threshold: float = 0.5,
    same_label: bool = False,
) -> int:
    """One-to-one matches, highest score first: a prediction takes the free GT box it overlaps most.

    ``preds``: (box, score, label); ``gts``: (box, label); boxes normalized xyxy. With ``same_label``
    a prediction may only match a GT box of the same label. Returns the number of matches.
    """
    return len(matched_gts(preds, gts, iou_threshold, same_label))


def matched_gts(
    preds: Sequence[tuple[Sequence[float], float, str]],
    gts: Sequence[tuple[Sequence[float], str]],
    iou_threshold: float = 0.5,
    same_label: bool = False,
) -> set[int]:
    """The indices of the GT boxes that ``greedy_match`` matches (so recall losses can be attributed)."""
    free = set(range(len(gts)))
    hit: set[int] = set()
    for box, _score, label in sorted(preds, key=lambda p: -p[1]):
        best, best_iou = None, iou_threshold
        for j in free:
            if same_label and gts[j][1] != label:
                continue
            iou = box_iou(box, gts[j][0])
            if iou >= best_iou:
                best, best_iou = j, iou
        if best is not None:
            free.discard(best)
            hit.add(best)
    return hit


def phrase_category(phrase: str, categories: Sequence[str]) -> str:
    """The ``color shape`` category a phrase names ('' if none): "a large red circle" -> "red circle"."""
    low = phrase.lower()
    for c in categories:
        if re.search(rf"\b{re.escape(c)}s?\b", low):
            return c
    return ""


@dataclass
class Counts:
    tp: int = 0
    n_pred: int = 0
    n_gt: int = 0

    @property
    def precision(self) -> float:
        return self.tp / self.n_pred if self.n_pred else 0.0

    @property
    def recall(self) -> float:
        return self.tp / self.n_gt if self.n_gt else 0.0


@dataclass
class LabelQuality:
    n_images: int = 0
    n_objects: int = 0
    caption_object_recall: float = 0.0  # GT objects named with correct color and shape
    caption_object_precision: float = 0.0  # `color shape` mentions that name an object of the scene
    caption_exact_recall: float = 0.0  # ... with the exact phrase (size too) and position words
    caption_errors: int = 0
    pipeline_box: Counts = field(default_factory=Counts)  # boxes vs GT boxes, IoU >= 0.5
    pipeline_labeled: Counts = field(default_factory=Counts)  # ... and the phrase names the GT category
    detector_box: Counts = field(default_factory=Counts)  # detector alone, queried with the GT phrases
    detector_labeled: Counts = field(default_factory=Counts)
    # where phrase-aware recall is lost, as fractions of all GT objects: "caption" (the caption never names
    # the object's colour and shape, so no phrase could ask for it) or "detector" (named, but no box with
    # the right phrase lies on it). found + caption + detector == 1.
    recall_fates: dict = field(default_factory=lambda: {"found": 0.0, "caption": 0.0, "detector": 0.0})
    seconds: dict = field(default_factory=dict)
    examples: list = field(default_factory=list)
    # other detector settings on the same captions and phrases: name -> phrase-aware Counts, detector seconds
    variants: dict = field(default_factory=dict)

    def summary(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if not isinstance(getattr(self, k), Counts)}
        for k in ("pipeline_box", "pipeline_labeled", "detector_box", "detector_labeled"):
            c = getattr(self, k)
            out[k] = {"precision": round(c.precision, 4), "recall": round(c.recall, 4), **asdict(c)}
        return out


def labeled_counts(scenes, regions_per_scene) -> Counts:
    """Phrase-aware box counts (IoU >= 0.5 and the phrase names the GT category) of given regions per scene."""
    from vesl.demo.synth import categories as all_categories

    cats = sorted(all_categories(), key=len, reverse=True)
    c = Counts()
    for scene, regions in zip(scenes, regions_per_scene, strict=True):
        _count(c, regions, scene, cats, True)
    return c


def _count(counts: Counts, regions, scene, categories: Sequence[str], same_label: bool) -> set[int]:
    preds = [(r.box, r.score, phrase_category(r.phrase, categories)) for r in regions]
    gts = [(o.box, o.category) for o in scene.objects]
    hit = matched_gts(preds, gts, 0.5, same_label)
    counts.tp += len(hit)
    counts.n_pred += len(preds)
    counts.n_gt += len(gts)
    return hit


def evaluate(
    scenes,
    captioner: str,
    detector: str,
    batch_size: int = 16,
    threshold: float = 0.1,
    detector_options: dict | None = None,
    detector_only: bool = True,
    n_examples: int = 3,
    verify: dict | None = None,
    keep: list | None = None,
    variants: dict[str, dict] | None = None,
) -> LabelQuality:
    """Label ``scenes`` with ``hf:<captioner>`` + ``owlv2:<detector>`` through the product stages.

    ``detector_options``: further ``DetectorConfig`` fields (post-processing), e.g. the demo profile's.
    ``verify``: ``VerifierConfig`` fields (the verification stage runs after the detector). ``keep``: a list
    that receives the labeled Samples (with their decoded images), for measurements on top of these labels.
    ``variants``: name -> ``DetectorConfig`` fields replacing ``detector_options`` (TTA, more detectors,
    fusion), each run on the same captions and phrases, so only the detector differs between them.
    """
    from collections import Counter

    from vesl.demo.synth import COLORS, SHAPES
    from vesl.demo.synth import categories as all_categories
    from vesl.pipeline.apply import apply_stage
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.wiring import build_stages
    from vesl.schemas.config import CaptionerConfig, DetectorConfig
    from vesl.schemas.stage import Phrase, Sample

    scenes = list(scenes)
    cats = sorted(all_categories(), key=len, reverse=True)
    cfg = LabelConfig(
        captioner=CaptionerConfig(spec=f"hf:{captioner}", batch_size=batch_size),
        detector=DetectorConfig(spec=f"owlv2:{detector}", batch_size=batch_size, threshold=threshold,
                                **(detector_options or {})),
        verify=verify or {},
    )
    stages = build_stages(cfg)
    q = LabelQuality(n_images=len(scenes), n_objects=sum(len(s.objects) for s in scenes))
    t_setup = time.perf_counter()
    for st in stages:
        st.setup()
    q.seconds["setup"] = round(time.perf_counter() - t_setup, 2)
    samples = [
        Sample(key=s.key, source_shard="quality", index=i, image_bytes=s.image, alt_text=s.alt_text)
        for i, s in enumerate(scenes)
    ]
    for k in range(0, len(samples), batch_size):
        batch = samples[k : k + batch_size]
        for st in stages:
            t = time.perf_counter()
            apply_stage(st, batch)
            q.seconds[st.name] = round(q.seconds.get(st.name, 0.0) + time.perf_counter() - t, 2)
    named = exact = mentioned = mentioned_right = 0
    fates = dict.fromkeys(("found", "caption", "detector"), 0)
    for s, sample in zip(scenes, samples, strict=True):
        if not sample.ok:
            q.caption_errors += 1
            _count(q.pipeline_box, [], s, cats, False)
            _count(q.pipeline_labeled, [], s, cats, True)
            fates["caption"] += len(s.objects)
            continue
        cap = sample.caption or ""
        said = Counter(named_categories(cap, list(COLORS), SHAPES))
        there = Counter(o.category for o in s.objects)
        mentioned += sum(said.values())
        mentioned_right += sum(min(n, there[c]) for c, n in said.items())  # an object justifies one mention
        for o, r in zip(s.objects, s.regions, strict=True):
            named += mentions(cap, o.color, o.shape)
            pos = s.caption[r.char_end:].split(",")[0].split(" and ")[0].rstrip(".").strip()
            exact += f"{o.phrase} {pos}" in cap
        _count(q.pipeline_box, sample.regions, s, cats, False)
        hit = _count(q.pipeline_labeled, sample.regions, s, cats, True)
        for j, o in enumerate(s.objects):
            fates["found" if j in hit else "detector" if mentions(cap, o.color, o.shape) else "caption"] += 1
        if len(q.examples) < n_examples:
            q.examples.append({"gt": s.caption, "caption": cap,
                               "regions": [(r.phrase, [round(v, 3) for v in r.box], round(r.score, 3))
                                           for r in sample.regions]})  # fmt: skip
    if keep is not None:
        keep.extend(samples)
    for name, options in (variants or {}).items():
        q.variants[name] = _variant(scenes, samples, cfg, options, stages[0], batch_size, cats)
    q.caption_object_recall = named / max(1, q.n_objects)
    q.recall_fates = {k: v / max(1, q.n_objects) for k, v in fates.items()}
    q.caption_object_precision = mentioned_right / mentioned if mentioned else 0.0
    q.caption_exact_recall = exact / max(1, q.n_objects)
    if detector_only:
        det, decode = next(st for st in stages if st.name == "detect"), stages[0]
        gt_samples = [
            Sample(key=s.key, source_shard="quality", index=i, image_bytes=s.image, alt_text=s.alt_text,
                   caption=s.caption, phrases=[Phrase(r.phrase, r.char_start, r.char_end) for r in s.regions])
            for i, s in enumerate(scenes)
        ]  # fmt: skip
        t = time.perf_counter()
        for k in range(0, len(gt_samples), batch_size):
            apply_stage(decode, gt_samples[k : k + batch_size])
            apply_stage(det, gt_samples[k : k + batch_size])
        q.seconds["detect_gt_phrases"] = round(time.perf_counter() - t, 2)
        for s, sample in zip(scenes, gt_samples, strict=True):
            _count(q.detector_box, sample.regions if sample.ok else [], s, cats, False)
            _count(q.detector_labeled, sample.regions if sample.ok else [], s, cats, True)
    return q


def _variant(scenes, samples, cfg, options: dict, decode, batch_size: int, cats) -> dict:
    """Phrase-aware box counts and detector seconds of the detector built from ``options`` on ``samples``'
    captions and phrases."""
    from vesl.labelers.detectors import make_detector
    from vesl.pipeline.apply import apply_stage
    from vesl.schemas.config import DetectorConfig
    from vesl.schemas.stage import Sample

    det = make_detector(DetectorConfig(spec=cfg.detector.spec, batch_size=batch_size, **options))
    det.setup()
    again = [Sample(key=s.key, source_shard=s.source_shard, index=s.index, image_bytes=s.image_bytes,
                    alt_text=s.alt_text, caption=s.caption, caption_source=s.caption_source,
                    phrases=list(s.phrases)) for s in samples if s.ok]  # fmt: skip
    seconds = 0.0
    for k in range(0, len(again), batch_size):
        apply_stage(decode, again[k : k + batch_size])
        t = time.perf_counter()
        apply_stage(det, again[k : k + batch_size])
        seconds += time.perf_counter() - t
    by_key = {s.key: s for s in again}
    counts = Counts()
    for scene in scenes:
        s = by_key.get(scene.key)
        _count(counts, s.regions if s is not None and s.ok else [], scene, cats, True)
    # aligned with ``samples`` (a sample that failed before the detector stays as it was), for later stages
    return {"counts": counts, "seconds": seconds, "samples": [by_key.get(s.key, s) for s in samples]}
