"""The stage list of a labeling job: decode -> captioner -> phrases -> detector -> verifier (a dedup job: decode -> hash).

Every engine builds its stages through :func:`build_stages` (once per worker), so local, Beam and
Ray run the same code. Imports are lazy: building the list loads no model; ``setup()`` does.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vesl.pipeline.config import LabelConfig

if TYPE_CHECKING:
    from vesl.schemas.stage import Stage


def build_stages(cfg: LabelConfig) -> list[Stage]:
    """The stages for ``cfg``, in order; the detector is left out when its spec is ``none``, the verifier when
    there is no detector or its spec is ``off``."""
    from vesl.pipeline.config import DedupConfig

    if isinstance(cfg, DedupConfig):  # `vesl dedup`: decode -> perceptual hash
        from vesl.pipeline.dedup import build_dedup_stages

        return build_dedup_stages(cfg)
    from vesl.labelers.captioners import make_captioner
    from vesl.labelers.phrases import PhraseStage
    from vesl.pipeline.decode import DecodeStage

    trust = cfg.trust_remote_code
    if cfg.captioner.spec.strip().lower() == "keep":  # re-ground stored captions: no captioner model at all
        from vesl.pipeline.keep import KeepCaption, original_captioner

        captioner: Stage = KeepCaption(original_captioner(list(cfg.inputs)))
    else:
        captioner = make_captioner(cfg.captioner, trust_remote_code=trust, seed=cfg.seed)
    stages: list[Stage] = [DecodeStage(cfg.decode), captioner, PhraseStage(cfg.phrases)]
    if cfg.detector.spec.strip().lower() == "none":
        if cfg.detector.also or cfg.detector.tta:
            from vesl.errors import UserError

            raise UserError("detector.also and detector.tta add looks to a detector: give --detector SPEC first")
        return stages  # skip importing the detector module (torch, torchvision) for a phrases-only job
    from vesl.labelers.detectors import make_detector

    detector = make_detector(cfg.detector, trust_remote_code=trust)
    if detector is not None:
        stages.append(detector)
    if detector is None or cfg.verify.spec == "off":
        return stages
    from vesl.labelers.verifiers import make_verifier

    verifier = make_verifier(cfg.verify)
    if verifier is not None:
        stages.append(verifier)
    return stages
