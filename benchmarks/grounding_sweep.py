"""Choose the grounding defaults on VALIDATION worlds (never the demo's seeds 1000-1002).

Trains the demo's tiny CLOC (the `vesl demo --full` recipe) on synthetic seed 5001 with one set of overrides
and reports grounding acc@0.5, Prompter mAcc and REC acc@0.5 (Prompter ranking and grounding head) on
held-out seed 5002. Each configuration is one line::

    python benchmarks/grounding_sweep.py --labels gt --steps 600 ground_head=mlp ground_weight=1
    python benchmarks/grounding_sweep.py --labels vesl --steps 1500 ground_head=patch ground_loss=l1+giou

Prints a JSON line; ``--out`` (default sweep-out/) caches the labeled data between runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

TRAIN_SEED, VAL_SEED = 5001, 5002  # validation worlds: disjoint from the demo's 1000/1001/1002


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("overrides", nargs="*", help="train options as key=value (YAML values)")
    ap.add_argument("--labels", choices=("gt", "vesl"), default="gt")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--eval-n", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0, help="training seed")
    ap.add_argument("--out", default="sweep-out")
    args = ap.parse_args(argv)

    from vesl.demo.ground_truth import label_ground_truth
    from vesl.demo.runner import _evaluate, _evaluate_refexp, _train, generate_input, label
    from vesl.demo.synth import make_refexp, make_scenes, write_coco, write_refexp
    from vesl.pipeline.exporters import COCO_ANNOTATIONS

    out = Path(args.out)
    generate_input(out / "input", args.n, TRAIN_SEED)
    coco = out / "val_coco" / COCO_ANNOTATIONS
    if not coco.exists():
        coco = write_coco(make_scenes(args.eval_n, VAL_SEED), out / "val_coco")
    refexp = out / "val_refexp" / "refexp.jsonl"
    if not refexp.exists():
        refexp = write_refexp((make_refexp(VAL_SEED, i) for i in range(args.eval_n)), out / "val_refexp")
    labeled = out / f"labeled-{args.labels}"
    if not (labeled / "manifest.json").exists():
        if args.labels == "gt":
            label_ground_truth(out / "input", labeled, TRAIN_SEED, progress=False)
        else:
            label(out / "input", labeled, profile="demo", progress=False, overwrite=True)
    kw = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in args.overrides)}
    name = "-".join(f"{k}={v}" for k, v in kw.items()) or "default"
    t = time.perf_counter()
    run = _train(labeled, out / "runs" / f"{args.labels}-{args.steps}-s{args.seed}-{name}", args.steps, seed=args.seed,
                 clip_only=False, **kw)
    m = _evaluate(run, coco, ("prompter",), grounding=True)
    r = _evaluate_refexp(run, refexp, ("ground", "prompter"))
    rec = {"labels": args.labels, "steps": args.steps, "seed": args.seed, **kw,
           "grounding_acc": round(100 * m["grounding_acc"], 1), "prompter_macc": round(100 * m["prompter_macc"], 1),
           "rec_prompter": round(100 * r["prompter"], 1), "rec_ground": round(100 * r["ground"], 1),
           "train_eval_s": round(time.perf_counter() - t)}
    print(json.dumps(rec), flush=True)
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(rec) + "\n")


if __name__ == "__main__":
    sys.exit(main())
