"""Train the tiny demo detector: a real ``Owlv2ForObjectDetection`` that grounds phrases to boxes.

Each training image is queried with the phrases of its own objects plus negative phrases taken from
other scenes (never one naming the same ``color shape``). OWLv2 predicts one box and one score per
query for every patch; a Hungarian match (scipy) pairs objects with patches, the box loss is L1 + GIoU
on the matched pairs and the class loss is a sigmoid focal loss over the model's own ``logits``
(patch x query, i.e. against the phrase embeddings). Boxes live in OWLv2's padded-square frame: the
processor pads every image bottom/right to a square before resizing, so targets are mapped into it.

    python -m vesl.demo.recipes.train_detector --out DIR --seed 0 [--steps N]
"""

from __future__ import annotations

import io
import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import box_convert, generalized_box_iou

from vesl.demo import ASSETS_DIR
from vesl.demo.recipes import cpu_seconds, finish, lr_at, recipe_main, save_step, set_threads


@dataclass
class DetectorRecipe:
    """Everything that determines the checkpoint; recorded in recipe.json."""

    seed: int = 0
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-3
    warmup: int = 60
    weight_decay: float = 0.05
    data_seed: int = 1  # scenes make_scene(data_seed, i), i < pool
    pool: int = 1600
    queries: int = 10  # per image: its own phrases, then negatives from other scenes
    image_size: int = 224
    patch_size: int = 16
    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 2
    projection_dim: int = 64
    max_query_tokens: int = 16
    vocab_size: int = 400
    # k > 1 repeats each object k times in the Hungarian match (k patches learn it: denser positives;
    # their boxes all regress onto the object, so per-phrase NMS or boxes_per_phrase drops the extras).
    # The shipped model's first stages use k = 1 and random negatives, its later ones k = 3 and a hard
    # negative rate of 0.5 (see its RECIPE.md).
    matches_per_object: int = 1
    hard_negative_rate: float = 0.0  # share of negatives that share a colour or shape with an object
    save_every: int = 250
    cost_class: float = 2.0
    cost_l1: float = 5.0
    cost_giou: float = 2.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    threads: int = 2


# ----------------------------------------------------------------------------- box math (pure)


def image_to_square(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Normalized xyxy of the image -> normalized xyxy of OWLv2's bottom/right padded square."""
    side = float(max(width, height))
    return boxes * boxes.new_tensor([width / side, height / side, width / side, height / side])


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float, gamma: float) -> torch.Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    return (alpha * targets + (1 - alpha) * (1 - targets)) * loss


# ----------------------------------------------------------------------------- tokenizer / model


def _bytes_to_unicode() -> list[str]:
    """GPT-2/CLIP byte alphabet in CLIP's order (so "!" is id 0, OWL's padding token)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def build_tokenizer(corpus: list[str], vocab_size: int, max_length: int):
    """CLIP-style lowercase byte-level BPE with ``</w>`` word ends, trained here, as a ``CLIPTokenizer``.

    CLIP's layout: byte symbols, the same with ``</w>``, merges, then start/end of text last.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    alphabet = _bytes_to_unicode()
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 2 * len(alphabet), end_of_word_suffix="</w>", initial_alphabet=alphabet,
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab: dict[str, int] = {}
    for tok in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(tok, len(vocab))
    for m in merges:
        vocab.setdefault("".join(m), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token="!", model_max_length=max_length)


def build_model(tokenizer, recipe: DetectorRecipe):
    from transformers import Owlv2Config, Owlv2ForObjectDetection

    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": recipe.text_hidden,
        "intermediate_size": recipe.text_hidden * 4,
        "num_hidden_layers": recipe.text_layers,
        "num_attention_heads": recipe.text_heads,
        "max_position_embeddings": recipe.max_query_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    vision = {
        "hidden_size": recipe.vision_hidden,
        "intermediate_size": recipe.vision_hidden * 2,
        "num_hidden_layers": recipe.vision_layers,
        "num_attention_heads": recipe.vision_heads,
        "image_size": recipe.image_size,
        "patch_size": recipe.patch_size,
    }
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=recipe.projection_dim)
    model = Owlv2ForObjectDetection(config)
    with torch.no_grad():
        # start from OWLv2's box prior: one patch-sized box centred on each patch
        model.box_head.dense2.weight.mul_(0.01)
        model.box_head.dense2.bias.zero_()
        # logits = (cos + shift) * scale start near (cos - 0.5) * 10: a rare-positive prior (p ~ 0.01),
        # as focal-loss detectors do, instead of random shifts/scales that swamp the loss
        for layer, bias in ((model.class_head.logit_shift, -0.5), (model.class_head.logit_scale, 9.0)):
            layer.weight.zero_()
            layer.bias.fill_(bias)
    return model


def build_processor(tokenizer, recipe: DetectorRecipe):
    from transformers import Owlv2ImageProcessor, Owlv2Processor

    image_processor = Owlv2ImageProcessor(size={"height": recipe.image_size, "width": recipe.image_size})
    return Owlv2Processor(image_processor=image_processor, tokenizer=tokenizer)


# ----------------------------------------------------------------------------- data


@dataclass
class _Item:
    pixel_values: torch.Tensor  # fp16 [3, S, S], exactly what the processor makes
    phrases: list[str]
    categories: list[str]
    boxes: torch.Tensor  # [n, 4] normalized xyxy in the padded square


def _prepare(scenes, processor, chunk: int = 32) -> list[_Item]:
    items = []
    for i in range(0, len(scenes), chunk):
        part = scenes[i : i + chunk]
        images = [Image.open(io.BytesIO(s.image)).convert("RGB") for s in part]
        pv = processor.image_processor(images=images, return_tensors="pt")["pixel_values"].half()
        for s, v in zip(part, pv, strict=True):
            boxes = image_to_square(torch.tensor([o.box for o in s.objects], dtype=torch.float32), s.width, s.height)
            items.append(_Item(v, [r.phrase for r in s.regions], [o.category for o in s.objects], boxes))
    return items


def _queries(
    item: _Item, all_phrases: list[tuple[str, str]], n: int, rng: random.Random, hard_rate: float = 0.0
) -> list[str]:
    """The item's phrases, then negatives naming other ``color shape`` categories, ``n`` in all; a share
    ``hard_rate`` of them shares a colour or a shape with one of the item's objects."""
    qs = list(item.phrases)
    taken = set(item.categories)
    words = {w for c in taken for w in c.split()}
    while len(qs) < n:
        phrase, cat = rng.choice(all_phrases)
        if cat in taken or phrase in qs:
            continue
        if hard_rate > 0 and not words & set(cat.split()) and rng.random() < hard_rate:
            continue
        qs.append(phrase)
    return qs[:n]


def detection_loss(logits, pred_boxes, targets, recipe: DetectorRecipe) -> tuple[torch.Tensor, dict]:
    """Hungarian-matched L1 + GIoU box loss and sigmoid focal class loss over all patch x query logits.

    ``targets``: per image ``(boxes [n, 4] xyxy in the padded square, query index [n])``.
    """
    from scipy.optimize import linear_sum_assignment

    b, p, q = logits.shape
    cls_target = torch.zeros_like(logits)
    src_boxes, tgt_boxes = [], []
    with torch.no_grad():
        prob = torch.sigmoid(logits.float())
        a, g = recipe.focal_alpha, recipe.focal_gamma
        for i, (boxes, qidx) in enumerate(targets):
            boxes, qidx = boxes.repeat(recipe.matches_per_object, 1), qidx.repeat(recipe.matches_per_object)
            pr = prob[i][:, qidx]  # [P, n * k]
            pos = a * (1 - pr) ** g * -(pr + 1e-8).log()
            neg = (1 - a) * pr**g * -(1 - pr + 1e-8).log()
            pb = box_convert(pred_boxes[i].float(), "cxcywh", "xyxy")
            cost = (recipe.cost_class * (pos - neg) + recipe.cost_l1 * torch.cdist(pb, boxes, p=1)
                    - recipe.cost_giou * generalized_box_iou(pb, boxes))  # fmt: skip
            rows, cols = linear_sum_assignment(cost.numpy())
            rows, cols = torch.as_tensor(rows), torch.as_tensor(cols)
            cls_target[i, rows, qidx[cols]] = 1.0
            src_boxes.append((i, rows))
            tgt_boxes.append(boxes[cols])
    n_obj = max(1, sum(len(t[1]) for t in targets) * recipe.matches_per_object)
    loss_cls = sigmoid_focal_loss(logits.float(), cls_target, recipe.focal_alpha, recipe.focal_gamma).sum() / n_obj
    src = torch.cat([box_convert(pred_boxes[i, rows].float(), "cxcywh", "xyxy") for i, rows in src_boxes])
    tgt = torch.cat(tgt_boxes)
    loss_l1 = F.l1_loss(box_convert(src, "xyxy", "cxcywh"), box_convert(tgt, "xyxy", "cxcywh"), reduction="sum") / n_obj
    loss_giou = (1 - torch.diag(generalized_box_iou(src, tgt))).sum() / n_obj
    loss = recipe.cost_class * loss_cls + recipe.cost_l1 * loss_l1 + recipe.cost_giou * loss_giou
    return loss, {"cls": loss_cls.item(), "l1": loss_l1.item(), "giou": loss_giou.item()}


def train(recipe: DetectorRecipe, out: Path, log=print, init: Path | None = None) -> dict:
    """Train from scratch, or continue from the checkpoint ``init`` (a warm restart of the schedule)."""
    from vesl.demo.synth import make_scenes

    set_threads(recipe.threads)
    rng = random.Random(recipe.seed)
    torch.manual_seed(recipe.seed)
    t0, c0 = time.time(), cpu_seconds()
    scenes = list(make_scenes(recipe.pool, seed=recipe.data_seed))
    corpus = [s.caption for s in scenes] + [r.phrase for s in scenes for r in s.regions]
    if init is None:
        tokenizer = build_tokenizer(corpus, recipe.vocab_size, recipe.max_query_tokens)
        processor = build_processor(tokenizer, recipe)
        model = build_model(tokenizer, recipe)
    else:
        from transformers import Owlv2ForObjectDetection, Owlv2Processor

        processor = Owlv2Processor.from_pretrained(init)
        tokenizer = processor.tokenizer
        model = Owlv2ForObjectDetection.from_pretrained(init, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"detector: {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}; preparing {len(scenes)} scenes")
    items = _prepare(scenes, processor)
    all_phrases = sorted({(r.phrase, o.category) for s in scenes for r, o in zip(s.regions, s.objects, strict=True)})
    del scenes
    log(f"prepared in wall {time.time() - t0:.0f}s cpu {cpu_seconds() - c0:.0f}s")
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    phrase_cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def encode(phrases: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [p for p in phrases if p not in phrase_cache]
        if missing:
            enc = tokenizer(missing, padding="max_length", truncation=True, max_length=recipe.max_query_tokens,
                            return_tensors="pt")
            for k, p in enumerate(missing):
                phrase_cache[p] = (enc["input_ids"][k], enc["attention_mask"][k])
        return (torch.stack([phrase_cache[p][0] for p in phrases]), torch.stack([phrase_cache[p][1] for p in phrases]))

    model.train()
    ema: dict[str, float] = {}
    order: list[int] = []
    for step in range(recipe.steps):
        if len(order) < recipe.batch_size:
            perm = list(range(len(items)))
            rng.shuffle(perm)
            order += perm
        batch = [items[order.pop(0)] for _ in range(recipe.batch_size)]
        queries, targets = [], []
        for it in batch:
            qs = _queries(it, all_phrases, recipe.queries, rng, recipe.hard_negative_rate)
            queries += qs
            targets.append((it.boxes, torch.arange(len(it.phrases))))
        ids, mask = encode(queries)
        pixel_values = torch.stack([it.pixel_values for it in batch]).float()
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        outputs = model(pixel_values=pixel_values, input_ids=ids, attention_mask=mask)
        loss, parts = detection_loss(outputs.logits, outputs.pred_boxes, targets, recipe)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        parts["loss"] = loss.item()
        ema = {k: v if k not in ema else 0.95 * ema[k] + 0.05 * v for k, v in parts.items()}
        if step % 25 == 0 or step == recipe.steps - 1:
            log(f"step {step:5d} " + " ".join(f"{k} {v:.4f}" for k, v in ema.items())
                + f" wall {time.time() - t0:.0f}s cpu {cpu_seconds() - c0:.0f}s")
        save_step(model, processor, out, recipe, step)
    return finish(model, processor, out, params=n_params, final_loss_ema={k: round(v, 5) for k, v in ema.items()}, t0=t0, c0=c0)


def main(argv: list[str] | None = None) -> None:
    recipe_main(
        argv, doc=__doc__, recipe_cls=DetectorRecipe,
        flags=["seed", "steps", "batch_size", "lr", "pool", "threads", "matches_per_object", "hard_negative_rate"],
        default_out=ASSETS_DIR / "detector", module="vesl.demo.recipes.train_detector",
        title="vesl demo detector (tiny OWLv2)", train=train,
        data=lambda r: {"train_scenes": f"make_scenes({r.pool}, seed={r.data_seed})"},
    )


if __name__ == "__main__":
    main()
