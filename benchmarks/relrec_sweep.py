"""Relative REC on vesl pseudo-labels: which training-world twins and ``region_relative_words`` teach it.

For each ``TWINS:RELATIVE_WORDS`` setting: ``N`` pairs of the ``--full`` training world (1001) with that share of
look-alike twins are labeled with ``--profile demo``; a ``--clip-only`` baseline and CLOC (with that
``region_relative_words``) are trained with the demo's trainer settings; both are evaluated on a validation
world (region mAcc with GT boxes, the absolute REC set, the relative REC set). Margins are CLOC Prompter minus
the best CLIP baseline, in points. Tune on validation worlds (the default, 1002); report on test worlds once.

    python benchmarks/relrec_sweep.py --n 1000 --steps 1000 --eval-seed 1002 0:0 0.3:0.5 0.3:1.0
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    from vesl.demo.runner import (
        FULL_TRAIN_SEED,
        _evaluate,
        _evaluate_refexp,
        _train,
        generate_input,
        label,
        margin_points,
        rec_margin_points,
        relrec_margin_points,
    )
    from vesl.demo.synth import make_refexp, make_refexp_relative, make_scenes, write_coco, write_refexp

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("settings", nargs="+", help="TWINS:RELATIVE_WORDS, e.g. 0.3:0.5")
    p.add_argument("--out", default="demo-out/relrec_sweep", help="work folder (ignored by git)")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--eval-seed", type=int, default=1002, help="validation world (report on 7001-7003 once)")
    p.add_argument("--eval-n", type=int, default=300)
    args = p.parse_args()

    out, n, steps, val = Path(args.out), args.n, args.steps, args.eval_seed
    coco = write_coco(make_scenes(args.eval_n, val), out / f"coco-{val}")
    rec = write_refexp((make_refexp(val, i) for i in range(args.eval_n)), out / f"rec-{val}")
    rel = write_refexp((make_refexp_relative(val, i) for i in range(args.eval_n)), out / f"relrec-{val}")
    for setting in args.settings:
        twins, rw = (float(x) for x in setting.split(":"))
        t0 = time.time()
        lab = out / f"lab-n{n}-t{twins}"
        if not (lab / "_done").exists():
            generate_input(out / f"in-n{n}-t{twins}", n, FULL_TRAIN_SEED, twins=twins)
            label(out / f"in-n{n}-t{twins}", lab, progress=False, overwrite=True)
            (lab / "_done").write_text("1")
        t1 = time.time()
        clip_dir = out / f"clip-n{n}-t{twins}-{steps}-s{args.seed}"
        if not (clip_dir / "_done").exists():
            _train(lab, clip_dir, steps, seed=args.seed, clip_only=True)
            (clip_dir / "_done").write_text("1")
        cloc_dir = _train(lab, out / f"cloc-n{n}-t{twins}-r{rw}-{steps}-s{args.seed}", steps, seed=args.seed,
                          clip_only=False, region_relative_words=rw)
        t2 = time.time()
        clip_m = _evaluate(clip_dir, coco, ("roi_align", "crop"), grounding=False)
        cloc_m = _evaluate(cloc_dir, coco, ("prompter",), grounding=False)
        m = {"clip_roi_align_macc": clip_m["roi_align_macc"], "clip_crop_macc": clip_m["crop_macc"],
             "cloc_prompter_macc": cloc_m["prompter_macc"]}
        for name, path in (("rec", rec), ("relrec", rel)):
            c = _evaluate_refexp(clip_dir, path, ("roi_align", "crop"))
            q = _evaluate_refexp(cloc_dir, path, ("prompter",))
            m |= {f"{name}_clip_roi_align": c["roi_align"], f"{name}_clip_crop": c["crop"],
                  f"{name}_cloc_prompter": q["prompter"]}
        res = {"twins": twins, "relative_words": rw, "n": n, "steps": steps, "seed": args.seed, "eval_seed": val,
               "macc_margin": round(margin_points(m), 1), "rec_margin": round(rec_margin_points(m), 1),
               "relrec_margin": round(relrec_margin_points(m), 1), **{k: round(100 * v, 1) for k, v in m.items()},
               "label_s": round(t1 - t0), "train_s": round(t2 - t1), "eval_s": round(time.time() - t2)}
        print(json.dumps(res), flush=True)
        with open(out / "results.jsonl", "a") as f:
            f.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
