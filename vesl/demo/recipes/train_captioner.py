"""Train the tiny demo captioner: a real Qwen2-VL, small enough to train on 2 CPU cores in minutes.

The model learns the VeCap task of the synthetic world: given the image and the product prompt
(``DEFAULT_PROMPT`` with the noisy alt-text, wrapped by the processor's chat template exactly as the
``hf:`` captioner builds it), write the detailed scene caption. Loss is on the caption tokens only.

    python -m vesl.demo.recipes.train_captioner --out DIR --seed 0 [--steps N]
"""

from __future__ import annotations

import functools
import io
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from vesl.demo import ASSETS_DIR
from vesl.demo.recipes import cpu_seconds, finish, lr_at, recipe_main, save_step, set_threads
from vesl.labelers.prompts import ALT_TEXT_FIELD, render_prompt
from vesl.schemas.config import DEFAULT_PROMPT

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# The chat template of the Qwen2-VL hub checkpoints, so prompts look exactly like a real Qwen2-VL's.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass
class CaptionerRecipe:
    """Everything that determines the checkpoint; recorded in recipe.json."""

    seed: int = 0
    steps: int = 2500
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.01
    data_seed: int = 0  # training scenes: make_scene(data_seed, i) for i < pool
    pool: int = 4000  # distinct training scenes, generated on first use and then revisited
    save_every: int = 200  # intermediate checkpoints let a long run be inspected before it ends
    tokenizer_scenes: int = 600  # the first scenes of the pool
    vocab_size: int = 1024
    # image: smart_resize keeps aspect; max_pixels bounds the visual tokens ((H/28)*(W/28) <= ~51)
    min_pixels: int = 140 * 140
    max_pixels: int = 200 * 200
    vision_depth: int = 2
    vision_dim: int = 96
    vision_heads: int = 4
    hidden: int = 192
    layers: int = 3
    heads: int = 6
    kv_heads: int = 2
    intermediate: int = 384
    threads: int = 2
    # Dense auxiliary supervision of the vision tower (dropped at save time): every merged visual token
    # predicts the colour/shape/size of the object under its centre. Without it the tiny model spends
    # its whole CPU budget as a blind language model before it starts to look at the image.
    aux_weight: float = 1.0
    prompt_template: str = DEFAULT_PROMPT


@functools.lru_cache(maxsize=4)
def epoch_order(seed: int, epoch: int, n: int) -> list[int]:
    """The seeded shuffle of the scene pool for one epoch."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()


def texts_for_tokenizer(scenes, prompt_template: str) -> list[str]:
    texts = []
    for s in scenes:
        texts.append(s.caption)
        texts.append(render_prompt(prompt_template, s.alt_text))
    texts += ["system\nuser\nassistant\n"] * 100
    return texts


def fixed_prompt_texts(prompt_template: str) -> list[str]:
    """The constant parts of the rendered prompt (around the alt-text) and of the chat template."""
    pieces = [p for p in prompt_template.split(ALT_TEXT_FIELD) if p.strip()]
    return [*pieces, "You are a helpful assistant."]


def build_tokenizer(texts: list[str], vocab_size: int, fixed_texts: list[str] = ()):
    """A byte-level BPE (like Qwen's) trained here; any text still encodes, unseen words fall back to bytes.

    The fixed pieces of the prompt (``fixed_texts``) are added as whole (non-special) tokens: they carry
    no information for the model, and short sequences are what makes training on 2 CPU cores affordable.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import TokenizersBackend

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in fixed_texts])
    hf_tok = TokenizersBackend(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        padding_side="left",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        model_max_length=4096,
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    return hf_tok


def build_processor(tokenizer, recipe: CaptionerRecipe):
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=recipe.min_pixels, max_pixels=recipe.max_pixels)
    return Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=CHAT_TEMPLATE,
    )


def build_model(tokenizer, recipe: CaptionerRecipe):
    from transformers import GenerationConfig, Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = recipe.hidden // recipe.heads
    quarter = head_dim // 2  # rotary pairs, split over (temporal, height, width)
    section = [quarter - 2 * (quarter // 3), quarter // 3, quarter // 3]
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": recipe.hidden,
            "intermediate_size": recipe.intermediate,
            "num_hidden_layers": recipe.layers,
            "num_attention_heads": recipe.heads,
            "num_key_value_heads": recipe.kv_heads,
            "max_position_embeddings": 2048,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
        },
        vision_config={
            "depth": recipe.vision_depth,
            "embed_dim": recipe.vision_dim,
            "hidden_size": recipe.hidden,
            "num_heads": recipe.vision_heads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"],
        bos_token_id=ids["<|endoftext|>"],
        do_sample=False,
        max_new_tokens=128,
    )
    return model


def prompt_messages(prompt: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]


def encode_batch(processor, scenes, recipe: CaptionerRecipe) -> dict[str, torch.Tensor]:
    """Teacher-forcing batch: chat prompt + caption + <|im_end|>, labels only on the caption part."""
    images, texts, n_target = [], [], []
    tok = processor.tokenizer
    for s in scenes:
        images.append(Image.open(io.BytesIO(s.image)).convert("RGB"))
        prompt = render_prompt(recipe.prompt_template, s.alt_text)
        head = processor.apply_chat_template(prompt_messages(prompt), add_generation_prompt=True, tokenize=False)
        target = s.caption + "<|im_end|>"
        texts.append(head + target)
        n_target.append(len(tok(target, add_special_tokens=False)["input_ids"]))
    enc = processor(text=texts, images=images, padding=True, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    length = enc["input_ids"].shape[1]
    for i, n in enumerate(n_target):  # left padding: the target is the last n tokens of every row
        labels[i, length - n :] = enc["input_ids"][i, length - n :]
    enc["labels"] = labels
    return dict(enc)


def token_labels(scenes, grid_thw: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """``[N_tokens, 3]`` (color, shape, size) class ids of the object under each merged visual token's
    centre, last id = background; tokens are row-major per image, images in batch order."""
    from vesl.demo.synth import COLORS, SHAPES, SIZES

    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    rows = []
    for s, (_t, h, w) in zip(scenes, grid_thw.tolist(), strict=True):
        ht, wt = h // merge, w // merge
        objs = sorted(s.objects, key=lambda o: (o.box[2] - o.box[0]) * (o.box[3] - o.box[1]))
        for r in range(ht):
            for c in range(wt):
                x, y = (c + 0.5) / wt, (r + 0.5) / ht
                hit = next((o for o in objs if o.box[0] <= x <= o.box[2] and o.box[1] <= y <= o.box[3]), None)
                rows.append((colors.index(hit.color), shapes.index(hit.shape), sizes.index(hit.size)) if hit
                            else (len(colors), len(shapes), len(sizes)))  # fmt: skip
    return torch.tensor(rows, dtype=torch.long)


def train(recipe: CaptionerRecipe, out: Path, log=print, init: Path | None = None) -> dict:
    """Train from scratch, or continue from the checkpoint ``init`` (a warm restart of the schedule)."""
    from vesl.demo.synth import make_scene, make_scenes

    set_threads(recipe.threads)
    random.seed(recipe.seed)
    torch.manual_seed(recipe.seed)
    t0, c0 = time.time(), cpu_seconds()
    if init is None:
        tok_scenes = list(make_scenes(min(recipe.tokenizer_scenes, recipe.pool), seed=recipe.data_seed))
        tokenizer = build_tokenizer(texts_for_tokenizer(tok_scenes, recipe.prompt_template), recipe.vocab_size,
                                    fixed_prompt_texts(recipe.prompt_template))
        processor = build_processor(tokenizer, recipe)
        model = build_model(tokenizer, recipe)
    else:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        tok_scenes = []
        processor = AutoProcessor.from_pretrained(init)
        tokenizer = processor.tokenizer
        model = Qwen2VLForConditionalGeneration.from_pretrained(init, dtype=torch.float32)
    n_params = sum(p.numel() for p in model.parameters())
    log(f"captioner: {n_params / 1e6:.2f}M params, vocab {len(tokenizer)}")
    from vesl.demo.synth import COLORS, SHAPES, SIZES

    n_cls = (len(COLORS) + 1, len(SHAPES) + 1, len(SIZES) + 1)
    aux_head = torch.nn.Linear(recipe.hidden, sum(n_cls))
    captured: list[torch.Tensor] = []
    model.model.visual.merger.register_forward_hook(lambda _m, _i, out: captured.append(out))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay + [aux_head.weight], "weight_decay": recipe.weight_decay},
         {"params": no_decay + [aux_head.bias], "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98),
    )
    model.train()
    ema, aux_ema = None, 0.0
    cache: dict[int, object] = {i: s for i, s in enumerate(tok_scenes)}

    def scene(i: int):
        if i not in cache:
            cache[i] = make_scene(recipe.data_seed, i)
        return cache[i]

    for step in range(recipe.steps):
        ks = range(step * recipe.batch_size, (step + 1) * recipe.batch_size)
        scenes = [scene(epoch_order(recipe.seed, k // recipe.pool, recipe.pool)[k % recipe.pool]) for k in ks]
        batch = encode_batch(processor, scenes, recipe)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, recipe)
        captured.clear()
        lm_loss = model(**batch).loss
        labels = token_labels(scenes, batch["image_grid_thw"])
        aux = aux_head(captured[-1]).split(n_cls, dim=-1)
        aux_loss = sum(F.cross_entropy(a, labels[:, k]) for k, a in enumerate(aux)) / 3
        loss = lm_loss + recipe.aux_weight * aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema = lm_loss.item() if ema is None else 0.95 * ema + 0.05 * lm_loss.item()
        aux_ema = aux_loss.item() if step == 0 else 0.95 * aux_ema + 0.05 * aux_loss.item()
        if step % 50 == 0 or step == recipe.steps - 1:
            log(f"step {step:5d} loss {ema:.4f} aux {aux_ema:.4f} lr {lr_at(step, recipe):.2e} "
                f"wall {time.time() - t0:.0f}s cpu {cpu_seconds() - c0:.0f}s")
        save_step(model, processor, out, recipe, step)
    return finish(model, processor, out, params=n_params, final_loss_ema=round(float(ema), 5), t0=t0, c0=c0)


def main(argv: list[str] | None = None) -> None:
    recipe_main(
        argv, doc=__doc__, recipe_cls=CaptionerRecipe, flags=["seed", "steps", "batch_size", "lr", "threads", "pool"],
        default_out=ASSETS_DIR / "captioner", module="vesl.demo.recipes.train_captioner",
        title="vesl demo captioner (tiny Qwen2-VL)", train=train,
        data=lambda r: {"train_seed": r.data_seed, "train_scenes": f"make_scene({r.data_seed}, i) for i in range({r.pool})",
                        "tokenizer_scenes": f"the first {r.tokenizer_scenes} of the pool"},
    )


if __name__ == "__main__":
    main()
