"""What REC needs from region-text data: CLOC trained on phrases with and without position words.

On ground-truth labels of the demo world (an oracle: it isolates the phrase form from labeling noise), this
trains, with the demo's trainer settings, the same steps and seed:

- ``paper``: CLOC on the paper's phrases ("a large red circle"; no position words reach L_region);
- ``referring``: CLOC on the same regions whose phrase runs on through the caption's position words
  ("a large red circle at the top left"), the GRIT-style referring expression of that object;
- ``clip``: the ``--clip-only`` baseline (captions only; its crop and RoI-Align rankings are the baselines).

Then it evaluates `vesl eval --refexp` on a held-out REC set (``vesl synth --format refexp``): CLOC Prompter
ranking against the best CLIP ranking. ``--split relative`` evaluates the relative set instead (an exact look-alike
pair told apart by side, ``--refexp-split relative``); ``--twins`` and ``--relative-words`` then give the training
world its look-alike pairs and the trainer its ``region_relative_words``. Tune on a validation world (1003, the default; see
``vesl.demo.synth.VALIDATION_SEEDS``), report on the sealed test worlds (``TEST_SEEDS``, e.g. 7001).

    python benchmarks/rec_referring.py [--steps 400] [--seed 0] [--rec-seed 1003] [--variants paper referring clip]
    python benchmarks/rec_referring.py --split relative --twins 0.3 --relative-words 0.5
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


class ReferringGroundTruthStage:
    """The demo's ground-truth labels, each region phrase extended through the position words after it."""

    name = "ground_truth"

    def __init__(self, seed: int, referring: bool, twins: float = 0.0):
        from vesl.schemas.stage import StageResources

        self.seed, self.referring, self.twins = seed, referring, twins
        self.resources = StageResources(batch_size=32)

    def setup(self) -> None:
        pass

    def provenance(self) -> dict[str, str]:
        return {"labels": "synthetic ground truth" + (", referring phrases" if self.referring else ""),
                "synth.seed": str(self.seed), "synth.twins": str(self.twins)}

    def __call__(self, batch: list) -> list:
        from vesl.demo.synth import make_scene
        from vesl.schemas.stage import Region

        for s in batch:
            scene = make_scene(self.seed, int(s.key), twins=self.twins)
            regions = []
            for r in scene.regions:
                end = r.char_end
                if self.referring:  # "a large red circle" + " at the top left" up to the next ",", " and " or "."
                    rest = scene.caption[end:]
                    end += min(i for i in (rest.find(","), rest.find(" and "), rest.find("."), len(rest)) if i >= 0)
                regions.append(Region(scene.caption[r.char_start:end], r.char_start, end, r.box, 1.0))
            s.caption, s.caption_source, s.regions = scene.caption, "vlm", regions
        return batch


def main() -> None:
    from vesl.demo.runner import FULL_TRAIN_SEED, _train, generate_input
    from vesl.demo.synth import REFEXP_SPLITS, write_refexp
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.decode import DecodeStage
    from vesl.pipeline.engines.local import run_local
    from vesl.pretrain.eval import refexp_metrics

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo-out/rec_referring", help="work folder (ignored by git)")
    p.add_argument("--n", type=int, default=2000, help="training scenes (world seed 1001, as demo --full)")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--seed", type=int, default=0, help="training seed")
    p.add_argument("--rec-seed", type=int, default=1003, help="REC world seed (validation: 1003; report on a test world, 7001-7005)")
    p.add_argument("--rec-n", type=int, default=300)
    p.add_argument("--variants", nargs="+", default=["paper", "referring", "clip"])
    p.add_argument("--split", choices=sorted(REFEXP_SPLITS), default="absolute", help="the REC set (vesl synth "
                   "--refexp-split): absolute (size and grid words) or relative (a look-alike pair told apart by side)")
    p.add_argument("--twins", type=float, default=0.0, help="share of training scenes with an exact look-alike pair")
    p.add_argument("--relative-words", type=float, default=0.0, help="the trainer's region_relative_words")
    args = p.parse_args()

    out = Path(args.out)
    tag = f"-twins{args.twins}" if args.twins else ""
    generate_input(out / f"input{tag}", args.n, FULL_TRAIN_SEED, twins=args.twins)
    make = REFEXP_SPLITS[args.split]
    rec = write_refexp((make(args.rec_seed, i) for i in range(args.rec_n)), out / f"rec-{args.split}-{args.rec_seed}")
    results: dict[str, dict] = {}
    for variant in args.variants:
        referring = variant == "referring"
        data = out / (("data-referring" if referring else "data-paper") + tag)
        if not (data / "_vesl_done").exists():
            cfg = LabelConfig(inputs=[str(out / f"input{tag}")], output=str(data), overwrite=True)
            run_local(cfg, progress=False, stages_factory=lambda c, r=referring: [
                DecodeStage(c.decode), ReferringGroundTruthStage(FULL_TRAIN_SEED, r, args.twins)])
            (data / "_vesl_done").write_text("1")
        t = time.perf_counter()
        run = _train(data, out / f"run-{variant}{tag}-r{args.relative_words}-{args.steps}-s{args.seed}", args.steps,
                     seed=args.seed, clip_only=variant == "clip", region_relative_words=args.relative_words)
        from vesl.pretrain import load

        methods = ("roi_align", "crop") if variant == "clip" else ("ground", "prompter")
        res = refexp_metrics(load(run).eval(), rec, methods=methods)
        results[variant] = {m: res[m]["acc@0.5"] for m in methods} | {"chance": res["chance"]["acc@0.5"],
                                                                      "train_s": time.perf_counter() - t}
        print(variant, json.dumps(results[variant]), flush=True)
    if "clip" in results:
        best = max(results["clip"]["roi_align"], results["clip"]["crop"])
        for v in ("paper", "referring"):
            if v in results:
                print(f"{v}: CLOC Prompter ranking {results[v]['prompter']:.1f} vs best CLIP ranking {best:.1f} -> "
                      f"{results[v]['prompter'] - best:+.1f} points ({args.split} REC seed {args.rec_seed}, {args.steps} steps, "
                      f"training seed {args.seed})")
    (out / f"results-{args.split}-{args.rec_seed}{tag}-r{args.relative_words}-{args.steps}-s{args.seed}.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
