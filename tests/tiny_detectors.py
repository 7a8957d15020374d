"""Tiny real OWLv2 and Grounding DINO checkpoints, built offline in seconds (random weights, seeded).

They are real transformers models from real configs with small dimensions, tokenizers trained locally
with ``tokenizers`` and processors saved with ``save_pretrained``; product code loads them back with
``from_pretrained`` exactly as it would a hub checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tests.tiny_dims import encoder_dims

DEFAULT_CORPUS = [
    "a photo of a cat sitting on a red sofa next to a remote control",
    "a black dog on the left of the wooden bench and a cat",
    "two red apples and a green pear on a white plate",
    "a man holding an umbrella stands next to a yellow taxi in the rain",
    "a dog in a field of flowers under a blue sky with white clouds",
    "a small boat on a lake, mountains and trees in the distance",
    "a woman wearing a hat rides a bicycle down the street past a car",
    "a kitchen with a table, chairs, a bowl of fruit and a cup of coffee",
    "a red circle, a blue square and a green triangle on a gray canvas",
    "a traffic light, a stop sign and a bus at the corner of the road",
]


def build_clip_tokenizer(corpus: Iterable[str], vocab_size: int = 600):
    """A CLIP-style byte-level BPE trained on ``corpus``: the same builder the demo detector recipe uses.

    ``vocab_size`` counts the learned merges; the 2 x 256 byte symbols come on top (CLIP's layout).
    """
    from vesl.demo.recipes.train_detector import build_tokenizer

    return build_tokenizer(list(corpus), vocab_size, max_length=16)


def build_tiny_owlv2(
    out_dir,
    *,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
    prior_boxes: bool = True,
) -> Path:
    """Save a tiny ``Owlv2ForObjectDetection`` + ``Owlv2Processor`` to ``out_dir`` and return it.

    ``prior_boxes`` zeroes the box head's last layer, so every predicted box is OWLv2's own box prior
    (one patch-sized box centred on each patch of the square input): random weights otherwise give
    degenerate boxes, and a trained model (H7b) can start from this init just as well.
    """
    import torch
    from transformers import Owlv2Config, Owlv2ForObjectDetection, Owlv2ImageProcessor, Owlv2Processor

    image_size, patch_size, hidden_size, num_layers, num_heads, projection_dim, vocab_size = 64, 16, 32, 2, 2, 32, 600
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_clip_tokenizer(corpus or DEFAULT_CORPUS, vocab_size=vocab_size)
    text = encoder_dims(
        hidden_size, num_layers, num_heads, vocab_size=len(tok), max_position_embeddings=16,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    vision = encoder_dims(hidden_size, num_layers, num_heads, image_size=image_size, patch_size=patch_size)
    config = Owlv2Config(text_config=text, vision_config=vision, projection_dim=projection_dim)
    torch.manual_seed(seed)
    model = Owlv2ForObjectDetection(config).eval()
    if prior_boxes:
        with torch.no_grad():
            model.box_head.dense2.weight.zero_()
            model.box_head.dense2.bias.zero_()
    model.save_pretrained(out)
    image_processor = Owlv2ImageProcessor(size={"height": image_size, "width": image_size})
    Owlv2Processor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    return out


BERT_SPECIALS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
# Grounding DINO hard-codes BERT-uncased ids for its phrase delimiters ("[CLS]", "[SEP]", ".", "?").
GDINO_FIXED = {**BERT_SPECIALS, ".": 1012, "?": 1029}


def build_bert_tokenizer(corpus: Iterable[str], vocab_size: int = 400):
    """A BERT-uncased-style WordPiece trained on ``corpus``; specials and ``.``/``?`` sit at BERT's ids."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import BertTokenizer

    wp = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    wp.normalizer = normalizers.BertNormalizer(lowercase=True)
    wp.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    wp.train_from_iterator(
        list(corpus), trainer=trainers.WordPieceTrainer(vocab_size=vocab_size, show_progress=False)
    )
    learned = [t for t, _ in sorted(wp.get_vocab().items(), key=lambda kv: kv[1]) if t not in GDINO_FIXED]
    size = max(1030, len(learned) + len(GDINO_FIXED))
    slots: list[str | None] = [None] * size
    for t, i in GDINO_FIXED.items():
        slots[i] = t
    it = iter(learned)
    for i in range(size):
        if slots[i] is None:
            slots[i] = next(it, None) or f"[unused{i}]"
    vocab = {t: i for i, t in enumerate(slots)}
    return BertTokenizer(vocab=vocab, do_lower_case=True, model_max_length=256)


def build_tiny_grounding_dino(
    out_dir,
    *,
    corpus: Iterable[str] | None = None,
    seed: int = 0,
) -> Path:
    """Save a tiny ``GroundingDinoForObjectDetection`` + processor (tiny Swin backbone, no timm, no
    pretrained weights) to ``out_dir`` and return it."""
    import torch
    from transformers import (
        GroundingDinoConfig,
        GroundingDinoForObjectDetection,
        GroundingDinoImageProcessor,
        GroundingDinoProcessor,
        SwinConfig,
    )

    d_model, text_hidden, num_queries, image_size = 32, 32, 30, 64
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_bert_tokenizer(corpus or DEFAULT_CORPUS)
    backbone = SwinConfig(
        image_size=image_size,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 2, 2],
        window_size=2,
        out_features=["stage2", "stage3", "stage4"],
    )
    text = encoder_dims(text_hidden, 1, 2, vocab_size=len(tok), max_position_embeddings=256)
    config = GroundingDinoConfig(
        backbone_config=backbone,
        text_config=text,
        d_model=d_model,
        num_queries=num_queries,
        encoder_layers=1,
        decoder_layers=2,  # the shared bbox head ties layer 0 to the others; one layer breaks tying
        encoder_ffn_dim=d_model * 2,
        decoder_ffn_dim=d_model * 2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_n_points=2,
        decoder_n_points=2,
        num_feature_levels=4,
        max_text_len=256,
    )
    torch.manual_seed(seed)
    model = GroundingDinoForObjectDetection(config).eval()
    model.save_pretrained(out)
    image_processor = GroundingDinoImageProcessor(
        size={"shortest_edge": image_size, "longest_edge": image_size * 2}
    )
    GroundingDinoProcessor(image_processor=image_processor, tokenizer=tok).save_pretrained(out)
    return out
