"""``cloc:<vesl run dir or export>``: a trained CLOC model as the labeling verifier (``vesl label --verifier``).

The CLOC Prompter embeds a box prompt over the whole image's ViT tokens (no crop), and the text tower embeds
each phrase: their cosine is the region's score. Registered in the ``vesl.verifiers`` entry-point group
(pyproject.toml), so ``labelers/`` never imports the trainer.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vesl.errors import UserError, first_line
from vesl.schemas.config import VerifierConfig


class ClocScorer:
    """Box-prompted region embeddings of a vesl run, checkpoint or export against phrase text embeddings."""

    kind = "cloc"

    def __init__(self, model: str, cfg: VerifierConfig):
        self.model_id = model
        self.model: Any = None
        self.preprocess: Any = None
        self.device: Any = None

    def load(self, device) -> None:
        from vesl.pretrain.data import Preprocess
        from vesl.pretrain.export import load

        p = Path(self.model_id).expanduser()
        if not p.is_dir():
            raise UserError(f"cloc verifier {p} is not a folder: pass a vesl run directory, checkpoint or export")
        try:
            self.model = load(p, device=str(device)).eval()
        except UserError as exc:
            raise UserError(f"cloc verifier {p} is not a vesl model: {exc}") from None
        except (OSError, ValueError, RuntimeError, KeyError) as exc:
            raise UserError(f"can't load the cloc verifier {p}: {first_line(exc, 300)}") from None
        self.preprocess, self.device = Preprocess.from_model(self.model), device

    def score(self, image, boxes: Sequence[Sequence[float]], phrases: Sequence[str]):
        import torch

        from vesl.pretrain.data import letterbox_box

        size, (w, h) = self.preprocess.size, image.size
        pixels = self.preprocess(image).unsqueeze(0).to(self.device)
        canvas = torch.tensor([letterbox_box(b, w, h, size) for b in boxes], dtype=torch.float32, device=self.device)
        regions = self.model.encode_regions(pixels, canvas.unsqueeze(0))[0].float()
        text = self.model.encode_text(list(phrases)).float()
        return (regions @ text.T).cpu()

    def provenance(self) -> dict[str, str]:
        return {"verifier.model": Path(self.model_id).expanduser().name}
