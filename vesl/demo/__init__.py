"""The demo world: shows the product, is not part of it (the product works with this folder deleted).

- ``synth``: the synthetic scene world (images of coloured shapes, web-like alt-text, ground truth);
- ``source``: ``synth://`` as a labeling input;
- ``recipes/``: the recipes that train the tiny demo models, and their quality checks;
- ``assets/``: those models (captioner, detector, verifier), with their recipe records;
- ``ground_truth``: oracle labels of the synthetic world as a stage (``vesl demo --full --labels gt``);
- ``runner``: ``vesl demo`` and ``vesl demo --full``; ``cli``: the ``demo`` and ``synth`` commands.

It plugs into vesl the way a user's package would, through the entry points declared in ``pyproject.toml``:
``synth://`` (group ``vesl.sources``), the ``demo`` profile (``vesl.profiles``) and the ``synth`` and ``demo``
commands (``vesl.commands``). Nothing outside this folder names it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS_DIR = Path(__file__).resolve().parent / "assets"  # the one place the demo models are looked up

def demo_profile() -> dict[str, Any]:
    """The ``demo`` labeling profile: the bundled offline models when shipped, else alt-text captions only.

    ``demo-plain``'s box voting (the tiny detector fires on several neighbouring patches of an object; the
    measurements are in docs/demo-report.md), and a mirrored second look fused in. The detector keeps 5
    candidate boxes per phrase, and the tiny CLIP verifier keeps, per mention, the candidate it scores highest
    among those whose phrase it confirms: a runner-up box replaces a wrong first one (docs/labeling.md,
    "Several looks" and "Verification"; chosen on validation worlds).
    """
    out = demo_plain_profile()
    verifier = ASSETS_DIR / "verifier"
    if out["detector"]["spec"] != "none":
        out["detector"]["tta"] = ["hflip"]
        if verifier.is_dir():  # the detector's 5 best boxes per phrase are candidates; the verifier picks one
            out["detector"]["boxes_per_phrase"] = 5
            out["verify"] = {"spec": f"clip:{verifier}", "min_score": 0.0, "min_margin": 0.1, "rule": "pick"}
    return out


def demo_plain_profile() -> dict[str, Any]:
    """``demo`` with one look of one detector and no verification: the baseline its label stages are measured
    against (``vesl demo --full --profile demo-plain``)."""
    captioner, detector = ASSETS_DIR / "captioner", ASSETS_DIR / "detector"
    out: dict[str, Any] = {"phrases": {"mode": "paper"}}
    out["captioner"] = {"spec": f"hf:{captioner}"} if captioner.is_dir() else {"spec": "alt_text"}
    detector_cfg = {"spec": f"owlv2:{detector}", "boxes_per_phrase": 1, "box_voting_iou": 0.3}
    out["detector"] = detector_cfg if detector.is_dir() else {"spec": "none"}
    return out
