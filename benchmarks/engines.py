"""Beam DirectRunner and Ray local against the local engine, same input, same stages, same output.

Baseline: ``run_local`` (one process). Measured: ``run_beam`` (Beam's Python FnApiRunner in this
process) and ``run_ray`` (local Ray, actor pools) with ``--workers 1`` and ``--workers 2``. Input:
N synthetic scenes (default 200) written as img2dataset tars of 25; stages: decode, the tiny Qwen2-VL
captioner and the tiny OWLv2 detector from tests/ (random weights: the cost is real, the labels are
not), spaCy phrases. Wall time includes each engine's start-up (model setup in every worker; for Ray
the actor start, with ``ray.init`` timed separately). Every engine's shards are checked to be
byte-identical to the baseline's. Goal: Beam and Ray each <= 1.5x local.

Usage: python benchmarks/engines.py [N_IMAGES]
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests.tiny_vlm / tests.tiny_detectors

SHARD_SIZE = 25


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("part-*.parquet"))}


def main(n: int = 200) -> None:
    from tests.tiny_detectors import build_tiny_owlv2
    from tests.tiny_vlm import build_tiny_vlm
    from vesl.pipeline.config import CaptionerConfig, DetectorConfig, LabelConfig
    from vesl.pipeline.engines.beam_engine import run_beam
    from vesl.pipeline.engines.local import run_local
    from vesl.pipeline.engines.ray_engine import run_ray
    from vesl.pipeline.synth import make_scenes, write_webdataset

    root = Path(tempfile.mkdtemp(prefix="vesl-bench-engines-"))
    try:
        vlm, owl = build_tiny_vlm(root / "vlm"), build_tiny_owlv2(root / "owl")
        write_webdataset(make_scenes(n, seed=0), root / "input", shard_size=SHARD_SIZE)

        def cfg(name: str, **kw) -> LabelConfig:
            return LabelConfig(
                inputs=[str(root / "input")],
                output=str(root / name),
                captioner=CaptionerConfig(spec=f"hf:{vlm}", max_new_tokens=16, batch_size=8, device="cpu"),
                detector=DetectorConfig(spec=f"owlv2:{owl}", threshold=0.05, batch_size=8, device="cpu"),
                **kw,
            )

        timings: dict[str, float] = {}

        def timed(name: str, fn, c: LabelConfig) -> None:
            t = time.perf_counter()
            summary = fn(c, progress=False)
            timings[name] = time.perf_counter() - t
            assert summary["failed"] == [], summary["failed"]
            assert summary["images"] == n, summary
            print(f"  {name:<16} {timings[name]:7.1f} s  {n / timings[name]:6.2f} img/s  {summary['regions']} regions", flush=True)

        print(f"{n} images, {n // SHARD_SIZE} shards, {os.cpu_count()} CPUs", flush=True)
        timed("local", run_local, cfg("local"))
        timed("beam-direct", run_beam, cfg("beam", engine="beam"))

        import ray

        t = time.perf_counter()
        ray.init(include_dashboard=False, log_to_driver=False)
        ray_init = time.perf_counter() - t
        try:
            timed("ray-1-worker", run_ray, cfg("ray1", engine="ray", workers=1))
            timed("ray-2-workers", run_ray, cfg("ray2", engine="ray", workers=2))
        finally:
            ray.shutdown()

        ref = _files(root / "local")
        for name in ("beam", "ray1", "ray2"):
            assert _files(root / name) == ref, f"{name} shards differ from the local engine's"
        print("all engines wrote byte-identical shards")
        print(f"ray.init (not in the Ray times): {ray_init:.1f} s")
        print(f"beam-direct / local:          {timings['beam-direct'] / timings['local']:.2f}x  (goal <= 1.5x)")
        print(f"ray-1-worker / local:         {timings['ray-1-worker'] / timings['local']:.2f}x  (goal <= 1.5x)")
        print(f"ray (init included) / local:  {(timings['ray-1-worker'] + ray_init) / timings['local']:.2f}x")
        print(f"ray scaling, 1 -> 2 workers:  {timings['ray-1-worker'] / timings['ray-2-workers']:.2f}x speed-up")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 200)
