"""A CLOC model as a transformers ``CLIPModel`` folder, and the region API that reads it back.

``vesl export-model RUN --format hf --out DIR`` writes::

    DIR/config.json, DIR/model.safetensors   transformers CLIPModel (load with CLIPModel / CLIPVisionModel)
    DIR/preprocessor_config.json             CLIPImageProcessor set up like vesl's letterbox preprocessing
    DIR/tokenizer.json, tokenizer_config.json CLIPTokenizer converted from open_clip's BPE
    DIR/vesl_heads.safetensors               the Prompter and the grounding head
    DIR/vesl_config.json                     Prompter settings, the open_clip config, the layout ("transformers")

open_clip ViTs map onto transformers CLIP one to one: the patch conv, class and positional embeddings,
``ln_pre`` = ``pre_layrnorm``, the fused ``in_proj`` split into q/k/v, ``ln_post`` = ``post_layernorm`` and
``proj`` = ``visual_projection`` (transposed). Architectures that do not map (attentional pooling, average
pooling, a non-ViT tower, layer scale, custom attention blocks, SigLIP's logit bias ...) are refused with a
one-line reason; see :func:`check_mappable`.

Image preprocessing. vesl letterboxes: the long side goes to the model size (aspect kept), the image sits at
the top left and the rest is the mean colour. The exported ``CLIPImageProcessor`` does the same with
``size={"max_height": S, "max_width": S}``, no center crop, and ``do_pad`` to S x S after normalizing (so the
padding is 0 = the mean colour). Differences: transformers floors the short side where vesl rounds it
(at most one pixel), pads with the exact mean where vesl pads with the mean rounded to 8 bits, and its default torchvision backend resizes with torch's bicubic kernel rather than
PIL's (``CLIPImageProcessorPil`` uses PIL's, like vesl).

Tokenizer. The ids are open_clip's up to and including the end token. open_clip pads with 0 and the export
pads with ``<|endoftext|>``: padding after the end token cannot change a CLIP text embedding (causal mask,
pooling at the first end token), and ``!`` (id 0) cannot be a pad token without being split out of text.
open_clip cleans text with ftfy and a double HTML unescape first; transformers' CLIPTokenizer does not (it
normalizes NFC, whitespace and case), so curly quotes, Latin ligatures, full-width forms and HTML entities
tokenize differently unless the text is cleaned first (:class:`CLOCRegionModel` does that).

Longer than 400 lines on purpose: the export to transformers and the region API that reads it back are two
halves of one weight mapping and must change together.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vesl.errors import UserError

HEADS_WEIGHTS = "vesl_heads.safetensors"
VESL_CONFIG = "vesl_config.json"
LAYOUT = "transformers"
END_TOKEN = "<|endoftext|>"
START_TOKEN = "<|startoftext|>"


# ----------------------------------------------------------------------------- what maps


def _activation(module: Any, where: str) -> str:
    import torch.nn as nn
    from open_clip.transformer import QuickGELU

    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}[module.approximate]
    raise UserError(f"{where}: activation {type(module).__name__} has no transformers CLIP counterpart "
                    "(gelu, quick_gelu and tanh-gelu map)")


def _tower(transformer: Any, where: str) -> dict[str, Any]:
    """Width, heads, MLP width, activation and LayerNorm eps of an open_clip Transformer, checked block by block."""
    import torch.nn as nn
    from open_clip.transformer import ResidualAttentionBlock

    acts, eps = set(), set()
    for i, blk in enumerate(transformer.resblocks):
        if type(blk) is not ResidualAttentionBlock:
            raise UserError(f"{where} block {i} is {type(blk).__name__} (qk-norm, scaled-cosine or scaled attention): "
                            "transformers CLIP has plain pre-norm attention blocks only")
        if not isinstance(blk.ls_1, nn.Identity) or not isinstance(blk.ls_2, nn.Identity):
            raise UserError(f"{where} uses layer scale (ls_init_value): transformers CLIP has no layer scale")
        if blk.attn.in_proj_bias is None or blk.attn.in_proj_weight is None:
            raise UserError(f"{where}: attention without a fused biased in_proj does not map onto CLIP q/k/v")
        acts.add(_activation(blk.mlp.gelu, where))
        for ln in (blk.ln_1, blk.ln_2):
            if not isinstance(ln, nn.LayerNorm):
                raise UserError(f"{where}: norm layer {type(ln).__name__} is not a LayerNorm")
            eps.add(ln.eps)
    if len(acts) > 1 or len(eps) > 1:
        raise UserError(f"{where}: mixed activations or LayerNorm eps across blocks do not fit one CLIP config")
    blk = transformer.resblocks[0]
    return {"width": transformer.width, "heads": blk.attn.num_heads, "layers": len(transformer.resblocks),
            "mlp": blk.mlp.c_fc.out_features, "act": acts.pop(), "eps": eps.pop()}


def check_mappable(clip: Any) -> dict[str, Any]:
    """The transformers-CLIP shape of an open_clip model, or a one-line UserError naming what does not map."""
    import torch.nn as nn
    from open_clip.model import CLIP
    from open_clip.transformer import VisionTransformer

    if not isinstance(clip, CLIP):
        raise UserError(f"open_clip {type(clip).__name__} (custom or Hugging Face text tower) does not map onto "
                        "transformers CLIP: only open_clip's CLIP with its own text transformer does")
    v = clip.visual
    if not isinstance(v, VisionTransformer):
        raise UserError(f"image tower {type(v).__name__} is not a ViT: transformers CLIPVisionModel holds a ViT only")
    if v.attn_pool is not None:
        raise UserError("the ViT uses attentional pooling (CoCa-style attn_pool): CLIPVisionModel pools the class token")
    if v.pool_type != "tok":
        raise UserError(f"the ViT pools with pool_type={v.pool_type!r}: CLIPVisionModel pools the class token ('tok')")
    if isinstance(v.ln_pre, nn.Identity):
        raise UserError("the ViT has no ln_pre (no_ln_pre): CLIPVisionModel always applies pre_layrnorm")
    if not isinstance(v.ln_pre, nn.LayerNorm) or not isinstance(v.ln_post, nn.LayerNorm):
        raise UserError("the ViT's ln_pre/ln_post are not LayerNorms")
    if v.proj is None:
        raise UserError("the ViT has no output projection: CLIPModel needs a visual_projection")
    if v.image_size[0] != v.image_size[1] or v.patch_size[0] != v.patch_size[1]:
        raise UserError(f"non-square image {v.image_size} or patch {v.patch_size}: CLIPVisionConfig is square")
    if v.conv1.bias is not None:
        raise UserError("the patch embedding has a bias: CLIP's patch_embedding has none")
    if getattr(clip, "logit_bias", None) is not None:
        raise UserError("the model has a logit_bias (SigLIP-style sigmoid loss): CLIPModel has a logit scale only")
    if clip.text_pool_type not in ("argmax", "eos"):
        raise UserError(f"the text tower pools with {clip.text_pool_type!r}: CLIPTextModel pools at the end token")
    if clip.attn_mask is None:
        raise UserError("the text tower has no causal mask: CLIPTextModel is causal")
    tp = clip.text_projection
    if tp is None or (isinstance(tp, nn.Linear) and tp.bias is not None) or not isinstance(tp, (nn.Linear, nn.Parameter)):
        raise UserError("the text projection is missing, biased or an MLP: CLIPModel's text_projection is one "
                        "bias-free linear layer")
    if not isinstance(clip.ln_final, nn.LayerNorm):
        raise UserError("the text tower's final norm is not a LayerNorm")
    vt, tt = _tower(v.transformer, "image tower"), _tower(clip.transformer, "text tower")
    vt["eps"] = _same_eps(vt["eps"], (v.ln_pre, v.ln_post), "image tower")
    tt["eps"] = _same_eps(tt["eps"], (clip.ln_final,), "text tower")
    return {"vision": vt, "text": tt, "embed_dim": v.output_dim, "image_size": v.image_size[0],
            "patch_size": v.patch_size[0], "context_length": clip.context_length, "vocab_size": clip.vocab_size}


def _same_eps(eps: float, norms: tuple, where: str) -> float:
    if any(n.eps != eps for n in norms):
        raise UserError(f"{where}: LayerNorm eps differs between blocks and pre/post norms")
    return eps


def hf_config(clip: Any):
    """transformers ``CLIPConfig`` for an open_clip CLIP (after :func:`check_mappable`)."""
    from transformers import CLIPConfig

    s = check_mappable(clip)
    vt, tt = s["vision"], s["text"]
    return CLIPConfig(
        text_config={
            "vocab_size": s["vocab_size"], "hidden_size": tt["width"], "intermediate_size": tt["mlp"],
            "num_hidden_layers": tt["layers"], "num_attention_heads": tt["heads"],
            "max_position_embeddings": s["context_length"], "hidden_act": tt["act"], "layer_norm_eps": tt["eps"],
            "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "projection_dim": s["embed_dim"],
        },
        vision_config={
            "hidden_size": vt["width"], "intermediate_size": vt["mlp"], "num_hidden_layers": vt["layers"],
            "num_attention_heads": vt["heads"], "image_size": s["image_size"], "patch_size": s["patch_size"],
            "hidden_act": vt["act"], "layer_norm_eps": vt["eps"], "projection_dim": s["embed_dim"],
        },
        projection_dim=s["embed_dim"],
        logit_scale_init_value=float(clip.logit_scale.detach()),
    )


# ----------------------------------------------------------------------------- weights


def _block_keys(oc: str, hf: str) -> list[tuple[str, str, str]]:
    pairs = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("attn.out_proj", "self_attn.out_proj"),
             ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2")]
    out = [(f"{oc}.{a}.{p}", f"{hf}.{b}.{p}", "same") for a, b in pairs for p in ("weight", "bias")]
    out += [(f"{oc}.attn.in_proj_{p}", f"{hf}.self_attn.{{}}_proj.{p}", "qkv") for p in ("weight", "bias")]
    return out


def key_map(clip: Any) -> list[tuple[str, str, str]]:
    """(open_clip key, transformers key, how): how is same, T (transpose) or qkv (split in three)."""
    from torch import nn

    s = check_mappable(clip)
    m = [
        ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", "same"),
        ("visual.class_embedding", "vision_model.embeddings.class_embedding", "same"),
        ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", "same"),
        ("visual.proj", "visual_projection.weight", "T"),
        ("token_embedding.weight", "text_model.embeddings.token_embedding.weight", "same"),
        ("positional_embedding", "text_model.embeddings.position_embedding.weight", "same"),
        ("logit_scale", "logit_scale", "same"),
    ]
    for oc, hf in (("visual.ln_pre", "vision_model.pre_layrnorm"), ("visual.ln_post", "vision_model.post_layernorm"),
                   ("ln_final", "text_model.final_layer_norm")):
        m += [(f"{oc}.weight", f"{hf}.weight", "same"), (f"{oc}.bias", f"{hf}.bias", "same")]
    if isinstance(clip.text_projection, nn.Linear):
        m.append(("text_projection.weight", "text_projection.weight", "same"))
    else:
        m.append(("text_projection", "text_projection.weight", "T"))
    for i in range(s["vision"]["layers"]):
        m += _block_keys(f"visual.transformer.resblocks.{i}", f"vision_model.encoder.layers.{i}")
    for i in range(s["text"]["layers"]):
        m += _block_keys(f"transformer.resblocks.{i}", f"text_model.encoder.layers.{i}")
    return m


def to_hf_state_dict(clip: Any) -> dict[str, Any]:
    sd = clip.state_dict()
    out = {}
    for oc, hf, how in key_map(clip):
        t = sd[oc].detach()
        if how == "T":
            out[hf] = t.T.contiguous()
        elif how == "qkv":
            for name, part in zip("qkv", t.chunk(3, dim=0), strict=True):
                out[hf.format(name)] = part.contiguous()
        else:
            out[hf] = t.contiguous()
    return out


def from_hf_state_dict(hf_sd: dict[str, Any], clip: Any) -> dict[str, Any]:
    """The inverse of :func:`to_hf_state_dict`: transformers CLIP weights -> the open_clip model's keys."""
    import torch

    out = {}
    for oc, hf, how in key_map(clip):
        if how == "T":
            out[oc] = hf_sd[hf].T.contiguous()
        elif how == "qkv":
            out[oc] = torch.cat([hf_sd[hf.format(n)] for n in "qkv"], dim=0)
        else:
            out[oc] = hf_sd[hf]
    return out


def to_hf_model(clip: Any):
    """A transformers ``CLIPModel`` holding the open_clip model's weights (strict: every weight maps)."""
    import torch
    from transformers import CLIPModel

    model = CLIPModel(hf_config(clip))
    sd = to_hf_state_dict(clip)
    res = model.load_state_dict(sd, strict=False)
    # position_ids are buffers transformers builds itself
    missing = [k for k in res.missing_keys if not k.endswith("position_ids")]
    if missing or res.unexpected_keys:
        raise RuntimeError(f"CLIP weight mapping is incomplete: missing {missing}, unexpected {res.unexpected_keys}")
    with torch.no_grad():
        model.logit_scale.copy_(clip.logit_scale.detach().reshape(model.logit_scale.shape))
    return model.eval()


# ----------------------------------------------------------------------------- tokenizer, image processor


def clip_tokenizer(context_length: int):
    """transformers ``CLIPTokenizer`` built from open_clip's own BPE file (the same vocabulary and merges)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1]]  # open_clip's SimpleTokenizer slice
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [START_TOKEN, END_TOKEN]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, unk_token=END_TOKEN,
                        bos_token=START_TOKEN, eos_token=END_TOKEN, pad_token=END_TOKEN,
                        model_max_length=context_length)
    return tok


def image_processor(size: int, mean: list[float], std: list[float]):
    """``CLIPImageProcessor`` doing vesl's letterbox: long side to ``size``, top-left, mean-colour padding."""
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(
        do_resize=True, size={"max_height": size, "max_width": size}, resample=3, do_center_crop=False,
        crop_size={"height": size, "width": size}, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(mean), image_std=list(std), do_convert_rgb=True, do_pad=True,
        pad_size={"height": size, "width": size},
    )


# ----------------------------------------------------------------------------- export


def export_hf(model: Any, out: Path, model_cfg: dict, model_name: str) -> Path:
    """Write a CLOC model (``vesl.pretrain.model.CLOCModel``) as a transformers CLIPModel folder plus heads."""
    from safetensors.torch import save_file

    from vesl.pretrain.model import preprocess_cfg

    hf = to_hf_model(model.clip)  # raises the one-line reason before anything is written
    out.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out)
    pp = preprocess_cfg(model)
    image_processor(int(pp["size"][0]), pp["mean"], pp["std"]).save_pretrained(out)
    clip_tokenizer(model.clip.context_length).save_pretrained(out)
    heads = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("clip.")}
    save_file(heads, str(out / HEADS_WEIGHTS))
    cfg = {"format": 1, "layout": LAYOUT, "model_name": model_name, "prompter": model.config_dict()["prompter"],
           "open_clip_model_cfg": model_cfg, "preprocess": {"letterbox": True, **pp}}
    (out / VESL_CONFIG).write_text(json.dumps(cfg, indent=2))
    return out


def load_open_clip_from_hf(path: Path, device: str = "cpu"):
    """The full vesl ``CLOCModel`` (open_clip towers) from a transformers export; exact inverse of the export."""
    import open_clip
    import torch

    from vesl.pretrain.checkpoint import REEXPORT, read_safetensors
    from vesl.pretrain.model import (
        CLOCModel,
        PrompterConfig,
        _quiet_random_init_warning,
        register_model_configs,
    )

    cfg = json.loads((path / VESL_CONFIG).read_text())
    register_model_configs()
    name = cfg["model_name"]
    with _quiet_random_init_warning():
        if name in open_clip.list_models():
            clip = open_clip.create_model(name)
        else:
            clip = open_clip.model.CLIP(**cfg["open_clip_model_cfg"])
    hf_sd = read_safetensors(path / "model.safetensors", REEXPORT)
    with torch.no_grad():
        clip.load_state_dict(from_hf_state_dict(hf_sd, clip), strict=True)
    model = CLOCModel(clip, name, PrompterConfig(**cfg["prompter"]))
    _load_heads(model, path)
    return model.to(device).eval()


def _load_heads(model: Any, path: Path) -> None:
    from vesl.pretrain.checkpoint import REEXPORT, read_safetensors

    res = model.load_state_dict(read_safetensors(path / HEADS_WEIGHTS, REEXPORT), strict=False)
    if res.unexpected_keys or any(not k.startswith("clip.") for k in res.missing_keys):
        raise UserError(f"{path / HEADS_WEIGHTS} does not match the model; re-export it with `vesl export-model`")


# ----------------------------------------------------------------------------- region API from the folder


def _features(out: Any) -> Any:
    """transformers 5 returns a model output from get_*_features (projected ``pooler_output``); 4 a tensor."""
    return getattr(out, "pooler_output", out)


def clean_text(text: str) -> str:
    """open_clip's text cleaning (ftfy, double HTML unescape, whitespace), before the transformers tokenizer."""
    import html

    import ftfy

    return " ".join(html.unescape(html.unescape(ftfy.fix_text(text))).split())


class CLOCRegionModel:
    """Region embeddings and grounding from an exported folder, with transformers and the two vesl heads only.

    >>> m = CLOCRegionModel.from_pretrained("DIR")
    >>> emb = m.encode_regions([img], [[[x0, y0, x1, y1], ...]])   # pixel boxes -> one (M, E) tensor per image
    >>> boxes = m.ground([img], ["the small red circle at the top left"])  # -> pixel boxes (B, 4)

    Images are PIL images, boxes are pixel ``x0, y0, x1, y1`` of the original image. Embeddings are
    L2-normalized and live in the CLIP space (compare them with ``encode_text``).
    """

    def __init__(self, clip: Any, tokenizer: Any, prompter: Any, ground_head: Any, cfg: dict, device: str = "cpu"):
        from vesl.pretrain.data import Preprocess

        self.clip, self.tokenizer, self.prompter, self.ground_head = clip, tokenizer, prompter, ground_head
        self.cfg, self.device = cfg, device
        pp = cfg["preprocess"]
        self.preprocess = Preprocess(int(pp["size"][0]), tuple(pp["mean"]), tuple(pp["std"]))
        self.prompter_cfg = prompter.cfg

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str = "cpu") -> CLOCRegionModel:
        import torch
        from transformers import CLIPModel, CLIPTokenizer

        from vesl.pretrain.checkpoint import REEXPORT, read_safetensors
        from vesl.pretrain.model import GroundingHead, Prompter, PrompterConfig

        p = Path(path)
        if not (p / VESL_CONFIG).exists() or not (p / "config.json").exists():
            raise UserError(f"{p} is not a `vesl export-model --format hf` folder (config.json + {VESL_CONFIG})")
        cfg = json.loads((p / VESL_CONFIG).read_text())
        if cfg.get("layout") != LAYOUT:
            raise UserError(f"{p} is an open_clip export; load it with vesl.pretrain.load, or re-export with --format hf")
        clip = CLIPModel.from_pretrained(p).to(device).eval()
        tok = CLIPTokenizer.from_pretrained(p)
        vc = clip.config.vision_config
        grid = (vc.image_size // vc.patch_size,) * 2
        pcfg = PrompterConfig.from_saved(cfg["prompter"])
        embed_dim = clip.config.projection_dim
        prompter = Prompter(vc.hidden_size, embed_dim, grid, pcfg)
        head = GroundingHead(embed_dim, pcfg.ground_hidden or 2 * embed_dim, grid, pcfg.ground_head, vc.hidden_size)
        heads = read_safetensors(p / HEADS_WEIGHTS, REEXPORT)
        with torch.no_grad():
            prompter.load_state_dict({k[len("prompter."):]: v for k, v in heads.items() if k.startswith("prompter.")})
            head.load_state_dict({k[len("ground_head."):]: v for k, v in heads.items() if k.startswith("ground_head.")})
        return cls(clip, tok, prompter.to(device).eval(), head.to(device).eval(), cfg, device)

    # -- towers
    def pixel_values(self, images: list) -> Any:
        import torch

        return torch.stack([self.preprocess(im) for im in images]).to(self.device)

    def image_tokens(self, pixel_values: Any) -> tuple[Any, Any]:
        """(projected pooled image features, patch tokens after post_layernorm) -- the Prompter's input."""
        vm = self.clip.vision_model
        h = vm(pixel_values=pixel_values).last_hidden_state
        h = vm.post_layernorm(h)
        return self.clip.visual_projection(h[:, 0]), h[:, 1:]

    def tokenize(self, texts: list[str]) -> Any:
        n = self.clip.config.text_config.max_position_embeddings
        enc = self.tokenizer([clean_text(t) for t in texts], padding="max_length", truncation=True, max_length=n,
                             return_tensors="pt")
        return enc["input_ids"].to(self.device)

    def encode_text(self, texts: list[str]) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            return F.normalize(_features(self.clip.get_text_features(input_ids=self.tokenize(texts))), dim=-1)

    def encode_image(self, images: list) -> Any:
        import torch
        import torch.nn.functional as F

        with torch.no_grad():
            return F.normalize(self.image_tokens(self.pixel_values(images))[0], dim=-1)

    # -- regions
    def _canvas_boxes(self, image: Any, boxes: Any) -> Any:
        import torch

        from vesl.pretrain.data import letterbox_box

        w, h = image.size
        out = [letterbox_box([b[0] / w, b[1] / h, b[2] / w, b[3] / h], w, h, self.preprocess.size) for b in boxes]
        return torch.tensor(out, dtype=torch.float32).reshape(-1, 4)

    def encode_regions(self, images: list, boxes: list) -> list:
        """One L2-normalized CLIP-space embedding per box: ``boxes[i]`` (M_i pixel xyxy) -> (M_i, E)."""
        import torch
        import torch.nn.functional as F

        if len(images) != len(boxes):
            raise UserError(f"{len(images)} images but {len(boxes)} box lists")
        canvas = [self._canvas_boxes(im, b) for im, b in zip(images, boxes, strict=True)]
        counts = [len(c) for c in canvas]
        m = max(counts + [1])
        padded = torch.zeros(len(canvas), m, 4)
        padded[..., 2:] = 1.0
        for i, c in enumerate(canvas):
            padded[i, : len(c)] = c
        padded = padded.to(self.device)
        with torch.no_grad():
            _, tokens = self.image_tokens(self.pixel_values(images))
            bias = self.prompter.box_attn_bias(padded) if self.prompter_cfg.box_bias else None
            y = F.normalize(self.prompter(tokens, self.prompter.box_prompt(padded), bias), dim=-1)
        return [y[i, :c] for i, c in enumerate(counts)]

    def ground(self, images: list, texts: list[str]) -> Any:
        """One text per image -> its predicted pixel box ``x0, y0, x1, y1`` in the original image, (B, 4)."""
        import torch

        from vesl.pretrain.data import unletterbox_box
        from vesl.pretrain.model import ground_boxes

        if len(images) != len(texts):
            raise UserError(f"{len(images)} images but {len(texts)} texts")
        with torch.no_grad():
            text = self.encode_text(list(texts))
            _, tokens = self.image_tokens(self.pixel_values(images))
            pred = ground_boxes(self.prompter, self.ground_head, tokens, text.unsqueeze(1))[0][:, 0].cpu().tolist()
        out = []
        for im, b in zip(images, pred, strict=True):
            w, h = im.size
            x0, y0, x1, y1 = unletterbox_box(b, w, h, self.preprocess.size)
            out.append([x0 * w, y0 * h, x1 * w, y1 * h])
        return torch.tensor(out)
