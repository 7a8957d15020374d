"""CLOC model: open_clip image/text towers plus the Prompter and the grounding head.

The Prompter turns ViT patch tokens (before pooling) and one prompt token into a region embedding in the
CLIP space. A prompt is either a box (sinusoidal encoding of its corners, then a linear layer) or a text
(the CLIP text embedding, then a linear layer). The grounding head regresses a box from the text-prompted
region embedding.

Boxes everywhere in this module are ``x0, y0, x1, y1`` normalized to [0, 1] of the model's square input
canvas (see ``vesl.pretrain.data.letterbox_box`` for the transform from original-image boxes).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_convert

MODEL_CONFIG_DIR = Path(__file__).parent / "model_configs"
POOL_MODES = ("prompt", "mean")
GROUND_HEADS = ("locate", "mlp", "patch")


@dataclass
class PrompterConfig:
    """Prompter and grounding-head settings; stored with every checkpoint and export.

    ``pool="prompt"`` reads the encoder output at the prompt position (the patch rows do not change it in a
    single layer, so they are never recomputed per region: cheap). ``pool="mean"`` mean-pools every output
    position as written in the paper, recomputing the layer for each region (exact, ~M x more Prompter cost).
    ``patch_pos`` adds the box encoding of each patch's own cell to its token, so box prompts and patch
    positions live in one space. ``box_bias`` (on by default; not in the paper) adds ``log`` of how much of
    each patch a box covers to the box prompt's attention logits, so attention starts inside the box and
    region learning is much faster on small data; ``box_bias=False`` is the paper-literal Prompter.

    ``ground_head="locate"`` (not in the paper) reads the box out of the text prompt's attention: the
    soft-argmax of its prompt-to-patch attention logits over the patch-cell centres gives the box centre, and
    the MLP adds a sub-cell offset and predicts the size. The attention itself then gets the gradient that
    locates the object. ``ground_head="mlp"`` is the paper-literal head: the MLP regresses all four numbers
    from the region embedding alone. ``ground_head="patch"`` (default; OWL-ViT style, not in the paper) leaves the Prompter to region
    embeddings: every patch token proposes a box (its cell centre plus an offset, and a size), and the text
    prompt picks among them through its own query/key projections; the box is the softmax-weighted mean.
    """

    pool: str = "prompt"
    patch_pos: bool = True
    box_bias: bool = True
    n_freqs: int = 16
    ground_hidden: int = 0  # 0: 2 x embed_dim
    ground_head: str = "patch"

    def __post_init__(self) -> None:
        if self.pool not in POOL_MODES:
            raise ValueError(f"prompter pool must be one of {POOL_MODES}, got {self.pool!r}")
        if self.ground_head not in GROUND_HEADS:
            raise ValueError(f"grounding head must be one of {GROUND_HEADS}, got {self.ground_head!r}")

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> PrompterConfig:
        """A config stored with a checkpoint or export; those saved before ``ground_head`` existed used the MLP."""
        return cls(**{"ground_head": "mlp", **d})


def register_model_configs() -> None:
    """Make the shipped tiny JSON configs (``vesl-tiny-vit`` ...) visible to open_clip by name."""
    import open_clip
    from open_clip import factory

    if MODEL_CONFIG_DIR not in factory._MODEL_CONFIG_PATHS:
        open_clip.add_model_config(MODEL_CONFIG_DIR)


def sincos_boxes(boxes: torch.Tensor, n_freqs: int) -> torch.Tensor:
    """Sinusoidal encoding of box corners: (..., 4) in [0, 1] -> (..., 8 * n_freqs).

    Frequencies are evenly spaced (pi, 2 pi, ..., n_freqs pi): a dot product of two such encodings can then
    express smooth functions of corner differences at patch resolution, which is what attention needs to
    pick the patches a box covers (powers of two would waste most features on sub-pixel frequencies).
    """
    freqs = torch.arange(1, n_freqs + 1, device=boxes.device, dtype=boxes.dtype) * math.pi
    ang = boxes.unsqueeze(-1) * freqs  # (..., 4, F)
    return torch.cat([ang.sin(), ang.cos()], dim=-1).flatten(-2)


def grid_cell_boxes(grid: tuple[int, int]) -> torch.Tensor:
    """The normalized box of every patch cell, row-major: (gh * gw, 4)."""
    gh, gw = grid
    ys, xs = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    x0, y0 = xs.flatten() / gw, ys.flatten() / gh
    return torch.stack([x0, y0, x0 + 1.0 / gw, y0 + 1.0 / gh], dim=-1).float()


class Prompter(nn.Module):
    """Single-layer, single-head pre-norm transformer encoder over ``[prompt; patch tokens]``."""

    def __init__(self, width: int, embed_dim: int, grid: tuple[int, int], cfg: PrompterConfig):
        super().__init__()
        self.cfg = cfg
        self.width = width
        self.box_embed = nn.Linear(8 * cfg.n_freqs, width)
        if cfg.ground_head != "patch":  # the patch head grounds text without the Prompter: no text prompts
            self.text_embed = nn.Linear(embed_dim, width)
        self.ln_1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Linear(width, embed_dim, bias=False)
        self.register_buffer("cell_boxes", grid_cell_boxes(grid), persistent=False)

    def box_prompt(self, boxes: torch.Tensor) -> torch.Tensor:
        return self.box_embed(sincos_boxes(boxes.to(self.box_embed.weight.dtype), self.cfg.n_freqs))

    def text_prompt(self, text_features: torch.Tensor) -> torch.Tensor:
        return self.text_embed(text_features.to(self.text_embed.weight.dtype))

    def _tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.cfg.patch_pos:
            if tokens.shape[1] != self.cell_boxes.shape[0]:
                raise ValueError(f"{tokens.shape[1]} patch tokens but the Prompter grid has {self.cell_boxes.shape[0]}")
            tokens = tokens + self.box_prompt(self.cell_boxes).to(tokens.dtype)
        return tokens

    def box_attn_bias(self, boxes: torch.Tensor) -> torch.Tensor:
        """(B, R, 4) boxes -> (B, R, N) log share of each patch cell covered by the box (0 inside)."""
        c = self.cell_boxes.to(boxes.dtype)
        b = boxes.unsqueeze(-2)
        iw = (torch.minimum(b[..., 2], c[:, 2]) - torch.maximum(b[..., 0], c[:, 0])).clamp_min(0)
        ih = (torch.minimum(b[..., 3], c[:, 3]) - torch.maximum(b[..., 1], c[:, 1])).clamp_min(0)
        cover = iw * ih / ((c[:, 2] - c[:, 0]) * (c[:, 3] - c[:, 1]))
        return torch.log(cover.clamp_min(1e-3))

    def patch_logits(self, x: torch.Tensor, prompts: torch.Tensor) -> torch.Tensor:
        """Prompt-to-patch attention logits (B, R, N) of tokens ``x`` that already hold their cell encoding."""
        w = self.width
        q_p = self.qkv(self.ln_1(prompts))[..., :w]
        k_x = self.qkv(self.ln_1(x))[..., w : 2 * w]
        return torch.einsum("brd,bnd->brn", q_p, k_x) * w**-0.5

    def forward(self, tokens: torch.Tensor, prompts: torch.Tensor, bias: torch.Tensor | None = None,
                with_logits: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, N, W) patch tokens, prompts (B, R, W) -> region embeddings (B, R, E), not normalized.

        ``bias`` (B, R, N) is added to the prompt-to-patch attention logits (see ``box_bias``). With
        ``with_logits`` also returns those logits before the bias (B, R, N), for the grounding read-out.
        """
        x = self._tokens(tokens)
        if self.cfg.pool == "mean":
            y = self._forward_mean(x, prompts, bias)
            return (y, self.patch_logits(x, prompts)) if with_logits else y
        w = self.width
        q_p, k_p, v_p = self.qkv(self.ln_1(prompts)).split(w, dim=-1)
        _, k_x, v_x = self.qkv(self.ln_1(x)).split(w, dim=-1)
        scale = w**-0.5
        s_self = (q_p * k_p).sum(-1, keepdim=True) * scale  # (B, R, 1): the prompt attends to itself
        logits = torch.einsum("brd,bnd->brn", q_p, k_x) * scale  # (B, R, N)
        s_x = logits + bias.to(logits.dtype) if bias is not None else logits
        attn = torch.cat([s_self, s_x], dim=-1).softmax(dim=-1)
        o = attn[..., :1] * v_p + torch.einsum("brn,bnd->brd", attn[..., 1:], v_x)
        h = prompts + self.out_proj(o)
        h = h + self.mlp(self.ln_2(h))
        y = self.proj(self.ln_post(h))
        return (y, logits) if with_logits else y

    def _forward_mean(self, x: torch.Tensor, prompts: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        b, r, w = prompts.shape
        n = x.shape[1]
        seq = torch.cat([prompts.reshape(b * r, 1, w), x.unsqueeze(1).expand(b, r, n, w).reshape(b * r, n, w)], 1)
        q, k, v = self.qkv(self.ln_1(seq)).split(w, dim=-1)
        mask = None
        if bias is not None:  # the same bias as in "prompt" pooling: on the prompt row's logits to the patches
            mask = q.new_zeros(b * r, 1 + n, 1 + n)
            mask[:, 0, 1:] = bias.reshape(b * r, n).to(q.dtype)
        h = seq + self.out_proj(F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        h = h + self.mlp(self.ln_2(h))
        return self.proj(self.ln_post(h.mean(dim=1))).reshape(b, r, -1)


class GroundingHead(nn.Module):
    """Text prompt -> box (x0, y0, x1, y1) on the model canvas.

    ``kind="mlp"``: a 2-layer GELU MLP regresses a sigmoid (cx, cy, w, h) from the text-prompted region
    embedding, as in the paper.
    ``kind="locate"``: the centre is the soft-argmax of the text prompt's Prompter attention logits over the cell
    centres (with a learned temperature), plus an offset of at most one cell from the same MLP; the MLP's other
    two outputs give the size.
    ``kind="patch"``: each patch token proposes a box (its cell centre plus an offset of at most one cell, and a
    size); the text selects among them with its own query/key projections (not the Prompter's attention, so
    grounding does not pull on the region embeddings), and the box is the selection-weighted mean.
    """

    def __init__(self, embed_dim: int, hidden: int, grid: tuple[int, int] = (1, 1), kind: str = "mlp",
                 width: int = 0):
        super().__init__()
        self.kind = kind
        self.hidden = hidden
        if kind in ("mlp", "locate"):
            self.mlp = nn.Sequential(nn.Linear(embed_dim, hidden), nn.GELU(), nn.Linear(hidden, 4))
        if kind == "patch":
            if width <= 0:
                raise ValueError("the patch grounding head needs the patch token width")
            self.query = nn.Linear(embed_dim, hidden)
            self.key = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden))
            self.box = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, 4))
        if kind in ("locate", "patch"):
            cells = grid_cell_boxes(grid)
            self.register_buffer("cell_centres", (cells[:, :2] + cells[:, 2:]) / 2, persistent=False)
            self.register_buffer("cell_size", torch.tensor([1.0 / grid[1], 1.0 / grid[0]]), persistent=False)
            self.log_temp = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, patch_logits: torch.Tensor | None = None) -> torch.Tensor:
        """``mlp`` / ``locate``: text-prompted region embeddings (..., E) and their patch logits (..., N)."""
        out = self.mlp(x)
        if self.kind == "mlp":
            return box_convert(out.sigmoid(), "cxcywh", "xyxy")
        if patch_logits is None:
            raise ValueError("the locate grounding head needs the prompt's patch logits")
        p = (patch_logits.float() * self.log_temp.exp()).softmax(dim=-1)
        centre = p @ self.cell_centres + out[..., :2].float().tanh() * self.cell_size
        return box_convert(torch.cat([centre, out[..., 2:].float().sigmoid()], dim=-1), "cxcywh", "xyxy")

    def from_patches(self, text: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``patch``: text features (B, R, E) and ViT patch tokens (B, N, W) -> boxes (B, R, 4), logits (B, R, N)."""
        q = self.query(text.to(self.query.weight.dtype))
        k = self.key(tokens.to(self.query.weight.dtype))
        logits = torch.einsum("brd,bnd->brn", q, k).float() * self.hidden**-0.5
        p = (logits * self.log_temp.exp()).softmax(dim=-1)
        raw = self.box(tokens.to(self.query.weight.dtype)).float()  # (B, N, 4): offset and size per patch
        proposals = torch.cat([self.cell_centres + raw[..., :2].tanh() * self.cell_size, raw[..., 2:].sigmoid()], -1)
        return box_convert(p @ proposals, "cxcywh", "xyxy"), logits


def ground_boxes(prompter: Prompter, head: GroundingHead, tokens: torch.Tensor,
                 text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Text features (B, R, E) on patch tokens (B, N, W) -> boxes (B, R, 4) and the text's patch logits (B, R, N)."""
    if head.kind == "patch":
        return head.from_patches(text, tokens)
    y, logits = prompter(tokens, prompter.text_prompt(text), with_logits=True)
    return head(y, logits), logits


class CLOCModel(nn.Module):
    """An open_clip CLIP plus the Prompter and grounding head. ``clip`` stays a plain open_clip model."""

    def __init__(self, clip: nn.Module, model_name: str, prompter_cfg: PrompterConfig | None = None):
        super().__init__()
        from open_clip.transformer import VisionTransformer

        visual = clip.visual
        if not isinstance(visual, VisionTransformer):
            raise ValueError(f"{model_name}: the Prompter needs an open_clip ViT image tower, got {type(visual).__name__}")
        self.clip = clip
        self.model_name = model_name
        self.prompter_cfg = prompter_cfg or PrompterConfig()
        width = visual.conv1.out_channels
        embed_dim = visual.output_dim
        self.embed_dim = embed_dim
        self.grid = tuple(visual.grid_size)
        self.image_size = tuple(visual.image_size)
        self.prompter = Prompter(width, embed_dim, self.grid, self.prompter_cfg)
        self.ground_head = GroundingHead(embed_dim, self.prompter_cfg.ground_hidden or 2 * embed_dim, self.grid,
                                         self.prompter_cfg.ground_head, width)
        self._tokenizer = None

    # ---- open_clip towers -------------------------------------------------------------------------
    @property
    def logit_scale(self) -> nn.Parameter:
        return self.clip.logit_scale

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            self._tokenizer = get_tokenizer(self.model_name, self.clip.context_length)
        return self._tokenizer

    def image_tokens(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One ViT pass: (pooled projected image features, patch tokens (B, N, W) before pooling)."""
        v = self.clip.visual
        x = v.transformer(v._embeds(images))
        pooled, tokens = v._pool(x)
        if v.proj is not None:
            pooled = pooled @ v.proj
        return pooled, tokens

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.clip.encode_image(images, normalize=normalize)

    def _as_tokens(self, texts: Any) -> torch.Tensor:
        if isinstance(texts, torch.Tensor):
            return texts
        return self.tokenizer(list(texts)).to(self.logit_scale.device)

    def encode_text(self, texts: Any, normalize: bool = True) -> torch.Tensor:
        """texts: token ids (T, L) or a list of strings."""
        return self.clip.encode_text(self._as_tokens(texts), normalize=normalize)

    def _encode_text_fast(self, tokens: torch.Tensor, trimmed: bool = False) -> torch.Tensor:
        """encode_text on the shortest prefix that holds every sequence's end token (normalized).

        With a causal mask and end-token pooling, positions after the end token cannot change the output, so
        dropping the common padding tail gives the same embedding at a fraction of the cost for short phrases.
        ``trimmed``: the caller already cut the tokens (:func:`trim_tokens`, on the host), so the length is not
        read back from the device. Falls back to open_clip's encode_text for towers where that does not hold.
        """
        return self._encode_texts_fast([tokens], trimmed)[0]

    def _encode_texts_fast(self, token_sets: list[torch.Tensor], trimmed: bool = False) -> list[torch.Tensor]:
        """:meth:`_encode_text_fast` of several token batches, with one token-embedding lookup for all of them.

        Why one lookup: the embedding's backward writes a dense (vocabulary x width) gradient per call, so the
        captions and the phrases as two calls paid that fill twice, plus the sum of the two, every step.
        """
        clip = self.clip
        usable = (
            getattr(clip, "text_pool_type", None) == "argmax"
            and getattr(clip, "attn_mask", None) is not None
            and hasattr(clip, "token_embedding")
            and all(t.shape[0] > 0 for t in token_sets)
        )
        if not usable:
            return [self.encode_text(t) for t in token_sets]
        cut = [t if trimmed else t[:, : int(t.argmax(dim=-1).max()) + 1] for t in token_sets]
        flat = clip.token_embedding(torch.cat([t.reshape(-1) for t in cut]))
        cast = clip.transformer.get_cast_dtype()
        out, start = [], 0
        for t in cut:
            n = t.shape[1]
            x = flat[start : start + t.numel()].view(*t.shape, -1).to(cast) + clip.positional_embedding[:n].to(cast)
            start += t.numel()
            x = clip.transformer(x, attn_mask=clip.attn_mask[:n, :n])
            x = clip.ln_final(x)
            x = x[torch.arange(x.shape[0], device=x.device), t.argmax(dim=-1)]
            proj = clip.text_projection
            if proj is not None:
                x = proj(x) if isinstance(proj, nn.Linear) else x @ proj
            out.append(F.normalize(x, dim=-1))
        return out

    # ---- region API -------------------------------------------------------------------------------
    def encode_regions(self, images: torch.Tensor, boxes: torch.Tensor | list[torch.Tensor], normalize: bool = True):
        """Box-prompted region embeddings. boxes: (B, M, 4) -> (B, M, E); or a list of (M_i, 4) -> list."""
        if isinstance(boxes, (list, tuple)):
            counts = [len(b) for b in boxes]
            m = max(counts + [1])
            padded = images.new_zeros(len(boxes), m, 4)
            padded[..., 2:] = 1.0
            for i, b in enumerate(boxes):
                padded[i, : len(b)] = torch.as_tensor(b, dtype=padded.dtype, device=padded.device)
            out = self.encode_regions(images, padded, normalize)
            return [out[i, :c] for i, c in enumerate(counts)]
        _, tokens = self.image_tokens(images)
        y = self.prompter(tokens, self.prompter.box_prompt(boxes), self._box_bias(boxes))
        return F.normalize(y, dim=-1) if normalize else y

    def _box_bias(self, boxes: torch.Tensor) -> torch.Tensor | None:
        return self.prompter.box_attn_bias(boxes) if self.prompter_cfg.box_bias else None

    def ground(self, images: torch.Tensor, texts: Any) -> torch.Tensor:
        """One text per image (list of B strings or (B, L) ids) -> boxes (B, 4) on the model canvas."""
        text = self.encode_text(texts)
        _, tokens = self.image_tokens(images)
        return ground_boxes(self.prompter, self.ground_head, tokens, text.unsqueeze(1))[0][:, 0]

    def roi_align_regions(self, images: torch.Tensor, boxes: list[torch.Tensor], output_size: int = 2) -> list[torch.Tensor]:
        """CLIP baseline: RoI-Align on the patch-token grid, average, project with the ViT head, normalize."""
        from torchvision.ops import roi_align

        _, tokens = self.image_tokens(images)
        b, n, w = tokens.shape
        gh, gw = self.grid
        fmap = tokens.transpose(1, 2).reshape(b, w, gh, gw)
        scale = torch.tensor([gw, gh, gw, gh], dtype=fmap.dtype, device=fmap.device)
        rois = [torch.as_tensor(bx, dtype=fmap.dtype, device=fmap.device) * scale for bx in boxes]
        pooled = roi_align(fmap, rois, output_size=output_size, spatial_scale=1.0, sampling_ratio=2, aligned=True)
        feats = pooled.mean(dim=(2, 3))
        if self.clip.visual.proj is not None:
            feats = feats @ self.clip.visual.proj
        feats = F.normalize(feats, dim=-1)
        return list(feats.split([len(bx) for bx in boxes]))

    # ---- training forward -------------------------------------------------------------------------
    def forward(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        region_boxes: torch.Tensor | None = None,
        region_texts: torch.Tensor | None = None,
        region_valid: torch.Tensor | None = None,
        clip_only: bool = False,
        phrase_index: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Features for the losses. Padded regions are replaced by constants before any computation.

        With ``phrase_index`` the text inputs come from :func:`prepare_texts` (run on the host before the
        batch moves to the device): ``texts`` trimmed, ``region_texts`` the distinct phrases and
        ``phrase_index`` (B, M) where each region's phrase is. Then the forward never waits on the device.
        """
        if phrase_index is None and region_valid is not None:
            prep = prepare_texts(texts, region_texts, region_valid)
            texts, region_texts, phrase_index = prep["texts"], prep["region_texts"], prep["phrase_index"]
        pooled, tokens = self.image_tokens(images)
        regions = not clip_only and region_valid is not None
        # only valid rows are encoded, each distinct phrase once
        text_sets = [texts, region_texts] if regions else [texts]
        encoded = self._encode_texts_fast(text_sets, trimmed=phrase_index is not None)
        out = {
            "image_features": F.normalize(pooled, dim=-1),
            "text_features": encoded[0],
            "logit_scale": self.logit_scale.exp(),
        }
        if not regions:
            return out
        m = region_valid.shape[1]
        valid = region_valid.bool()
        whole = torch.tensor([0.0, 0.0, 1.0, 1.0], dtype=region_boxes.dtype, device=region_boxes.device)
        boxes = torch.where(valid.unsqueeze(-1), region_boxes, whole)
        phr = encoded[1]
        phr_bm = torch.where(valid.unsqueeze(-1), phr[phrase_index.clamp_min(0)], torch.zeros((), dtype=phr.dtype,
                                                                                             device=phr.device))
        patch_head = self.ground_head.kind == "patch"  # grounds without a text pass through the Prompter
        prompts = self.prompter.box_prompt(boxes)
        if not patch_head:
            prompts = torch.cat([prompts, self.prompter.text_prompt(phr_bm)], dim=1)
        bias = self._box_bias(boxes)
        if bias is not None and not patch_head:
            bias = torch.cat([bias, torch.zeros_like(bias)], dim=1)  # text prompts attend freely
        y, logits = self.prompter(tokens, prompts.to(tokens.dtype), bias, with_logits=True)
        out["region_features"] = F.normalize(y[:, :m], dim=-1)
        out["region_text_features"] = phr_bm
        if patch_head:
            pred, ground_logits = self.ground_head.from_patches(phr_bm, tokens)
        else:
            pred, ground_logits = self.ground_head(y[:, m:], logits[:, m:]), logits[:, m:]
        out["pred_boxes"] = pred.float()
        if self.prompter_cfg.ground_head in ("locate", "patch"):
            # which patch cell holds each region's centre: the target of the text's patch selection
            gh, gw = self.grid
            centre = ((boxes[..., :2] + boxes[..., 2:]) / 2).clamp(0, 1 - 1e-6)
            out["ground_logits"] = ground_logits.float()
            out["ground_cells"] = (centre[..., 1] * gh).long() * gw + (centre[..., 0] * gw).long()
        return out

    def config_dict(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "prompter": asdict(self.prompter_cfg)}


def trim_tokens(tokens: torch.Tensor) -> torch.Tensor:
    """Token ids (..., L) cut after the last end token of any row (the end token has the highest id)."""
    if tokens.numel() == 0:
        return tokens
    return tokens[..., : int(tokens.argmax(dim=-1).max()) + 1]


def prepare_texts(texts: torch.Tensor, region_texts: torch.Tensor, region_valid: torch.Tensor) -> dict[str, torch.Tensor]:
    """The text inputs of ``CLOCModel.forward`` in the form that needs no host read on the device.

    Run it where the batch still lives (the host): captions trimmed, the distinct phrases of the valid regions
    (at least one row, trimmed) and ``phrase_index`` (B, M): each region's row among them, -1 for padding.
    """
    valid = region_valid.bool()
    flat = region_texts.reshape(-1, region_texts.shape[-1])
    v = valid.reshape(-1)
    if bool(v.any()):
        uniq, inverse = torch.unique(flat[v], dim=0, return_inverse=True)
    else:
        uniq, inverse = flat[:1], torch.zeros(0, dtype=torch.long, device=flat.device)
    index = torch.full(v.shape, -1, dtype=torch.long, device=flat.device)
    index[v] = inverse
    return {"texts": trim_tokens(texts), "region_texts": trim_tokens(uniq), "phrase_index": index.view(valid.shape)}


class _quiet_random_init_warning:
    """open_clip logs a root WARNING for every randomly initialized model; from scratch is our default."""

    @staticmethod
    def _filter(record: logging.LogRecord) -> bool:
        return "No pretrained weights loaded" not in record.getMessage()

    def __enter__(self) -> None:
        logging.getLogger().addFilter(self._filter)

    def __exit__(self, *exc: object) -> None:
        logging.getLogger().removeFilter(self._filter)


def get_tokenizer(model_name: str, context_length: int | None = None):
    import open_clip

    register_model_configs()
    return open_clip.get_tokenizer(model_name, context_length=context_length)


def create_model(
    model_name: str = "vesl-tiny-vit",
    pretrained: str | None = None,
    prompter: PrompterConfig | dict | None = None,
    seed: int | None = 0,
    device: str | torch.device = "cpu",
) -> CLOCModel:
    """Build the towers with open_clip (any model name; ``pretrained`` = open_clip tag or weights path)."""
    import open_clip

    register_model_configs()
    if seed is not None:
        torch.manual_seed(seed)
    cfg = prompter if isinstance(prompter, PrompterConfig) else PrompterConfig(**(prompter or {}))
    with _quiet_random_init_warning():
        clip = open_clip.create_model(model_name, pretrained=pretrained or None, device=device)
    return CLOCModel(clip, model_name, cfg).to(device)


def preprocess_cfg(model: CLOCModel) -> dict[str, Any]:
    """Mean/std/size that the loader must use for this model (open_clip's per-model preprocess config)."""
    pp = dict(getattr(model.clip.visual, "preprocess_cfg", {}) or {})
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    return {
        "size": list(model.image_size),
        "mean": list(pp.get("mean", OPENAI_DATASET_MEAN)),
        "std": list(pp.get("std", OPENAI_DATASET_STD)),
    }
