"""The training processes: rank, device and the few collectives the loop needs (DDP under torchrun,
gloo on CPU, nccl on GPU; a single process without torchrun)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Torch's thread count for a run (0: leave it), and the caller's back afterwards (an in-process caller,
    such as ``vesl demo``, goes on with its own)."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class Dist:
    def __init__(self, device_pref: str):
        import torch

        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.cuda.is_available() and device_pref in ("auto", "cuda")
        self.device = torch.device(f"cuda:{self.local_rank}" if cuda else "cpu")
        if cuda:
            torch.cuda.set_device(self.device)
        self.enabled = self.world_size > 1
        if self.enabled:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group(backend="nccl" if cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def mean_rows(self, t):
        """(S, K) device tensor -> its mean over the ranks as S lists of K floats (one host read)."""
        if self.enabled:
            import torch
            import torch.distributed as dist

            t = t.to(torch.float64)
            dist.all_reduce(t)
            t = t / self.world_size
        return t.tolist()

    def sum_int(self, n: int) -> int:
        if not self.enabled:
            return n
        import torch
        import torch.distributed as dist

        t = torch.tensor([n], dtype=torch.long, device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def gather_object(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.destroy_process_group()


