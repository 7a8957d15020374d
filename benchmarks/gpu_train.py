"""One CLOC training step of ViT-B/16 at batch 256 in bf16: samples/s and MFU against 989 TFLOP/s.

FLOPs are counted, not estimated: ``torch.utils.flop_counter.FlopCounterMode`` records every matmul,
convolution and attention of one full step (forward + backward) of the real model and losses. MFU =
counted FLOPs per step / step time / peak. The goal on an H200 is MFU >= 40%.

    .venv/bin/python benchmarks/gpu_train.py            # on the GPU machine
    .venv/bin/python benchmarks/gpu_train.py --tiny     # CPU self-check with vesl-tiny-vit (no MFU claim)
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PEAK_BF16_DENSE = 989e12  # H100/H200 SXM bf16 dense tensor-core peak


def synthetic_batch(model, batch: int, m: int, device, seed: int = 0):
    """Random pixels, token ids and boxes with ~3 of 4 regions valid: a real step without data loading."""
    import torch

    g = torch.Generator(device="cpu").manual_seed(seed)
    s = model.image_size[0]
    ctx = model.clip.context_length
    corners = torch.rand(batch, m, 2, generator=g) * 0.6
    out = {
        "images": torch.randn(batch, 3, s, s, generator=g),
        "texts": torch.randint(1, 49000, (batch, ctx), generator=g),
        "image_valid": torch.ones(batch, dtype=torch.bool),
        "region_boxes": torch.cat([corners, corners + 0.1 + 0.3 * torch.rand(batch, m, 2, generator=g)], -1),
        "region_texts": torch.randint(1, 49000, (batch, m, ctx), generator=g),
        "region_valid": torch.rand(batch, m, generator=g) < 0.75,
    }
    out["texts"][:, -1] = 49407  # an end-of-text token so argmax pooling is well defined
    out["region_texts"][..., -1] = 49407
    return {k: v.to(device) for k, v in out.items()}


def main() -> None:
    import torch

    from vesl.pretrain.losses import CLOCLoss
    from vesl.pretrain.model import create_model
    from vesl.pretrain.train import TrainConfig, make_optimizer

    ap = argparse.ArgumentParser()
    ap.add_argument("--tiny", action="store_true", help="CPU self-check: vesl-tiny-vit, batch 8, fp32")
    ap.add_argument("--model", default="ViT-B-16")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    args = ap.parse_args()
    if args.tiny:
        args.model, args.batch, args.steps, args.warmup = "vesl-tiny-vit", 8, 3, 1
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = create_model(args.model, seed=0, device=device)
    cfg = TrainConfig(data=".", batch_size=args.batch, lr=1e-4)
    opt = make_optimizer(model, cfg)
    loss_fn = CLOCLoss()
    fwd = torch.compile(model) if args.compile else model
    batch = synthetic_batch(model, args.batch, 4, device)
    bf16 = cuda

    def step() -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(batch["images"], batch["texts"], batch["region_boxes"], batch["region_texts"], batch["region_valid"])
        losses = loss_fn(out, batch)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        return losses["loss"].detach()

    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        first = step()
    flops = counter.get_total_flops()
    for _ in range(args.warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
    t = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    if cuda:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.steps
    final = losses[-1].item()
    sps = args.batch / dt
    mfu = flops / dt / PEAK_BF16_DENSE
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}  model {args.model}  batch {args.batch}  "
          f"precision {'bf16' if bf16 else 'fp32'}")
    print(f"counted FLOPs per step {flops / 1e12:.3f} TFLOP  step {dt * 1000:.1f} ms  {sps:.1f} samples/s")
    if cuda:
        print(f"MFU {100 * mfu:.1f}% of {PEAK_BF16_DENSE / 1e12:.0f} TFLOP/s bf16 dense  (goal >= 40%)")
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    checks = {
        "loss finite": math.isfinite(final) and math.isfinite(first.item()),
        "FLOPs counted": flops > 0,
        "loss moved": final != first.item(),
    }
    if cuda and bf16:
        checks["MFU goal >= 40%"] = mfu >= 0.40
    print("self-check: " + ", ".join(f"{k}: {'ok' if v else 'FAILED'}" for k, v in checks.items()))
    if not all(checks.values()):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
