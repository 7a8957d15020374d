"""Build a tiny Qwen2-VL checkpoint offline: real config classes, a locally trained tokenizer, real processor.

Used by the ``tiny_vlm_dir`` fixture and reusable for training a small real captioner (pass a caption
corpus and bigger dims). Everything is seeded, so two builds give byte-identical weights.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

# The same special tokens and Qwen2-VL chat template as the shipped demo captioner's recipe.
from tests.tiny_dims import encoder_dims
from vesl.demo.recipes.train_captioner import CHAT_TEMPLATE, SPECIAL_TOKENS

_COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple", "brown", "gray"]
_SHAPES = ["square", "circle", "triangle", "rectangle", "star", "ring", "cross", "stripe"]
_OBJECTS = ["dog", "cat", "car", "tree", "house", "person", "bicycle", "boat", "cup", "chair", "bird"]
_PLACES = ["on the left", "on the right", "at the top", "at the bottom", "in the center", "near the edge"]


# Large: spreads the random logits so that greedy decoding has no near-ties (the sizes live in each builder).
INITIALIZER_RANGE = 0.2


def synthetic_captions(n: int = 400, seed: int = 0) -> list[str]:
    """Caption-like sentences (plus prompt words) so the BPE learns useful merges for the tests."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = [
            f"a {rng.choice(_COLORS)} {rng.choice(_SHAPES)} {rng.choice(_PLACES)}",
            f"and a {rng.choice(_COLORS)} {rng.choice(_OBJECTS)} {rng.choice(_PLACES)}.",
        ]
        if rng.random() < 0.5:
            parts.append(f"The image shows a {rng.choice(_OBJECTS)} next to a {rng.choice(_OBJECTS)}.")
        out.append(" ".join(parts))
    out.append("Describe this image in detail: name every object with its color and shape and say where it is.")
    out.append("The image's alt-text, which may be noisy or uninformative, is: \"a photo\"")
    out.append("You are a helpful assistant. system user assistant")
    return out


def _bpe_tokenizer(corpus: Sequence[str], vocab_size: int, special_tokens: Sequence[str]):
    """A byte-level BPE (the GPT-2 / Qwen / SmolLM kind) trained on ``corpus``; specials get the first ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    return tok


def _wrap(tok, *, eos: str, pad: str, template: str, **extra):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        unk_token=None,
        padding_side="left",
        chat_template=template,
        model_max_length=4096,
        **extra,
    )


def _save_greedy(model_cls, config, out_dir: Path, *, seed: int, eos: list[int], pad: int, bos: int) -> None:
    """Seeded random weights and a greedy generation config, saved in the ``from_pretrained`` layout."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_cls(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=bos, do_sample=False)
    model.save_pretrained(out_dir)


def build_tokenizer(corpus: Sequence[str], vocab_size: int = 512):
    """Byte-level BPE trained on ``corpus``, wrapped as a transformers fast tokenizer with Qwen specials."""
    return _wrap(
        _bpe_tokenizer(corpus, vocab_size, SPECIAL_TOKENS),
        eos="<|im_end|>",
        pad="<|endoftext|>",
        template=CHAT_TEMPLATE,
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def build_tiny_vlm(
    out_dir: Path,
    *,
    captions: Sequence[str] | None = None,
    min_pixels: int = 28 * 28 * 4,
    max_pixels: int = 28 * 28 * 16,
    seed: int = 0,
) -> Path:
    """Save a tiny Qwen2-VL (config, safetensors weights, tokenizer, processor, chat template) to ``out_dir``.

    ``max_pixels`` caps image tokens (28*28*16 -> at most 16 tokens per image) so CPU generation is fast.
    The large ``initializer_range`` spreads the random logits so greedy decoding has no near-ties.
    """
    from transformers import (
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    hidden_size, num_layers, num_heads, vision_dim, vision_depth, vocab_size = 32, 2, 2, 32, 1, 512
    initializer_range = INITIALIZER_RANGE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(captions if captions is not None else synthetic_captions(seed=seed), vocab_size)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    head_dim = hidden_size // num_heads
    # mrope splits the rotary half-dim into (temporal, height, width) sections.
    half = head_dim // 2
    mrope = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen2VLConfig(
        text_config=encoder_dims(
            hidden_size, num_layers, num_heads, vocab_size=len(tokenizer), num_key_value_heads=num_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
            initializer_range=initializer_range,
        ),
        vision_config={
            "depth": vision_depth,
            "embed_dim": vision_dim,
            "hidden_size": hidden_size,
            "num_heads": num_heads,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "initializer_range": initializer_range,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    _save_greedy(Qwen2VLForConditionalGeneration, config, out_dir, seed=seed,
                 eos=[ids["<|im_end|>"], ids["<|endoftext|>"]], pad=ids["<|endoftext|>"], bos=ids["<|endoftext|>"])

    size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}
    processor = Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(size=size),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(size=size),
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir


IDEFICS3_SPECIAL_TOKENS = [
    "<|endoftext|>",  # id 0: pad and eos of the text model
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *[f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)],
]

# The SmolVLM / Idefics3 chat template, trimmed to images and text.
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'][0]['type'] == 'image' %}{{ ':' }}{% else %}{{ ': ' }}{% endif %}"
    "{% for line in message['content'] %}"
    "{% if line['type'] == 'text' %}{{ line['text'] }}{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


def build_tiny_idefics3(
    out_dir: Path,
    *,
    captions: Sequence[str] | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny Idefics3 (the SmolVLM family): SigLIP-style tiles of ``image_size`` px, Llama text model.

    Images are split into at most 2x2 tiles plus a global view; each tile gives
    ``(image_size // patch_size) ** 2 / 4`` image tokens (4 with the defaults).
    """
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3ImageProcessor,
        Idefics3Processor,
    )

    hidden_size, num_layers, num_heads, vision_dim, vision_depth, vocab_size = 32, 2, 2, 32, 1, 512
    image_size, patch_size, initializer_range = 32, 8, INITIALIZER_RANGE
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    corpus = captions if captions is not None else synthetic_captions(seed=seed)
    tokenizer = _bpe_tokenizer(corpus, vocab_size, IDEFICS3_SPECIAL_TOKENS)
    tokenizer = _wrap(tokenizer, eos="<end_of_utterance>", pad="<|endoftext|>", template=IDEFICS3_CHAT_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in IDEFICS3_SPECIAL_TOKENS}
    scale = 2
    config = Idefics3Config(
        text_config=encoder_dims(
            hidden_size, num_layers, num_heads, model_type="llama", vocab_size=len(tokenizer),
            num_key_value_heads=num_heads, max_position_embeddings=4096, bos_token_id=ids["<|im_start|>"],
            eos_token_id=ids["<end_of_utterance>"], pad_token_id=ids["<|endoftext|>"],
            initializer_range=initializer_range,
        ),
        vision_config=encoder_dims(
            vision_dim, vision_depth, num_heads, image_size=image_size, patch_size=patch_size,
            initializer_range=initializer_range,
        ),
        image_token_id=ids["<image>"],
        scale_factor=scale,
        pad_token_id=ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )
    _save_greedy(Idefics3ForConditionalGeneration, config, out_dir, seed=seed,
                 eos=[ids["<end_of_utterance>"], ids["<|endoftext|>"]], pad=ids["<|endoftext|>"], bos=ids["<|im_start|>"])
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": 2 * image_size}, max_image_size={"longest_edge": image_size}
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch_size) ** 2 // (scale * scale),
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out_dir)
    return out_dir
