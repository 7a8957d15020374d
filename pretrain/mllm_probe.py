"""The MLLM probe: the same small LLaVA trained on top of each candidate vision tower, compared on grounding,
referring and a control task (Cambrian-1's way to judge an encoder for MLLMs, in miniature).

The model is a real ``transformers.LlavaForConditionalGeneration`` whose vision tower is the candidate
``CLIPVisionModel`` (frozen) and whose language model is a small Llama built from a config, with a word-level
tokenizer made from the training text: every word, punctuation mark and ``0.00``..``1.00`` coordinate is one
token, so box text is a short sequence the small LM can learn, and the coordinate tokens start from a code of
their value (``init_coordinate_embeddings``). Only the projector and the LM train.

Why it is fast: the tower is frozen, so each image's features (LLaVA's ``vision_feature_layer``, CLS dropped)
are computed once and cached; the train loop and generation feed the LLaVA ``inputs_embeds`` with the
projector's output at the ``<image>`` positions, exactly what ``LlavaModel.forward`` does with
``pixel_values``, without running the tower again. Patch tokens are average-pooled on their grid first (a
pool of 2 turns 14x14 tokens into 7x7), which shortens every sequence. Each step runs its batch in one or two
length groups (``train_step``), so a long caption does not pad every question to its length.

Metrics (each with the share of answers that do not parse):

- grounding acc@0.5: IoU >= 0.5 between the box parsed from the generated text and the reference; an answer
  with no box, a value outside [0, 1] or an empty box is wrong;
- referring: exact match of the normalized phrase (lowercase, articles and punctuation dropped), and a soft
  match: word-level F1 >= 0.5 between prediction and reference (SQuAD's F1, thresholded);
- control: exact match of the count;
- trivial: the most frequent training answer of each task, scored the same way.
"""

from __future__ import annotations

import json
import math
import random
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vesl.errors import UserError
from vesl.schemas.llava import IMAGE_TOKEN, LOOKALIKE, TASKS, parse_box

SPECIALS = ["<unk>", "<pad>", "<s>", "</s>", IMAGE_TOKEN]
# numbers stay whole ("0.37"), words stay whole ("circle"), punctuation splits off ("[", ",", "?"); every piece
# the tokenizer cuts must be a piece the vocabulary is built from, or it decodes to nothing (an <unk>)
_PIECES = r"\d+\.\d+|\d+|[^\W\d]+|[^\w\s]"
_ARTICLES = {"a", "an", "the"}


@dataclass
class ProbeConfig:
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3  # 3e-3 left the small LM on the answer priors (loss at the marginal entropy) for 1,000 steps
    warmup: int = 30
    seed: int = 0
    hidden: int = 192
    layers: int = 2
    heads: int = 4
    pool: int = 0  # grid pooling of the patch tokens; 0: auto (pool until the grid is at most 8x8)
    feature_layer: int = -2  # LLaVA's vision_feature_layer (the penultimate layer, as LLaVA-1.5)
    max_new_tokens: int = 0  # 0: the longest training answer of a scored task + 2
    threads: int = 0  # torch threads; 0 leaves torch's default
    coord_init: bool = True  # coordinate tokens start from a code of their value (init_coordinate_embeddings)
    max_eval: int = 0  # score only the first N eval questions (a quick look while tuning); 0: all
    # the question's words before the image tokens (LLaVA's training puts the image first): on validation world
    # 1002 it doubled the CLOC tower's pointing (13% -> 26%) and left the CLIP tower's level (12% -> 11%)
    question_first: bool = True


@dataclass
class ProbeResult:
    tower: str
    settings: dict[str, Any]
    n_train: int
    n_eval: dict[str, int]
    metrics: dict[str, dict[str, float]]
    trivial: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)
    samples: list[dict[str, str]] = field(default_factory=list)
    answers: list[str] = field(default_factory=list)  # every generated answer, in the order of the eval records


# ----------------------------------------------------------------------------- scoring


def normalize(text: str) -> list[str]:
    """Lowercase words without articles or punctuation (the referring match)."""
    return [w for w in re.findall(r"[a-z0-9]+", text.lower()) if w not in _ARTICLES]


def word_f1(pred: str, ref: str) -> float:
    p, r = normalize(pred), normalize(ref)
    common = sum((Counter(p) & Counter(r)).values())
    if not p or not r or common == 0:
        return 0.0
    prec, rec = common / len(p), common / len(r)
    return 2 * prec * rec / (prec + rec)


def box_iou(a: list[float], b: list[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def score(task: str, pred: str, ref: str) -> dict[str, float]:
    """One answer's scores: ``ok`` (the task's main metric), ``parse_fail``; for grounding also ``iou`` and
    ``pointing`` (the answer's centre inside the reference box), for referring ``soft``."""
    if task == "grounding":
        box, want = parse_box(pred), parse_box(ref)
        iou = box_iou(box, want) if box is not None and want is not None else 0.0
        # pointing: the answer's centre falls in the reference box (localized, if not tight enough for IoU 0.5)
        point = box is not None and want is not None and want[0] <= (box[0] + box[2]) / 2 <= want[2] \
            and want[1] <= (box[1] + box[3]) / 2 <= want[3]
        return {"ok": float(iou >= 0.5), "iou": iou, "pointing": float(point), "parse_fail": float(box is None)}
    if task == "referring":
        words = normalize(pred)
        fail = not words or parse_box(pred) is not None
        return {"ok": float(words == normalize(ref)), "soft": float(word_f1(pred, ref) >= 0.5),
                "parse_fail": float(fail)}
    fail = re.fullmatch(r"\s*\d+\s*", pred) is None
    return {"ok": float(not fail and pred.strip() == ref.strip()), "parse_fail": float(fail)}


def summarize(rows: list[tuple[str, str, str]], lookalike: list[bool] | None = None) -> dict[str, dict[str, float]]:
    """(task, prediction, reference) -> per task: the mean of each score, and n; the grounding rows that
    ``lookalike`` marks are ``grounding_lookalike``, apart, so that ``grounding`` stays comparable between eval
    sets with and without look-alike pairs."""
    out: dict[str, dict[str, float]] = {}
    marked = lookalike or [False] * len(rows)
    groups = [(task, [row for row, m in zip(rows, marked, strict=True) if row[0] == task and not m]) for task in TASKS]
    groups.append((LOOKALIKE, [row for row, m in zip(rows, marked, strict=True) if m and row[0] == "grounding"]))
    for name, group in groups:
        scores = [score(t, p, r) for t, p, r in group]
        if scores:
            out[name] = {k: sum(s[k] for s in scores) / len(scores) for k in scores[0]} | {"n": len(scores)}
    return out


# ----------------------------------------------------------------------------- data


def load_records(path: str | Path, flag: str, train: bool = False) -> list[dict[str, Any]]:
    """LLaVA-format records with a task this probe scores, plus, for ``train``, records of other tasks (a
    ``caption`` task, say: more text about the images to learn from, never scored); one-line errors for a
    wrong file."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"{flag} {path}: no such file (a train.json/eval.json of `vesl export --format llava`)")
    try:
        recs = json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{flag} {path} is not JSON: {exc}") from None
    if not isinstance(recs, list):
        raise UserError(f"{flag} {path}: expected a JSON list of LLaVA records")
    out = []
    for i, r in enumerate(recs):
        try:
            conv = r["conversations"]
            q, a = conv[0]["value"], conv[1]["value"]
            image = p.parent / r["image"]
        except (KeyError, IndexError, TypeError):
            raise UserError(f"{flag} {path}: record {i} lacks image or a human/gpt conversation") from None
        if IMAGE_TOKEN not in q:
            raise UserError(f"{flag} {path}: record {i}'s first turn has no {IMAGE_TOKEN}")
        task = r.get("task") or _guess_task(a)
        if task in TASKS or train:
            out.append({"task": task, "image": str(image), "question": q.replace(IMAGE_TOKEN, "").strip(),
                        "answer": a.strip(), "lookalike": bool(r.get("lookalike"))})
    if not out:
        raise UserError(f"{flag} {path}: no grounding, referring or control records")
    return out


def _guess_task(answer: str) -> str:
    """The task of a record without ``task``: a box answer is grounding, a number control, else referring."""
    if parse_box(answer) is not None:
        return "grounding"
    return "control" if answer.strip().isdigit() else "referring"


def pieces(text: str) -> list[str]:
    return re.findall(_PIECES, text)


def make_tokenizer(records: list[dict[str, Any]]):
    """A word-level tokenizer over the training text plus every two-decimal coordinate."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = Counter(w for r in records for w in pieces(f"USER: {r['question']} ASSISTANT: {r['answer']}"))
    vocab_words = sorted(set(words) | {f"{i / 100:.2f}" for i in range(101)} | set("[],?"))
    vocab = {w: i for i, w in enumerate(SPECIALS + [w for w in vocab_words if w not in SPECIALS])}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(re.escape(IMAGE_TOKEN)), behavior="isolated"),
        pre_tokenizers.WhitespaceSplit(),
        pre_tokenizers.Split(Regex(_PIECES), behavior="isolated"),
    ])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": IMAGE_TOKEN})


# ----------------------------------------------------------------------------- tower


def load_tower(path: str | Path):
    """The frozen ``CLIPVisionModel`` of a folder (a `vesl export-model --format hf` CLIPModel folder or a
    CLIPVisionModel folder) and its image processor; a one-line error for anything else."""
    from transformers import CLIPImageProcessor, CLIPVisionModel

    p = Path(path)
    cfg = p / "config.json"
    hint = "pass a `vesl export-model --format hf` folder or a CLIPVisionModel folder"
    if not cfg.is_file():
        raise UserError(f"tower {path} is not a CLIPVisionModel folder (no config.json): {hint}")
    try:
        model_type = json.loads(cfg.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"tower {path}: config.json is not a JSON object: {hint}") from None
    if model_type not in ("clip", "clip_vision_model"):
        raise UserError(f"tower {path} is a {model_type!r} model, not a CLIPVisionModel: {hint}")
    try:
        tower = CLIPVisionModel.from_pretrained(p, use_safetensors=True).eval()
    except Exception as exc:  # missing or mismatched weights: one line, not a traceback
        raise UserError(f"tower {path}: cannot load a CLIPVisionModel ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''}): {hint}") from None
    for prm in tower.parameters():
        prm.requires_grad_(False)
    if (p / "preprocessor_config.json").is_file():
        proc = CLIPImageProcessor.from_pretrained(p)
    else:
        size = tower.config.image_size
        proc = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    return tower, proc


def auto_pool(grid: int) -> int:
    """The smallest pool that brings the patch grid to at most 8x8 (and divides it)."""
    for k in range(1, grid + 1):
        if grid % k == 0 and grid // k <= 8:
            return k
    return grid


def image_features(tower, proc, paths: list[str], layer: int, pool: int, batch: int = 64):
    """Pooled patch features of each image, computed once: ``{path: (tokens, dim)}``."""
    import torch
    import torch.nn.functional as F
    from PIL import Image

    out = {}
    with torch.no_grad():
        for i in range(0, len(paths), batch):
            chunk = paths[i : i + batch]
            imgs = []
            for p in chunk:
                with Image.open(p) as im:
                    imgs.append(im.convert("RGB"))
            pv = proc(images=imgs, return_tensors="pt")["pixel_values"]
            hs = tower(pixel_values=pv, output_hidden_states=True).hidden_states[layer][:, 1:]
            b, n, d = hs.shape
            g = int(math.isqrt(n))
            grid = hs.transpose(1, 2).reshape(b, d, g, g)
            pooled = F.avg_pool2d(grid, pool) if pool > 1 else grid
            feats = pooled.flatten(2).transpose(1, 2).contiguous()
            for p, f in zip(chunk, feats, strict=True):
                out[p] = f
    return out


# ----------------------------------------------------------------------------- model


def build_llava(tower, tok, cfg: ProbeConfig, lm: str | None = None):
    """A ``LlavaForConditionalGeneration`` with ``tower`` as its vision tower (weights copied, frozen) and a
    small Llama (or the causal LM at ``lm``) as its language model."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    if lm is None:
        text_cfg = LlamaConfig(vocab_size=len(tok), hidden_size=cfg.hidden, intermediate_size=2 * cfg.hidden,
                               num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                               num_key_value_heads=cfg.heads, max_position_embeddings=256,
                               pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                               eos_token_id=tok.eos_token_id)  # fmt: skip
    else:
        text_cfg = AutoConfig.from_pretrained(lm)
    llava_cfg = LlavaConfig(vision_config=tower.config, text_config=text_cfg,
                            image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                            vision_feature_layer=cfg.feature_layer, vision_feature_select_strategy="default")
    llava = LlavaForConditionalGeneration(llava_cfg)
    llava.model.vision_tower.load_state_dict(tower.state_dict())
    if lm is not None:
        causal = AutoModelForCausalLM.from_pretrained(lm, use_safetensors=True)
        llava.model.language_model.load_state_dict(causal.model.state_dict())
        llava.lm_head.load_state_dict(causal.lm_head.state_dict())
        if len(tok) > llava.get_input_embeddings().num_embeddings:
            llava.resize_token_embeddings(len(tok))
    elif cfg.coord_init:
        init_coordinate_embeddings(llava, tok)
    for prm in llava.model.vision_tower.parameters():
        prm.requires_grad_(False)
    return llava


def coordinate_code(values, dim: int):
    """A sinusoidal code of values in [0, 1] (frequencies 1/2..32 cycles over the range, as in NeRF/Transformer
    position codes), RMS 1/sqrt(2): nearby coordinates get nearby codes."""
    import torch

    v = torch.as_tensor(values, dtype=torch.float32)[:, None]
    freqs = torch.logspace(math.log10(0.5), math.log10(32.0), dim // 2)[None]
    code = torch.cat([torch.sin(2 * math.pi * v * freqs), torch.cos(2 * math.pi * v * freqs)], dim=1)
    return torch.nn.functional.pad(code, (0, dim - code.shape[1]))


def init_coordinate_embeddings(llava, tok) -> None:
    """Start each coordinate token (``0.00``..``1.00``) from a code of its value, in the input embedding and the
    output head, instead of a random vector. Why: a box is four of 101 unrelated classes to a fresh LM, and in a
    few hundred steps it cannot learn from data alone that 0.41 lies next to 0.42; with the code it starts out
    knowing it, so the steps go to reading the image (the tower is what the probe compares, not the LM's
    arithmetic)."""
    import torch

    coords = {f"{i / 100:.2f}": i / 100 for i in range(101)}
    ids = [tok.convert_tokens_to_ids(w) for w in coords]
    with torch.no_grad():
        for emb in (llava.get_input_embeddings().weight, llava.lm_head.weight):
            code = coordinate_code(list(coords.values()), emb.shape[1])
            emb[ids] = code * emb.std() * math.sqrt(2.0)  # the code's RMS is 1/sqrt(2); match the random rows


def _load_lm_tokenizer(lm: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(lm)
    if IMAGE_TOKEN not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _prompt(tok, n_image: int, question: str, question_first: bool) -> list[int]:
    """BOS, the image tokens and ``USER: question ASSISTANT:``; with ``question_first`` the image tokens come
    after the question (``USER: question <image> ASSISTANT:``). Why: in a causal LM only tokens after the
    question can look for what it names; image-first, a 2-layer LM needs both layers to find the phrase's
    object and has none left to read its place."""
    bos = [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]
    image = [tok.convert_tokens_to_ids(IMAGE_TOKEN)] * n_image
    if not question_first:
        return bos + image + tok(f"USER: {question} ASSISTANT:", add_special_tokens=False)["input_ids"]
    head = tok(f"USER: {question}", add_special_tokens=False)["input_ids"]
    return bos + head + image + tok("ASSISTANT:", add_special_tokens=False)["input_ids"]


def split_by_length(lengths: list[int]) -> list[list[int]]:
    """The positions of a batch in one or two groups (short, long), cut where the padded batch has the fewest
    tokens. Why: a caption is half again as long as a question, and nearly every random batch of 32 holds one,
    so padding the whole batch to it costs about a third of each step."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    n, longest = len(order), lengths[order[-1]]
    cost = [k * lengths[order[k - 1]] + (n - k) * longest for k in range(1, n)]
    k = min(range(len(cost)), key=cost.__getitem__, default=-1) + 1
    return [order[:k], order[k:]] if k and cost[k - 1] < n * longest else [order]


def train_step(llava, examples: list[tuple[list[int], list[int]]], feats: list, pad_id: int):
    """Backpropagate the batch's mean answer-token loss, one length group at a time (``split_by_length``): each
    group's mean is weighted by its share of the answer tokens, so the gradient is the whole batch's (the same
    rows, the same random order); only less padding runs. Returns the loss."""
    import torch

    n_answer = sum(len(a) for _, a in examples)
    total = torch.zeros(())
    for group in split_by_length([len(p) + len(a) for p, a in examples]):
        width = max(len(examples[j][0]) + len(examples[j][1]) for j in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        labels = torch.full((len(group), width), -100, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        for row, j in enumerate(group):
            p, a = examples[j]
            ids[row, : len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p) : len(p) + len(a)] = torch.tensor(a)
            mask[row, : len(p) + len(a)] = 1
        f = torch.stack([feats[j] for j in group])
        out = llava(inputs_embeds=_embed(llava, ids, f), attention_mask=mask, labels=labels)
        part = out.loss * (sum(len(examples[j][1]) for j in group) / n_answer)
        part.backward()
        total = total + part.detach()
    return total


def _embed(llava, ids, feats):
    """``inputs_embeds`` with the projected image features at the ``<image>`` positions (as LlavaModel does)."""
    emb = llava.get_input_embeddings()(ids)
    mask = (ids == llava.config.image_token_id).unsqueeze(-1).expand_as(emb)
    img = llava.model.multi_modal_projector(feats).to(emb.dtype)
    return emb.masked_scatter(mask, img)


# ----------------------------------------------------------------------------- probe


def probe(
    tower_path: str | Path,
    data: str | Path,
    eval_data: str | Path,
    cfg: ProbeConfig | None = None,
    lm: str | None = None,
    out: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> ProbeResult:
    """Train the LLaVA's projector and LM on ``data``, generate answers on ``eval_data``, score them."""
    from vesl.pretrain.distributed import torch_threads

    cfg = cfg or ProbeConfig()
    with torch_threads(cfg.threads):
        return _probe(tower_path, data, eval_data, cfg, lm, out, echo)


def _probe(tower_path, data, eval_data, cfg: ProbeConfig, lm, out, echo) -> ProbeResult:
    import torch

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise UserError("--steps and --batch-size must be at least 1")
    if lm is not None and not (Path(lm) / "config.json").is_file():
        raise UserError(f"--lm {lm}: not a local transformers model folder (no config.json)")
    times: dict[str, float] = {}
    if cfg.max_eval < 0:
        raise UserError("--max-eval must be 0 (all) or a number of questions")
    train_recs, eval_recs = load_records(data, "--data", train=True), load_records(eval_data, "--eval")
    eval_recs = eval_recs[: cfg.max_eval or None]
    for r in train_recs + eval_recs:
        if not Path(r["image"]).is_file():
            raise UserError(f"image {r['image']} does not exist (paths are relative to the JSON's folder)")
    tower, proc = load_tower(tower_path)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    t = time.perf_counter()
    grid = int(math.isqrt((tower.config.image_size // tower.config.patch_size) ** 2))
    pool = cfg.pool or auto_pool(grid)
    paths = sorted({r["image"] for r in train_recs + eval_recs})
    feats = image_features(tower, proc, paths, cfg.feature_layer, pool)
    n_image = next(iter(feats.values())).shape[0]
    times["features"] = time.perf_counter() - t
    echo(f"probe: {len(paths)} images -> {n_image} pooled tokens each (pool {pool}) in {times['features']:.1f}s")

    tok = _load_lm_tokenizer(lm) if lm else make_tokenizer(train_recs)
    llava = build_llava(tower, tok, cfg, lm)
    eos = tok.eos_token_id

    def encode(r):
        prompt = _prompt(tok, n_image, r["question"], cfg.question_first)
        ans = tok(r["answer"], add_special_tokens=False)["input_ids"]
        if tok.unk_token_id is not None and tok.unk_token_id in ans:  # it would decode to nothing
            raise UserError(f"answer {r['answer']!r} has pieces the tokenizer does not know; the probe cannot "
                            "learn to say it (use another --lm or report this)")
        return prompt, ans + [eos]

    enc = [encode(r) for r in train_recs]
    # the longest answer of a scored task (a train-only caption is longer than any answer the eval asks for)
    max_new = cfg.max_new_tokens or max((len(a) for (_, a), r in zip(enc, train_recs, strict=True)
                                         if r["task"] in TASKS), default=max(len(a) for _, a in enc)) + 2
    params = [p for p in llava.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * min(s / cfg.steps, 1.0))))
    rng = random.Random(cfg.seed)
    order: list[int] = []
    llava.train()
    llava.model.vision_tower.eval()
    t = time.perf_counter()
    every = max(cfg.steps // 10, 1)
    for step in range(cfg.steps):
        if len(order) < cfg.batch_size:
            more = list(range(len(enc)))
            rng.shuffle(more)
            order += more
        idx, order = order[: cfg.batch_size], order[cfg.batch_size :]
        opt.zero_grad(set_to_none=True)
        loss = train_step(llava, [enc[i] for i in idx], [feats[train_recs[i]["image"]] for i in idx], tok.pad_token_id)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if (step + 1) % every == 0 or step + 1 == cfg.steps:
            el = time.perf_counter() - t
            echo(f"probe: step {step + 1}/{cfg.steps} loss {loss.item():.3f} "
                 f"({el:.0f}s, ETA {el / (step + 1) * (cfg.steps - step - 1):.0f}s)")
    times["train"] = time.perf_counter() - t

    t = time.perf_counter()
    preds = generate(llava, tok, eval_recs, feats, n_image, max_new, cfg.question_first)
    times["generate"] = time.perf_counter() - t
    rows = [(r["task"], p, r["answer"]) for r, p in zip(eval_recs, preds, strict=True)]
    marked = [r["lookalike"] for r in eval_recs]
    trivial_answers = {task: Counter(r["answer"] for r in train_recs if r["task"] == task).most_common(1)
                       for task in TASKS}
    trivial_rows = [(r["task"], trivial_answers[r["task"]][0][0] if trivial_answers[r["task"]] else "", r["answer"])
                    for r in eval_recs]
    res = ProbeResult(
        tower=str(tower_path), settings={**asdict(cfg), "pool": pool, "image_tokens": n_image, "lm": lm,
                                         "max_new_tokens": max_new, "vocab": len(tok)},
        n_train=len(train_recs), n_eval=dict(Counter(r["task"] for r in eval_recs)),
        metrics=summarize(rows, marked), trivial=summarize(trivial_rows, marked), seconds=times,
        samples=[{"task": r["task"], "question": r["question"], "answer": r["answer"], "generated": p}
                 for r, p in list(zip(eval_recs, preds, strict=True))[:12]],
        answers=preds,
    )
    echo(format_result(res))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(asdict(res), indent=2))
    return res


def generate(llava, tok, recs: list[dict[str, Any]], feats, n_image: int, max_new: int, question_first: bool,
             batch: int = 256) -> list[str]:
    """Greedy answers, in batches of prompts of equal length (no padding: the positions match training)."""
    import torch

    llava.eval()
    prompts = [_prompt(tok, n_image, r["question"], question_first) for r in recs]
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(i)
    out = [""] * len(recs)
    with torch.no_grad():
        for group in by_len.values():
            for k in range(0, len(group), batch):
                idx = group[k : k + batch]
                ids = torch.tensor([prompts[i] for i in idx])
                f = torch.stack([feats[recs[i]["image"]] for i in idx])
                gen = llava.generate(inputs_embeds=_embed(llava, ids, f), attention_mask=torch.ones_like(ids),
                                     max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                                     eos_token_id=tok.eos_token_id)
                for i, g in zip(idx, gen, strict=True):
                    out[i] = tok.decode(g, skip_special_tokens=True).strip()
    return out


def probe_seeds(
    tower_path: str | Path,
    data: str | Path,
    eval_data: str | Path,
    cfg: ProbeConfig,
    runs: int,
    lm: str | None = None,
    out: str | Path | None = None,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """``runs`` probes with seeds ``cfg.seed`` .. ``cfg.seed + runs - 1``; each metric's mean, min and max. Why:
    whether the small LM learns to read boxes off the tower within a run turns on its seed (validation: a CLOC
    lead in grounding from +2 to +20 points between two seeds), so one run's grounding says little."""
    if runs < 1:
        raise UserError("--seeds must be at least 1")
    seeds = [cfg.seed + k for k in range(runs)]
    results = [probe(tower_path, data, eval_data, replace(cfg, seed=s), lm, None, echo) for s in seeds]
    first = results[0]

    def over_runs(fn) -> dict[str, dict[str, float]]:
        return {task: {k: fn([r.metrics[task][k] for r in results]) for k in m} for task, m in first.metrics.items()}

    record = {"tower": first.tower, "seeds": seeds, "settings": first.settings,
              "n_train": first.n_train, "n_eval": first.n_eval, "metrics": over_runs(lambda v: sum(v) / len(v)),
              "min": over_runs(min), "max": over_runs(max), "trivial": first.trivial,
              "runs": [asdict(r) for r in results]}  # fmt: skip
    if runs > 1:
        echo(f"mean over probe seeds {seeds[0]}..{seeds[-1]}:")
        echo(format_result(replace(first, metrics=record["metrics"])))
        for task, key in (("grounding", "ok"), ("referring", "ok")):
            if task in first.metrics:
                echo(f"{task} per seed: " + ", ".join(f"{100 * r.metrics[task][key]:.1f}%" for r in results))
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(record if runs > 1 else asdict(first), indent=2))
    return record


def format_result(res: ProbeResult) -> str:
    m, tr = res.metrics, res.trivial
    lines = [f"{'task':<11}{'metric':<14}{'probe':>8}{'trivial':>9}{'parse fail':>12}{'n':>6}"]
    for task, metric, key in (("grounding", "acc@0.5", "ok"), ("grounding", "mean IoU", "iou"),
                              ("grounding", "pointing", "pointing"), (LOOKALIKE, "  look-alikes", "ok"),
                              ("referring", "exact", "ok"),
                              ("referring", "soft (F1>=.5)", "soft"), ("control", "accuracy", "ok")):
        if task in m:
            lines.append(f"{'' if task == LOOKALIKE else task:<11}{metric:<14}{100 * m[task][key]:>7.1f}%{100 * tr[task][key]:>8.1f}%"
                         f"{100 * m[task]['parse_fail']:>11.1f}%{int(m[task]['n']):>6}")
    return "\n".join(lines)
