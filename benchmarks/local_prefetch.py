"""Local engine prefetch vs a serial loop, same stages, same output.

Baseline: read -> decode -> model -> write, one shard after another in one thread (what a plain
loop over the stages does). Measured: ``run_local`` (reader thread, decode threads, bounded queue).
The model stage is a real torchvision ResNet-18 forward (random init, no download) at 224 px on
CPU, standing in for a captioner/detector that keeps the main thread busy. Prints images/s of both
and their ratio, measured in one run. Usage: python benchmarks/local_prefetch.py [N_IMAGES]
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from pathlib import Path


class ResNetStage:
    """Scores each image with a ResNet-18 forward; the score is not written (only the cost matters)."""

    name = "model"

    def __init__(self) -> None:
        from vesl.pipeline.stage import StageResources

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
    from vesl.pipeline.job import commit_shard, job_provenance, plan_shards, read_task
    from vesl.pipeline.stage import apply_stage

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
        commit_shard(cfg, task, samples, prov)
    return time.perf_counter() - t


def main() -> None:
    import torch

    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.engines.local import run_local, setup_stages

    torch.set_num_threads(1)
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 192
    tmp = Path(tempfile.mkdtemp(prefix="vesl-bench-"))
    try:
        src = f"synth://{n}?seed=0&shard_size=48"
        cfg_a = LabelConfig(inputs=[src], output=str(tmp / "serial"))
        cfg_b = LabelConfig(inputs=[src], output=str(tmp / "prefetch"))
        built, _ = setup_stages(cfg_a, stages)  # model init outside both timings; both use these stages
        t_serial = serial(cfg_a, built)
        t0 = time.perf_counter()
        summary = run_local(cfg_b, lambda cfg: built, progress=False)
        t_prefetch = time.perf_counter() - t0
        same = all(
            (tmp / "serial" / p.name).read_bytes() == p.read_bytes()
            for p in (tmp / "prefetch").glob("*.parquet")
        )
        print(f"images: {n}  (torch threads 1, ResNet-18 forward at 224 px as the model stage)")
        print(f"serial loop (baseline): {n / t_serial:8.1f} images/s  ({t_serial:.2f} s)")
        print(f"run_local prefetch:     {n / t_prefetch:8.1f} images/s  ({t_prefetch:.2f} s)")
        print(f"speedup vs serial: {t_serial / t_prefetch:.2f}x   identical shards: {same}   rows: {summary['rows']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
