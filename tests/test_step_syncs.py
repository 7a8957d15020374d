"""The training step never waits on the device between log steps.

On a GPU each host read of a device value (``.item()``, ``float()``, ``.tolist()``, a boolean mask, ``unique``)
stalls the step. On CPU every op that would be such a read is counted with a dispatch mode (plus
``Tensor.tolist``, which does not dispatch); the host-side work on a batch before it moves to the device
(the loader, ``host_prepare``) is left out. Steps between log steps must make none.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.pretrain_data import write_shards

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten._unique", "aten.unique", "aten.masked_select",
            "aten.equal", "aten.is_nonzero")


class HostReads(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0
        self.paused = 0
        self.seen: list[str] = []

    def _hit(self, what: str) -> None:
        if not self.paused:
            self.count += 1
            self.seen.append(what)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        bool_index = name.startswith(("aten.index.", "aten.index_put")) and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] if len(args) > 1 else []) or [])
        if name.startswith(SYNC_OPS) or bool_index:
            self._hit(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("clip_only", [False, True])
def test_steps_between_log_steps_make_no_host_reads(tmp_path, monkeypatch, clip_only):
    import vesl.pretrain.train as tr
    from vesl.pretrain.data import RegionTextLoader

    torch.set_num_threads(1)
    write_shards(tmp_path / "data", 24, n_files=2, row_group_size=4, seed=3)
    reads = HostReads()
    per_step: list[int] = []
    real_lr, real_prepare, real_tolist = tr.cosine_lr, tr.host_prepare, torch.Tensor.tolist

    def lr_mark(step, *a):  # called once at the start of every step
        per_step.append(reads.count)
        return real_lr(step, *a)

    def prepare(*a, **k):
        reads.paused += 1
        try:
            return real_prepare(*a, **k)
        finally:
            reads.paused -= 1

    def tolist(self):
        reads._hit("Tensor.tolist")
        return real_tolist(self)

    real_epoch = RegionTextLoader.epoch

    def epoch(self, *a, **k):  # the loader works on the host
        it = real_epoch(self, *a, **k)
        while True:
            reads.paused += 1
            try:
                batch = next(it)
            except StopIteration:
                return
            finally:
                reads.paused -= 1
            yield batch

    monkeypatch.setattr(RegionTextLoader, "epoch", epoch)
    monkeypatch.setattr(tr, "cosine_lr", lr_mark)
    monkeypatch.setattr(tr, "host_prepare", prepare)
    monkeypatch.setattr(torch.Tensor, "tolist", tolist)
    cfg = tr.TrainConfig(data=str(tmp_path / "data"), out=str(tmp_path / "run"), model="vesl-micro-vit", batch_size=4,
                         workers=1, max_steps=12, epochs=5, warmup=2, log_every=5, save_every=1000, tensorboard=False,
                         clip_only=clip_only)
    with reads:
        tr.train(cfg)
    per_step.append(reads.count)
    steps = len(per_step) - 1
    assert steps == 12
    made = {s + 1: per_step[s + 1] - per_step[s] for s in range(steps)}
    quiet = {s: n for s, n in made.items() if s % 5 and s != 12}
    assert sum(quiet.values()) == 0, (quiet, reads.seen)
    assert made[5] > 0  # the log steps read their values: the counter sees them
    assert made[10] > 0
