"""Evaluation: zero-shot region classification (three region embeddings), retrieval and grounding.

Region classification uses GT boxes from a COCO-format annotations file plus an images folder. The three
region embeddings are the CLOC Prompter (box prompt), RoI-Align on the CLIP patch tokens, and
crop-and-encode; the last two are the CLIP baselines and work on any checkpoint. mAcc is the mean of
per-class accuracies; top-1 is the overall accuracy.

On held-out region-text shards: image-text retrieval R@1/R@5 (both directions), region-text retrieval
R@10 (box-prompted region -> phrase, over the set of distinct phrases; and phrase -> region), and
grounding accuracy (share of ``ground`` boxes with IoU >= 0.5), next to the trivial whole-image box.

Referring-expression comprehension (REC) on a RefCOCO-style JSONL (``vesl synth --format refexp`` writes one;
see docs/training.md for converting RefCOCO/+/g): acc@0.5 of the grounding head (no candidates), and of ranking the
candidate boxes against the expression with the Prompter, RoI-Align and crop-and-encode.

Longer than 400 lines on purpose: every benchmark shares one loader, one set of region embeddings and one
results table, and splitting them per task would repeat that setup in each.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from vesl.errors import UserError, first_line

METHODS = ("prompter", "roi_align", "crop")
REC_METHODS = ("ground", "prompter", "roi_align", "crop")
MAX_REFEXP_CANDIDATES = 100
"""The most candidate boxes one referring-expression line may hold; a line with more becomes an error row.

RefCOCO-style candidate sets (MAttNet or detector proposals) hold about ten boxes, and every candidate costs a
Prompter row, a RoI and, for crop ranking, a whole image encode: a cap keeps one hostile line from exhausting memory.
"""
BOX_SLACK_PX = 1.0  # how far (in pixels) a box may reach past the image's edge: rounding in converted annotations
# Zero-shot class prompts, averaged per category as in CLIP's prompt ensembles. Region phrases are worded
# "<article> <size> <name>" ("a small red circle"), so the ensemble covers both sizes; `vesl demo --full` uses
# the same default, so `vesl eval` reproduces its table. Recorded in the results JSON.
DEFAULT_TEMPLATES = ("a {}", "a small {}", "a large {}")


def _chunks(seq: list, n: int):
    for i in range(0, len(seq), n):
        yield seq[i:i + n]


def region_classification(model, annotations: str | os.PathLike, images_dir: str | os.PathLike, *,
                          templates: tuple[str, ...] = DEFAULT_TEMPLATES, methods: tuple[str, ...] = METHODS,
                          batch_size: int = 32, max_images: int | None = None) -> dict[str, dict[str, float]]:
    """{method: {"mAcc": %, "top1": %, "n": regions}} with GT boxes from a COCO annotations file."""
    import torch
    from PIL import Image

    from vesl.pretrain.data import Preprocess, letterbox_box

    ann_path, img_dir = Path(annotations), Path(images_dir)
    if not ann_path.exists():
        raise UserError(f"COCO annotations {ann_path} not found")
    if not img_dir.is_dir():
        raise UserError(f"images folder {img_dir} not found")
    coco = json.loads(ann_path.read_text())
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cat_index = {c["id"]: i for i, c in enumerate(cats)}
    by_image: dict[int, list[dict]] = defaultdict(list)
    for a in coco["annotations"]:
        if not a.get("iscrowd") and a["bbox"][2] > 0 and a["bbox"][3] > 0:
            by_image[a["image_id"]].append(a)
    images = [im for im in coco["images"] if im["id"] in by_image][:max_images]
    pre = Preprocess.from_model(model)
    size = pre.size
    with torch.no_grad():
        classes = []
        for c in cats:
            e = model.encode_text([t.format(c["name"]) for t in templates])
            classes.append(torch.nn.functional.normalize(e.mean(0), dim=-1))
        class_emb = torch.stack(classes)
        preds: dict[str, list[int]] = {m: [] for m in methods}
        labels: list[int] = []
        for chunk in _chunks(images, batch_size):
            pils, tensors, boxes_list, orig_boxes = [], [], [], []
            for im in chunk:
                pil = Image.open(img_dir / im["file_name"]).convert("RGB")
                w, h = pil.size
                anns = by_image[im["id"]]
                nb = [[a["bbox"][0] / w, a["bbox"][1] / h, (a["bbox"][0] + a["bbox"][2]) / w, (a["bbox"][1] + a["bbox"][3]) / h]
                      for a in anns]
                pils.append(pil)
                tensors.append(pre(pil))
                boxes_list.append(torch.tensor([letterbox_box(b, w, h, size) for b in nb]))
                orig_boxes.append(anns)
                labels += [cat_index[a["category_id"]] for a in anns]
            batch = torch.stack(tensors)
            feats: dict[str, torch.Tensor] = {}
            if "prompter" in methods:
                feats["prompter"] = torch.cat(model.encode_regions(batch, boxes_list))
            if "roi_align" in methods:
                feats["roi_align"] = torch.cat(model.roi_align_regions(batch, boxes_list))
            if "crop" in methods:
                crops = []
                for pil, anns in zip(pils, orig_boxes, strict=True):
                    for a in anns:
                        x, y, bw, bh = a["bbox"]
                        crops.append(pre(pil.crop((int(x), int(y), int(round(x + bw)), int(round(y + bh))))))
                feats["crop"] = model.encode_image(torch.stack(crops))
            for m, f in feats.items():
                preds[m] += (f @ class_emb.T).argmax(-1).tolist()
    out = {}
    for m in methods:
        correct = [p == t for p, t in zip(preds[m], labels, strict=True)]
        per_class: dict[int, list[bool]] = defaultdict(list)
        for c, t in zip(correct, labels, strict=True):
            per_class[t].append(c)
        macc = sum(sum(v) / len(v) for v in per_class.values()) / max(len(per_class), 1)
        out[m] = {"mAcc": 100.0 * macc, "top1": 100.0 * sum(correct) / max(len(correct), 1), "n": len(correct)}
    return out


def _recall(sim, gt_sets: list[set[int]], k: int) -> float:
    import torch

    top = torch.topk(sim, min(k, sim.shape[1]), dim=1).indices.tolist()
    return 100.0 * sum(bool(set(t) & g) for t, g in zip(top, gt_sets, strict=True)) / max(len(gt_sets), 1)


def shard_metrics(model, data: str | list[str], *, batch_size: int = 32, regions_per_image: int = 16,
                  max_images: int | None = None, regions: bool = True) -> dict[str, float]:
    """Retrieval and grounding metrics on held-out region-text shards (``regions=False``: retrieval only)."""
    import torch

    from vesl.pretrain.data import Preprocess, RegionTextLoader, letterbox_box
    from vesl.schemas.boxes import box_iou

    size = Preprocess.from_model(model).size
    loader = RegionTextLoader(data, batch_size=batch_size, tokenizer=model.tokenizer, preprocess=Preprocess.from_model(model),
                              regions_per_image=regions_per_image, num_workers=0)
    img_f, txt_f, reg_f, phrases, ious, whole_ious = [], [], [], [], [], []
    seen = 0
    with torch.no_grad():
        for batch in loader.epoch(0):
            iv = batch["image_valid"]
            if not iv.any():
                continue
            img_f.append(model.encode_image(batch["images"][iv]))
            txt_f.append(model.encode_text(batch["texts"][iv]))
            rv = batch["region_valid"] & iv.unsqueeze(1)
            if regions and rv.any():
                reg = model.encode_regions(batch["images"], batch["region_boxes"])
                reg_f.append(reg[rv])
                b_idx = rv.nonzero()[:, 0]
                toks = batch["region_texts"][rv]
                phrases += [tuple(t.tolist()) for t in toks]
                pred = model.ground(batch["images"][b_idx], toks)
                gt = batch["region_boxes"][rv]
                for p, g, bi in zip(pred.tolist(), gt.tolist(), b_idx.tolist(), strict=True):
                    ious.append(box_iou(p, g))
                    w, h = batch["image_sizes"][bi].tolist()
                    whole_ious.append(box_iou(letterbox_box([0, 0, 1, 1], w, h, size), g))
            seen += int(iv.sum())
            if max_images and seen >= max_images:
                break
    if not img_f:
        raise UserError(f"no readable images in {data!r}")
    img, txt = torch.cat(img_f), torch.cat(txt_f)
    sim = img @ txt.T
    n = len(img)
    eye = [{i} for i in range(n)]
    out = {
        "images": float(n),
        "i2t_R@1": _recall(sim, eye, 1), "i2t_R@5": _recall(sim, eye, 5),
        "t2i_R@1": _recall(sim.T, eye, 1), "t2i_R@5": _recall(sim.T, eye, 5),
    }
    if reg_f:
        reg = torch.cat(reg_f)
        uniq = sorted(set(phrases))
        index = {p: i for i, p in enumerate(uniq)}
        phr_f = model.encode_text(torch.tensor(uniq))
        r2t = reg @ phr_f.T
        out["regions"] = float(len(reg))
        out["region2text_R@10"] = _recall(r2t, [{index[p]} for p in phrases], 10)
        owners: dict[int, set[int]] = defaultdict(set)
        for i, p in enumerate(phrases):
            owners[index[p]].add(i)
        out["text2region_R@10"] = _recall(r2t.T, [owners[i] for i in range(len(uniq))], 10)
        out["grounding_acc@0.5"] = 100.0 * sum(i >= 0.5 for i in ious) / len(ious)
        out["grounding_mIoU"] = 100.0 * sum(ious) / len(ious)
        out["whole_image_mIoU"] = 100.0 * sum(whole_ious) / len(whole_ious)
    return out


def _xywh_ok(b: Any) -> bool:
    """A pixel ``[x, y, w, h]`` of four finite numbers with w, h > 0 (NaN, infinities and booleans are not)."""
    return (isinstance(b, (list, tuple)) and len(b) == 4
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in b)
            and b[2] > 0 and b[3] > 0)


def _outside(b: list[float], width: int, height: int) -> bool:
    """Whether the pixel ``[x, y, w, h]`` reaches past the image by more than :data:`BOX_SLACK_PX`."""
    s = BOX_SLACK_PX
    return b[0] < -s or b[1] < -s or b[0] + b[2] > width + s or b[1] + b[3] > height + s


def read_refexp(path: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(valid items, error rows) of a REC JSONL; each bad line becomes an error row ({"line", "error"}).

    A line holds ``image`` (a path relative to the JSONL's folder, or absolute), ``expression``, ``bbox``
    (pixel ``[x, y, w, h]`` of finite numbers) and ``candidates`` (a list of at most
    :data:`MAX_REFEXP_CANDIDATES` such boxes; optional for the grounding head). Boxes are checked against the
    image's size when it is opened (:func:`refexp_metrics`).
    """
    p = Path(path)
    if not p.is_file():
        raise UserError(f"referring-expression file {p} not found; write one with `vesl synth --format refexp`")
    items, errors = [], []
    for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append({"line": i, "error": f"not JSON: {exc.msg}"})
            continue
        if not isinstance(d, dict):
            errors.append({"line": i, "error": "not a JSON object"})
            continue
        problem = None
        if not isinstance(d.get("image"), str) or not d["image"]:
            problem = "no image path"
        elif not isinstance(d.get("expression"), str) or not d["expression"].strip():
            problem = "no expression"
        elif not _xywh_ok(d.get("bbox")):
            problem = "bbox is not a pixel [x, y, w, h] of finite numbers with w, h > 0"
        elif "candidates" in d and not isinstance(d["candidates"], list):
            problem = "candidates is not a list of pixel [x, y, w, h] boxes"
        elif len(d.get("candidates") or []) > MAX_REFEXP_CANDIDATES:
            problem = f"{len(d['candidates'])} candidates; at most {MAX_REFEXP_CANDIDATES} per line"
        elif not all(_xywh_ok(c) for c in d.get("candidates") or []):
            problem = "candidates is not a list of pixel [x, y, w, h] boxes of finite numbers with w, h > 0"
        elif not (p.parent / d["image"]).is_file():
            problem = f"image {d['image']} not found"
        if problem:
            errors.append({"line": i, "error": problem})
            continue
        items.append({**d, "line": i, "path": p.parent / d["image"]})
    return items, errors


def _xywh_to_xyxy(b: list[float]) -> list[float]:
    return [b[0], b[1], b[0] + b[2], b[1] + b[3]]


def _crop(pil: Any, c: list[float]) -> Any:
    """The pixel box ``x0, y0, x1, y1`` of ``pil``, clipped to the image and at least one pixel wide and high."""
    x0 = min(max(int(c[0]), 0), pil.width - 1)
    y0 = min(max(int(c[1]), 0), pil.height - 1)
    x1 = min(max(int(round(c[2])), x0 + 1), pil.width)
    y1 = min(max(int(round(c[3])), y0 + 1), pil.height)
    return pil.crop((x0, y0, x1, y1))


def refexp_metrics(model, path: str | os.PathLike, *, methods: tuple[str, ...] = REC_METHODS, batch_size: int = 32,
                   max_items: int | None = None) -> dict[str, Any]:
    """REC acc@0.5 per method, the chance level of picking a candidate at random, and the error rows."""
    import torch
    from PIL import Image

    from vesl.pretrain.data import Preprocess, letterbox_box, unletterbox_box
    from vesl.schemas.boxes import box_iou

    def none_usable() -> UserError:
        errors.sort(key=lambda e: e["line"])
        return UserError(f"{path} holds no usable referring expression ({len(errors)} bad line(s); first: "
                         f"{errors[0]['error'] if errors else 'empty file'})")

    items, errors = read_refexp(path)
    items = items[:max_items]
    if not items:
        raise none_usable()
    pre = Preprocess.from_model(model)
    usable = 0
    hits: dict[str, list[bool]] = {m: [] for m in methods}
    chance: list[float] = []
    with torch.no_grad():
        for chunk in _chunks(items, batch_size):
            pils, ok = [], []
            for it in chunk:
                try:
                    pil = Image.open(it["path"]).convert("RGB")
                except (OSError, Image.DecompressionBombError) as exc:
                    errors.append({"line": it["line"], "error": f"unreadable image: {first_line(exc)}"})
                    continue
                bad = [b for b in (it["bbox"], *(it.get("candidates") or [])) if _outside(b, *pil.size)]
                if bad:
                    errors.append({"line": it["line"], "error": f"box {bad[0]} lies outside the {pil.width}x"
                                                                f"{pil.height} image"})
                    continue
                pils.append(pil)
                ok.append(it)
            if not ok:
                continue
            usable += len(ok)
            batch = torch.stack([pre(im) for im in pils])
            texts = [it["expression"] for it in ok]
            targets = [_xywh_to_xyxy(it["bbox"]) for it in ok]
            if "ground" in methods:
                pred = model.ground(batch, texts).tolist()
                for p, im, t in zip(pred, pils, targets, strict=True):
                    w, h = im.size
                    x0, y0, x1, y1 = unletterbox_box(p, w, h, pre.size)
                    hits["ground"].append(box_iou([x0 * w, y0 * h, x1 * w, y1 * h], t) >= 0.5)
            ranked = [i for i, it in enumerate(ok) if it.get("candidates")]
            rank_methods = [m for m in methods if m != "ground"]
            if not ranked or not rank_methods:
                continue
            cands = [[_xywh_to_xyxy(c) for c in ok[i]["candidates"]] for i in ranked]
            chance += [100.0 * sum(box_iou(c, targets[i]) >= 0.5 for c in cs) / len(cs) for i, cs in zip(ranked, cands, strict=True)]
            sub = batch[ranked]
            canvas = [torch.tensor([letterbox_box([c[0] / pils[i].width, c[1] / pils[i].height, c[2] / pils[i].width,
                                                   c[3] / pils[i].height], pils[i].width, pils[i].height, pre.size)
                                    for c in cs]) for i, cs in zip(ranked, cands, strict=True)]
            text = model.encode_text([texts[i] for i in ranked])
            feats: dict[str, list] = {}
            if "prompter" in rank_methods:
                feats["prompter"] = model.encode_regions(sub, canvas)
            if "roi_align" in rank_methods:
                feats["roi_align"] = model.roi_align_regions(sub, canvas)
            if "crop" in rank_methods:  # one image's crops at a time: at most MAX_REFEXP_CANDIDATES encodes
                feats["crop"] = [model.encode_image(torch.stack([pre(_crop(pils[i], c)) for c in cs]))
                                 for i, cs in zip(ranked, cands, strict=True)]
            for m, per_item in feats.items():
                for k, (f, cs) in enumerate(zip(per_item, cands, strict=True)):
                    best = int((f @ text[k]).argmax())
                    hits[m].append(box_iou(cs[best], targets[ranked[k]]) >= 0.5)
    if not usable:  # every line that parsed failed on its image: the same one line as an empty file
        raise none_usable()
    out: dict[str, Any] = {m: {"acc@0.5": 100.0 * sum(v) / len(v), "n": len(v)} for m, v in hits.items() if v}
    out["chance"] = {"acc@0.5": sum(chance) / len(chance) if chance else 0.0, "n": len(chance)}
    out["errors"] = len(errors)
    out["error_rows"] = errors[:20]
    return out


def load_for_eval(model: str | os.PathLike, pretrained: str | None = None) -> tuple[Any, bool]:
    """(model, whether its CLOC heads are trained): a vesl run/export/checkpoint, or with ``pretrained`` (or a
    name that is no path) a plain open_clip model, whose Prompter and grounding head are untrained."""
    from vesl.pretrain.export import load
    from vesl.pretrain.model import create_model, register_model_configs

    if pretrained is None and Path(model).exists():
        return load(model), True
    import open_clip

    register_model_configs()
    name = str(model)
    if name not in open_clip.list_models():
        raise UserError(f"{name} is neither an existing path nor an open_clip model name: pass a vesl run, export "
                        "or checkpoint folder, or an open_clip model (see open_clip.list_models()) with --pretrained")
    try:
        return create_model(name, pretrained), False
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"open_clip could not build {name} with pretrained={pretrained!r}: {first_line(exc)}") from None


def coco_grounding_accuracy(model: Any, coco_json: str | os.PathLike, images_dir: str | os.PathLike,
                            batch_size: int = 32) -> float:
    """Share of GT objects that ``model.ground`` boxes with IoU >= 0.5 from their phrase (the annotation's
    ``phrase``, else ``a <category>``), on a COCO set; the grounding row of `vesl demo --full`."""
    import torch
    from PIL import Image

    from vesl.pretrain.data import Preprocess, letterbox_box
    from vesl.schemas.boxes import box_iou

    coco = json.loads(Path(coco_json).read_text())
    images = {im["id"]: im for im in coco["images"]}
    names = {c["id"]: c["name"] for c in coco["categories"]}
    pre = Preprocess.from_model(model)
    tensors: dict[int, torch.Tensor] = {}
    hits = total = 0
    anns = coco["annotations"]
    with torch.no_grad():
        for i in range(0, len(anns), batch_size):
            chunk = anns[i : i + batch_size]
            batch, texts, gts = [], [], []
            for a in chunk:
                im = images[a["image_id"]]
                if a["image_id"] not in tensors:
                    pil = Image.open(Path(images_dir) / im["file_name"]).convert("RGB")
                    tensors[a["image_id"]] = pre(pil)
                w, h = im["width"], im["height"]
                x, y, bw, bh = a["bbox"]
                batch.append(tensors[a["image_id"]])
                texts.append(a.get("phrase") or f"a {names[a['category_id']]}")
                gts.append(letterbox_box([x / w, y / h, (x + bw) / w, (y + bh) / h], w, h, pre.size))
            pred = model.ground(torch.stack(batch), texts).tolist()
            hits += sum(box_iou(p, g) >= 0.5 for p, g in zip(pred, gts, strict=True))
            total += len(chunk)
    return hits / max(total, 1)


def evaluate(model_or_path: Any, *, coco_annotations: str | None = None, coco_images: str | None = None,
             shards: str | list[str] | None = None, out_json: str | os.PathLike | None = None,
             templates: tuple[str, ...] = DEFAULT_TEMPLATES, batch_size: int = 32,
             max_images: int | None = None, pretrained: str | None = None,
             refexp: str | os.PathLike | None = None) -> dict[str, Any]:
    """Everything that was asked for, as one dict (also written to ``out_json`` when given).

    A plain open_clip model (``pretrained`` given, or a model name) gets the CLIP baselines only: RoI-Align
    and crop region classification, and image-text retrieval; its Prompter and grounding head are untrained.
    """
    import torch

    if coco_annotations is None and shards is None and refexp is None:
        raise UserError("nothing to evaluate: pass --coco-annotations with --coco-images, --shards and/or --refexp")
    if (coco_annotations is None) != (coco_images is None):
        raise UserError("--coco-annotations and --coco-images go together")
    torch.manual_seed(0)
    if isinstance(model_or_path, (str, os.PathLike)):
        model, heads = load_for_eval(model_or_path, pretrained)
    else:
        model, heads = model_or_path, True
    model.eval()
    results: dict[str, Any] = {"templates": list(templates)}
    if coco_annotations:
        methods = METHODS if heads else tuple(m for m in METHODS if m != "prompter")
        results["region_classification"] = region_classification(
            model, coco_annotations, coco_images, templates=templates, methods=methods, batch_size=batch_size,
            max_images=max_images)
        if heads:
            results["coco_grounding_acc@0.5"] = 100.0 * coco_grounding_accuracy(
                model, coco_annotations, coco_images, batch_size=batch_size)
    if shards:
        results["shards"] = shard_metrics(model, shards, batch_size=batch_size, max_images=max_images, regions=heads)
    if refexp:
        methods = REC_METHODS if heads else tuple(m for m in REC_METHODS if m in ("roi_align", "crop"))
        results["refexp"] = refexp_metrics(model, refexp, methods=methods, batch_size=batch_size, max_items=max_images)
    if out_json:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(results, indent=2))
    return results


def format_table(results: dict[str, Any]) -> str:
    """One text table per task that ran, a blank line between them."""
    sections: list[list[str]] = []
    rc = results.get("region_classification")
    if rc:
        rows = [f"class templates: {' | '.join(results.get('templates', []))}"]
        if "coco_grounding_acc@0.5" in results:
            rows.append(f"grounding acc@0.5 (phrase -> box): {results['coco_grounding_acc@0.5']:.1f}")
        rows.append(f"{'region classification':<24}{'mAcc':>8}{'top-1':>8}{'regions':>9}")
        sections.append(rows + [f"{m:<24}{r['mAcc']:>8.1f}{r['top1']:>8.1f}{r['n']:>9d}" for m, r in rc.items()])
    sh = results.get("shards")
    if sh:
        sections.append([f"{'held-out shards':<24}{'value':>8}", *(f"{k:<24}{v:>8.1f}" for k, v in sh.items())])
    rx = results.get("refexp")
    if rx:
        names = {"ground": "ground (no candidates)", "prompter": "prompter ranking", "roi_align": "roi_align ranking",
                 "crop": "crop ranking", "chance": "random candidate"}
        rows = [f"{'referring expressions':<24}{'acc@0.5':>8}{'n':>9}"]
        rows += [f"{names[m]:<24}{rx[m]['acc@0.5']:>8.1f}{rx[m]['n']:>9d}" for m in (*REC_METHODS, "chance") if m in rx]
        if rx.get("errors"):
            rows.append(f"{rx['errors']} bad line(s) skipped, e.g. line {rx['error_rows'][0]['line']}: "
                        f"{rx['error_rows'][0]['error']}")
        sections.append(rows)
    return "\n\n".join("\n".join(rows) for rows in sections)
