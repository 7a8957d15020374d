"""Local engine prefetch vs a serial loop, same stages, same output.

Baseline: read -> decode -> model -> write, one shard after another in one thread (what a plain
loop over the stages does). Measured: ``run_local`` (reader thread, decode threads, bounded queue).
The model stage is a real torchvision ResNet-18 forward (random init, no download) at 224 px on
CPU, standing in for a captioner/detector that keeps the main thread busy. Both use the same built
stages and torch threads (``stage_threads`` 1). After a warm-up of each, they run ``REPEATS`` times in
alternating order; the medians (with min-max) and their ratio are printed. Goal: prefetch >= 1.2x serial
(exit 1 when missed). Usage: python benchmarks/local_prefetch.py [N_IMAGES]
"""

from __future__ import annotations

import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPEATS = 5
GOAL = 1.2


class ResNetStage:
    """Scores each image with a ResNet-18 forward; the score is not written (only the cost matters)."""

    name = "model"

    def __init__(self) -> None:
        from vesl.schemas.stage import StageResources

        self.resources = StageResources(batch_size=16)
        self.model = None

    def setup(self) -> None:
        if self.model is not None:
            return
        import torch
        import torchvision

        torch.manual_seed(0)
        self.model = torchvision.models.resnet18(weights=None).eval()

    def __call__(self, batch):
        import numpy as np
        import torch

        x = np.stack([np.asarray(s.image.resize((224, 224)), dtype=np.float32) / 255.0 for s in batch])
        with torch.inference_mode():
            self.model(torch.from_numpy(x).permute(0, 3, 1, 2))
        return batch

    def provenance(self):
        return {"model": "resnet18-random"}


def stages(cfg):
    from vesl.labelers.captioners import make_captioner
    from vesl.pipeline.decode import DecodeStage

    return [DecodeStage(cfg.decode), make_captioner(cfg.captioner), ResNetStage()]


def serial(cfg, st) -> float:
    from vesl.pipeline.apply import apply_stage
    from vesl.pipeline.job import commit, job_provenance, plan_shards, read_task

    prov = job_provenance(cfg, st)
    t = time.perf_counter()
    todo, _ = plan_shards(cfg)
    for task in todo:
        samples = list(read_task(task, cfg))
        for stage in st:
            bs = stage.resources.batch_size
            ok = [s for s in samples if s.ok]
            for i in range(0, len(ok), bs):
                apply_stage(stage, ok[i : i + bs])
        for s in samples:
            s.image = None
        commit(cfg, task, samples, prov)
    return time.perf_counter() - t


def main() -> int:
    import torch

    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.engines.local import run_local, setup_stages

    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 192
    tmp = Path(tempfile.mkdtemp(prefix="vesl-bench-"))
    try:
        src = f"synth://{n}?seed=0&shard_size=48"
        built, _ = setup_stages(LabelConfig(inputs=[src], output=str(tmp / "x")), stages)  # model init outside

        def run(kind: str, tag: str) -> float:
            cfg = LabelConfig(inputs=[src], output=str(tmp / f"{kind}-{tag}"))
            if kind == "serial":
                return serial(cfg, built)
            t0 = time.perf_counter()
            run_local(cfg, lambda c: built, progress=False)
            return time.perf_counter() - t0

        run("serial", "warm")
        run("prefetch", "warm")
        times: dict[str, list[float]] = {"serial": [], "prefetch": []}
        for r in range(REPEATS):
            for kind in ("serial", "prefetch") if r % 2 == 0 else ("prefetch", "serial"):
                times[kind].append(run(kind, str(r)))
        same = all(
            (tmp / "serial-0" / p.name).read_bytes() == p.read_bytes() for p in (tmp / "prefetch-0").glob("*.parquet")
        )
        t_serial, t_prefetch = statistics.median(times["serial"]), statistics.median(times["prefetch"])
        print(f"images: {n}  (torch threads 1, ResNet-18 forward at 224 px as the model stage; "
              f"median of {REPEATS} alternating runs after a warm-up)")
        for kind, t in (("serial loop (baseline)", t_serial), ("run_local prefetch", t_prefetch)):
            key = "serial" if kind.startswith("serial") else "prefetch"
            print(f"{kind:<23} {n / t:8.1f} images/s  ({t:.2f} s; {min(times[key]):.2f}-{max(times[key]):.2f})")
        ratio = t_serial / t_prefetch
        print(f"speedup vs serial: {ratio:.2f}x (goal >= {GOAL}x: {'met' if ratio >= GOAL else 'NOT met'})   "
              f"identical shards: {same}")
        return 0 if ratio >= GOAL and same else 1
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
