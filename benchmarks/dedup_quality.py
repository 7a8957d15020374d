"""Near-duplicate detection on the synthetic world: quality, the calls it saves, and what the pass costs.

Baseline: no deduplication (every image captioned and grounded). World: ``--n`` items (default 2,000) of a TEST
seed with ``--duplicates`` (default 0.3) near-duplicate copies (re-encoded, resized) and 5% look-alike hard
negatives (same objects, moved); the hash and threshold were chosen on VALIDATION_SEEDS only.

Measured, in one run, with `vesl dedup` on the local engine:
1. recall of the ground-truth duplicate pairs (two items showing one scene) found in one group;
2. false merges: groups joining distinct scenes, and, apart, groups joining a scene and its look-alike;
3. the fraction of captioner/detector calls saved against the ground-truth duplicate fraction;
4. with ``--label``: the dedup pass's wall time against `vesl label --profile demo` on the same inputs;
5. with ``--compare-rows``: a second, deduplicated `vesl label --profile demo --duplicates` run, whose rows
   must equal the full run's for every representative, and each duplicate's regions its representative's.

Goals (exit 1 when one is missed): recall >= 0.99, 0 false merges, 0 look-alike merges, calls saved within
1 point of the duplicate fraction, (with ``--label``) the pass <= 5% of the labeling time, and (with
``--compare-rows``) every representative's row equal to the full run's.

Usage: python benchmarks/dedup_quality.py [--n 2000] [--seed 7001] [--duplicates 0.3] [--label] [--compare-rows]
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
    ap.add_argument("--compare-rows", action="store_true",
                    help="with --label: also label with --duplicates and compare its rows with the full run's")
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
            if args.compare_rows:
                dedup_cfg = resolve_config("demo", None, {"inputs": [f"{tmp}/in"], "output": f"{tmp}/dedup-labels",
                                                          "duplicates": {"table": f"{tmp}/dups"}})
                run(dedup_cfg, progress=False)
                rows = _compare_rows(Path(tmp) / "labels", Path(tmp) / "dedup-labels")
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
        if args.compare_rows:
            same, reps, dup_ok, dups = rows
            print(f"deduplicated run vs full   {same}/{reps} representative rows identical (goal all); "
                  f"{dup_ok}/{dups} duplicates carry their representative's caption and regions")
            ok = ok and same == reps and dup_ok == dups
    return 0 if ok else 1


def _compare_rows(full_dir: Path, dedup_dir: Path) -> tuple[int, int, int, int]:
    """(representative rows identical to the full run's, representatives, duplicates whose caption and
    regions equal their representative's, duplicates)."""

    def rows(d: Path) -> dict[str, dict]:
        return {r["key"]: r for f in sorted(d.glob("part-*[0-9].parquet")) for r in pq.read_table(f).to_pylist()}

    full, dedup = rows(full_dir), rows(dedup_dir)
    reps = [k for k, r in dedup.items() if not r.get("duplicate_of")]
    dups = [k for k, r in dedup.items() if r.get("duplicate_of")]
    same = sum({**dedup[k], "duplicate_of": None} == {**full[k], "duplicate_of": None} for k in reps)
    dup_ok = sum((dedup[k]["caption"], dedup[k]["regions"]) == (dedup[dedup[k]["duplicate_of"]]["caption"],
                                                                dedup[dedup[k]["duplicate_of"]]["regions"])
                 for k in dups)  # fmt: skip
    return same, len(reps), dup_ok, len(dups)


if __name__ == "__main__":
    sys.exit(main())
