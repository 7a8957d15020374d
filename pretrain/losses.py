"""CLOC losses: L = L_clip + lambda * (L_region + L_ground).

Every input row comes with a validity mask. Rows are compacted with the mask *before* any gather or loss,
so the values in padded rows cannot reach a loss or a gradient. Ranks may hold different numbers of valid
rows: :func:`gather_rows` exchanges counts first and pads only the transport buffer (with zeros), which
is sliced away again before use.

Normalization follows open_clip's semantics while staying exact with uneven counts: with ``local_loss``
each rank sums its own rows and divides by ``global_count / world_size``, so DDP's gradient averaging
gives the gradient of the global mean; without it every rank computes the full global loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Gathered:
    rows: torch.Tensor  # (N_global, D) valid rows of every rank, rank order
    offset: int  # where this rank's rows start
    count: int  # this rank's rows
    total: int


def gather_rows(x: torch.Tensor, *, gather_with_grad: bool, rank: int, world_size: int) -> Gathered:
    """All-gather already-compacted rows (uneven counts allowed) in rank order."""
    n = x.shape[0]
    if world_size == 1:
        return Gathered(x, 0, n, n)
    import torch.distributed as dist

    counts_t = torch.zeros(world_size, dtype=torch.long, device=x.device)
    counts_t[rank] = n
    dist.all_reduce(counts_t)
    counts = counts_t.tolist()
    top = max(counts)
    buf = torch.cat([x, x.new_zeros(top - n, *x.shape[1:])]) if top > n else x
    if gather_with_grad:
        import torch.distributed.nn as dist_nn

        parts = list(dist_nn.all_gather(buf.contiguous()))
    else:
        parts = [torch.zeros_like(buf) for _ in range(world_size)]
        dist.all_gather(parts, buf.contiguous())
        parts[rank] = buf  # keep the local rows' graph, as open_clip does
    rows = torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)])
    return Gathered(rows, sum(counts[:rank]), n, sum(counts))


def _sum_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits, labels, reduction="sum")


class ContrastiveLoss(nn.Module):
    """Symmetric InfoNCE over the valid rows of the global batch (open_clip's ClipLoss, with masks).

    With ``text_sim_threshold`` set, a negative whose text embedding has cosine > threshold with the
    positive's text is removed from both softmax directions (CLOC's region loss). ``dropped_share`` then
    holds the share of negatives the last call removed: near 1 means the loss has almost nothing to learn.

    With ``drop_hardest = r > 0`` the share ``r`` of the pairs this call sums (the global batch, or this
    process's rows with ``local_loss``) with the highest loss is left out: the small-loss trick of
    noisy-label learning, as in Co-teaching. A pseudo-label whose phrase names another object, or whose box
    misses it, costs far more than a right one, so the dropped pairs are mostly wrong labels.
    """

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                 text_sim_threshold: float | None = None, drop_hardest: float = 0.0):
        super().__init__()
        self.local_loss = local_loss
        self.gather_with_grad = gather_with_grad
        self.rank = rank
        self.world_size = world_size
        self.text_sim_threshold = text_sim_threshold
        self.drop_hardest = drop_hardest
        self.dropped_share: torch.Tensor | None = None

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor | None = None,
                text_keys: torch.Tensor | None = None) -> torch.Tensor:
        """a, b: (..., D) normalized pairs; valid: (...) bool; text_keys: (..., D) normalized texts for filtering."""
        self.dropped_share = None
        d = a.shape[-1]
        a, b = a.reshape(-1, d), b.reshape(-1, d)
        keys = text_keys.reshape(-1, text_keys.shape[-1]) if text_keys is not None else None
        if valid is not None:
            v = valid.reshape(-1).bool()
            a, b = a[v], b[v]
            keys = keys[v] if keys is not None else None
        kw = {"gather_with_grad": self.gather_with_grad, "rank": self.rank, "world_size": self.world_size}
        ga, gb = gather_rows(a, **kw), gather_rows(b, **kw)
        gk = gather_rows(keys.detach(), gather_with_grad=False, rank=self.rank, world_size=self.world_size) if keys is not None else None
        if ga.total == 0:
            return (a.sum() + b.sum()) * 0.0 + logit_scale * 0.0
        if self.local_loss:
            rows_a, rows_b = a, b
            labels = torch.arange(ga.count, device=a.device) + ga.offset
            row_keys = keys
            norm = ga.total / self.world_size
        else:
            rows_a, rows_b = ga.rows, gb.rows
            labels = torch.arange(ga.total, device=a.device)
            row_keys = gk.rows if gk is not None else None
            norm = ga.total
        logits_a = logit_scale * rows_a @ gb.rows.T
        logits_b = logit_scale * rows_b @ ga.rows.T
        if gk is not None and self.text_sim_threshold is not None:
            drop = negative_mask(row_keys, gk.rows, labels, self.text_sim_threshold)
            self.dropped_share = drop.sum() / max(drop.numel() - len(labels), 1)
            logits_a = logits_a.masked_fill(drop, float("-inf"))
            logits_b = logits_b.masked_fill(drop, float("-inf"))
        if self.drop_hardest > 0:
            per_pair = (F.cross_entropy(logits_a, labels, reduction="none")
                        + F.cross_entropy(logits_b, labels, reduction="none")) / 2  # fmt: skip
            kept = small_loss_rows(per_pair.detach(), self.drop_hardest)
            return per_pair[kept].sum() / (norm * len(kept) / len(per_pair))
        return (_sum_ce(logits_a, labels) + _sum_ce(logits_b, labels)) / (2 * norm)


def small_loss_rows(losses: torch.Tensor, drop: float) -> torch.Tensor:
    """Indices of the ``1 - drop`` share of rows with the smallest loss (at least one row)."""
    k = max(1, round(len(losses) * (1.0 - drop)))
    return torch.topk(losses, k, largest=False, sorted=False).indices


def negative_mask(row_keys: torch.Tensor, all_keys: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where a negative's text is near-identical (cosine > threshold) to the row's positive text."""
    sim = row_keys.float() @ all_keys.float().T
    drop = sim > threshold
    drop[torch.arange(len(labels), device=labels.device), labels] = False  # never drop the positive
    return drop


def box_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-box squared L2 distance between corner vectors."""
    return ((pred - target) ** 2).sum(-1)


def box_l1_giou(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    from torchvision.ops import generalized_box_iou_loss

    p = torch.stack([torch.minimum(pred[:, 0], pred[:, 2]), torch.minimum(pred[:, 1], pred[:, 3]),
                     torch.maximum(pred[:, 0], pred[:, 2]), torch.maximum(pred[:, 1], pred[:, 3])], -1)
    return (pred - target).abs().sum(-1) + generalized_box_iou_loss(p, target, reduction="none")


GROUND_LOSSES = {"l2": box_l2, "l1+giou": box_l1_giou}


class GroundingLoss(nn.Module):
    """Mean over the valid regions of the global batch (no gather needed: only the count is shared)."""

    def __init__(self, kind: str = "l2", rank: int = 0, world_size: int = 1):
        super().__init__()
        if kind not in GROUND_LOSSES:
            raise ValueError(f"grounding loss must be one of {sorted(GROUND_LOSSES)}, got {kind!r}")
        self.fn = GROUND_LOSSES[kind]
        self.rank = rank
        self.world_size = world_size

    def forward(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        v = valid.reshape(-1).bool()
        p, t = pred.reshape(-1, 4)[v].float(), target.reshape(-1, 4)[v].float()
        total = torch.tensor(float(p.shape[0]), device=p.device)
        if self.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(total)
        if total.item() == 0:
            return pred.sum() * 0.0
        return self.fn(p, t).sum() / (total / self.world_size)


class CLOCLoss(nn.Module):
    """L = L_clip + lam * (L_region + L_ground); region loss shares the CLIP temperature."""

    def __init__(self, lam: float = 1.0, text_sim_threshold: float = 0.9, ground_loss: str = "l2",
                 local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                 region_loss_drop: float = 0.0):
        super().__init__()
        kw = {"local_loss": local_loss, "gather_with_grad": gather_with_grad, "rank": rank, "world_size": world_size}
        self.lam = lam
        self.region_loss_drop = region_loss_drop
        self.clip = ContrastiveLoss(**kw)
        self.region = ContrastiveLoss(text_sim_threshold=text_sim_threshold, **kw)
        self.ground = GroundingLoss(ground_loss, rank, world_size)

    def set_progress(self, step: int, total: int) -> None:
        """Ramp the region loss's dropped share linearly over the first quarter of training (Co-teaching's
        schedule): early on every pair is still hard, and the loss cannot yet tell wrong labels apart."""
        self.region.drop_hardest = self.region_loss_drop * min(1.0, step / max(1, total // 4))

    def forward(self, out: dict[str, torch.Tensor], batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        scale = out["logit_scale"]
        image_valid = batch.get("image_valid")
        clip = self.clip(out["image_features"].float(), out["text_features"].float(), scale, image_valid)
        losses = {"clip": clip}
        total = clip
        if "region_features" in out:
            rv = batch["region_valid"].bool()
            if image_valid is not None:
                rv = rv & image_valid.bool().unsqueeze(1)
            region = self.region(out["region_features"].float(), out["region_text_features"].float(), scale, rv,
                                 text_keys=out["region_text_features"].float())
            ground = self.ground(out["pred_boxes"], batch["region_boxes"], rv)
            losses.update(region=region, ground=ground)
            total = total + self.lam * (region + ground)
            if self.region.dropped_share is not None:
                losses["region_neg_dropped"] = self.region.dropped_share.detach()
        losses["loss"] = total
        return losses


def filter_warning(dropped_share: float, threshold: float) -> str | None:
    """The warning to print when the text-similarity filter removes most region negatives."""
    if dropped_share < 0.5:
        return None
    return (f"warning: text_sim_threshold {threshold} removes {dropped_share:.0%} of the region negatives, so "
            "L_region learns little; the text tower cannot tell the phrases apart yet (typical when it trains "
            "from scratch on phrases one word apart): raise text_sim_threshold, e.g. 0.999")
