"""Data parallelism with ``torchrun`` + ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node=2 recipes/pretrain.py ...

Every rank holds the full params and optimizer state and reads its own rows of
each global batch (the batch iterator takes ``rank`` / ``world_size``). The train
step divides each rank's summed token loss by the *global* token count, then
:class:`DataParallel` sums gradients across ranks, so the update equals the one
a single process would make on the whole global batch. Gradients travel in
flat buckets of about ``bucket_mb`` MiB (one all-reduce per bucket instead of
one per tensor). Only rank 0 logs and writes checkpoints.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

Tensor = torch.Tensor
Flat = dict[str, Tensor]


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size``, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: str = "cpu"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def launched_with_torchrun() -> bool:
    """True when the torchrun environment (``RANK``, ``WORLD_SIZE``) is present."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: str = "auto", timeout_s: int = 600) -> DistInfo:
    """Join the process group if launched by torchrun (else a single-process :class:`DistInfo`).

    ``device="auto"`` picks ``cuda:<local_rank>`` when CUDA is available, else the CPU;
    the backend follows the device (NCCL for CUDA, gloo for CPU).
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not launched_with_torchrun():
        return DistInfo(device=device if device != "cuda" else "cuda:0")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local, device)


def shutdown() -> None:
    """Leave the process group (a no-op without one)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op without a process group)."""
    if dist.is_initialized():
        dist.barrier()


def broadcast_tree(flat: Flat, src: int = 0) -> Flat:
    """Copy rank ``src``'s tensors into every rank's (in place), so all start identical."""
    if dist.is_initialized():
        for t in flat.values():
            dist.broadcast(t, src)
    return flat


def buckets(tensors: list[Tensor], bucket_bytes: int) -> list[list[int]]:
    """Group tensor indices into runs of at most ``bucket_bytes`` (a tensor larger than that gets its own)."""
    out: list[list[int]] = []
    size = 0
    for i, t in enumerate(tensors):
        nbytes = t.numel() * t.element_size()
        if out and size + nbytes <= bucket_bytes and tensors[out[-1][0]].dtype == t.dtype:
            out[-1].append(i)
            size += nbytes
        else:
            out.append([i])
            size = nbytes
    return out


@dataclass
class DataParallel:
    """The ``reducer`` of :func:`ghostvis.train.step.make_train_step`: sums over all ranks.

    Attributes:
        bucket_mb: gradient bucket size in MiB.
    """

    bucket_mb: float = 25.0

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce (sum) a tensor in place and return it."""
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_grads_(self, grads: Flat) -> Flat:
        """Sum gradients across ranks, bucket by bucket (flatten, all-reduce, copy back)."""
        if not dist.is_initialized() or dist.get_world_size() == 1:
            return grads
        tensors = list(grads.values())
        for idx in buckets(tensors, int(self.bucket_mb * 2**20)):
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for i in idx:
                n = tensors[i].numel()
                tensors[i].copy_(flat[offset:offset + n].view_as(tensors[i]))
                offset += n
        return grads
