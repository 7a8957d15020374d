"""Label quality of the shipped demo models on held-out synthetic scenes, through the product stages.

Scenes come from a world seed the recipes never saw (they train on seeds 0 and 1). The captioner is
``hf:vesl/assets/demo/captioner`` and the detector ``owlv2:vesl/assets/demo/detector``, run exactly as
``vesl label --profile demo`` runs them (decode -> caption -> paper phrases -> detect, threshold 0.1).

Baseline: the alt-text itself as the caption (the paper's "without VESL" labels), for object recall.

    python benchmarks/label_quality.py [--n 200] [--seed 1003]
"""

from __future__ import annotations

import argparse
import json
import os
import time

GOALS = {"caption_object_recall": 0.9, "box_precision": 0.85, "box_recall": 0.85}


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    from vesl.labelers.recipes import ASSETS_DIR
    from vesl.labelers.recipes.quality import evaluate, mentions
    from vesl.pipeline.synth import make_scenes

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--seed", type=int, default=1003, help="held-out world seed (recipes use 0 and 1)")
    p.add_argument("--captioner", default=str(ASSETS_DIR / "captioner"))
    p.add_argument("--detector", default=str(ASSETS_DIR / "detector"))
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--boxes-per-phrase", type=int, default=None,
                   help="detector cap per phrase (default: what --profile demo uses)")
    p.add_argument("--box-voting-iou", type=float, default=None,
                   help="detector box voting IoU, 0 = off (default: what --profile demo uses)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="also write the figures here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    scenes = list(make_scenes(args.n, seed=args.seed))
    n_obj = sum(len(s.objects) for s in scenes)
    alt_recall = sum(mentions(s.alt_text, o.color, o.shape) for s in scenes for o in s.objects) / n_obj
    t = time.perf_counter()
    from vesl.profiles import profile

    options = {k: v for k, v in profile("demo")["detector"].items() if k != "spec"}
    if args.boxes_per_phrase is not None:
        options["boxes_per_phrase"] = args.boxes_per_phrase
    if args.box_voting_iou is not None:
        options["box_voting_iou"] = args.box_voting_iou
    q = evaluate(scenes, args.captioner, args.detector, batch_size=args.batch_size, detector_options=options)
    wall = time.perf_counter() - t
    s = q.summary()

    def ok(v: float, goal: float) -> str:
        return "met" if v >= goal else "NOT met"

    print(f"label quality on {q.n_images} held-out scenes (world seed {args.seed}), {q.n_objects} objects")
    print(f"  captioner {args.captioner}\n  detector  {args.detector} (threshold 0.1, {options})")
    print(f"caption object recall (color+shape named): {q.caption_object_recall:.3f}   "
          f"goal >= {GOALS['caption_object_recall']}: {ok(q.caption_object_recall, GOALS['caption_object_recall'])}")
    print(f"  baseline alt-text as caption:            {alt_recall:.3f}   "
          f"(ratio {q.caption_object_recall / max(alt_recall, 1e-9):.1f}x)")
    print(f"  exact phrase + position named:           {q.caption_exact_recall:.3f}")
    print(f"  caption errors: {q.caption_errors}")
    pb, pl = s["pipeline_box"], s["pipeline_labeled"]
    print(f"pseudo-label boxes (caption -> phrases -> detector), IoU >= 0.5: "
          f"precision {pb['precision']:.3f} ({ok(pb['precision'], GOALS['box_precision'])}), "
          f"recall {pb['recall']:.3f} ({ok(pb['recall'], GOALS['box_recall'])}); "
          f"{pb['n_pred']} boxes for {pb['n_gt']} objects")
    print(f"  ... and phrase names the right category:  precision {pl['precision']:.3f}, recall {pl['recall']:.3f}")
    db, dl = s["detector_box"], s["detector_labeled"]
    print(f"detector only, queried with GT phrases:       precision {db['precision']:.3f}, recall {db['recall']:.3f}"
          f"  (labeled: {dl['precision']:.3f} / {dl['recall']:.3f})")
    print(f"stage seconds: {q.seconds}; total wall {wall:.1f}s")
    for ex in q.examples[:2]:
        print(f"  GT : {ex['gt']}\n  GEN: {ex['caption']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({**s, "alt_text_baseline_recall": alt_recall, "seed": args.seed}, f, indent=2)


if __name__ == "__main__":
    main()
