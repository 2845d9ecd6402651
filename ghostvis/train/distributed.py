"""Data parallelism with ``torchrun`` + ``torch.distributed`` (NCCL on GPUs, gloo on CPU).

    torchrun --nproc_per_node=2 recipes/pretrain.py ...

Every rank holds the full params and reads its own rows of each global batch (the
batch iterator takes ``rank`` / ``world_size``). The train step divides each rank's
summed token loss by the *global* token count, then :class:`DataParallel` sums
gradients across ranks, so the update equals the one a single process would make
on the whole global batch. Only rank 0 logs and writes checkpoints.

Gradients travel in flat buckets of about ``bucket_mb`` MiB (one all-reduce per
bucket instead of one per tensor). By default a bucket's all-reduce starts *during*
the backward pass, as soon as its last gradient exists, so communication hides
behind the rest of the backward (``--train.overlap-comm``; see :class:`DataParallel`).

:class:`ShardedOptimizer` (``--train.shard-optimizer``) keeps optimizer state only
for this rank's share of the parameters (ZeRO stage 1) and broadcasts each updated
tensor from the rank that owns it.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch
import torch.distributed as dist
from safetensors import safe_open

from ..core.io import CheckpointError
from ..core.tree import flatten
from .optim import as_flat, update_or_skip

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


def context_parallel_group(cp: int):
    """This rank's context-parallel group on a ``(data, context)`` grid of ``world / cp`` x ``cp`` ranks.

    Consecutive ranks share sequences: ranks ``[i*cp, (i+1)*cp)`` hold the shards of the same rows
    and run ring attention among themselves; ranks with the same ``rank % cp`` read different
    rows (data parallel). Gradients are still summed over all ranks (each rank's are partial sums
    over its tokens). Every rank must call this (``new_group`` is collective). Returns ``None``
    (the whole world) when ``cp`` equals the world size.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cp < 1 or world % cp:
        raise ValueError(f"--train.context-parallel {cp} must divide the number of ranks ({world})")
    if cp == world:
        return None
    mine = None
    for first in range(0, world, cp):
        group = dist.new_group(list(range(first, first + cp)))
        if first <= dist.get_rank() < first + cp:
            mine = group
    return mine


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


def _pack(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _unpack(flat: Tensor, tensors: list[Tensor]) -> None:
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


# --------------------------------------------------------------------------- gradient all-reduce


class _GradBuckets:
    """Flat buckets over named gradients, laid out in a given order; they launch strictly in index order.

    Per step: ``waiting[b]`` counts the gradients bucket ``b`` still lacks, ``launched``
    how many buckets (a prefix) have started their all-reduce.
    """

    def __init__(self, like: Flat, order: list[str], bucket_bytes: int):
        self.groups = [[order[i] for i in idx] for idx in buckets([like[n] for n in order], bucket_bytes)]
        self.flat: list[Tensor] = []
        self.slots: dict[str, tuple[int, Tensor]] = {}
        for b, names in enumerate(self.groups):
            first = like[names[0]]
            buf = torch.empty(sum(like[n].numel() for n in names), dtype=first.dtype, device=first.device)
            offset = 0
            for n in names:
                k = like[n].numel()
                self.slots[n] = (b, buf[offset:offset + k].view(like[n].shape))
                offset += k
            self.flat.append(buf)
        self.reset(None)

    def reset(self, prior: Optional[Flat]) -> None:
        self.prior = prior
        self.waiting = [len(g) for g in self.groups]
        self.launched = 0
        self.handles: list = []


@dataclass
class DataParallel:
    """The ``reducer`` of :func:`ghostvis.train.step.make_train_step`: sums over all ranks.

    Without overlap, :meth:`sum_grads_` all-reduces the finished gradients bucket by
    bucket after the backward. With ``overlap=True`` the train step calls
    :meth:`start_overlap`, runs the backward with every trainable leaf wrapped in an
    identity whose backward hands the leaf's complete gradient to :meth:`grad_ready`
    (which copies it into its slot of a flat bucket and, once a bucket is full,
    starts ``all_reduce(async_op=True)`` on it), then calls :meth:`finish_overlap_`,
    which launches what is left, waits on every bucket and hands back the sums.

    * Buckets follow the order in which gradients arrive. The first step only records
      that order (its all-reduce runs after the backward); every rank then lays out its
      buckets by rank 0's order (one broadcast of indices), so the layout is the same on
      all ranks and, for a given model, in every run -- a resumed run sums in the same
      grouping as an uninterrupted one, which keeps resume bit-exact on many ranks too.
    * Buckets launch strictly in index order on every rank, so all ranks issue the
      same sequence of collectives even when their backward passes differ: a rank whose
      batch has no images never computes the vision gradients, and their slots are
      filled (with the zeros ``torch.func`` returns) by :meth:`finish_overlap_`.
    * With gradient accumulation only the last micro-batch's backward overlaps: the
      earlier micro-batches are summed locally, and each slot receives ``earlier sum +
      last gradient`` -- the same sum, bit for bit, as the step without overlap forms.
    * The buckets are persistent flat buffers (one more gradient-sized block of memory),
      and the summed gradients the step goes on with are views into them.
    * The taps cost host time: one ``torch.func``-level autograd function per block,
      forward and backward. An eager step is often bound by exactly that kind of Python
      work, so on fast links the communication hidden can be worth less than the taps
      cost (2 H200s over NVLink, eager bf16: d20 1-2% and d12 ~8% slower than
      ``overlap=False``); overlap pays where the all-reduce is slow relative to the
      backward (more ranks, slower links).
    * Under ``torch.compile`` of the gradient function (``--train.compile``) the backward
      is traced and the Python call to :meth:`grad_ready` is dropped, so
      ``make_train_step`` falls back to :meth:`sum_grads_` after the backward.

    Attributes:
        bucket_mb: gradient bucket size in MiB.
        overlap: start all-reduces during the backward (see above); False (the default, the
            faster choice measured on one NVLink node): after it.
        launched_in_backward: buckets whose all-reduce started inside a backward so far
            (a counter for tests and benchmarks: 0 means nothing overlapped).
    """

    bucket_mb: float = 25.0
    overlap: bool = False
    launched_in_backward: int = field(default=0, init=False)
    _names: tuple = field(default=(), init=False, repr=False, compare=False)
    _buckets: Optional[_GradBuckets] = field(default=None, init=False, repr=False, compare=False)
    _arrived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # an ordered set
    _active: bool = field(default=False, init=False, repr=False, compare=False)

    @staticmethod
    def _world() -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def sum_(self, t: Tensor) -> Tensor:
        """All-reduce (sum) a tensor in place and return it."""
        if dist.is_initialized():
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def sum_grads_(self, grads: Flat) -> Flat:
        """Sum gradients across ranks, bucket by bucket (flatten, all-reduce, copy back)."""
        if self._world() == 1:
            return grads
        tensors = list(grads.values())
        for idx in buckets(tensors, int(self.bucket_mb * 2**20)):
            group = [tensors[i] for i in idx]
            flat = _pack(group)
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            _unpack(flat, group)
        return grads

    # -- overlap with the backward

    def start_overlap(self, params: Flat, prior: Optional[Flat] = None) -> None:
        """Get ready for one backward whose gradients arrive through :meth:`grad_ready`.

        ``params``: the trainable flat dict (names, shapes, dtypes and devices of the
        gradients to come). ``prior``: gradients of earlier micro-batches of this step,
        added to each arriving gradient (None: the backward is the step's only one).
        """
        self._active = self.overlap and self._world() > 1
        if not self._active:
            return
        if tuple(params) != self._names:  # new params: learn the arrival order again
            self._names, self._buckets = tuple(params), None
        self._arrived = {}
        if self._buckets is not None:
            self._buckets.reset(prior)

    def grad_ready(self, name: str, grad: Tensor) -> None:
        """Called from the backward with the complete gradient of trainable leaf ``name``."""
        if not self._active:
            return
        if name in self._arrived:
            raise RuntimeError(f"the gradient of {name!r} arrived twice in one backward; each trainable leaf must "
                               "pass through its gradient hook exactly once")
        self._arrived[name] = None
        st = self._buckets
        if st is None:  # the first step only records the order
            return
        b, slot = st.slots[name]
        slot.copy_(grad)
        if st.prior is not None:
            slot.add_(st.prior[name])
        st.waiting[b] -= 1
        self._launch_ready(in_backward=True)

    def _launch_ready(self, in_backward: bool) -> None:
        st = self._buckets
        while st.launched < len(st.groups) and st.waiting[st.launched] == 0:
            st.handles.append(dist.all_reduce(st.flat[st.launched], op=dist.ReduceOp.SUM, async_op=True))
            st.launched += 1
            self.launched_in_backward += int(in_backward)

    def finish_overlap_(self, grads: Flat) -> Flat:
        """Launch the buckets not yet started, wait for all, and put the sums in ``grads`` (in place).

        ``grads`` is the step's total gradient (prior micro-batches plus the last); it
        supplies the slots whose gradient never arrived (leaves the backward did not reach).
        Its entries are replaced by views into the buckets (no copy back), valid until
        the next :meth:`start_overlap`. Without :meth:`start_overlap` (or with one
        process) this is :meth:`sum_grads_`.
        """
        if not self._active:
            return self.sum_grads_(grads)
        self._active = False
        if self._buckets is None:
            self._buckets = _GradBuckets(grads, self._agreed_order(grads), int(self.bucket_mb * 2**20))
            self._arrived = {}
        st = self._buckets
        for b in range(st.launched, len(st.groups)):
            for n in st.groups[b]:
                if n not in self._arrived:
                    st.slots[n][1].copy_(grads[n])
            st.waiting[b] = 0
        self._launch_ready(in_backward=False)
        for h in st.handles:
            h.wait()
        for n, (_, slot) in st.slots.items():
            grads[n] = slot
        st.reset(None)
        return grads

    def _agreed_order(self, like: Flat) -> list[str]:
        """Rank 0's arrival order (leaves its backward did not reach last, in reverse parameter order)."""
        names = list(self._names)
        order = list(self._arrived) + [n for n in reversed(names) if n not in self._arrived]
        index = {n: i for i, n in enumerate(names)}
        idx = torch.tensor([index[n] for n in order], dtype=torch.int64, device=next(iter(like.values())).device)
        dist.broadcast(idx, 0)
        return [names[i] for i in idx.tolist()]


# --------------------------------------------------------------------------- sharded optimizer state


def assign_owners(params: Flat, world_size: int) -> dict[str, int]:
    """The rank that owns each tensor: largest first, each to the rank with the fewest elements so far.

    Depends only on names and sizes (not on the dict's order; ties go by name, then
    to the lower rank), so every rank, and a resumed run, computes the same assignment.
    """
    load = [0] * world_size
    owner: dict[str, int] = {}
    for name in sorted(params, key=lambda n: (-params[n].numel(), n)):
        r = min(range(world_size), key=load.__getitem__)
        owner[name] = r
        load[r] += params[name].numel()
    return {n: owner[n] for n in params}


@dataclass(frozen=True)
class ShardedOptimizer:
    """ZeRO stage 1: each rank keeps optimizer state for, and updates, only the tensors it owns.

        opt = ShardedOptimizer(make_optimizer("muon"), rank, world_size)
        state = opt.init(trainable)                                   # this rank's share only
        trainable, state = opt.update(trainable, grads, state, step)  # grads already all-reduced

    Whole tensors are dealt out by :func:`assign_owners` (balanced by size), so no
    tensor is ever split and Muon still orthogonalises whole matrices. ``update`` runs
    the wrapped optimizer on this rank's tensors, then broadcasts every tensor from
    its owner (flat per-owner buckets, all asynchronous, then awaited), so all ranks
    hold identical params again. The gradients are still all-reduced in full (the
    global-norm clip needs all of them); what shrinks is the optimizer state, to about
    1/world of AdamW's moments or Muon's momentum per rank. Like the wrapped optimizer
    it is pure in form and updates ``params`` and ``state`` in place.

    Checkpoints do not depend on the number of ranks: :meth:`gather_state` collects
    the whole state on rank 0 (in CPU memory) for the usual ``optim.safetensors``, and
    :meth:`load_state` reads back only this rank's tensors. A run may therefore resume
    on a different number of ranks, or with sharding switched on or off.

    Attributes:
        inner: the optimizer to shard (anything with ``init`` / ``update`` whose state
            holds per-parameter tensors, e.g. ``AdamW``, ``Muon``, ``Partitioned``).
        rank: this process's rank.
        world_size: number of data-parallel ranks.
        bucket_mb: size of the flat buffers the broadcasts and the gather travel in.
    """

    inner: Any
    rank: int
    world_size: int
    bucket_mb: float = 25.0

    def owners(self, params) -> dict[str, int]:
        """``{name: owning rank}`` for a flat dict or pytree of params."""
        return assign_owners(as_flat(params), self.world_size)

    def _mine(self, flat: Flat, owners: dict[str, int], rank: int) -> Flat:
        return {n: t for n, t in flat.items() if owners[n] == rank}

    def _layout(self, flat: Flat) -> Flat:
        """The flattened state ``inner.init`` gives ``flat``, as meta tensors (no memory)."""
        return flatten(self.inner.init({n: torch.empty_like(t, device="meta") for n, t in flat.items()}))

    def init(self, params) -> dict:
        """The wrapped optimizer's state over this rank's tensors only."""
        flat = as_flat(params)
        return self.inner.init(self._mine(flat, self.owners(flat), self.rank))

    def update(self, params, grads, state: dict, step: int, found_inf: Optional[torch.Tensor] = None):
        """Update this rank's tensors, then broadcast every tensor from its owner; returns ``(params, state)``.

        ``found_inf`` (the same flag on every rank) is handed to the wrapped optimizer; a skipped
        step broadcasts unchanged tensors.
        """
        p, g = as_flat(params), as_flat(grads)
        if p.keys() != g.keys():
            raise KeyError(f"grads do not match params: {sorted(p.keys() ^ g.keys())[:5]}")
        owners = self.owners(p)
        mine = self._mine(p, owners, self.rank)
        update_or_skip(self.inner, mine, {n: g[n] for n in mine}, state, step, found_inf)
        self._broadcast_from_owners(p, owners)
        return params, state

    def _broadcast_from_owners(self, p: Flat, owners: dict[str, int]) -> None:
        if not dist.is_initialized():
            return
        pending = []
        for src in range(self.world_size):
            tensors = list(self._mine(p, owners, src).values())
            for idx in buckets(tensors, int(self.bucket_mb * 2**20)):
                group = [tensors[i] for i in idx]
                if len(group) == 1 and group[0].is_contiguous():
                    buf = group[0]
                elif src == self.rank:
                    buf = _pack(group)
                else:
                    buf = torch.empty(sum(t.numel() for t in group), dtype=group[0].dtype, device=group[0].device)
                pending.append((dist.broadcast(buf, src, async_op=True), buf, group, src))
        for work, buf, group, src in pending:
            work.wait()
            if src != self.rank and buf is not group[0]:
                _unpack(buf, group)

    def _key_owners(self, p: Flat) -> tuple[Flat, dict[str, int]]:
        """The full state layout and, for each state tensor, the rank that holds it (the lowest, if several)."""
        full = self._layout(p)
        owners = self.owners(p)
        key_owner: dict[str, int] = {}
        for r in range(self.world_size):
            for k in self._layout(self._mine(p, owners, r)):
                key_owner.setdefault(k, r)
        if key_owner.keys() != full.keys():
            raise ValueError(f"{type(self.inner).__name__}'s state is not made of per-parameter tensors (the shards' "
                             f"keys differ from the whole state's: {sorted(key_owner.keys() ^ full.keys())[:5]}); "
                             "it cannot be sharded")
        return full, key_owner

    def gather_state(self, params, state: dict) -> Optional[dict]:
        """The whole optimizer state (as ``inner.init(params)`` lays it out) on rank 0, in CPU memory; None elsewhere.

        A collective: every rank must call it. Each rank's tensors travel to rank 0 in flat
        buckets; state held by several ranks (e.g. AdamW's step count) comes from rank 0.
        """
        p = as_flat(params)
        full, key_owner = self._key_owners(p)
        local = flatten(state)
        gathered: dict[str, Tensor] = {}
        if self.rank == 0:
            gathered.update({k: local[k].to("cpu", copy=True) for k in full if key_owner[k] == 0})
        device = next(iter(p.values())).device
        for src in range(1, self.world_size):
            keys = [k for k in full if key_owner[k] == src]
            if self.rank not in (0, src):
                continue
            for idx in buckets([full[k] for k in keys], int(self.bucket_mb * 2**20)):
                group = [keys[i] for i in idx]
                if self.rank == src:
                    dist.send(_pack([local[k] for k in group]), 0)
                    continue
                buf = torch.empty(sum(full[k].numel() for k in group), dtype=full[group[0]].dtype, device=device)
                dist.recv(buf, src)
                offset = 0
                for k in group:
                    n = full[k].numel()
                    gathered[k] = buf[offset:offset + n].view(full[k].shape).to("cpu", copy=True)
                    offset += n
        if self.rank != 0:
            return None
        return _unflatten_like(self.inner.init({n: torch.empty_like(t, device="meta") for n, t in p.items()}),
                               gathered)

    def load_state(self, path: str | os.PathLike, params, state: dict, device: str | torch.device = "cpu") -> dict:
        """Fill this rank's ``state`` (from :meth:`init`) with its tensors from a whole-state file (in place).

        The file is one :meth:`gather_state` wrote, or any unsharded ``optim.safetensors``
        of the same params and optimizer. Raises :class:`CheckpointError` naming every
        missing, unexpected or mis-shaped tensor.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: no optimizer state file to resume from")
        full = self._layout(as_flat(params))
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            problems = [f"{k}: missing" for k in full if k not in saved]
            problems += [f"{k}: expected {list(v.shape)}, got {list(saved[k])}" for k, v in full.items()
                         if k in saved and saved[k] != tuple(v.shape)]
            problems += [f"{k}: unexpected" for k in saved if k not in full]
            if problems:
                raise CheckpointError(f"{path}: optimizer state does not match the optimizer ({len(problems)} "
                                      "problems):\n  " + "\n  ".join(problems[:20]))
            for k, t in flatten(state).items():
                t.copy_(f.get_tensor(k))
        return state


def _unflatten_like(template, flat: Flat, prefix: str = ""):
    """``template``'s nested dicts with the leaf at each dotted path taken from ``flat``."""
    if isinstance(template, dict):
        return {k: _unflatten_like(v, flat, f"{prefix}.{k}" if prefix else k) for k, v in template.items()}
    return flat[prefix]
