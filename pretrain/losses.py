"""CLOC losses: L = L_clip + lambda * (w_region * L_region + w_ground * L_ground).

Every input row comes with a validity mask. Shapes stay fixed (no boolean indexing, no counts read back to
the host), so a training step never waits on the device: padded rows are replaced by zeros with
``torch.where`` before any product or gather (their values cannot reach a loss or a gradient, NaN included),
their logit columns are masked out and their loss rows are weighted 0. The number of valid rows stays a
device tensor.

**Balance across processes.** DDP averages gradients over the W processes, so each process's loss must have
W times the gradient of its share of the global mean. Then 1 process and W processes give the same gradients
for the same global batch, term by term:

- ``local_loss``: each rank sums its own rows and divides by ``global_count / W`` (exact with
  ``gather_with_grad``; without it the other ranks' rows are constants, open_clip's approximation);
- global loss (default): every rank computes the whole global loss, but only its own rows carry a graph, so
  its feature gradients are scaled by W (and the shared temperature's, which every rank sees in full, is not);
- with ``gather_with_grad`` the gather's backward already sums the gradients of every rank's copy;
- the grounding loss sums this rank's rows and divides by ``global_count / W``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Gathered:
    rows: torch.Tensor  # (W * N, D) the rows of every rank, rank order (padded rows are zeros)
    valid: torch.Tensor  # (W * N,) bool
    offset: int  # where this rank's rows start
    count: int  # this rank's rows (valid or not)


def _all_gather(x: torch.Tensor, *, with_grad: bool, rank: int, world_size: int) -> torch.Tensor:
    import torch.distributed as dist

    if with_grad:
        import torch.distributed.nn as dist_nn

        return torch.cat(list(dist_nn.all_gather(x.contiguous())))
    parts = [torch.zeros_like(x) for _ in range(world_size)]
    dist.all_gather(parts, x.contiguous())
    parts[rank] = x  # keep the local rows' graph, as open_clip does
    return torch.cat(parts)


def gather_rows(x: torch.Tensor, valid: torch.Tensor, *, gather_with_grad: bool, rank: int,
                world_size: int) -> Gathered:
    """All-gather fixed-shape rows (N, D) and their mask (N,) in rank order; padded rows become zeros first."""
    n = x.shape[0]
    x = torch.where(valid.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))
    if world_size == 1:
        return Gathered(x, valid, 0, n)
    rows = _all_gather(x, with_grad=gather_with_grad, rank=rank, world_size=world_size)
    v = _all_gather(valid.to(torch.uint8), with_grad=False, rank=rank, world_size=world_size).bool()
    return Gathered(rows, v, rank * n, n)


def _global_count(valid: torch.Tensor, world_size: int) -> torch.Tensor:
    """Valid rows over every rank, as a float device tensor (no host read)."""
    total = valid.sum().to(torch.float32)
    if world_size > 1:
        import torch.distributed as dist

        total = total.clone()
        dist.all_reduce(total)
    return total


def _scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    """``x`` in the forward pass, ``factor`` times its gradient in the backward pass."""
    return x if factor == 1 else x * factor + (x * (1 - factor)).detach()


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
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad  # how rows meet the global batch
        self.rank, self.world_size = rank, world_size
        self.text_sim_threshold, self.drop_hardest = text_sim_threshold, drop_hardest  # which pairs leave the loss
        self.dropped_share: torch.Tensor | None = None
        self.count: torch.Tensor | None = None  # valid pairs of the last call's global batch (a device tensor)

    def forward(self, a: torch.Tensor, b: torch.Tensor, logit_scale: torch.Tensor, valid: torch.Tensor | None = None,
                text_keys: torch.Tensor | None = None, extra_b: torch.Tensor | None = None,
                extra_valid: torch.Tensor | None = None) -> torch.Tensor:
        """a, b: (..., D) normalized pairs; valid: (...) bool; text_keys: (..., D) normalized texts for filtering.

        ``extra_b`` (..., D) with ``extra_valid`` (...): more ``b``-side texts that are no row's positive (an
        image's unmatched phrases), added as negatives of the ``a`` -> ``b`` direction only; one near-identical to
        a row's own text (``text_sim_threshold``) is removed for that row, as the other negatives are."""
        self.dropped_share = None
        d = a.shape[-1]
        a, b = a.reshape(-1, d), b.reshape(-1, d)
        v = valid.reshape(-1).bool() if valid is not None else torch.ones(a.shape[0], dtype=torch.bool, device=a.device)
        keys = text_keys.reshape(-1, text_keys.shape[-1]).detach() if text_keys is not None else None
        w = self.world_size
        if w > 1 and not self.local_loss and not self.gather_with_grad:
            # every rank computes the whole loss with a graph on its own rows only: after DDP's mean, the
            # feature gradients would be 1/W of the global loss's (the temperature's, seen whole by every rank,
            # would not)
            a, b = _scale_grad(a, w), _scale_grad(b, w)
        kw = {"gather_with_grad": self.gather_with_grad, "rank": self.rank, "world_size": w}
        ga, gb = gather_rows(a, v, **kw), gather_rows(b, v, **kw)
        gk = gather_rows(keys, v, gather_with_grad=False, rank=self.rank, world_size=w) if keys is not None else None
        total = ga.valid.sum().to(torch.float32)  # the gathered masks: the same on every rank
        self.count = total
        if self.local_loss:
            rows_a, rows_b, row_valid = ga.rows[ga.offset:ga.offset + ga.count], gb.rows[gb.offset:gb.offset + gb.count], v
            labels = torch.arange(ga.count, device=a.device) + ga.offset
            row_keys = gk.rows[gk.offset:gk.offset + gk.count] if gk is not None else None
            norm = total / w
        else:
            rows_a, rows_b, row_valid = ga.rows, gb.rows, ga.valid
            labels = torch.arange(ga.rows.shape[0], device=a.device)
            row_keys = gk.rows if gk is not None else None
            norm = total
        # padded columns: -inf; padded rows: all-zero logits (a finite loss, weighted 0)
        drop = ~ga.valid.unsqueeze(0).expand(len(labels), -1)
        if gk is not None and self.text_sim_threshold is not None:
            sim_drop = negative_mask(row_keys, gk.rows, labels, self.text_sim_threshold)
            pair_valid = row_valid.unsqueeze(1) & ga.valid.unsqueeze(0)
            n_neg = (pair_valid.sum() - row_valid.sum()).to(torch.float32)
            self.dropped_share = (sim_drop & pair_valid).sum() / n_neg.clamp_min(1)
            drop = drop | sim_drop
        keep_row = row_valid.unsqueeze(1)
        neg_inf = torch.tensor(float("-inf"), device=a.device)
        zero = torch.zeros((), device=a.device)
        logits_a = torch.where(keep_row, (logit_scale * rows_a @ gb.rows.T).masked_fill(drop, neg_inf), zero)
        if extra_b is not None:
            ev = extra_valid.reshape(-1).bool()
            ge = gather_rows(extra_b.reshape(-1, d), ev, **kw)
            extra_drop = ~ge.valid.unsqueeze(0).expand(len(labels), -1)
            if row_keys is not None and self.text_sim_threshold is not None:
                extra_drop = extra_drop | ((row_keys @ ge.rows.detach().T) > self.text_sim_threshold)
            extra = torch.where(keep_row, (logit_scale * rows_a @ ge.rows.T).masked_fill(extra_drop, neg_inf), zero)
            logits_a = torch.cat([logits_a, extra], dim=1)
        logits_b = torch.where(keep_row, (logit_scale * rows_b @ ga.rows.T).masked_fill(drop, neg_inf), zero)
        per_pair = (F.cross_entropy(logits_a, labels, reduction="none")
                    + F.cross_entropy(logits_b, labels, reduction="none")) / 2  # fmt: skip
        weight = row_valid.to(per_pair.dtype)
        if self.drop_hardest > 0:
            kept = small_loss_mask(per_pair.detach(), row_valid, self.drop_hardest)
            n_rows = row_valid.sum().to(per_pair.dtype)
            # the kept pairs' mean, scaled to the same normalization as without dropping
            weight = kept.to(per_pair.dtype) * n_rows / kept.sum().to(per_pair.dtype).clamp_min(1)
        loss = (per_pair * weight).sum() / norm.clamp_min(1)
        return loss + logit_scale * 0.0  # keeps the temperature in the graph when no row is valid


def small_loss_mask(losses: torch.Tensor, valid: torch.Tensor, drop: float) -> torch.Tensor:
    """True for the ``1 - drop`` share of the valid rows with the smallest loss (at least one row), on device."""
    n = valid.sum()
    k = torch.round(n.to(torch.float64) * (1.0 - drop)).clamp_min(1).to(n.dtype)
    masked = torch.where(valid, losses, torch.tensor(float("inf"), dtype=losses.dtype, device=losses.device))
    order = torch.argsort(masked, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    return (rank < k) & valid


def negative_mask(row_keys: torch.Tensor, all_keys: torch.Tensor, labels: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where a negative's text is near-identical (cosine > threshold) to the row's positive text."""
    sim = row_keys.float() @ all_keys.float().T
    drop = sim > threshold
    drop[torch.arange(len(labels), device=labels.device), labels] = False  # never drop the positive
    return drop


def box_l2(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-box squared L2 distance between corner vectors."""
    return ((pred - target) ** 2).sum(-1)


L1_WEIGHT, GIOU_WEIGHT = 5.0, 2.0  # DETR's box-loss weights (Carion et al., 2020), also used by OWL-ViT


def generalized_iou(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """GIoU of paired ``x0, y0, x1, y1`` boxes (N, 4) -> (N,); torchvision's formula, written without the
    boolean indexing that would make the host wait for the device every step."""
    area_a = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    area_b = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    wh = (torch.minimum(a[:, 2:], b[:, 2:]) - torch.maximum(a[:, :2], b[:, :2])).clamp_min(0)
    inter = wh[:, 0] * wh[:, 1]
    union = area_a + area_b - inter
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp_min(0)
    area_c = hull[:, 0] * hull[:, 1]
    return inter / (union + eps) - (area_c - union) / (area_c + eps)


def box_l1_giou(pred: torch.Tensor, target: torch.Tensor, l1_weight: float = L1_WEIGHT,
                giou_weight: float = GIOU_WEIGHT) -> torch.Tensor:
    """Per-box ``l1_weight * L1(corners) + giou_weight * (1 - GIoU)``."""
    p = torch.stack([torch.minimum(pred[:, 0], pred[:, 2]), torch.minimum(pred[:, 1], pred[:, 3]),
                     torch.maximum(pred[:, 0], pred[:, 2]), torch.maximum(pred[:, 1], pred[:, 3])], -1)
    return l1_weight * (pred - target).abs().sum(-1) + giou_weight * (1 - generalized_iou(p, target))


GROUND_LOSSES = {"l2": box_l2, "l1+giou": box_l1_giou}


class GroundingLoss(nn.Module):
    """Mean over the valid regions of the global batch (no gather needed: only the count is shared)."""

    def __init__(self, kind: str = "l2", rank: int = 0, world_size: int = 1, l1_weight: float = L1_WEIGHT,
                 giou_weight: float = GIOU_WEIGHT):
        super().__init__()
        if kind not in GROUND_LOSSES:
            raise ValueError(f"grounding loss must be one of {sorted(GROUND_LOSSES)}, got {kind!r}")
        self.kind = kind
        self.fn = GROUND_LOSSES[kind]
        self.kw = {"l1_weight": l1_weight, "giou_weight": giou_weight} if kind == "l1+giou" else {}
        self.rank = rank
        self.world_size = world_size
        self.count: torch.Tensor | None = None  # valid regions of the last call's global batch (a device tensor)

    def forward(self, pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        v = valid.reshape(-1).bool()
        p, t = pred.reshape(-1, 4).float(), target.reshape(-1, 4).float()
        ok = v.unsqueeze(-1)
        # padded rows: a constant pair of unit boxes (finite loss, weight 0, no gradient to their values)
        unit = torch.tensor([0.0, 0.0, 1.0, 1.0], device=p.device)
        p, t = torch.where(ok, p, unit), torch.where(ok, t, unit)
        per_box = torch.where(v, self.fn(p, t, **self.kw), torch.zeros((), device=p.device))
        total = _global_count(v, self.world_size)
        self.count = total
        return per_box.sum() / (total.clamp_min(1) / self.world_size)


class CellLoss(nn.Module):
    """Cross-entropy of the text prompt's patch logits against the cell that holds the region's centre, as a
    mean over the valid regions of the global batch (the locate head's direct signal to find the object)."""

    def __init__(self, rank: int = 0, world_size: int = 1):
        super().__init__()
        self.rank = rank
        self.world_size = world_size

    def forward(self, logits: torch.Tensor, cells: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        v = valid.reshape(-1).bool()
        x = logits.reshape(-1, logits.shape[-1]).float()
        x = torch.where(v.unsqueeze(-1), x, torch.zeros((), device=x.device))
        ce = F.cross_entropy(x, cells.reshape(-1).clamp(0, x.shape[-1] - 1), reduction="none")
        per = torch.where(v, ce, torch.zeros((), device=x.device))
        total = _global_count(v, self.world_size)
        return per.sum() / (total.clamp_min(1) / self.world_size)


class CLOCLoss(nn.Module):
    """L = L_clip + lam * (region_weight * L_region + ground_weight * L_ground + cell_weight * L_cell); the region
    loss shares the CLIP temperature. ``lam`` is the paper's shared factor; the weights (1 and 1 in the paper,
    which has no L_cell) balance the terms. ``L_cell`` exists only with the locate grounding head. The logged
    ``region``, ``ground`` and ``ground_cell`` values are the unweighted terms."""

    def __init__(self, *, lam: float = 1.0, text_sim_threshold: float = 0.9, ground_loss: str = "l2",
                 local_loss: bool = False, gather_with_grad: bool = False, rank: int = 0, world_size: int = 1,
                 region_loss_drop: float = 0.0, region_weight: float = 1.0, ground_weight: float = 1.0,
                 l1_weight: float = L1_WEIGHT, giou_weight: float = GIOU_WEIGHT, cell_weight: float = 0.0):
        super().__init__()
        kw = {"local_loss": local_loss, "gather_with_grad": gather_with_grad, "rank": rank, "world_size": world_size}
        self.cell_weight = cell_weight
        self.cell = CellLoss(rank, world_size)
        self.lam = lam
        self.region_weight = region_weight
        self.ground_weight = ground_weight
        self.region_loss_drop = region_loss_drop
        self.clip = ContrastiveLoss(**kw)
        self.region = ContrastiveLoss(text_sim_threshold=text_sim_threshold, **kw)
        self.ground = GroundingLoss(ground_loss, rank, world_size, l1_weight, giou_weight)
        self._most: dict[str, torch.Tensor] = {}  # per term, the most valid inputs of one step since the last check
        self._starved_warned = False

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
            neg = out.get("negative_text_features")
            nv = batch.get("negative_valid")
            if neg is not None and image_valid is not None:
                nv = nv.bool() & image_valid.bool().unsqueeze(1)
            region = self.region(out["region_features"].float(), out["region_text_features"].float(), scale, rv,
                                 text_keys=out["region_text_features"].float(),
                                 extra_b=None if neg is None else neg.float(), extra_valid=nv)
            ground = self.ground(out["pred_boxes"], batch["region_boxes"], rv)
            losses.update(region=region, ground=ground)
            total = total + self.lam * (self.region_weight * region + self.ground_weight * ground)
            if "ground_logits" in out and self.cell_weight > 0:
                cell = self.cell(out["ground_logits"], out["ground_cells"], rv)
                losses["ground_cell"] = cell
                total = total + self.lam * self.cell_weight * cell
            if self.region.dropped_share is not None:
                losses["region_neg_dropped"] = self.region.dropped_share.detach()
        losses["loss"] = total
        for name in losses.keys() & STARVED_BELOW.keys():
            c = getattr(self, name).count.detach()
            self._most[name] = torch.maximum(self._most[name], c) if name in self._most else c
        return losses

    def starved_warning(self) -> str | None:
        """Once per run, the warning for terms that had no usable input in any step since the last call (one host
        read; call it where the loop reads values back anyway). Such a term is 0 and trains nothing, which the
        logged ``region 0.0000`` alone does not tell apart from a converged one."""
        most, self._most = self._most, {}
        if self._starved_warned or not most:
            return None
        counts = dict(zip(most, torch.stack(list(most.values())).tolist(), strict=True))
        starved = [f"{_TERM_NAMES[k]} ({STARVED_BELOW[k][1]})" for k in STARVED_BELOW if counts.get(k, 2) < STARVED_BELOW[k][0]]
        if not starved:
            return None
        self._starved_warned = True
        return (f"warning: {', '.join(starved)}: no step since the last log had the input these loss terms need, so "
                "they are 0 and train nothing; check the data (`vesl validate`, `vesl inspect`) or raise batch_size")


# the fewest valid inputs a term needs in a global batch to train anything, and what that means
STARVED_BELOW = {
    "clip": (2, "fewer than 2 readable images per global batch: no negatives"),
    "region": (2, "fewer than 2 regions with a valid box per global batch: no negatives"),
    "ground": (1, "no region with a finite box inside [0, 1]"),
}
_TERM_NAMES = {"clip": "L_clip", "region": "L_region", "ground": "L_ground"}


def filter_warning(dropped_share: float, threshold: float) -> str | None:
    """The warning to print when the text-similarity filter removes most region negatives."""
    if dropped_share < 0.5:
        return None
    return (f"warning: text_sim_threshold {threshold} removes {dropped_share:.0%} of the region negatives, so "
            "L_region learns little; the text tower cannot tell the phrases apart yet (typical when it trains "
            "from scratch on phrases one word apart): raise text_sim_threshold, e.g. 0.999")
