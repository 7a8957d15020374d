"""CLOC training loop: one process per device under torchrun (DDP), or a single process.

Run directory layout::

    RUN/config.yaml                     the resolved TrainConfig
    RUN/log.jsonl                       one line per step (rank 0): losses, lr, samples/s
    RUN/tb/                             TensorBoard events
    RUN/checkpoints/step-00000100/      model.safetensors, optimizer.pt, state.json (loader cursors)

A checkpoint directory is written under a temporary name and renamed into place, so a killed run never
leaves a half checkpoint; ``resume: latest`` picks the newest complete one.

Longer than 400 lines on purpose: the config with its checks and the loop that reads it (``train``,
``train_one_epoch``, ``RunLog``) change together; checkpoints and processes live in ``checkpoint.py`` and
``distributed.py``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from vesl.errors import UserError
from vesl.pretrain.checkpoint import (
    load_optimizer_state,
    load_weights,
    resolve_resume,
    save_checkpoint,
)
from vesl.pretrain.distributed import Dist, torch_threads

MAX_STEPS = 10**9  # upper bound of every step count: far above any run, far below an index overflow
MAX_FACTOR = 1e6  # upper bound of every weight, rate and norm: far above any sensible value, and finite


class TrainConfig(BaseModel):
    """Every `vesl train` option (the command's flags and help are made from these fields); a YAML file with the
    same keys can set any of them. Every number has a range and must be finite, so a mistake is one line here,
    not a traceback in a loader worker."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: str | list[str] = Field(description="region-text shards: directory, glob, file or fsspec URL")
    out: str = Field("runs/vesl", description="run directory (checkpoints, logs, TensorBoard)")
    model: str = Field("vesl-tiny-vit", description="open_clip model name or a vesl tiny config")
    pretrained: str | None = Field(None, description="open_clip pretrained tag or weights file to start from")
    prompter_pool: Literal["prompt", "mean"] = Field("prompt", description="prompt: the Prompter's output at the "
                                                     "prompt token (cheap); mean: all outputs mean-pooled (paper)")
    patch_pos: bool = Field(True, description="add each patch's own cell as a box encoding to its Prompter token")
    box_bias: bool = Field(True, description="bias box-prompt attention toward the patches the box covers (not in the paper)")
    epochs: int = Field(1, ge=1, le=MAX_STEPS, description="passes over the data")
    max_steps: int | None = Field(None, ge=1, le=MAX_STEPS, description="cap on total optimizer steps (schedule "
                                  "follows it)")
    batch_size: int = Field(32, ge=1, le=65536, description="images per process and step")
    workers: int = Field(2, ge=0, le=256, description="loader worker processes per rank")
    threads: int = Field(0, ge=0, le=1024, description="torch threads per process (0: torch's default; on a small "
                         "CPU machine, 1 leaves the other cores to the loader workers)")
    lr: float = Field(5e-4, gt=0, le=MAX_FACTOR, description="peak learning rate (AdamW, cosine schedule)")
    warmup: int = Field(100, ge=0, le=MAX_STEPS, description="linear warmup steps")
    weight_decay: float = Field(0.2, ge=0, le=MAX_FACTOR, description="AdamW weight decay (not on norms, biases, "
                                "logit scale)")
    beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1")
    beta2: float = Field(0.98, ge=0, lt=1, description="AdamW beta2")
    eps: float = Field(1e-6, gt=0, le=1, description="AdamW epsilon")
    grad_clip: float | None = Field(1.0, ge=0, le=MAX_FACTOR, description="max global grad norm (0 or null: off)")
    regions_per_image: int = Field(4, ge=1, le=1024, description="M, regions sampled per image")
    lam: float = Field(1.0, ge=0, le=MAX_FACTOR, description="the paper's shared factor lambda of the region and "
                       "grounding terms")
    region_weight: float = Field(1.0, ge=0, le=MAX_FACTOR, description="weight of L_region inside lambda (1 in the "
                                 "paper)")
    ground_weight: float = Field(1.0, ge=0, le=MAX_FACTOR, description="weight of L_ground inside lambda (1, as in "
                                 "the paper)")
    text_sim_threshold: float = Field(0.9, ge=-1, le=1, description="region negatives with text cosine above this "
                                      "are removed")
    region_loss_drop: float = Field(0.0, ge=0.0, lt=1.0, description="share of region pairs with the highest loss "
                                    "left out of L_region, for noisy pseudo-labels (0: paper-literal)")
    ground_loss: Literal["l2", "l1+giou"] = Field("l1+giou", description="l1+giou: DETR's box loss (chosen on "
                                                  "validation worlds of the demo, see docs/demo-report.md); l2: the paper's")
    ground_cell_weight: float = Field(0.0, ge=0, le=MAX_FACTOR, description="--ground-head locate: weight of the cross-entropy that "
                                      "points the text prompt's attention at the cell holding the box centre (0: off)")
    ground_l1_weight: float = Field(5.0, ge=0, le=MAX_FACTOR, description="--ground-loss l1+giou: weight of L1 (DETR's 5)")
    ground_giou_weight: float = Field(2.0, ge=0, le=MAX_FACTOR, description="--ground-loss l1+giou: weight of 1 - GIoU (DETR's 2)")
    ground_head: Literal["locate", "mlp", "patch"] = Field(
        "patch", description="locate: soft-argmax over the text prompt's Prompter attention plus offset and size; "
        "patch: a box from every patch token, picked by the text (OWL-ViT style); mlp: the paper's MLP")
    region_position_words: float = Field(0.0, ge=0.0, le=1.0, description="share of region texts that get the "
                                         "box's position on a 3x3 grid appended ('... at the top left'), so box "
                                         "geometry meets position words (0: the phrases as labeled)")
    unmatched_negatives: int = Field(0, ge=0, le=64, description="add up to N of each image's unmatched phrases "
                                     "(phrases the detector found no box for; schema 1.2) as extra negative texts "
                                     "of the region loss (0: off)")
    region_relative_words: float = Field(0.0, ge=0.0, le=1.0, description="share of region texts whose phrase "
                                         "names another region of the image too (a look-alike) that get their side "
                                         "against it appended ('... on the left'), so the Prompter learns which of "
                                         "two look-alikes is meant (0: the phrases as labeled)")
    clip_only: bool = Field(False, description="train the CLIP baseline only (same data and steps)")
    local_loss: bool = Field(False, description="each process scores its own features against the gathered batch "
                             "(open_clip)")
    gather_with_grad: bool = Field(False, description="gradients flow through the all-gather (open_clip)")
    precision: Literal["auto", "fp32", "bf16"] = Field("auto", description="auto: bf16 on GPU, fp32 on CPU")
    grad_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less memory)")
    save_every: int = Field(100, ge=1, le=MAX_STEPS, description="checkpoint every N steps (and at the end)")
    keep_checkpoints: int = Field(2, ge=1, le=MAX_STEPS, description="newest checkpoints kept")
    resume: str | None = Field(None, description="'latest' or a checkpoint directory")
    overwrite: bool = Field(False, description="train into a run directory that holds an earlier run, deleting its "
                            "config, logs, TensorBoard events and checkpoints")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed of the initialisation and the data order")
    log_every: int = Field(10, ge=1, le=MAX_STEPS, description="log a line every N steps")
    tensorboard: bool = Field(True, description="write TensorBoard events under RUN/tb")
    text_field: Literal["caption", "alt_text"] = Field("caption", description="the image text trained on")
    stop_after: int | None = Field(None, ge=1, le=MAX_STEPS, description="stop (as if killed) after this global step")
    record_keys: bool = Field(False, description="write each step's sample keys to keys-rank*.jsonl")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: each process on its local rank's GPU "
                                                   "when there is one, else the CPU")
    storage_options: dict[str, Any] | None = Field(None, description="fsspec options for remote --data")


def load_config(path: str | os.PathLike | None = None, **overrides: Any) -> TrainConfig:
    """YAML file (optional) + non-None overrides -> validated TrainConfig."""
    raw: dict[str, Any] = {}
    if path:
        p = Path(path)
        if not p.exists():
            raise UserError(f"config file {p} does not exist")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise UserError(f"config file {p} must be a YAML mapping of option: value")
        raw = {k.replace("-", "_"): v for k, v in raw.items()}
    raw.update({k: v for k, v in overrides.items() if v is not None})
    if "data" not in raw:
        raise UserError("no training data: pass --data DIR (region-text shards) or set `data:` in the config file")
    return _validated(raw)


def _validated(raw: dict[str, Any]) -> TrainConfig:
    """TrainConfig(**raw), with a one-line error that names `vesl train --help`."""
    from pydantic import ValidationError

    try:
        return TrainConfig(**raw)
    except ValidationError as exc:
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
        raise UserError("invalid train config: " + "; ".join(parts) + " (check the YAML file or flags; see "
                        "`vesl train --help`)") from None


RUN_FILES = ("config.yaml", "log.jsonl", "tb", "checkpoints")


def check_run_dir(run_dir: Path, resume: str | None, overwrite: bool) -> bool:
    """Whether ``run_dir`` holds an earlier run that ``--overwrite`` must clear; refuses one without either flag.

    Training into it silently would append to its log, add TensorBoard events and overwrite its checkpoints.
    """
    found = [n for n in RUN_FILES if (run_dir / n).exists()]
    if not found or resume:
        return False
    if not overwrite:
        raise UserError(f"{run_dir} already holds a run ({', '.join(found)}): pass --resume latest to continue it, "
                        "--overwrite to start again there, or another --out")
    return True


def clear_run_dir(run_dir: Path) -> None:
    """Delete what an earlier run wrote (only the names vesl writes there)."""
    for n in RUN_FILES:
        p = run_dir / n
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for p in run_dir.glob("keys-rank*.jsonl"):
        p.unlink()


def fit_workers(units: int, workers: int, world_size: int) -> tuple[int, str | None]:
    """Loader workers per process that the data can feed (each needs a data unit), and a note when fewer."""
    if units >= world_size * max(workers, 1) or workers == 0:
        return workers, None
    fit = units // world_size
    return fit, (f"note: {units} data unit{'s' if units != 1 else ''} (row groups) for {workers} loader workers per "
                 f"process x {world_size}; using --workers {fit} (write more row groups, e.g. smaller "
                 "--shard-size, for parallel loading)")


def fit_warmup(warmup: int, total: int) -> tuple[int, str | None]:
    """The warmup to use, scaled to total // 10 when the given one would take more than half the run."""
    if warmup <= total // 2:
        return warmup, None
    fit = max(total // 10, 1)
    return fit, (f"note: --warmup {warmup} is longer than half the run ({total} steps); warming up over {fit} "
                 f"step{'s' if fit != 1 else ''} instead (pass a shorter --warmup to choose)")


def cosine_lr(step: int, base: float, warmup: int, total: int) -> float:
    """open_clip's cosine schedule with linear warmup."""
    if step < warmup:
        return base * (step + 1) / warmup
    e = step - warmup
    es = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


def _param_groups(model, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exclude = p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n
        (no_decay if exclude else decay).append(p)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


def make_optimizer(model, cfg: TrainConfig):
    """AdamW with open_clip's no-decay rule; the fused kernel is deterministic and ~7x faster on CPU."""
    import torch

    groups = _param_groups(model, cfg.weight_decay)
    kw = {"lr": cfg.lr, "betas": (cfg.beta1, cfg.beta2), "eps": cfg.eps}
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, **kw)


def make_loss(cfg: TrainConfig, d: Dist):
    """The CLOC loss that ``cfg`` asks for, on this process's rank."""
    from vesl.pretrain.losses import CLOCLoss

    return CLOCLoss(
        lam=cfg.lam, text_sim_threshold=cfg.text_sim_threshold, ground_loss=cfg.ground_loss,
        local_loss=cfg.local_loss, gather_with_grad=cfg.gather_with_grad, rank=d.rank, world_size=d.world_size,
        region_loss_drop=cfg.region_loss_drop, region_weight=cfg.region_weight, ground_weight=cfg.ground_weight,
        l1_weight=cfg.ground_l1_weight, giou_weight=cfg.ground_giou_weight, cell_weight=cfg.ground_cell_weight,
    )


def negative_features(model, texts: Any, valid: Any) -> Any:
    """(B, N, D) normalized text features of the unmatched-phrase negatives, zero where ``valid`` is False (None:
    none is valid); only the valid ones go through the text tower (outside the DDP forward: the text tower's
    gradients add up)."""
    import torch

    flat, v = texts.reshape(-1, texts.shape[-1]), valid.reshape(-1).bool()
    if not bool(v.any()):
        return None
    feats = model.encode_text(flat[v]).float()
    out = torch.zeros(v.shape[0], feats.shape[-1], device=feats.device, dtype=feats.dtype)
    out[v] = feats
    return out.view(*valid.shape, feats.shape[-1])


def host_prepare(batch: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """What the step needs read from the batch, read while it is still on the host: its number of valid images,
    and the text inputs in the form that lets the forward run without host reads (``prepare_texts``)."""
    from vesl.pretrain.model import prepare_texts

    n_valid = int(batch["image_valid"].sum())
    return n_valid, {**batch, **prepare_texts(batch["texts"], batch["region_texts"], batch["region_valid"])}


def _to(batch: dict[str, Any], device) -> dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if hasattr(v, "to") else v) for k, v in batch.items()}


def _build_model(cfg: TrainConfig, device):
    """The model (heads frozen with ``clip_only``), or a one-line UserError for a wrong model name (with the closest names) or unusable weights."""
    import open_clip

    from vesl.errors import first_line
    from vesl.pretrain.model import PrompterConfig, create_model, register_model_configs

    register_model_configs()
    names = open_clip.list_models()
    if cfg.model not in names and not cfg.model.startswith(("hf-hub:", "local-dir:")):
        import difflib

        close = difflib.get_close_matches(cfg.model, names, n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "see open_clip.list_models(), or use vesl-tiny-vit"
        raise UserError(f"unknown model {cfg.model!r}: {hint}")
    prompter = PrompterConfig(pool=cfg.prompter_pool, patch_pos=cfg.patch_pos, box_bias=cfg.box_bias,
                              ground_head=cfg.ground_head)
    import logging

    def no_download_log(record: logging.LogRecord) -> bool:  # open_clip logs it, then raises: say it once
        return not record.getMessage().startswith("Failed to download")

    root = logging.getLogger()
    root.addFilter(no_download_log)
    try:
        model = create_model(cfg.model, cfg.pretrained, prompter, seed=cfg.seed, device=device)
    except (RuntimeError, ValueError, OSError) as exc:
        if cfg.pretrained:
            raise UserError(f"open_clip could not load {cfg.model} with --pretrained {cfg.pretrained}: "
                            f"{first_line(exc, 300)} (offline? pass a local weights file to --pretrained)") from None
        raise
    finally:
        root.removeFilter(no_download_log)
    if cfg.clip_only:  # the heads stay as built: no gradients, no optimizer state
        model.prompter.requires_grad_(False)
        model.ground_head.requires_grad_(False)
    return model


# ---- the training half (as open_clip splits ``main`` and ``train_one_epoch``) ----------------------


class RunLog:
    """What a run records: ``log.jsonl`` (rank 0, one line per step), TensorBoard and the console (rank 0),
    and each rank's ``keys-rankN.jsonl`` with ``record_keys``.

    Loss values stay on the device until a log step, a checkpoint or the end: then one read brings back
    every pending step's values (and one all-reduce averages them over the ranks), so the steps between
    never wait on the device. log.jsonl still gets one line per step.
    """

    def __init__(self, cfg: TrainConfig, d: Dist, run_dir: Path) -> None:
        self.cfg, self.d = cfg, d
        self.writer = None
        if d.main and cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run_dir / "tb"))
        self.log = open(run_dir / "log.jsonl", "a") if d.main else None
        self.keys_log = open(run_dir / f"keys-rank{d.rank}.jsonl", "a") if cfg.record_keys else None
        self.pending: list[tuple[dict[str, Any], dict[str, Any]]] = []
        self.t0 = self.t_last = time.perf_counter()
        self.seen_last = 0
        self.warned = False

    def step(self, step: int, epoch: int, lr: float, losses: dict[str, Any], keys: list[str]) -> None:
        """Record one step; its loss tensors stay on the device until :meth:`flush`."""
        if self.keys_log:
            self.keys_log.write(json.dumps({"step": step, "keys": keys}) + "\n")
            self.keys_log.flush()
        self.pending.append(({"step": step, "epoch": epoch, "lr": lr, "t": time.perf_counter() - self.t0},
                             {k: v.detach() for k, v in losses.items()}))  # fmt: skip

    def flush(self) -> dict[str, float]:
        """Read back the pending steps (one host read), write their lines; the last step's values."""
        import torch

        if not self.pending:
            return {}
        keys = list(self.pending[0][1])
        stacked = torch.stack([torch.stack([v[k].detach().float() for k in keys]) for _, v in self.pending])
        rows = self.d.mean_rows(stacked)
        last: dict[str, float] = {}
        for (meta, _), row in zip(self.pending, rows, strict=True):
            last = dict(zip(keys, row, strict=True))
            if self.log:
                self.log.write(json.dumps({**meta, **last}) + "\n")
            # Checked here, at log steps and before every checkpoint, so the step loop never waits on the
            # host; the rows are all-reduced, so every rank stops together, and no checkpoint is written.
            if not math.isfinite(last["loss"]):
                if self.log:
                    self.log.flush()
                raise UserError(
                    f"step {meta['step']}: the loss is {last['loss']} (not finite); stopped without saving a "
                    "checkpoint: check the data with `vesl validate`, or lower lr"
                )
        if self.log:
            self.log.flush()
        self.pending.clear()
        return last

    def report(self, model, step: int, epoch: int, total: int, warmup: int, lr: float) -> None:
        """A log step: flush, warn once about the negative filter, print and chart the step's values."""
        from vesl.pretrain.losses import filter_warning

        cfg, d = self.cfg, self.d
        vals = self.flush()
        dropped = vals.get("region_neg_dropped", 0.0)
        if d.main and not self.warned and step > warmup and (w := filter_warning(dropped, cfg.text_sim_threshold)):
            print(w, file=sys.stderr, flush=True)
            self.warned = True
        seen = d.sum_int(self.seen_last)
        now = time.perf_counter()
        sps = seen / max(now - self.t_last, 1e-9)
        self.t_last, self.seen_last = now, 0
        if d.main:
            parts = " ".join(f"{k} {v:.4f}" for k, v in vals.items())
            print(f"epoch {epoch} step {step}/{total} {parts} lr {lr:.2e} "
                  f"scale {model.logit_scale.exp().item():.2f} {sps:.1f} samples/s", flush=True)
            if self.writer:
                for k, v in vals.items():
                    self.writer.add_scalar(f"train/{k}", v, step)
                self.writer.add_scalar("train/lr", lr, step)
                self.writer.add_scalar("train/samples_per_s", sps, step)

    def close(self) -> None:
        for f in (self.log, self.keys_log):
            if f:
                f.close()
        if self.writer:
            self.writer.close()


@dataclass
class Run:
    """Everything the step loop needs, built by :func:`train`; ``step`` and ``last_saved`` advance."""

    cfg: TrainConfig
    d: Dist
    run_dir: Path
    model: Any
    ddp: Any  # the model, or its DistributedDataParallel wrapper
    optimizer: Any
    loss_fn: Any
    loader: Any
    log: RunLog
    total: int
    warmup: int
    workers: int
    use_bf16: bool
    step: int = 0
    last_saved: int = 0


def save(run: Run, epoch: int) -> None:
    """A checkpoint of ``run`` (every rank's loader cursors; rank 0 writes), after flushing the pending losses."""
    run.log.flush()
    states = run.d.gather_object(run.loader.state)
    if run.d.main:
        meta = {"step": run.step, "epoch": epoch, "world_size": run.d.world_size, "num_workers": run.workers,
                "loader": states, "model": run.model.config_dict()}  # fmt: skip
        ck_dir = run.run_dir / "checkpoints" / f"step-{run.step:08d}"
        save_checkpoint(ck_dir, run.model, run.optimizer, meta, run.cfg.keep_checkpoints)
    run.d.barrier()


def resume(cfg: TrainConfig, d: Dist, run_dir: Path, model, optimizer, steps_per_epoch: list[int]) -> tuple[int, int, Any]:
    """(step, epoch, this rank's loader cursor) to continue from: the checkpoint ``cfg.resume`` names, else a start."""
    step, epoch, loader_resume = 0, 0, None
    ck = resolve_resume(cfg.resume, run_dir) if cfg.resume else None
    if ck is None:
        return step, epoch, loader_resume
    state = json.loads((ck / "state.json").read_text())
    if state["world_size"] != d.world_size:
        raise UserError(f"{ck} was saved with {state['world_size']} processes; resume with the same number")
    load_weights(model, ck / "model.safetensors")
    opt = load_optimizer_state(ck / "optimizer.pt", d.device)
    optimizer.load_state_dict(opt["optimizer"])
    step = state["step"]
    loader_resume = state["loader"][d.rank]
    epoch = loader_resume["epoch"]
    if loader_resume["step"] >= steps_per_epoch[epoch]:
        epoch, loader_resume = epoch + 1, None
    if d.main:
        print(f"resumed from {ck} at step {step}", flush=True)
    return step, epoch, loader_resume


def wrap_ddp(model, d: Dist):
    """The model as the step loop calls it: DistributedDataParallel under torchrun, else itself."""
    if not d.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def train_step(run: Run, batch: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    """One optimizer step on a ``host_prepare``d batch on the device; advances ``run.step``. (lr, loss tensors).

    A function of its own so that benchmarks/train_step.py times exactly this step, on fixed inputs.
    """
    import torch

    cfg, model = run.cfg, run.model
    lr = cosine_lr(run.step, cfg.lr, run.warmup, run.total)
    for g in run.optimizer.param_groups:
        g["lr"] = lr
    model.train()
    with torch.autocast(run.d.device.type, dtype=torch.bfloat16, enabled=run.use_bf16):
        out = run.ddp(batch["images"], batch["texts"], batch["region_boxes"], batch["region_texts"],
                      batch["region_valid"], clip_only=cfg.clip_only, phrase_index=batch.get("phrase_index"))
        if "negative_texts" in batch and not cfg.clip_only:
            neg = negative_features(model, batch["negative_texts"], batch["negative_valid"])
            if neg is not None:
                out["negative_text_features"] = neg
    run.loss_fn.set_progress(run.step, run.total)
    losses = run.loss_fn(out, batch)
    run.optimizer.zero_grad(set_to_none=True)
    losses["loss"].backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    run.optimizer.step()
    with torch.no_grad():
        model.logit_scale.clamp_(0, math.log(100))
    run.step += 1
    return lr, losses


def train_one_epoch(run: Run, epoch: int, loader_resume: Any) -> bool:
    """The steps of one epoch (from ``loader_resume`` when resuming); True when training is done."""
    cfg, model = run.cfg, run.model
    for batch in run.loader.epoch(epoch, loader_resume):
        n_valid, batch = host_prepare(batch)
        run.log.seen_last += n_valid
        lr, losses = train_step(run, _to(batch, run.d.device))
        run.log.step(run.step, epoch, lr, losses, batch["keys"] if run.log.keys_log else [])
        if run.step % cfg.log_every == 0 or run.step == run.total:
            run.log.report(model, run.step, epoch, run.total, run.warmup, lr)
            if (starved := run.loss_fn.starved_warning()) and run.d.main:
                print(starved, file=sys.stderr, flush=True)
        if run.step % cfg.save_every == 0:
            save(run, epoch)
            run.last_saved = run.step
        if run.step >= run.total or (cfg.stop_after and run.step >= cfg.stop_after):
            return True
    return False


def train(config: TrainConfig | dict | str | os.PathLike) -> Path:
    """Train (or resume) a CLOC model; returns the run directory. Works under torchrun or alone."""
    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = _validated(config)
    cfg = config
    with torch_threads(cfg.threads):
        return _train(cfg)


def _train(cfg: TrainConfig) -> Path:
    from vesl.pretrain.data import Preprocess, RegionTextLoader, scan_units
    from vesl.schemas.dataset import training_shards

    # a wrong path fails before any model is built
    units = len(scan_units(training_shards(cfg.data, cfg.storage_options), cfg.storage_options))
    run_dir = Path(cfg.out)
    clear = check_run_dir(run_dir, cfg.resume, cfg.overwrite)
    d = Dist(cfg.device)
    loader = None
    try:
        use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and d.device.type == "cuda")
        model = _build_model(cfg, d.device)
        workers, note = fit_workers(units, cfg.workers, d.world_size)
        if note and d.main:
            print(note, file=sys.stderr, flush=True)
        d.barrier()  # every rank checked the run directory before rank 0 writes into it
        if d.main:
            if clear:
                clear_run_dir(run_dir)
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))
        if cfg.grad_checkpointing:
            model.clip.set_grad_checkpointing(True)
        loader = RegionTextLoader(
            cfg.data, batch_size=cfg.batch_size, tokenizer=model.tokenizer, preprocess=Preprocess.from_model(model),
            regions_per_image=cfg.regions_per_image, num_workers=workers, rank=d.rank, world_size=d.world_size,
            seed=cfg.seed, text_field=cfg.text_field, storage_options=cfg.storage_options, with_regions=not cfg.clip_only,
            pin_memory=d.device.type == "cuda", position_share=cfg.region_position_words,
            unmatched_negatives=0 if cfg.clip_only else cfg.unmatched_negatives,
            relative_share=cfg.region_relative_words,
        )
        steps_per_epoch = [loader.steps_per_epoch(e) for e in range(cfg.epochs)]
        total = sum(steps_per_epoch)
        if cfg.max_steps:
            total = min(total, cfg.max_steps)
        warmup, note = fit_warmup(cfg.warmup, total)
        if note and d.main:
            print(note, file=sys.stderr, flush=True)
        optimizer = make_optimizer(model, cfg)
        step, epoch, loader_resume = resume(cfg, d, run_dir, model, optimizer, steps_per_epoch)
        loss_fn = make_loss(cfg, d)
        run = Run(cfg, d, run_dir, model, wrap_ddp(model, d), optimizer, loss_fn, loader, RunLog(cfg, d, run_dir),
                  total, warmup, workers, use_bf16, step=step, last_saved=step)  # fmt: skip
        while epoch < cfg.epochs and run.step < total:
            done = train_one_epoch(run, epoch, loader_resume)
            loader_resume = None
            if done:
                break
            epoch += 1
        run.log.flush()
        if run.step != run.last_saved:
            save(run, epoch)
        run.log.close()
        return run_dir
    finally:
        if loader is not None:
            loader.close()
        d.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m vesl.pretrain.train CONFIG.yaml [key=value ...]``: the torchrun entry point."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        raise SystemExit("usage: python -m vesl.pretrain.train CONFIG.yaml [key=value ...]")
    overrides = dict(a.split("=", 1) for a in args[1:])
    parsed = {k: yaml.safe_load(v) for k, v in overrides.items()}
    try:
        train(load_config(args[0], **parsed))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc


if __name__ == "__main__":
    main()
