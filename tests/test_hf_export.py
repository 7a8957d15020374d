"""`vesl export-model --format hf`: a transformers CLIPModel folder equal to the open_clip towers, a CLIP
tokenizer with open_clip's ids, the region API from the folder, and a tiny LLaVA whose vision tower it is."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from vesl.errors import UserError

TOL = 1e-4
CAPTIONS = [
    "a photo of a cat.",
    "There is a large red circle at the top left, a small blue square in the center and a green star.",
    "Hello,  world!! (really?) -- yes; 100% sure: #1 @home & more...",
    "café crème brûlée, naïve façade",
    "日本語のキャプション 🙂🐈 emoji and CJK",
    "Über straße — em-dash … ellipsis",
    "the small red circle at the top left",
    "a very long caption " * 20,
]


def _checkpoint(tmp: Path, model) -> Path:
    """A trainer-style checkpoint folder (what `vesl export-model` reads) for an untrained model."""
    from safetensors.torch import save_file

    ck = tmp / "run" / "checkpoints" / "step-00000001"
    ck.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ck / "model.safetensors"))
    (ck / "state.json").write_text(json.dumps({"model": model.config_dict()}))
    return tmp / "run"


def _export(tmp: Path, name: str, seed: int = 0, ground_head: str = "locate") -> tuple:
    from vesl.pretrain.export import export_model
    from vesl.pretrain.model import create_model

    model = create_model(name, prompter={"ground_head": ground_head}, seed=seed).eval()
    with torch.no_grad():  # heads away from their init, so a mix-up would show
        for p in [*model.prompter.parameters(), *model.ground_head.parameters()]:
            p.add_(0.02 * torch.randn_like(p))
    out = export_model(_checkpoint(tmp, model), tmp / "hf", format="hf")
    return model, out


def _open_clip_hidden(model, x: torch.Tensor) -> list[torch.Tensor]:
    v = model.clip.visual
    h = v._embeds(x)
    states = [h]
    for blk in v.transformer.resblocks:
        h = blk(h)
        states.append(h)
    return states


def _check_equal(model, out: Path, image_size: int) -> None:
    from transformers import CLIPModel, CLIPVisionModel

    torch.manual_seed(1)
    x = torch.randn(2, 3, image_size, image_size)
    toks = model.tokenizer(CAPTIONS)
    hf = CLIPModel.from_pretrained(out).eval()
    vm = CLIPVisionModel.from_pretrained(out).eval()
    with torch.no_grad():
        img_ref, txt_ref = model.clip.encode_image(x), model.clip.encode_text(toks)
        img = hf.get_image_features(pixel_values=x).pooler_output
        txt = hf.get_text_features(input_ids=toks).pooler_output
        assert (img - img_ref).abs().max() < TOL
        assert (txt - txt_ref).abs().max() < TOL
        hs = vm(pixel_values=x, output_hidden_states=True).hidden_states
        ref = _open_clip_hidden(model, x)
        assert len(hs) == len(ref)
        for a, b in zip(hs, ref, strict=True):
            assert (a - b).abs().max() < TOL
        assert (hs[-2] - ref[-2]).abs().max() < TOL  # LLaVA's vision_feature_layer=-2
        assert torch.allclose(hf.logit_scale, model.clip.logit_scale)


def test_tiny_export_equals_open_clip_layer_by_layer(tmp_path):
    model, out = _export(tmp_path, "vesl-tiny-vit")
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "tokenizer.json", "vesl_heads.safetensors",
            "vesl_config.json"} <= names
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vision_config"]["hidden_act"] == "gelu"
    assert cfg["text_config"]["hidden_act"] == "gelu"
    _check_equal(model, out, 64)


def test_full_size_vit_b_16_export_equals_open_clip(tmp_path):
    """Random weights, the real ViT-B/16 shapes (~30 s on CPU)."""
    model, out = _export(tmp_path, "ViT-B-16")
    _check_equal(model, out, 224)


def test_quick_gelu_maps_to_quick_gelu():
    import open_clip

    from vesl.pretrain.hf import hf_config

    clip = open_clip.model.CLIP(embed_dim=16, quick_gelu=True,
                                vision_cfg={"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8},
                                text_cfg={"context_length": 8, "width": 16, "heads": 2, "layers": 1})
    cfg = hf_config(clip)
    assert cfg.vision_config.hidden_act == "quick_gelu"
    assert cfg.text_config.hidden_act == "quick_gelu"


@pytest.mark.parametrize(("vision_cfg", "reason"), [
    ({"layers": [1, 1, 1, 1], "width": 16, "image_size": 32}, "not a ViT"),
    ({"attentional_pool": True, "attn_pooler_heads": 2, "attn_pooler_queries": 4}, "attentional pooling"),
    ({"pool_type": "avg"}, "pool_type='avg'"),
    ({"ls_init_value": 1e-4}, "layer scale"),
    ({"no_ln_pre": True}, "no ln_pre"),
])
def test_architectures_that_do_not_map_get_a_one_line_reason(vision_cfg, reason):
    import open_clip

    from vesl.pretrain.hf import check_mappable

    v = {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8, **vision_cfg}
    clip = open_clip.model.CLIP(embed_dim=16, vision_cfg=v, text_cfg={"context_length": 8, "width": 16, "heads": 2,
                                                                    "layers": 1})
    with pytest.raises(UserError) as exc:
        check_mappable(clip)
    assert reason in str(exc.value)
    assert "\n" not in str(exc.value)


def test_cli_refuses_an_unmappable_model_in_one_line_and_writes_nothing(tmp_path, monkeypatch, capsys):
    import open_clip

    from vesl.cli import main
    from vesl.pretrain.model import create_model

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / "vesl-test-avgpool-vit.json").write_text(json.dumps({
        "embed_dim": 16,
        "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, "patch_size": 8, "pool_type": "avg"},
        "text_cfg": {"context_length": 8, "width": 16, "heads": 2, "layers": 1}}))
    open_clip.add_model_config(cfg_dir)
    run = _checkpoint(tmp_path, create_model("vesl-test-avgpool-vit"))
    monkeypatch.setattr(sys, "argv", ["vesl", "export-model", str(run), "--format", "hf", "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "pool_type='avg'" in err
    assert not (tmp_path / "x").exists() or not any((tmp_path / "x").iterdir())


def test_export_refuses_a_non_empty_out_unless_overwrite(tmp_path):
    from vesl.pretrain.export import export_model

    model, out = _export(tmp_path, "vesl-tiny-vit")
    run = tmp_path / "run"
    for fmt in ("open_clip", "hf"):
        with pytest.raises(UserError, match="not empty"):
            export_model(run, out, format=fmt)
    before = (out / "model.safetensors").read_bytes()
    export_model(run, out, format="open_clip", overwrite=True)
    assert not (out / "model.safetensors").exists()
    assert not (out / "config.json").exists()
    export_model(run, out, format="hf", overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    with pytest.raises(UserError, match="--format"):
        export_model(run, tmp_path / "y", format="onnx")


def test_tokenizer_ids_equal_open_clip(tmp_path):
    import open_clip
    from transformers import AutoTokenizer, CLIPTokenizer

    from vesl.pretrain.hf import clip_tokenizer

    oc = open_clip.get_tokenizer("ViT-B-16")
    ref = oc(CAPTIONS)
    clip_tokenizer(77).save_pretrained(tmp_path / "tok")
    for cls in (CLIPTokenizer, AutoTokenizer):
        tok = cls.from_pretrained(tmp_path / "tok")
        ids = tok(CAPTIONS, padding="max_length", max_length=77, truncation=True, return_tensors="pt")["input_ids"]
        for a, b in zip(ids, ref, strict=True):
            n = int(b.argmax()) + 1  # through the end token; open_clip pads with 0, the export with the end token
            assert a[:n].tolist() == b[:n].tolist()
            assert (a[n:] == tok.pad_token_id).all()
            assert tok.pad_token_id == 49407
    assert int(ref[-1].argmax()) == 76  # the long caption was truncated to end with the end token in both


def test_region_model_cleans_text_like_open_clip(tmp_path):
    import open_clip

    from vesl.pretrain.hf import CLOCRegionModel

    _, out = _export(tmp_path, "vesl-tiny-vit")
    m = CLOCRegionModel.from_pretrained(out)
    texts = ["\u201ccurly\u201d quotes", "the \ufb01ne &amp; dandy", "\uff2c\uff2f\uff35\uff24 noise"]
    ref = open_clip.get_tokenizer("vesl-tiny-vit", context_length=24)(texts)
    ids = m.tokenize(texts)
    for a, b in zip(ids, ref, strict=True):
        n = int(b.argmax()) + 1
        assert a[:n].tolist() == b[:n].tolist()


def _scene_images(n: int = 3) -> list[tuple[Image.Image, list[list[float]]]]:
    import io

    from vesl.demo.synth import make_scene

    out = []
    for i in range(n):
        s = make_scene(7, i)
        boxes = [[o.box[0] * s.width, o.box[1] * s.height, o.box[2] * s.width, o.box[3] * s.height] for o in s.objects]
        out.append((Image.open(io.BytesIO(s.image)).convert("RGB"), boxes))
    return out


def test_image_processor_matches_vesl_letterbox(tmp_path):
    from transformers import CLIPImageProcessor

    from vesl.pretrain.data import Preprocess

    model, out = _export(tmp_path, "vesl-tiny-vit")
    pre = Preprocess.from_model(model)
    proc = CLIPImageProcessor.from_pretrained(out)
    rng = torch.Generator().manual_seed(0)
    for w, h in ((300, 300), (320, 160), (160, 320)):  # sizes where flooring and rounding agree
        pil = Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=rng, dtype=torch.uint8).numpy())
        got = proc(pil, return_tensors="pt")["pixel_values"][0]
        ref = pre(pil)
        assert got.shape == ref.shape == (3, 64, 64)
        assert (got - ref).abs().mean() < 0.05  # torchvision's bicubic vs PIL's; padding exact
        pad = ref[:, 40:, :] if h < w else ref[:, :, 40:]
        got_pad = got[:, 40:, :] if h < w else got[:, :, 40:]
        if w != h:
            assert torch.equal(got_pad, torch.zeros_like(got_pad))  # the exact mean
            assert pad.abs().max() < 0.01  # vesl pads with the mean rounded to 8 bits


@pytest.mark.parametrize("ground_head", ["locate", "patch", "mlp"])
def test_region_api_from_the_folder_equals_the_trainer_model(tmp_path, ground_head):
    from vesl.pretrain.data import Preprocess, letterbox_box, unletterbox_box
    from vesl.pretrain.hf import CLOCRegionModel

    model, out = _export(tmp_path, "vesl-tiny-vit", ground_head=ground_head)
    m = CLOCRegionModel.from_pretrained(out)
    data = _scene_images()
    images, boxes = [d[0] for d in data], [d[1] for d in data]
    got = m.encode_regions(images, boxes)
    pre = Preprocess.from_model(model)
    x = torch.stack([pre(im) for im in images])
    canvas = [torch.tensor([letterbox_box([b[0] / im.width, b[1] / im.height, b[2] / im.width, b[3] / im.height],
                                          im.width, im.height, pre.size) for b in bs]) for im, bs in zip(images, boxes, strict=False)]
    texts = ["a small red circle", "the large blue square at the top", "a star"]
    with torch.no_grad():
        ref = model.encode_regions(x, canvas)
        ref_ground = model.ground(x, texts)
    assert [g.shape for g in got] == [r.shape for r in ref]
    for g, r in zip(got, ref, strict=True):
        assert (g - r).abs().max() < TOL
    pix = m.ground(images, texts)
    assert pix.shape == (3, 4)
    for p, r, im in zip(pix.tolist(), ref_ground.tolist(), images, strict=True):
        x0, y0, x1, y1 = unletterbox_box(r, im.width, im.height, pre.size)
        expect = [x0 * im.width, y0 * im.height, x1 * im.width, y1 * im.height]
        assert max(abs(a - b) for a, b in zip(p, expect, strict=True)) < 1e-2  # pixels
    with pytest.raises(UserError):
        m.encode_regions(images, boxes[:1])


def test_vesl_load_reads_the_hf_export_back_exactly(tmp_path):
    from vesl.pretrain import load

    model, out = _export(tmp_path, "vesl-tiny-vit")
    back = load(out)
    x = torch.randn(2, 3, 64, 64)
    boxes = torch.tensor([[[0.1, 0.1, 0.5, 0.5]], [[0.2, 0.3, 0.9, 0.8]]])
    with torch.no_grad():
        assert torch.allclose(back.encode_image(x), model.encode_image(x), atol=1e-6)
        assert torch.allclose(back.encode_regions(x, boxes), model.encode_regions(x, boxes), atol=1e-6)


def _word_tokenizer(words: list[str]):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<image>"]
    vocab = {w: i for i, w in enumerate(specials + words)}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def test_tiny_llava_with_the_cloc_tower_generates(tmp_path):
    """The drop-in: LLaVA loads the exported folder as its vision tower and generates through its processor."""
    from transformers import (
        CLIPImageProcessor,
        CLIPVisionModel,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    model, out = _export(tmp_path, "vesl-tiny-vit")
    tower = CLIPVisionModel.from_pretrained(out)
    tok = _word_tokenizer("USER: ASSISTANT: what is in the image ? a red circle square".split())
    text_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256,
                           pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    cfg = LlavaConfig(vision_config=tower.config, text_config=text_cfg, image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    llava = LlavaForConditionalGeneration(cfg)
    llava.model.vision_tower.load_state_dict(tower.state_dict())
    llava.save_pretrained(tmp_path / "llava")
    proc = LlavaProcessor(image_processor=CLIPImageProcessor.from_pretrained(out), tokenizer=tok,
                          patch_size=tower.config.patch_size, vision_feature_select_strategy="default",
                          num_additional_image_tokens=1)
    proc.save_pretrained(tmp_path / "llava")

    llava = LlavaForConditionalGeneration.from_pretrained(tmp_path / "llava").eval()
    proc = LlavaProcessor.from_pretrained(tmp_path / "llava")
    image = _scene_images(1)[0][0]
    inputs = proc(images=image, text="USER: <image> what is in the image ? ASSISTANT:", return_tensors="pt")
    assert int((inputs["input_ids"] == cfg.image_token_id).sum()) == (64 // 8) ** 2
    with torch.no_grad():
        gen = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        assert gen.shape[1] == inputs["input_ids"].shape[1] + 4 or int(gen[0, -1]) == tok.eos_token_id
        # the LLaVA image features are the CLOC tower's penultimate patch tokens, projected
        feats = llava.model.get_image_features(pixel_values=inputs["pixel_values"])
        feats = feats.pooler_output if hasattr(feats, "pooler_output") else feats
        feats = torch.cat(list(feats)) if isinstance(feats, (list, tuple)) else feats.reshape(-1, feats.shape[-1])
        ref = _open_clip_hidden(model, inputs["pixel_values"])[-2][:, 1:]
        ref = llava.model.multi_modal_projector(ref).reshape(-1, feats.shape[-1])
    assert (feats - ref).abs().max() < TOL
