"""Label quality of the shipped demo models on sealed test worlds, through the product stages.

The captioner is ``hf:vesl/demo/assets/captioner`` and the detector ``owlv2:vesl/demo/assets/detector``, run
exactly as ``vesl label --profile demo`` runs them (decode -> caption -> paper phrases -> detect).

Worlds: the figures are means over the sealed test seeds (``vesl.demo.synth.TEST_SEEDS``, never looked at
while tuning), with the spread (min-max over seeds). ``--split validation`` measures on the validation seeds
instead: that is the split to tune on. The headline metrics count what CLOC trains on:
- caption recall (the GT objects the caption names by colour and shape) and caption precision (the
  ``color shape`` mentions that name an object of the scene, so invented objects count against it);
- phrase-aware box precision and recall at IoU 0.5: a box counts only if its phrase names the object it lies on.
The lenient box figures (any phrase) follow as secondary lines.

Baseline: the alt-text itself as the caption (the paper's "without VESL" labels), for caption recall.
Verification (``--verifier``, default: the demo profile's): the box figures are given for detection alone and
with the verification stage, with the verifier's cost per image. ``--sweep`` also prints the box figures over
a grid of ``min_score`` x ``min_margin`` (scores computed once, the keep rule applied per cell): tune on
``--split validation``. Exits 1 when a goal is missed.

Several looks (docs/labeling.md, "Several looks"): ``--tta``, ``--also-detector`` and ``--fusion-*`` run the
detector once more with those settings on the same captions and phrases, and print detection alone beside
detection with TTA/fusion, each with its detector seconds per image and the whole labeling time per image
against today's (``--variants FILE.json``, name -> DetectorConfig fields, compares several in one run).

    python benchmarks/label_quality.py [--n 200] [--split test|validation] [--seeds 7001,7002,7003]
        [--verifier off|clip:DIR|cloc:RUN] [--min-score S] [--min-margin M] [--sweep]
        [--tta hflip,scale:1.25] [--also-detector owlv2:PATH] [--fusion-threshold 0.15] [--fusion-iou 0.55]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# box goals: issue 31 (the demo profile with its label stages on)
GOALS = {"caption_recall": 0.9, "caption_precision": 0.9, "box_precision": 0.92, "box_recall": 0.85}
SWEEP_SCORES = (0.0, 0.1, 0.2, 0.3, 0.4)
SWEEP_MARGINS = (0.0, 0.02, 0.05, 0.1, 0.15, 0.2, 0.3)


def _verify(verify: dict, scenes, samples, sweep: bool = False) -> tuple[dict[str, float], list, float]:
    """The verification stage on the detector's labels: (box figures, (score, margin) per region when ``sweep``
    asks for them, s/image)."""
    import copy

    import torch

    from vesl.demo.recipes.quality import labeled_counts
    from vesl.labelers.verifiers import _phrase_texts, make_verifier, own_and_margin
    from vesl.schemas.config import VerifierConfig

    stage = make_verifier(VerifierConfig(**verify))
    stage.setup()
    verified = [copy.copy(s) for s in samples]
    t = time.perf_counter()
    stage([s for s in verified if s.ok])
    per_image = (time.perf_counter() - t) / len(samples)
    c = labeled_counts(scenes, [s.regions if s.ok else [] for s in verified])
    figures = {"box_precision": c.precision, "box_recall": c.recall,
               "verifier_dropped": sum(s.verifier_dropped or 0 for s in verified if s.ok)}
    scored: list[list[tuple[float, float]]] = []  # per sample: (own score, margin) of each region
    with torch.inference_mode():
        for s in samples if sweep else []:
            if not s.ok or not s.regions:
                scored.append([])
                continue
            texts = _phrase_texts(s.phrases, s.regions)
            m = stage.scorer.score(s.image, [r.box for r in s.regions], texts)
            scored.append([own_and_margin(m, k, texts.index(r.phrase)) for k, r in enumerate(s.regions)])
    return figures, scored, per_image


def _sweep_cell(scenes, samples, scored, min_score: float, min_margin: float) -> tuple[float, float]:
    from vesl.demo.recipes.quality import labeled_counts

    kept = [[r for r, (own, margin) in zip(s.regions, sc, strict=True) if own >= min_score and margin >= min_margin]
            if s.ok else [] for s, sc in zip(samples, scored, strict=True)]
    c = labeled_counts(scenes, kept)
    return c.precision, c.recall


def _figures(q, alt_recall: float) -> dict[str, float]:
    s = q.summary()
    return {
        "caption_recall": q.caption_object_recall,
        "caption_precision": q.caption_object_precision,
        "box_precision": s["pipeline_labeled"]["precision"],
        "box_recall": s["pipeline_labeled"]["recall"],
        "lenient_box_precision": s["pipeline_box"]["precision"],
        "lenient_box_recall": s["pipeline_box"]["recall"],
        "detector_gt_phrases_precision": s["detector_labeled"]["precision"],
        "detector_gt_phrases_recall": s["detector_labeled"]["recall"],
        "alt_text_caption_recall": alt_recall,
        "recall_lost_caption": q.recall_fates["caption"],
        "recall_lost_detector": q.recall_fates["detector"],
    }


def main() -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from vesl.cli.profiles import profile
    from vesl.demo import ASSETS_DIR
    from vesl.demo.recipes.quality import evaluate, mentions
    from vesl.demo.synth import TEST_SEEDS, VALIDATION_SEEDS, make_scenes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200, help="scenes per world")
    p.add_argument("--split", choices=("test", "validation"), default="test")
    p.add_argument("--seeds", default=None, help="comma-separated world seeds (default: the first 3 of the split)")
    p.add_argument("--captioner", default=str(ASSETS_DIR / "captioner"))
    p.add_argument("--detector", default=str(ASSETS_DIR / "detector"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--boxes-per-phrase", type=int, default=None,
                   help="detector cap per phrase (default: what --profile demo uses)")
    p.add_argument("--box-voting-iou", type=float, default=None,
                   help="detector box voting IoU, 0 = off (default: what --profile demo uses)")
    p.add_argument("--threshold", type=float, default=None, help="detector score threshold (default: the demo's)")
    p.add_argument("--verifier", default=None,
                   help="off | clip:<open_clip model> | cloc:<vesl run> (default: the demo profile's verifier)")
    p.add_argument("--min-score", type=float, default=None, help="verifier min_score (default: the demo's)")
    p.add_argument("--min-margin", type=float, default=None, help="verifier min_margin (default: the demo's)")
    p.add_argument("--verify-rule", default=None, help="verifier rule: drop | relabel | pick (default: the demo's)")
    p.add_argument("--verify-variants", default=None,
                   help="JSON file: name -> VerifierConfig fields, each applied after every detection compared")
    p.add_argument("--sweep", action="store_true", help="box figures over a grid of min_score x min_margin")
    p.add_argument("--tta", default="", help="test-time looks, comma-separated: hflip, scale:S, hflip+scale:S")
    p.add_argument("--also-detector", action="append", default=[], help="another detector spec to fuse (repeatable)")
    p.add_argument("--fusion-iou", type=float, default=None, help="weighted box fusion IoU (default 0.55)")
    p.add_argument("--fusion-skip", type=float, default=None, help="boxes under this score are left out of fusion")
    p.add_argument("--fusion-conf-type", default=None, help="avg | max | box_and_model_avg | absent_model_aware_avg")
    p.add_argument("--fusion-threshold", type=float, default=None, help="drop fused boxes scoring <= this")
    p.add_argument("--variants", default=None, help="JSON file: name -> DetectorConfig fields, each compared")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    split = TEST_SEEDS if args.split == "test" else VALIDATION_SEEDS
    seeds = [int(x) for x in args.seeds.split(",")] if args.seeds else list(split[:3])

    demo = profile("demo")
    detector = demo["detector"]
    verify = dict(demo.get("verify") or {"spec": "off"})
    for key, value in (("spec", args.verifier), ("min_score", args.min_score), ("min_margin", args.min_margin),
                       ("rule", args.verify_rule)):
        if value is not None:
            verify[key] = value
    verifying = verify.get("spec", "off") != "off"
    options = {k: v for k, v in detector.items() if k not in ("spec", "threshold")}
    threshold = args.threshold if args.threshold is not None else detector.get("threshold", 0.1)
    if args.boxes_per_phrase is not None:
        options["boxes_per_phrase"] = args.boxes_per_phrase
    if args.box_voting_iou is not None:
        options["box_voting_iou"] = args.box_voting_iou

    variants = {}
    fusion = {k: v for k, v in (("iou_thr", args.fusion_iou), ("skip_box_thr", args.fusion_skip),
                                ("conf_type", args.fusion_conf_type), ("threshold", args.fusion_threshold))
              if v is not None}  # fmt: skip
    looks = [t.strip() for t in args.tta.split(",") if t.strip()]
    if looks or args.also_detector or fusion:
        variants["fused"] = {**options, "threshold": threshold, "tta": looks, "also": args.also_detector,
                             "fusion": fusion}
    if args.variants:
        with open(args.variants) as f:
            variants.update({k: {**options, "threshold": threshold, **v} for k, v in json.load(f).items()})
    verify_variants: dict[str, dict] = {}
    if args.verify_variants:
        with open(args.verify_variants) as f:
            verify_variants = json.load(f)
    per_seed: dict[int, dict[str, float]] = {}
    grid: dict[int, dict[tuple[float, float], tuple[float, float]]] = {}
    costs: dict[int, dict[str, float]] = {}
    t = time.perf_counter()
    for seed in seeds:
        scenes = list(make_scenes(args.n, seed=seed))
        n_obj = sum(len(s.objects) for s in scenes)
        alt = sum(mentions(s.alt_text, o.color, o.shape) for s in scenes for o in s.objects) / n_obj
        samples: list = []
        q = evaluate(scenes, args.captioner, args.detector, batch_size=args.batch_size, threshold=threshold,
                     detector_options=options, keep=samples, variants=variants)
        per_seed[seed] = _figures(q, alt)
        per_seed[seed]["detection_box_precision"] = per_seed[seed]["box_precision"]
        per_seed[seed]["detection_box_recall"] = per_seed[seed]["box_recall"]
        labeling = sum(v for k, v in q.seconds.items() if k not in ("setup", "detect_gt_phrases")) / args.n
        costs[seed] = {"labeling_s_per_image": labeling, "detect_s_per_image": q.seconds.get("detect", 0.0) / args.n}
        for name, v in q.variants.items():
            per_seed[seed][f"{name}_box_precision"] = v["counts"].precision
            per_seed[seed][f"{name}_box_recall"] = v["counts"].recall
            costs[seed][f"{name}_detect_s_per_image"] = v["seconds"] / args.n
            # the whole labeling time with this detector instead of today's, over today's
            costs[seed][f"{name}_labeling_ratio"] = (labeling - costs[seed]["detect_s_per_image"]
                                                     + v["seconds"] / args.n) / labeling
        if verifying:
            figures, scored, per_image = _verify(verify, scenes, samples, sweep=args.sweep)
            per_seed[seed].update(figures)
            per_seed[seed]["verifier_ms_per_image"] = 1000 * per_image
            per_seed[seed]["detect_ms_per_image"] = 1000 * q.seconds.get("detect", 0.0) / len(scenes)
            # all together: each detection compared, then each verification compared
            for name, v in q.variants.items():
                both, _, _ = _verify(verify, scenes, v["samples"])
                per_seed[seed][f"{name}+verify_box_precision"] = both["box_precision"]
                per_seed[seed][f"{name}+verify_box_recall"] = both["box_recall"]
            for vname, vcfg in verify_variants.items():
                for name, dets in (("detection", samples), *((n, v["samples"]) for n, v in q.variants.items())):
                    both, _, _ = _verify({**verify, **vcfg}, scenes, dets)
                    per_seed[seed][f"{name}+{vname}_box_precision"] = both["box_precision"]
                    per_seed[seed][f"{name}+{vname}_box_recall"] = both["box_recall"]
            if args.sweep:
                grid[seed] = {(a, b): _sweep_cell(scenes, samples, scored, a, b)
                              for a in SWEEP_SCORES for b in SWEEP_MARGINS}
        print(f"  world {seed}: " + ", ".join(f"{k} {v:.3f}" for k, v in per_seed[seed].items()), flush=True)
    wall = time.perf_counter() - t

    def mean(k: str) -> float:
        return statistics.fmean(f[k] for f in per_seed.values())

    def spread(k: str) -> str:
        vals = [f[k] for f in per_seed.values()]
        return f"{mean(k):.3f} (min {min(vals):.3f}, max {max(vals):.3f})"

    print(f"label quality, {args.split} worlds {seeds}, {args.n} scenes each "
          f"({'reported figures' if args.split == 'test' else 'for tuning; not reported'})")
    print(f"  captioner {args.captioner}\n  detector  {args.detector} (threshold {threshold}, {options})")
    print(f"  verifier  {verify}")
    missed = []
    for key, label in (("caption_recall", "caption recall (objects named by colour and shape)"),
                       ("caption_precision", "caption precision (named objects that exist)"),
                       ("box_precision", "phrase-aware box precision, IoU >= 0.5"),
                       ("box_recall", "phrase-aware box recall, IoU >= 0.5")):  # fmt: skip
        met = mean(key) >= GOALS[key]
        missed += [] if met else [key]
        print(f"{label:52s} {spread(key)}   goal >= {GOALS[key]}: {'met' if met else 'NOT met'}")
    print(f"  baseline alt-text as caption, recall:              {spread('alt_text_caption_recall')}")
    print(f"  lenient box precision / recall (any phrase):       {spread('lenient_box_precision')} / "
          f"{spread('lenient_box_recall')}")
    print(f"  detector alone with GT phrases, phrase-aware P / R: {spread('detector_gt_phrases_precision')} / "
          f"{spread('detector_gt_phrases_recall')}")
    print(f"  where recall is lost (fractions of all objects):    caption never names it "
          f"{spread('recall_lost_caption')}; named, no right box {spread('recall_lost_detector')}")
    if verifying:
        print(f"  before verification, phrase-aware P / R:          {spread('detection_box_precision')} / "
              f"{spread('detection_box_recall')}")
        print(f"  regions dropped by the verifier: {sum(f['verifier_dropped'] for f in per_seed.values()):.0f}; its cost "
              f"{spread('verifier_ms_per_image')} ms per image (detector {spread('detect_ms_per_image')} ms)")
    if grid:
        print("sweep (mean over worlds): precision / recall; rows min_score, columns min_margin")
        print("      " + "".join(f"{b:>14}" for b in SWEEP_MARGINS))
        for a in SWEEP_SCORES:
            cells = [tuple(statistics.fmean(g[(a, b)][i] for g in grid.values()) for i in (0, 1)) for b in SWEEP_MARGINS]
            print(f"{a:5}  " + "".join(f"   {pr:.3f}/{rc:.3f}" for pr, rc in cells))
    if variants:
        def cost(k: str) -> float:
            return statistics.fmean(c[k] for c in costs.values())

        print(f"  profile's detection, no verification: P / R {spread('detection_box_precision')} / {spread('detection_box_recall')}, detector "
              f"{1000 * cost('detect_s_per_image'):.0f} ms/image, labeling {1000 * cost('labeling_s_per_image'):.0f} "
              "ms/image")
        for name, v in variants.items():
            print(f"  {name}: P / R {spread(name + '_box_precision')} / {spread(name + '_box_recall')}, detector "
                  f"{1000 * cost(name + '_detect_s_per_image'):.0f} ms/image "
                  f"({cost(name + '_detect_s_per_image') / cost('detect_s_per_image'):.2f}x), labeling "
                  f"{cost(name + '_labeling_ratio'):.2f}x today's   "
                  f"{ {k: v[k] for k in ('tta', 'also', 'fusion') if k in v} }")
            if verifying:
                print(f"  {name} + verification: P / R {spread(name + '+verify_box_precision')} / "
                      f"{spread(name + '+verify_box_recall')}")
    for vname in verify_variants:
        for name in ("detection", *variants):
            print(f"  {name} + {vname}: P / R {spread(f'{name}+{vname}_box_precision')} / "
                  f"{spread(f'{name}+{vname}_box_recall')}   {verify_variants[vname]}")
    print(f"total wall {wall:.1f}s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"split": args.split, "seeds": seeds, "n": args.n, "goals": GOALS, "per_seed": per_seed,
                       "mean": {k: mean(k) for k in next(iter(per_seed.values()))}, "missed": missed,
                       "costs": costs, "variants": variants, "verify_variants": verify_variants}, f, indent=2)
    if missed:
        print(f"goals missed: {', '.join(missed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
