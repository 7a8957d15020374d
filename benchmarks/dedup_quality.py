"""Near-duplicate detection on the synthetic world: quality, the calls it saves, and what the pass costs.

Baseline: no deduplication (every image captioned and grounded). World: ``--n`` items (default 2,000) of a TEST
seed with ``--duplicates`` (default 0.3) near-duplicate copies (re-encoded, resized) and 5% look-alike hard
negatives (same objects, moved); the hash and threshold were chosen on VALIDATION_SEEDS only.

Measured, in one run, with `vesl dedup` on the local engine:
1. recall of the ground-truth duplicate pairs (two items showing one scene) found in one group;
2. false merges: groups joining distinct scenes, and, apart, groups joining a scene and its look-alike;
3. the fraction of captioner/detector calls saved against the ground-truth duplicate fraction;
4. with ``--label``: the dedup pass's wall time against `vesl label --profile demo` on the same inputs.

Goals (exit 1 when one is missed): recall >= 0.99, 0 false merges, 0 look-alike merges, calls saved within
1 point of the duplicate fraction, and (with ``--label``) the pass <= 5% of the labeling time.

Usage: python benchmarks/dedup_quality.py [--n 2000] [--seed 7001] [--duplicates 0.3] [--label]
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import pyarrow.parquet as pq

from vesl.demo.synth import TEST_SEEDS, make_world, write_webdataset
from vesl.pipeline.config import DedupConfig
from vesl.pipeline.engines import run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=TEST_SEEDS[0])
    ap.add_argument("--duplicates", type=float, default=0.3)
    ap.add_argument("--label", action="store_true", help="also time `vesl label --profile demo` on the same inputs")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        world = make_world(args.n, args.seed, args.duplicates)
        write_webdataset(world, Path(tmp) / "in", shard_size=100)
        t = time.perf_counter()
        summary = run(DedupConfig(inputs=[f"{tmp}/in"], output=f"{tmp}/dups"), progress=False)
        dedup_s = time.perf_counter() - t
        table = pq.read_table(f"{tmp}/dups/duplicates.parquet").to_pylist()
        label_s = None
        if args.label:
            from vesl.cli.profiles import resolve_config

            cfg = resolve_config("demo", None, {"inputs": [f"{tmp}/in"], "output": f"{tmp}/labels"})
            t = time.perf_counter()
            run(cfg, progress=False)
            label_s = time.perf_counter() - t
    scene = {s.key: s.duplicate_of or s.key for s in world}  # which scene each item shows
    like = {s.key: s.look_alike_of for s in world if s.look_alike_of}
    found = {r["key"]: r["representative_key"] for r in table}
    members = defaultdict(list)
    for s in world:
        members[scene[s.key]].append(s.key)
    pairs = [p for m in members.values() for p in itertools.combinations(m, 2)]
    recall = sum(found[a] == found[b] for a, b in pairs) / max(1, len(pairs))
    groups = defaultdict(set)
    for k, rep in found.items():
        groups[rep].add(scene[k])
    false_merges = sum(len(g) - 1 for g in groups.values())
    like_merges = sum(found[k] == found[o] for k, o in like.items())
    truth = sum(1 for s in world if s.duplicate_of) / len(world)
    saved = summary["dedup"]["duplicate_fraction"]
    print(f"world: {len(world)} items, seed {args.seed}, {len(pairs)} duplicate pairs, {len(like)} look-alikes")
    print(f"recall of duplicate pairs  {recall:.4f}  (goal >= 0.99)")
    print(f"false merges               {false_merges}  (goal 0); look-alike merges {like_merges} (goal 0)")
    print(f"calls saved                {100 * saved:.1f}% vs {100 * truth:.1f}% duplicates (goal within 1 point)")
    ok = recall >= 0.99 and false_merges == 0 and like_merges == 0 and abs(saved - truth) <= 0.01
    print(f"dedup pass                 {dedup_s:.1f} s ({1000 * dedup_s / len(world):.2f} ms per image)")
    if label_s is not None:
        print(f"labeling (demo profile)    {label_s:.1f} s; dedup / labeling = {100 * dedup_s / label_s:.1f}% (goal <= 5%)")
        ok = ok and dedup_s <= 0.05 * label_s
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
