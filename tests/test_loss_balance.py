"""The loss balance does not depend on the number of processes.

The same global batch on 1 process and on W = 2 processes (gloo on CPU, gradients averaged over the ranks as
DDP does) gives the same gradients, for each loss term separately and in each gather mode that is exact.

"The same" means equal up to float32 rounding of the sums involved, on any CPU: one process and two gloo
processes add the same terms in another order, and the vectorized kernels (AVX-512, AVX2, scalar) split
their sums differently. A float32 sum's error is bounded by eps times the sum of its terms' magnitudes,
not by its result: some gradients cancel to almost nothing (a key bias's true gradient is zero, by
softmax's shift invariance) and are pure rounding noise on both sides. So each tensor's difference is
measured against the whole gradient's norm, the scale of the terms every tensor sums:
``|two_n - one_n| <= TOL * |one|``.
"""

from __future__ import annotations

import pytest
import torch

MODEL = "vesl-micro-vit"
W = 2
TERMS = ("clip", "region", "ground", "ground_cell")
MODES = {"global": {}, "global+gather_with_grad": {"gather_with_grad": True},
         "local_loss+gather_with_grad": {"local_loss": True, "gather_with_grad": True}}
EPS32 = torch.finfo(torch.float32).eps  # 1.19e-7
# Measured: at most 6.1e-7 (about 5 eps) with AVX-512, AVX2 and scalar kernels, 1 or 2 threads. TOL = 256 eps
# (3.1e-5) leaves 50x room and stays far below a real imbalance: a term off by the world size W = 2 is off
# by half of every affected tensor (see the negative test).
TOL = 256 * EPS32


def _norm(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.double().flatten() for g in grads.values()]).norm()


def close_to(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> bool:
    """``|a - b| <= TOL * scale`` (float64 norms)."""
    return bool((a.double() - b.double()).norm() <= TOL * scale)


def _global_batch(model) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(11)
    b, m, n_tok = 6, 3, model.clip.context_length
    corner = torch.rand(b, m, 2, generator=g) * 0.5
    texts = torch.randint(1, 400, (b, n_tok), generator=g)
    texts[:, -1] = 49407  # an end token in each row
    phrases = torch.randint(1, 400, (b, m, n_tok), generator=g)
    phrases[..., -1] = 49407
    phrases[1, 0] = phrases[4, 1]  # a phrase shared across ranks, so the text filter has work to do
    return {
        "images": torch.randn(b, 3, 32, 32, generator=g),
        "texts": texts,
        # uneven counts: rank 0 holds 4 valid regions and 3 valid images, rank 1 holds 6 and 2
        "image_valid": torch.tensor([True, True, True, True, False, True]),
        "region_boxes": torch.cat([corner, corner + 0.3], -1),
        "region_texts": phrases,
        "region_valid": torch.tensor([[True, True, False], [True, False, False], [True, False, False],
                                      [True, True, True], [True, True, False], [True, False, False]]),
    }


def _grads(rank: int, world_size: int, mode: dict, term: str) -> dict[str, torch.Tensor]:
    from vesl.pretrain.losses import CLOCLoss
    from vesl.pretrain.model import create_model

    model = create_model(MODEL, seed=0)
    batch = _global_batch(model)
    if world_size > 1:
        n = batch["images"].shape[0] // world_size
        batch = {k: v[rank * n:(rank + 1) * n] for k, v in batch.items()}
    # the hardest-pair drop picks among the rows one call sums: per process with local_loss, so only the global
    # modes can match there
    drop = 0.0 if mode.get("local_loss") else 0.25
    loss_fn = CLOCLoss(text_sim_threshold=0.9, rank=rank, world_size=world_size, region_loss_drop=drop,
                       cell_weight=1.0, ground_loss="l1+giou", **mode)  # the trainer default
    loss_fn.set_progress(100, 100)  # the hardest-pair drop at full strength
    out = model(batch["images"], batch["texts"], batch["region_boxes"], batch["region_texts"], batch["region_valid"])
    loss_fn(out, batch)[term].backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p)) for n, p in model.named_parameters()}
    if world_size > 1:
        import torch.distributed as dist

        for gr in grads.values():  # what DDP does with the gradients
            dist.all_reduce(gr)
            gr /= world_size
    return grads


def _worker(rank: int, init: str, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=W)
    try:
        res = {(m, t): _grads(rank, W, MODES[m], t) for m in MODES for t in TERMS}
        if rank == 0:
            torch.save(res, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_grads(tmp_path_factory):
    import torch.multiprocessing as mp

    tmp = tmp_path_factory.mktemp("balance")
    out = tmp / "grads.pt"
    mp.start_processes(_worker, args=(f"file://{tmp / 'store'}", str(out)), nprocs=W, join=True, start_method="spawn")
    return torch.load(out, weights_only=True)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("term", TERMS)
def test_each_loss_term_has_the_same_gradients_on_one_and_two_processes(two_process_grads, mode, term):
    torch.set_num_threads(1)
    one = _grads(0, 1, MODES[mode], term)
    two = two_process_grads[(mode, term)]
    nonzero = [n for n, g in one.items() if g.abs().sum() > 0]
    assert len(nonzero) > 5, (mode, term)
    scale = _norm(one)
    for n, g in one.items():
        assert close_to(two[n], g, scale), (mode, term, n, ((two[n].double() - g.double()).norm() / scale).item())


def test_default_global_loss_without_the_fix_would_be_off_by_the_world_size(two_process_grads):
    """The check above can fail: the default mode's feature gradients, halved, would not match."""
    one = _grads(0, 1, MODES["global"], "clip")
    two = two_process_grads[("global", "clip")]
    n = "clip.visual.conv1.weight"
    assert one[n].abs().sum() > 0
    assert close_to(two[n], one[n], _norm(one))
    assert not close_to(two[n] / W, one[n], _norm(one))
