"""Oracle labels for the synthetic world as a stage, and a labeled dataset of them (``--labels gt``)."""

from __future__ import annotations

from pathlib import Path

from vesl.schemas.stage import StageResources


class GroundTruthStage:
    """Oracle labels for the synthetic world: the GT caption and regions of each scene (``--labels gt``).

    Replaces the captioner, phrase and detector stages to measure how much better labels would buy;
    the scene is recovered from the key (the scene index) and the seed of the generated input.
    """

    name = "ground_truth"

    def __init__(self, seed: int, twins: float = 0.0):
        self.seed, self.twins = seed, twins
        self.resources = StageResources(batch_size=32)

    def setup(self) -> None:
        pass

    def teardown(self) -> None:
        pass

    def provenance(self) -> dict[str, str]:
        prov = {"labels": "synthetic ground truth", "synth.seed": str(self.seed)}
        return prov | ({"synth.twins": str(self.twins)} if self.twins else {})

    def __call__(self, batch: list) -> list:
        from vesl.demo.synth import make_scene

        for s in batch:
            scene = make_scene(self.seed, int(s.key), twins=self.twins)
            s.caption, s.caption_source, s.regions = scene.caption, "vlm", list(scene.regions)
        return batch


def label_ground_truth(input_dir: Path, output_dir: Path, seed: int, progress: bool = True, twins: float = 0.0) -> dict:
    """Write the GT of generated input as a region-text dataset through the local engine and shard writer."""
    from vesl.pipeline.config import LabelConfig
    from vesl.pipeline.decode import DecodeStage
    from vesl.pipeline.engines.local import run_local

    cfg = LabelConfig(inputs=[str(input_dir)], output=str(output_dir), overwrite=True)
    return run_local(
        cfg, stages_factory=lambda c: [DecodeStage(c.decode), GroundTruthStage(seed, twins)], progress=progress
    )
