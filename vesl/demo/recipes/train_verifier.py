"""Train the tiny demo verifier: a real open_clip CLIP that scores a box crop against the phrases of its image.

Data: the objects of TRAINING-world scenes (``make_scenes(pool, seed=data_seed)``), each cropped a few times
around a jittered box (IoU >= ~0.6 with the object, as detector boxes are) with the verifier's context pad, and
background crops (IoU < 0.2 with every object). An object crop's target is its ``color shape``: the softmax over
all phrase forms ``a {size} {color} {shape}`` puts its mass evenly on that category's forms (every size: a
crop shows no size, and the caption's size word is not what the verifier judges). A background crop's target is uniform over its scene's phrases, so
no phrase of the image wins it (a small margin: the verifier drops it). The tokenizer is the demo detector's
(trained by its recipe on training worlds), copied beside the weights.

    python -m vesl.demo.recipes.train_verifier --out DIR --seed 0 [--steps N]
"""

from __future__ import annotations

import io
import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from vesl.demo import ASSETS_DIR
from vesl.demo.recipes import cpu_seconds, lr_at, recipe_main, set_threads


@dataclass
class VerifierRecipe:
    """Everything that determines the checkpoint; recorded in recipe.json."""

    seed: int = 0
    steps: int = 1500
    batch_size: int = 128
    lr: float = 2e-3
    warmup: int = 50
    weight_decay: float = 0.05
    data_seed: int = 0  # a training world (vesl.demo.synth.TRAINING_SEEDS)
    pool: int = 1200  # scenes
    crops_per_object: int = 4
    background_per_scene: int = 2
    background_rate: float = 0.2  # share of each batch
    pad: float = 0.1  # must equal VerifierConfig.pad, the crop the product scores
    image_size: int = 32
    patch_size: int = 4
    width: int = 64
    layers: int = 2
    heads: int = 2
    text_width: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    context_length: int = 16
    threads: int = 2
    # "each": an object crop's target is uniform over its category's size forms, so "a small orange diamond"
    # scores as "a large orange diamond" does (the product compares an image's phrases, which carry size words).
    # "any" (the first two stages of the shipped weights): their summed mass, which let one size form drift away
    object_target: str = "each"


MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # open_clip's defaults


def model_config(r: VerifierRecipe, vocab_size: int) -> dict:
    """The open_clip config (``open_clip_config.json``): a tiny ViT and text transformer."""
    return {
        "model_cfg": {
            "embed_dim": r.embed_dim,
            "vision_cfg": {"image_size": r.image_size, "patch_size": r.patch_size, "width": r.width,
                           "layers": r.layers, "head_width": r.width // r.heads, "mlp_ratio": 2.0},
            "text_cfg": {"context_length": r.context_length, "vocab_size": vocab_size, "width": r.text_width,
                         "heads": 2, "layers": r.text_layers, "mlp_ratio": 2.0, "hf_tokenizer_name": "local"},
        },
        "preprocess_cfg": {"size": r.image_size, "mean": list(MEAN), "std": list(STD),
                           "interpolation": "bicubic", "resize_mode": "squash"},
    }


def _iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def _jitter(box, rng: random.Random, amount: float = 0.12):
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    d = [rng.uniform(-amount, amount) for _ in range(4)]
    return (x0 + d[0] * w, y0 + d[1] * h, x1 + d[2] * w, y1 + d[3] * h)


def _crop(img: Image.Image, box, r: VerifierRecipe) -> np.ndarray:
    from vesl.labelers.verifiers import padded_crop_box

    w, h = img.size
    c = img.crop(padded_crop_box(box, w, h, r.pad)).resize((r.image_size, r.image_size), Image.BICUBIC)
    return np.asarray(c, dtype=np.uint8)


def build_data(r: VerifierRecipe, rng: random.Random):
    """Crops (uint8 N x S x S x 3), the category of each object crop (-1: background) and each crop's scene."""
    from vesl.demo.synth import make_scenes

    crops, cats, scene_cats = [], [], []
    for scene in make_scenes(r.pool, seed=r.data_seed):
        img = Image.open(io.BytesIO(scene.image)).convert("RGB")
        sc = [o.category for o in scene.objects]
        for o in scene.objects:
            for _ in range(r.crops_per_object):
                for _try in range(20):
                    b = _jitter(o.box, rng)
                    if _iou(b, o.box) >= 0.6:
                        break
                crops.append(_crop(img, b, r))
                cats.append(o.category)
                scene_cats.append(sc)
        for _ in range(r.background_per_scene):
            for _try in range(30):
                s = rng.uniform(0.1, 0.4)
                x0, y0 = rng.uniform(0, 1 - s), rng.uniform(0, 1 - s)
                b = (x0, y0, x0 + s, y0 + s)
                if all(_iou(b, o.box) < 0.2 for o in scene.objects):
                    crops.append(_crop(img, b, r))
                    cats.append(None)
                    scene_cats.append(sc)
                    break
    return np.stack(crops), cats, scene_cats


def save(model, config: dict, tokenizer_dir: Path, out: Path) -> None:
    """The open_clip folder layout ``create_model_and_transforms('local-dir:OUT')`` reads, weights in float16."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / "open_clip_model.safetensors"))
    shutil.copy(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    tok_cfg.pop("processor_class", None)
    tok_cfg["model_max_length"] = tok_cfg["max_length"] = config["model_cfg"]["text_cfg"]["context_length"]
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


def train(r: VerifierRecipe, out: Path, init: Path | None = None) -> dict:
    import open_clip

    from vesl.demo.synth import COLORS, SHAPES, SIZES

    set_threads(r.threads)
    torch.manual_seed(r.seed)
    rng = random.Random(r.seed)
    t0, c0 = time.time(), cpu_seconds()
    tok_dir = ASSETS_DIR / "detector"
    vocab = len(json.loads((tok_dir / "tokenizer.json").read_text())["model"]["vocab"])
    config = model_config(r, vocab)
    model = _build(config, init)
    save(model, config, tok_dir, out)  # the tokenizer files first: open_clip reads the tokenizer from the folder
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out.resolve()}")

    crops, cats, scene_cats = build_data(r, rng)
    categories = [f"{c} {s}" for c in COLORS for s in SHAPES]
    forms = [(f"a {z} {c}", c) for c in categories for z in SIZES]  # (phrase, category)
    texts = tokenizer([p for p, _ in forms])
    cat_index = {c: i for i, c in enumerate(categories)}
    form_cat = torch.tensor([cat_index[c] for _, c in forms])
    obj = [i for i, c in enumerate(cats) if c is not None]
    bg = [i for i, c in enumerate(cats) if c is None]
    target = torch.tensor([cat_index[c] if c is not None else -1 for c in cats])
    scene_cat = torch.zeros(len(cats), len(categories), dtype=torch.bool)
    for i, sc in enumerate(scene_cats):
        scene_cat[i, [cat_index[c] for c in sc]] = True
    scene_mask = scene_cat[:, form_cat]  # [N, forms]
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    log = lambda m: print(m, flush=True)  # noqa: E731
    log(f"{len(obj)} object crops, {len(bg)} background crops, {len(forms)} phrase forms")

    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    model.train()
    ema: dict[str, float] = {}
    n_bg = int(r.batch_size * r.background_rate)
    for step in range(r.steps):
        idx = rng.sample(obj, r.batch_size - n_bg) + rng.sample(bg, n_bg)
        x = torch.from_numpy(crops[idx]).permute(0, 3, 1, 2).float() / 255.0
        if rng.random() < 0.5:
            x = x.flip(-1)  # no phrase of this world names a side of an object
        x = (x - mean) / std
        for g in opt.param_groups:
            g["lr"] = lr_at(step, r)
        img = F.normalize(model.encode_image(x), dim=-1)
        txt = F.normalize(model.encode_text(texts), dim=-1)
        logits = model.logit_scale.exp() * img @ txt.T  # [B, forms]
        logp = logits.log_softmax(-1)
        is_obj = target[idx] >= 0
        right = form_cat[None, :] == target[idx][:, None]  # [B, forms]: the forms of the crop's category
        if r.object_target == "each":  # every size form of the category alike: the crop cannot tell size
            lo = -(logp.masked_fill(~right, 0.0).sum(-1) / right.sum(-1))[is_obj].mean()
        else:  # "any": the mass on the category's forms together; one form may take it all
            lo = -logp.masked_fill(~right, float("-inf")).logsumexp(-1)[is_obj].mean()
        own = scene_mask[idx][~is_obj]  # [b, forms]: the forms of the crop's scene's categories
        if len(own):  # uniform over its scene's own phrases, among themselves
            within = logits[~is_obj].masked_fill(~own, float("-inf")).log_softmax(-1)
            lb = -(within.masked_fill(~own, 0.0).sum(-1) / own.sum(-1)).mean()
        else:
            lb = lo.new_zeros(())
        loss = lo + lb
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)
        parts = {"loss": loss.item(), "object": lo.item(), "background": lb.item()}
        ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v for k, v in parts.items()}
        if step % 50 == 0 or step == r.steps - 1:
            log(f"step {step:5d} " + " ".join(f"{k} {v:.4f}" for k, v in ema.items())
                + f" wall {time.time() - t0:.0f}s cpu {cpu_seconds() - c0:.0f}s")
    model.eval()
    save(model, config, tok_dir, out)
    return {"params": sum(p.numel() for p in model.parameters()), "final_loss_ema": {k: round(v, 5) for k, v in ema.items()},
            "wall_s": round(time.time() - t0, 1), "cpu_s": round(cpu_seconds() - c0, 1)}


def _build(config: dict, init: Path | None):
    """A fresh open_clip CLIP from ``config`` (or the weights of ``init``, a previous output)."""
    import open_clip

    if init is not None:
        model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{init.resolve()}")
        return model.float()
    from open_clip.model import CLIP

    cfg = config["model_cfg"]
    text_cfg = {k: v for k, v in cfg["text_cfg"].items() if k != "hf_tokenizer_name"}
    return CLIP(cfg["embed_dim"], cfg["vision_cfg"], text_cfg)


def main(argv: list[str] | None = None) -> None:
    recipe_main(
        argv, doc=__doc__, recipe_cls=VerifierRecipe,
        flags=["seed", "steps", "batch_size", "lr", "pool", "threads", "object_target"],
        default_out=ASSETS_DIR / "verifier", module="vesl.demo.recipes.train_verifier",
        title="vesl demo verifier (tiny open_clip CLIP)", train=train,
        data=lambda r: {"train_scenes": f"make_scenes({r.pool}, seed={r.data_seed})"},
    )


if __name__ == "__main__":
    main()
