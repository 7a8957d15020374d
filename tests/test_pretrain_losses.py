"""CLOC losses and model pieces against plain reference computations (CPU, tiny shapes)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vesl.pretrain.losses import CLOCLoss, ContrastiveLoss, GroundingLoss, negative_mask


def _ref_infonce(a, b, scale, allowed):
    """Plain Python symmetric InfoNCE: row i's positive is column i; ``allowed[i][j]`` says j is in row i's softmax."""
    n = len(a)
    sim = [[scale * sum(x * y for x, y in zip(a[i], b[j], strict=True)) for j in range(n)] for i in range(n)]
    total = 0.0
    for i in range(n):
        row = [sim[i][j] for j in range(n) if allowed[i][j] or j == i]
        total += -(sim[i][i] - math.log(sum(math.exp(v) for v in row)))
        col = [sim[j][i] for j in range(n) if allowed[i][j] or j == i]
        total += -(sim[i][i] - math.log(sum(math.exp(v) for v in col)))
    return total / (2 * n)


def _unit(rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float64), dim=-1)


A = _unit([[1.0, 0.2, 0.0], [0.1, 1.0, 0.3], [0.0, 0.4, 1.0], [0.5, 0.5, 0.5]])
B = _unit([[0.9, 0.1, 0.1], [0.2, 0.8, 0.1], [0.1, 0.3, 0.9], [0.3, 0.6, 0.4]])


def test_clip_loss_matches_plain_reference_and_open_clip():
    from open_clip.loss import ClipLoss

    scale = torch.tensor(7.0, dtype=torch.float64)
    ours = ContrastiveLoss()(A, B, scale)
    ref = _ref_infonce(A.tolist(), B.tolist(), 7.0, [[True] * 4 for _ in range(4)])
    assert ours.item() == pytest.approx(ref, abs=1e-12)
    assert ours.item() == pytest.approx(ClipLoss()(A, B, scale).item(), abs=1e-12)


def test_clip_loss_ignores_padded_rows():
    scale = torch.tensor(7.0, dtype=torch.float64)
    garbage = _unit([[3.0, -1.0, 2.0], [0.0, 0.0, 1.0]])
    a = torch.cat([A[:2], garbage[:1], A[2:], garbage[1:]])
    b = torch.cat([B[:2], garbage[1:], B[2:], garbage[:1]])
    valid = torch.tensor([True, True, False, True, True, False])
    assert ContrastiveLoss()(a, b, scale, valid).item() == pytest.approx(ContrastiveLoss()(A, B, scale).item(), abs=1e-12)


def test_text_similarity_filter_removes_exactly_the_intended_negatives():
    # texts 0 and 2 identical (cos 1); 1 and 3 at cos 0.95 (> 0.9); 0 and 1 at cos 0.8 (kept)
    t1 = [1.0, 0.0, 0.0]
    t2 = [0.8, 0.6, 0.0]
    t4 = [0.8 * 0.95 - 0.6 * math.sqrt(1 - 0.95**2), 0.6 * 0.95 + 0.8 * math.sqrt(1 - 0.95**2), 0.0]
    keys = _unit([t1, t2, t1, t4])
    drop = negative_mask(keys, keys, torch.arange(4), 0.9)
    expected = torch.tensor([[False, False, True, False], [False, False, False, True],
                             [True, False, False, False], [False, True, False, False]])
    assert torch.equal(drop, expected)
    assert not negative_mask(keys, keys, torch.arange(4), 0.99)[[1, 3], [3, 1]].any()  # 0.95 < 0.99 kept

    scale = torch.tensor(5.0, dtype=torch.float64)
    ours = ContrastiveLoss(text_sim_threshold=0.9)(A, B, scale, text_keys=keys).item()
    allowed = (~expected).tolist()
    assert ours == pytest.approx(_ref_infonce(A.tolist(), B.tolist(), 5.0, allowed), abs=1e-12)
    unfiltered = ContrastiveLoss()(A, B, scale).item()
    assert ours < unfiltered  # removing negatives can only lower the loss


def test_filter_reports_the_share_of_dropped_negatives_and_warns_when_most_are_gone():
    from vesl.pretrain.losses import filter_warning

    t1, t2 = [1.0, 0.0, 0.0], [0.8, 0.6, 0.0]
    keys = _unit([t1, t2, t1, t2])  # 0~2 and 1~3 identical: 4 of the 12 negatives go
    loss = ContrastiveLoss(text_sim_threshold=0.9)
    loss(A, B, torch.tensor(5.0, dtype=torch.float64), text_keys=keys)
    assert loss.dropped_share.item() == pytest.approx(4 / 12)
    assert filter_warning(4 / 12, 0.9) is None
    msg = filter_warning(0.97, 0.9)
    assert "97%" in msg
    assert "text_sim_threshold 0.9 " in msg
    import re

    suggested = float(re.search(r"e\.g\. ([0-9.]+)", msg).group(1))
    assert 0.9 < suggested < 1.0  # it suggests raising the threshold, to a value that still filters
    assert "\n" not in msg


def _ref_pair_losses(a, b, scale):
    """Plain Python per-pair symmetric InfoNCE (row i's two directions averaged), no filter."""
    n = len(a)
    sim = [[scale * sum(x * y for x, y in zip(a[i], b[j], strict=True)) for j in range(n)] for i in range(n)]
    out = []
    for i in range(n):
        row = -(sim[i][i] - math.log(sum(math.exp(sim[i][j]) for j in range(n))))
        col = -(sim[i][i] - math.log(sum(math.exp(sim[j][i]) for j in range(n))))
        out.append((row + col) / 2)
    return out


def test_drop_hardest_leaves_out_the_pairs_with_the_highest_loss():
    # row 3's text points away from its region (a wrong label), so its pair has by far the highest loss
    b_noisy = torch.cat([B[:3], _unit([[0.0, -1.0, 0.2]])])
    scale = torch.tensor(5.0, dtype=torch.float64)
    per = _ref_pair_losses(A.tolist(), b_noisy.tolist(), 5.0)
    worst = max(range(4), key=lambda i: per[i])
    assert worst == 3

    loss = ContrastiveLoss(drop_hardest=0.25)
    got = loss(A, b_noisy, scale).item()
    assert got == pytest.approx(sum(per[i] for i in range(4) if i != worst) / 3, abs=1e-12)
    assert ContrastiveLoss()(A, b_noisy, scale).item() == pytest.approx(sum(per) / 4, abs=1e-12)
    assert ContrastiveLoss(drop_hardest=0.9)(A, b_noisy, scale).item() == pytest.approx(min(per), abs=1e-12)


def test_region_loss_drop_ramps_over_the_first_quarter_and_spares_the_clip_loss():
    loss = CLOCLoss(region_loss_drop=0.2)
    loss.set_progress(0, 400)
    assert loss.region.drop_hardest == 0.0
    loss.set_progress(50, 400)
    assert loss.region.drop_hardest == pytest.approx(0.1)
    loss.set_progress(300, 400)
    assert loss.region.drop_hardest == pytest.approx(0.2)
    assert loss.clip.drop_hardest == 0.0


def test_region_loss_drop_must_be_a_share_below_one():
    from pydantic import ValidationError

    from vesl.pretrain.train import TrainConfig

    assert TrainConfig(data="x", region_loss_drop=0.2).region_loss_drop == 0.2
    with pytest.raises(ValidationError):
        TrainConfig(data="x", region_loss_drop=1.0)


def test_grounding_losses_match_reference():
    pred = torch.tensor([[0.1, 0.1, 0.5, 0.6], [0.2, 0.3, 0.9, 0.8], [9.0, 9.0, 9.0, 9.0]], dtype=torch.float64)
    gt = torch.tensor([[0.0, 0.1, 0.4, 0.7], [0.2, 0.2, 0.8, 0.8], [0.0, 0.0, 1.0, 1.0]], dtype=torch.float64)
    valid = torch.tensor([True, True, False])
    l2 = GroundingLoss("l2")(pred, gt, valid).item()
    ref = sum(sum((p - g) ** 2 for p, g in zip(pr, gr, strict=True)) for pr, gr in zip(pred[:2].tolist(), gt[:2].tolist(), strict=True)) / 2
    assert l2 == pytest.approx(ref, abs=1e-6)

    def giou(p, g):
        inter = max(0, min(p[2], g[2]) - max(p[0], g[0])) * max(0, min(p[3], g[3]) - max(p[1], g[1]))
        union = (p[2] - p[0]) * (p[3] - p[1]) + (g[2] - g[0]) * (g[3] - g[1]) - inter
        hull = (max(p[2], g[2]) - min(p[0], g[0])) * (max(p[3], g[3]) - min(p[1], g[1]))
        return inter / union - (hull - union) / hull

    for w1, wg in ((5.0, 2.0), (1.0, 1.0)):  # DETR's weights (the default), and unit weights
        l1g = GroundingLoss("l1+giou", l1_weight=w1, giou_weight=wg)(pred, gt, valid).item()
        ref = sum(w1 * sum(abs(p - g) for p, g in zip(pr, gr, strict=True)) + wg * (1 - giou(pr, gr))
                  for pr, gr in zip(pred[:2].tolist(), gt[:2].tolist(), strict=True)) / 2
        assert l1g == pytest.approx(ref, abs=1e-6)


@pytest.fixture(scope="module")
def micro():
    from vesl.pretrain.model import create_model

    torch.set_num_threads(1)
    return create_model("vesl-micro-vit", seed=0)


def _batch(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    b, m, n_tok = 3, 4, model.clip.context_length
    boxes = torch.rand(b, m, 2, generator=g) * 0.5
    return {
        "images": torch.randn(b, 3, 32, 32, generator=g),
        "texts": torch.randint(1, 400, (b, n_tok), generator=g),
        "image_valid": torch.tensor([True, True, True]),
        "region_boxes": torch.cat([boxes, boxes + 0.3], -1),
        "region_texts": torch.randint(1, 400, (b, m, n_tok), generator=g),
        "region_valid": torch.tensor([[True, True, False, False], [True, False, False, False], [True, True, True, False]]),
    }


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    out = model(batch["images"], batch["texts"], batch["region_boxes"], batch["region_texts"], batch["region_valid"])
    losses = CLOCLoss()(out, batch)
    losses["loss"].backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_padded_regions_change_neither_loss_nor_gradients(micro):
    batch = _batch(micro)
    l1, g1 = _loss_and_grads(micro, batch)
    pad = ~batch["region_valid"]
    changed = dict(batch)
    changed["region_boxes"] = batch["region_boxes"].clone()
    changed["region_boxes"][pad] = torch.tensor([0.9, -3.0, 7.0, 0.1])
    changed["region_texts"] = batch["region_texts"].clone()
    changed["region_texts"][pad] = 4242
    l2, g2 = _loss_and_grads(micro, changed)
    for k in ("clip", "region", "ground", "loss"):
        assert torch.equal(l1[k], l2[k]), k
    assert g1.keys() == g2.keys()
    assert len(g1) > 10
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


def test_padded_image_rows_change_neither_loss_nor_gradients(micro):
    batch = _batch(micro)
    batch["image_valid"] = torch.tensor([True, False, True])
    l1, g1 = _loss_and_grads(micro, batch)
    changed = dict(batch)
    changed["images"] = batch["images"].clone()
    changed["images"][1] = 5.0
    changed["texts"] = batch["texts"].clone()
    changed["texts"][1] = 77
    l2, g2 = _loss_and_grads(micro, changed)
    assert l1["loss"].item() == pytest.approx(l2["loss"].item(), abs=1e-6)
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n


def test_prompter_responds_to_the_box(micro):
    img = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    boxes = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.5, 0.5]]])
    with torch.no_grad():
        e = micro.encode_regions(img, boxes)[0]
    assert e.shape == (3, micro.embed_dim)
    assert torch.allclose(e[0], e[2])  # same box, same embedding
    assert (e[0] - e[1]).norm() > 1e-2  # different box, different embedding
    box = boxes[:, :1].clone().requires_grad_(True)
    micro.encode_regions(img, box).sum().backward()
    assert box.grad.abs().sum() > 0


def test_mean_pool_prompter_runs_and_responds():
    from vesl.pretrain.model import create_model

    model = create_model("vesl-micro-vit", prompter={"pool": "mean"}, seed=0)
    img = torch.randn(2, 3, 32, 32)
    boxes = torch.tensor([[[0.0, 0.0, 0.3, 0.3], [0.6, 0.6, 1.0, 1.0]]] * 2)
    with torch.no_grad():
        e = model.encode_regions(img, boxes)
    assert e.shape == (2, 2, model.embed_dim)
    assert (e[:, 0] - e[:, 1]).norm() > 1e-3


def test_grad_checkpointing_gives_the_same_gradients(micro):
    batch = _batch(micro, seed=4)
    l1, g1 = _loss_and_grads(micro, batch)
    micro.clip.set_grad_checkpointing(True)
    try:
        l2, g2 = _loss_and_grads(micro, batch)
    finally:
        micro.clip.set_grad_checkpointing(False)
    assert torch.allclose(l1["loss"], l2["loss"])
    for n in g1:
        assert torch.allclose(g1[n], g2[n], atol=1e-6), n


def test_config_file_mirrors_cli_options(tmp_path):
    from vesl.errors import UserError
    from vesl.pretrain.train import load_config

    p = tmp_path / "c.yaml"
    p.write_text("data: somewhere\nbatch-size: 8\nclip_only: true\n")
    cfg = load_config(p, batch_size=16, lr=None)
    assert (cfg.data, cfg.batch_size, cfg.clip_only, cfg.lr) == ("somewhere", 16, True, 5e-4)
    with pytest.raises(UserError, match="no training data"):
        load_config(None)
    shipped = load_config(Path(__file__).parent.parent / "pretrain" / "configs" / "cloc-tiny.yaml")
    assert shipped.model == "vesl-tiny-vit"


def test_fast_text_path_matches_open_clip_encode_text(micro):
    toks = micro.tokenizer(["a red circle", "a large blue square on the left", "", "a red circle"])
    with torch.no_grad():
        assert torch.allclose(micro._encode_text_fast(toks), micro.encode_text(toks), atol=1e-6)


def test_captions_and_phrases_share_one_embedding_lookup_with_the_same_result(micro):
    """One token-embedding call for both sets (one dense gradient per step), same features and gradients."""
    caps = micro.tokenizer(["a large blue square on the left", "a red circle"])
    phr = micro.tokenizer(["a red circle", "a square"])  # each set is cut to its own length
    emb = micro.clip.token_embedding
    emb.weight.grad = None  # the fixture is shared
    calls = []
    hook = emb.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape))
    joint = micro._encode_texts_fast([caps, phr])
    hook.remove()
    assert len(calls) == 1
    (joint[0].sum() + joint[1].sum()).backward()
    g_joint, emb.weight.grad = emb.weight.grad.clone(), None
    separate = (micro.encode_text(caps), micro.encode_text(phr))
    (separate[0].sum() + separate[1].sum()).backward()
    for a, b in zip(joint, separate, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(g_joint, emb.weight.grad, rtol=1e-5, atol=1e-4)  # float summation order
    emb.weight.grad = None


def test_box_attention_bias_is_zero_inside_and_negative_outside():
    from vesl.pretrain.model import create_model

    model = create_model("vesl-micro-vit", prompter={"box_bias": True}, seed=0)  # 4 x 4 patch grid
    bias = model.prompter.box_attn_bias(torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 1.0, 1.0]]]))[0]
    inside = torch.tensor([0, 1, 4, 5])
    assert torch.allclose(bias[0, inside], torch.zeros(4), atol=1e-6)
    assert (bias[0, [i for i in range(16) if i not in inside]] < -6).all()
    assert torch.allclose(bias[1], torch.zeros(16), atol=1e-6)
    img = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        e = model.encode_regions(img, torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]]))
    assert (e[0, 0] - e[0, 1]).norm() > 1e-2


def test_mean_pool_prompter_applies_the_box_bias():
    """--prompter-pool mean used to drop the box bias silently; the same weights must now respond to it."""
    from vesl.pretrain.model import create_model

    img = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    boxes = torch.tensor([[[0.0, 0.0, 0.3, 0.3], [0.5, 0.2, 1.0, 0.9]]] * 2)
    with_bias = create_model("vesl-micro-vit", prompter={"pool": "mean", "box_bias": True}, seed=0)
    without = create_model("vesl-micro-vit", prompter={"pool": "mean", "box_bias": False}, seed=0)
    with torch.no_grad():
        a, b = with_bias.encode_regions(img, boxes), without.encode_regions(img, boxes)
    assert (a - b).norm() > 1e-3


def test_locate_head_puts_the_centre_where_the_text_attends():
    from vesl.pretrain.model import GroundingHead

    head = GroundingHead(8, 16, (4, 4), kind="locate")
    logits = torch.full((2, 16), -30.0)
    logits[0, 5] = 30.0  # row 1, column 1: centre (0.375, 0.375)
    logits[1, 14] = 30.0  # row 3, column 2: centre (0.625, 0.875)
    box = head(torch.randn(2, 8), logits)
    centre = (box[:, :2] + box[:, 2:]) / 2
    assert torch.allclose(centre, torch.tensor([[0.375, 0.375], [0.625, 0.875]]), atol=0.25 + 1e-6)  # <= one cell off
    soft = torch.zeros(1, 16, requires_grad=True)
    head(torch.randn(1, 8), soft)[:, 0].sum().backward()
    assert soft.grad.abs().sum() > 0  # the attention logits get a direct gradient from the box


def test_patch_head_takes_the_box_the_text_selects_and_leaves_the_prompter_alone():
    from vesl.pretrain.model import GroundingHead, create_model

    head = GroundingHead(8, 16, (4, 4), kind="patch", width=12)
    tokens = torch.randn(1, 16, 12)
    with torch.no_grad():  # the query picks patch 5 (row 1, column 1: centre (0.375, 0.375)) decisively
        text = torch.randn(1, 1, 8)
        q = head.query(text)
        k = head.key(tokens)
        tokens_sel = (q @ k.transpose(1, 2)).argmax().item()
    box, logits = head.from_patches(text, tokens)
    assert logits.shape == (1, 1, 16)
    assert box.shape == (1, 1, 4)
    centre = (box[0, 0, :2] + box[0, 0, 2:]) / 2
    assert ((0 <= centre) & (centre <= 1)).all()
    with torch.no_grad():
        head.log_temp.fill_(20.0)  # a sharp selection: the box is the selected patch's own proposal
        box, _ = head.from_patches(text, tokens)
    row, col = divmod(tokens_sel, 4)
    centre = (box[0, 0, :2] + box[0, 0, 2:]) / 2
    assert abs(centre[0] - (col + 0.5) / 4) <= 0.25 + 1e-5
    assert abs(centre[1] - (row + 0.5) / 4) <= 0.25 + 1e-5

    # in a CLOC forward the grounding loss never reaches the Prompter: region embeddings are left to L_region
    model = create_model("vesl-micro-vit", prompter={"ground_head": "patch"}, seed=0)
    x = torch.randn(2, 3, 32, 32)
    tok = model.tokenizer(["a", "b"])
    out = model(x, tok, torch.tensor([[[0.1, 0.1, 0.5, 0.5]]] * 2), model.tokenizer(["red", "blue"]).view(2, 1, -1),
                torch.ones(2, 1, dtype=torch.bool))
    out["pred_boxes"].sum().backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.prompter.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.ground_head.parameters())


def test_position_words_follow_the_box_and_are_drawn_deterministically():
    from vesl.pretrain.data import BatchBuilder, Preprocess, position_words
    from vesl.pretrain.model import create_model

    assert position_words([0.0, 0.0, 0.2, 0.2]) == "at the top left"
    assert position_words([0.4, 0.4, 0.6, 0.6]) == "in the center"
    assert position_words([0.7, 0.9, 1.0, 1.0]) == "at the bottom right"
    assert position_words([0.0, 0.4, 0.1, 0.5]) == "on the left"
    model = create_model("vesl-micro-vit", seed=0)
    rows = [{"key": f"k{i}", "image": None, "image_uri": None, "width": 8, "height": 8, "caption": "c",
             "regions": [{"phrase": "a red circle", "box": [0.0, 0.0, 0.2, 0.2]}] * 4} for i in range(8)]
    words = []
    for share in (0.0, 0.5, 1.0):
        b = BatchBuilder(model.tokenizer, Preprocess.from_model(model), 8, 4, position_share=share)
        flags = [b._with_position(r["key"], 0, 4) for r in rows]
        assert flags == [b._with_position(r["key"], 0, 4) for r in rows]  # the same draw on any rank or rerun
        words.append(sum(map(sum, flags)))
    assert words[0] == 0
    assert words[2] == 32
    assert 4 <= words[1] <= 28


def test_saved_configs_without_a_ground_head_load_the_paper_mlp():
    from vesl.pretrain.model import PrompterConfig

    assert PrompterConfig.from_saved({"pool": "prompt"}).ground_head == "mlp"
    assert PrompterConfig.from_saved({"ground_head": "locate"}).ground_head == "locate"
    assert PrompterConfig().ground_head == "patch"


def test_generalized_iou_equals_torchvision():
    from torchvision.ops import generalized_box_iou_loss

    from vesl.pretrain.losses import generalized_iou

    g = torch.Generator().manual_seed(3)
    a = torch.rand(64, 4, generator=g)
    b = torch.rand(64, 4, generator=g)
    a = torch.cat([torch.minimum(a[:, :2], a[:, 2:]), torch.maximum(a[:, :2], a[:, 2:])], -1)
    b = torch.cat([torch.minimum(b[:, :2], b[:, 2:]), torch.maximum(b[:, :2], b[:, 2:])], -1)
    assert torch.allclose(1 - generalized_iou(a, b), generalized_box_iou_loss(a, b, reduction="none"), atol=1e-6)


def test_vit_b16_builds_with_the_prompter_and_heads_at_vit_width():
    """benchmarks/train_step.py measures CLOC's overhead on open_clip's ViT-B-16 with random weights: the
    Prompter and the grounding head must be built at its width, and a CLOC forward must fit together at 224 px.
    Built and run on the meta device (shapes only): real weights take seconds to initialise."""
    from vesl.pretrain.model import create_model

    with torch.device("meta"):
        model = create_model("ViT-B-16", seed=0, device="meta")
    assert (model.prompter.width, model.grid, model.embed_dim, model.image_size) == (768, (14, 14), 512, (224, 224))
    assert model.prompter.qkv.in_features == 768
    assert model.ground_head.key[1].in_features == 768
    assert sum(p.numel() for p in model.clip.parameters()) == 149_620_737  # open_clip's ViT-B/16, as published
    meta = {"device": "meta"}
    out = model(torch.empty(2, 3, 224, 224, **meta), torch.empty(2, 12, dtype=torch.long, **meta),
                torch.empty(2, 4, 4, **meta), torch.empty(5, 6, dtype=torch.long, **meta),
                torch.empty(2, 4, dtype=torch.bool, **meta), phrase_index=torch.empty(2, 4, dtype=torch.long, **meta))
    assert out["region_features"].shape == (2, 4, 512)
    assert out["pred_boxes"].shape == (2, 4, 4)
    assert out["image_features"].shape == out["text_features"].shape == (2, 512)


def test_clip_only_model_trains_no_prompter_or_head_parameter():
    from vesl.pretrain.train import TrainConfig, _build_model, make_optimizer

    model = _build_model(TrainConfig(data="unused", model="vesl-micro-vit", clip_only=True), "cpu")
    frozen = list(model.prompter.parameters()) + list(model.ground_head.parameters())
    assert frozen
    assert not any(p.requires_grad for p in frozen)
    in_opt = {id(p) for group in make_optimizer(model, TrainConfig(data="unused")).param_groups for p in group["params"]}
    assert in_opt == {id(p) for p in model.clip.parameters() if p.requires_grad}
