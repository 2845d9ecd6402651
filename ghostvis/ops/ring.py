"""Ring attention: causal attention over a sequence split across a process group.

Each rank holds a shard of the sequence (queries, keys and values of its own
tokens). K/V blocks travel around the ring; at every hop a rank attends its
queries to the block it holds, and the partial results are merged with their
log-sum-exp, so the full ``[T, T]`` score matrix never exists anywhere. The
next block is already in flight while the current one is computed.

Causal balance: with a plain split, rank 0 would skip almost every block and the
last rank would do all the work. ``zigzag`` layout cuts the sequence into
``2 * world`` chunks and gives rank ``r`` chunks ``r`` and ``2*world-1-r``, so
every rank does the same amount of unmasked work.

The backward pass runs the ring again: K/V travel with their gradient
accumulators and arrive home after one extra hop. The next K/V block is in
flight while a block's gradients are computed, and a block's accumulator is
sent on while the next block is computed.

Two implementations of one hop (``impl``, or the module default :data:`IMPL`):

- ``reference``: float32 scores by einsum under an explicit mask; the oracle, any
  device, any positions, packed documents.
- ``fused``: FlashAttention kernels (torch's own ``_scaled_dot_product_flash_attention``
  and its backward) on the part of a hop that is unmasked. With sorted local
  positions (``zigzag`` or ``contiguous``) every causal hop is one of: skipped,
  fully visible, the rank's own block (lower-triangular), all queries over a
  contiguous run of keys, or a contiguous run of queries over all keys; which one
  is read off the positions, once per :class:`RingLayout`. The forward returns
  the block's log-sum-exp for the merge; the backward hands each block the
  merged output and log-sum-exp, so the kernel produces the exact global
  softmax gradient of its block. Hops of any other shape fall back to the
  reference. Off CUDA the same code runs with float32 math kernels (for tests).
- ``auto`` (default): ``fused`` for CUDA fp16/bf16 inputs without ``doc_ids``
  where the flash kernel applies, else ``reference``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from . import dispatch

Tensor = torch.Tensor

IMPL = "auto"  # default hop implementation: "auto" | "reference" | "fused"
_IMPLS = ("auto", "reference", "fused")


def shard_positions(seq_len: int, world: int, rank: int, layout: str = "zigzag", device=None) -> Tensor:
    """Global token positions held by ``rank`` (in the order they are stored locally)."""
    if layout == "contiguous":
        if seq_len % world:
            raise ValueError(f"sequence length {seq_len} must divide by world size {world}")
        n = seq_len // world
        return torch.arange(rank * n, (rank + 1) * n, device=device)
    if layout != "zigzag":
        raise ValueError(f"layout must be 'zigzag' or 'contiguous', got {layout!r}")
    if seq_len % (2 * world):
        raise ValueError(f"zigzag needs the sequence length {seq_len} to divide by 2*world = {2 * world}")
    c = seq_len // (2 * world)
    return torch.cat([torch.arange(rank * c, (rank + 1) * c, device=device),
                      torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)])


def shard(x: Tensor, world: int, rank: int, dim: int = 2, layout: str = "zigzag") -> Tensor:
    """This rank's shard of a full-sequence tensor (sequence along ``dim``)."""
    return x.index_select(dim, shard_positions(x.shape[dim], world, rank, layout, x.device))


def unshard(parts: list[Tensor], dim: int = 2, layout: str = "zigzag") -> Tensor:
    """Reassemble the full sequence from every rank's shard (inverse of :func:`shard`)."""
    world = len(parts)
    seq = sum(p.shape[dim] for p in parts)
    pos = torch.cat([shard_positions(seq, world, r, layout, parts[0].device) for r in range(world)])
    out = torch.cat(parts, dim)
    return out.index_select(dim, torch.argsort(pos))


# ----------------------------------------------------------------------------- reference hop


def _allowed(qpos, kpos, qdoc, kdoc, causal):
    """Bool ``[B|1, 1, 1, Tq, Tk]`` mask of allowed (query, key) pairs, or None when all are allowed."""
    m = None
    if causal:
        m = (kpos[None, :] <= qpos[:, None])[None, None, None]
    if qdoc is not None:
        same = (qdoc[:, :, None] == kdoc[:, None, :])[:, None, None]
        m = same if m is None else m & same
    return m


def _block_forward(q, k, v, allowed, scale):
    """Scores of local queries against one K/V block: (out, lse) in float32, GQA by grouping.

    ``out`` is ``[B, Hkv, G, Tq, D]``, ``lse`` ``[B, Hkv, G, Tq]`` (natural log, -inf for a row with no key).
    """
    b, hq, tq, d = q.shape
    hk = k.shape[1]
    qg = q.float().reshape(b, hk, hq // hk, tq, d)
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, k.float()) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # -inf for rows with no allowed key
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    out = torch.einsum("bhgqk,bhkd->bhgqd", p, v.float())
    return out, lse


def _block_backward(qg, kf, vf, do, lse_safe, delta, allowed, scale):
    """Gradients of one K/V block given the merged (global) softmax statistics, all float32.

    ``qg``/``do`` ``[B, Hkv, G, Tq, D]``; ``kf``/``vf`` ``[B, Hkv, Tk, D]``; ``lse_safe`` the global
    log-sum-exp with -inf replaced by 0; ``delta`` ``rowsum(dO * O)``. Returns ``(dq, dk, dv)``,
    ``dq`` grouped like ``qg``, ``dk``/``dv`` like ``kf``.
    """
    s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kf) * scale
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    p = torch.exp(s - lse_safe[..., None])
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", do, vf)
    ds = p * (dp - delta[..., None]) * scale
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kf)
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg)
    return dq, dk, dv


def _merge(out, lse, blk_out, blk_lse):
    """Combine two softmax-normalised partial results by their log-sum-exp."""
    new_lse = torch.logaddexp(lse, blk_lse)
    w_old = torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]
    w_new = torch.exp(blk_lse - new_lse).nan_to_num(0.0)[..., None]
    return out * w_old + blk_out * w_new, new_lse


# ----------------------------------------------------------------------------- hop shapes


class _Hop(NamedTuple):
    """The visible part of one hop: queries ``rows`` see keys ``cols``, every other pair is masked.

    ``causal`` means rows and cols are the same square and query ``i`` sees keys ``<= i``
    (lower-triangular); otherwise the rectangle is fully visible.
    """

    rows: slice
    cols: slice
    causal: bool


_SKIP = "skip"
_HopPlan = Union[_Hop, str, None]  # a _Hop, _SKIP (no visible pair) or None (no fused shape: reference)


def _run(sel: Tensor, rest: Tensor) -> Optional[slice]:
    """``sel`` as one contiguous slice, when it is one run and every other index is in ``rest``."""
    if not bool((sel | rest).all()):
        return None
    idx = sel.nonzero().flatten()
    if idx.numel() == 0 or int(idx[-1]) - int(idx[0]) + 1 != idx.numel():
        return None
    return slice(int(idx[0]), int(idx[-1]) + 1)


def _classify(qpos: Tensor, kpos: Tensor, causal: bool) -> _HopPlan:
    """Shape of the causal mask of queries at ``qpos`` over keys at ``kpos`` (1-D CPU tensors)."""
    tq, tk = qpos.numel(), kpos.numel()
    full = _Hop(slice(0, tq), slice(0, tk), False)
    if not causal:
        return full
    qmin, qmax, kmin, kmax = int(qpos.min()), int(qpos.max()), int(kpos.min()), int(kpos.max())
    if kmin > qmax:
        return _SKIP
    if qmin >= kmax:
        return full
    if tq == tk and torch.equal(qpos, kpos) and bool((qpos[1:] > qpos[:-1]).all()):
        return _Hop(slice(0, tq), slice(0, tk), True)  # own block, sorted: key j visible to query i iff j <= i
    rows = _run(qpos >= kmax, qpos < kmin)  # queries that see every key; the others see none
    if rows is not None:
        return _Hop(rows, slice(0, tk), False)
    cols = _run(kpos <= qmin, kpos > qmax)  # keys every query sees; no query sees the others
    if cols is not None:
        return _Hop(slice(0, tq), cols, False)
    return None


class RingLayout:
    """Every rank's positions in a ring (gathered once) and, lazily, the shape of every hop.

    Building one is a collective (an all-gather over ``group``); reuse it for every attention
    call over the same positions (:func:`context_parallel` does).
    """

    def __init__(self, positions: Tensor, group=None):
        self.rank = dist.get_rank(group)
        self.positions = torch.stack(_gather(positions, group))  # [world, Tl], on positions' device
        self._host: Optional[Tensor] = None
        self._plans: dict[bool, tuple[_HopPlan, ...]] = {}

    def hops(self, causal: bool) -> tuple[_HopPlan, ...]:
        """The hop plan of this rank's queries over each source rank's keys, indexed by source rank."""
        if causal not in self._plans:
            if self._host is None:
                self._host = self.positions.cpu()
            mine = self._host[self.rank]
            self._plans[causal] = tuple(_classify(mine, kpos, causal) for kpos in self._host)
        return self._plans[causal]


def ring_layout(positions: Tensor, group=None) -> RingLayout:
    """The :class:`RingLayout` of ``positions`` (this rank's ``[Tl]`` global positions) over ``group``."""
    return RingLayout(positions, group)


# ----------------------------------------------------------------------------- fused hop


_HALF = (torch.float16, torch.bfloat16)
_RNG: dict = {}


def _last_dim_dense(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _rng_placeholders(device) -> tuple[Tensor, Tensor]:
    """Seed/offset arguments of the flash backward; never read without dropout."""
    if device not in _RNG:
        _RNG[device] = (torch.empty(2, dtype=torch.uint64, device=device),
                        torch.empty((), dtype=torch.uint64, device=device))
    return _RNG[device]


def _math_flash_forward(q, k, v, causal, scale):
    """What the flash kernel computes, in float32 (equal head counts): ``(out in q's dtype, lse)``."""
    s = torch.einsum("bhqd,bhkd->bhqk", q.float(), k.float()) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.nan_to_num(neginf=0.0)[..., None])
    return torch.einsum("bhqk,bhkd->bhqd", p, v.float()).to(q.dtype), lse


def _math_flash_backward(do, q, k, v, out, lse, causal, scale):
    """The flash backward in float32 (equal head counts); ``lse`` is +inf on rows with no key."""
    qf, kf, vf, dof = q.float(), k.float(), v.float(), do.float()
    s = torch.einsum("bhqd,bhkd->bhqk", qf, kf) * scale
    if causal:
        s = s.masked_fill(torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).triu(1), float("-inf"))
    p = torch.exp(s - lse[..., None])
    delta = (dof * out.float()).sum(-1)
    dv = torch.einsum("bhqk,bhqd->bhkd", p, dof)
    ds = p * (torch.einsum("bhqd,bhkd->bhqk", dof, vf) - delta[..., None]) * scale
    dq = torch.einsum("bhqk,bhkd->bhqd", ds, kf)
    dk = torch.einsum("bhqk,bhqd->bhkd", ds, qf)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


def _flash_forward(q, k, v, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    """One block, equal head counts, ``[B, H, T, D]``: ``(out, lse)``, ``lse`` ``[B, H, Tq]`` float32 natural log.

    ``causal`` is the square lower-triangular mask (only used with ``Tq == Tk``). A row with no
    visible key gets lse -inf (the merge's convention).
    """
    if not q.is_cuda:
        return _math_flash_forward(q, k, v, causal, scale)
    q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
    res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    out, lse = res[0], res[1][..., :q.shape[2]].float()
    # the flash kernel marks a row without keys with lse +inf; for the merge it carries no mass: -inf
    return out, lse.masked_fill(lse == float("inf"), float("-inf"))


def _flash_backward(do, q, k, v, out, lse, causal: bool, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    """Flash backward of one block, equal head counts, given the *global* ``out`` and ``lse`` of its rows.

    ``out`` ``[B, H, Tq, D]`` in q's dtype and ``lse`` ``[B, H, Tq]`` natural log; the kernel's ``P`` is
    then the global softmax restricted to this block and ``rowsum(dO * O)`` the global one, so
    ``(dq, dk, dv)`` are this block's exact share. Returned in the input dtype.
    """
    lse = lse.masked_fill(lse == float("-inf"), float("inf")).contiguous()  # a row with no key: P = 0
    if not q.is_cuda:
        return _math_flash_backward(do, q, k, v, out, lse, causal, scale)
    q, k, v = _last_dim_dense(q), _last_dim_dense(k), _last_dim_dense(v)
    seed, offset = _rng_placeholders(q.device)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_backward(
        do.to(q.dtype), q, k, v, out.to(q.dtype), lse, None, None, q.shape[2], k.shape[2], 0.0, causal,
        seed, offset, scale=scale)
    return dq, dk, dv


def _expand_kv(x: Tensor, groups: int) -> Tensor:
    """``[B, Hkv, T, D]`` -> ``[B, Hkv*G, T, D]``: query head ``h`` reads kv head ``h // G`` (as the grouping)."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _fused_block_forward(q, k, v, hop: _Hop, scale):
    """Queries ``hop.rows`` over keys ``hop.cols`` of one block by the flash kernel.

    Returns ``(out, lse)`` of those rows, float32, grouped ``[B, Hkv, G, rows, D]`` / ``[B, Hkv, G, rows]``
    like :func:`_block_forward`.
    """
    b, hq, _, d = q.shape
    hk = k.shape[1]
    g = hq // hk
    out, lse = _flash_forward(q[:, :, hop.rows], _expand_kv(k[:, :, hop.cols], g), _expand_kv(v[:, :, hop.cols], g),
                              hop.causal, scale)
    return out.float().reshape(b, hk, g, -1, d), lse.reshape(b, hk, g, -1)


def _fused_block_backward(do, q, k, v, out, lse, hop: _Hop, scale):
    """This block's gradient share by the flash backward, given the global ``out`` and ``lse``.

    ``do``, ``q``, ``out``: ``[B, Hq, Tq, D]``; ``lse`` ``[B, Hq, Tq]`` (natural log); ``k``, ``v``
    ``[B, Hkv, Tk, D]``. Returns float32 ``dq`` of rows ``hop.rows`` ``[B, Hq, rows, D]`` and ``dk``,
    ``dv`` of keys ``hop.cols`` ``[B, Hkv, cols, D]`` (summed over each kv head's query group).
    """
    hk = k.shape[1]
    g = q.shape[1] // hk
    r, c = hop.rows, hop.cols
    dq, dk, dv = _flash_backward(do[:, :, r], q[:, :, r], _expand_kv(k[:, :, c], g), _expand_kv(v[:, :, c], g),
                                 out[:, :, r], lse[:, :, r], hop.causal, scale)
    return dq.float(), _group_sum(dk, hk), _group_sum(dv, hk)


def _group_sum(x: Tensor, hk: int) -> Tensor:
    b, h, t, d = x.shape
    return x.float().reshape(b, hk, h // hk, t, d).sum(2)


def fused_supported(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether ``impl="auto"`` takes the fused hop for these inputs (CUDA fp16/bf16 the flash kernel takes)."""
    d = q.shape[-1]
    return (q.is_cuda and q.dtype in _HALF and k.dtype == v.dtype == q.dtype and k.shape[-1] == v.shape[-1] == d
            and d % 8 == 0 and d <= 256 and torch.backends.cuda.flash_sdp_enabled()
            and torch.cuda.get_device_capability(q.device)[0] >= 8)


def _use_fused(q, k, v, doc_ids, impl: str) -> bool:
    if impl not in _IMPLS:
        raise ValueError(f"impl must be one of {_IMPLS}, got {impl!r}")
    if impl == "fused" and doc_ids is not None:
        raise ValueError("the fused ring hop takes no doc_ids; use impl='reference' for packed documents")
    fused = impl == "fused" or (impl == "auto" and doc_ids is None and fused_supported(q, k, v))
    if impl == "auto" and q.is_cuda and not fused:
        dispatch.log_once("ring-reference-hops", "ring attention: float32 reference hops on CUDA (%s)",
                          "packed documents (doc_ids)" if doc_ids is not None else
                          f"no flash kernel for dtype {q.dtype}, head dim {q.shape[-1]}")
    return fused


# ----------------------------------------------------------------------------- the ring


def _ring_pass(tensors: list[Tensor], group) -> tuple[list[Tensor], list]:
    """Start sending ``tensors`` to the next rank and receiving the previous rank's; returns (buffers, requests)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    nxt, prv = (rank + 1) % world, (rank - 1) % world
    tensors = [t.contiguous() for t in tensors]  # P2P needs dense buffers on both ends
    recv = [torch.empty_like(t) for t in tensors]
    ops = []
    for t, r in zip(tensors, recv):
        ops.append(dist.P2POp(dist.isend, t, dist.get_global_rank(group, nxt) if group else nxt, group))
        ops.append(dist.P2POp(dist.irecv, r, dist.get_global_rank(group, prv) if group else prv, group))
    return recv, dist.batch_isend_irecv(ops)


def _wait(reqs) -> None:
    for r in reqs:
        r.wait()


def _skip(qpos, kpos, causal) -> bool:
    return causal and bool(kpos.min() > qpos.max())


def _gather(t: Tensor, group) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _reference_grad_operands(q, grad_out, out, lse):
    """Grouped float32 ``(q, dO, rowsum(dO * O), lse with -inf -> 0)`` for :func:`_block_backward`."""
    b, hq, tq, d = q.shape
    hk = lse.shape[1]
    do = grad_out.float().reshape(b, hk, hq // hk, tq, d)
    qg = q.float().reshape(b, hk, hq // hk, tq, d)
    delta = (do * out.float().reshape(b, hk, hq // hk, tq, d)).sum(-1)
    return qg, do, delta, lse.nan_to_num(neginf=0.0)


class _RingAttention(torch.autograd.Function):
    """Forward and backward rings. Written with ``setup_context`` so ``torch.func.grad`` can see through it.

    ``hops`` is None for the reference path, else the fused plan (one entry per source rank).
    """

    @staticmethod
    def forward(q, k, v, qpos, qdoc, all_pos, hops, scale, causal, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, hq, tq, d = q.shape
        hk = k.shape[1]
        out = torch.zeros(b, hk, hq // hk, tq, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, hk, hq // hk, tq), float("-inf"), device=q.device)
        all_doc = torch.stack(_gather(qdoc, group)) if qdoc is not None else None
        kb, vb = k, v
        for step in range(world):
            reqs = None
            if step < world - 1:  # the next block travels while this one is computed
                (kn, vn), reqs = _ring_pass([kb, vb], group)
            src = (rank - step) % world
            hop = None if hops is None else hops[src]
            if isinstance(hop, _Hop):
                blk_out, blk_lse = _fused_block_forward(q, kb, vb, hop, scale)
                r = hop.rows
                out[..., r, :], lse[..., r] = _merge(out[..., r, :], lse[..., r], blk_out, blk_lse)
            elif hop is None and not _skip(qpos, all_pos[src], causal):
                allowed = _allowed(qpos, all_pos[src], qdoc, None if all_doc is None else all_doc[src], causal)
                blk_out, blk_lse = _block_forward(q, kb, vb, allowed, scale)
                out, lse = _merge(out, lse, blk_out, blk_lse)
            if reqs is not None:
                _wait(reqs)
                kb, vb = kn, vn
        return out.reshape(b, hq, tq, d).to(q.dtype), out, lse, all_doc

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, qpos, qdoc, all_pos, hops, scale, causal, group = inputs
        out_q, out, lse, all_doc = output
        # the fused backward wants the output in q's dtype: keep the returned one, not the float32 copy
        ctx.save_for_backward(q, k, v, qpos, qdoc, out if hops is None else out_q, lse, all_pos, all_doc)
        ctx.scale, ctx.causal, ctx.group, ctx.hops = scale, causal, group, hops
        ctx.mark_non_differentiable(out, lse, *([all_doc] if all_doc is not None else []))

    @staticmethod
    def backward(ctx, grad_out, *_):
        q, k, v, qpos, qdoc, out, lse, all_pos, all_doc = ctx.saved_tensors
        scale, causal, group, hops = ctx.scale, ctx.causal, ctx.group, ctx.hops
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, hq, tq, d = q.shape
        ref = _reference_grad_operands(q, grad_out, out, lse) if hops is None else None
        lse_rows = lse.reshape(b, hq, tq)
        dq = torch.zeros(b, hq, tq, d, dtype=torch.float32, device=q.device)
        kb, vb = k, v
        d_in, d_reqs = None, None  # the accumulators in flight to this rank
        for step in range(world):
            kv_reqs = None
            if step < world - 1:  # K/V do not change: send them on before computing with them
                (kn, vn), kv_reqs = _ring_pass([kb, vb], group)
            src = (rank - step) % world
            hop = None if hops is None else hops[src]
            parts = []  # (key slice, dk, dv) of this rank's share of the block's gradients
            if isinstance(hop, _Hop):
                dq_r, dk_c, dv_c = _fused_block_backward(grad_out, q, kb, vb, out, lse_rows, hop, scale)
                dq[:, :, hop.rows] += dq_r
                parts.append((hop.cols, dk_c, dv_c))
            elif hop is None and not _skip(qpos, all_pos[src], causal):
                if ref is None:  # a hop the fused path has no shape for
                    ref = _reference_grad_operands(q, grad_out, out, lse)
                qg, do, delta, lse_safe = ref
                allowed = _allowed(qpos, all_pos[src], qdoc, None if all_doc is None else all_doc[src], causal)
                dq_b, dk_b, dv_b = _block_backward(qg, kb.float(), vb.float(), do, lse_safe, delta, allowed, scale)
                dq += dq_b.reshape(b, hq, tq, d)
                parts.append((slice(None), dk_b, dv_b))
            # the block's accumulator (what the ranks before this one added) arrived meanwhile
            if d_reqs is None:
                dkb = torch.zeros(kb.shape, dtype=torch.float32, device=kb.device)
                dvb = torch.zeros(vb.shape, dtype=torch.float32, device=vb.device)
            else:
                _wait(d_reqs)
                dkb, dvb = d_in
            for c, dk_c, dv_c in parts:
                dkb[:, :, c] += dk_c
                dvb[:, :, c] += dv_c
            if world > 1:  # on to the next holder of this block; after the last step, home
                d_in, d_reqs = _ring_pass([dkb, dvb], group)
            if kv_reqs is not None:
                _wait(kv_reqs)
                kb, vb = kn, vn
        if d_reqs is not None:
            _wait(d_reqs)
            dkb, dvb = d_in
        return (dq.to(q.dtype), dkb.to(k.dtype), dvb.to(v.dtype),
                None, None, None, None, None, None, None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, *, doc_ids: Optional[Tensor] = None,
                   group=None, causal: bool = True, scale: Optional[float] = None, impl: Optional[str] = None,
                   layout: Optional[RingLayout] = None) -> Tensor:
    """Attention of this rank's queries over the whole sequence held across ``group``.

    Args:
        q: ``[B, Hq, Tl, D]`` local queries; k, v: ``[B, Hkv, Tl, D]`` local keys/values (GQA allowed).
        positions: ``[Tl]`` global positions of the local tokens (e.g. :func:`shard_positions`); the
            same length on every rank.
        doc_ids: ``[B, Tl]`` document ids of the local tokens of packed rows (sharded like the
            tokens); tokens attend only within their document.
        group: the context-parallel process group (default: the world).
        causal: mask keys at later global positions.
        impl: ``"auto"``, ``"reference"`` or ``"fused"`` (see the module doc); default :data:`IMPL`.
        layout: :func:`ring_layout` of ``positions`` to reuse (saves an all-gather); built when None.

    Returns the local shard of the output, ``[B, Hq, Tl, D]``. Differentiable.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    fused = _use_fused(q, k, v, doc_ids, IMPL if impl is None else impl)
    layout = ring_layout(positions, group) if layout is None else layout
    hops = layout.hops(causal) if fused else None
    return _RingAttention.apply(q, k, v, positions, doc_ids, layout.positions, hops, scale, causal, group)[0]


# ----------------------------------------------------------------------------- context parallelism

_CONTEXT: dict = {}


@contextlib.contextmanager
def context_parallel(group, positions: Tensor, *, impl: Optional[str] = None) -> Iterator[None]:
    """Inside this context, causal self-attention runs as ring attention over ``group``.

    ``positions`` ``[Tl]`` are the global sequence positions of this rank's tokens (its shard, e.g.
    :func:`shard_positions`); the ``attention`` op's ``ring`` backend picks itself up from here, so the
    model functions need no change. Only causal self-attention qualifies (queries and keys of the
    same shard, no padding-key or explicit masks); packed documents are supported through ``doc_ids``.
    The first attention call gathers every rank's positions once for the whole context, so keep
    ``positions`` unchanged inside it. ``impl`` picks the hop implementation (default :data:`IMPL`).
    """
    saved = dict(_CONTEXT)
    _CONTEXT.update(group=group, positions=positions, impl=impl, layout=None)
    try:
        yield
    finally:
        _CONTEXT.clear()
        _CONTEXT.update(saved)


def ring_supports(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None) -> bool:
    """The ``ring`` backend of ``attention``: only inside :func:`context_parallel`, causal self-attention."""
    return (bool(_CONTEXT) and causal and key_valid is None and mask is None
            and q.shape[2] == k.shape[2] == _CONTEXT["positions"].shape[0])


def ring_backend(q, k, v, *, causal=True, doc_ids=None, key_valid=None, mask=None, scale=None) -> Tensor:
    """``attention`` backend body: ring attention with the positions and group of the active context."""
    if _CONTEXT["layout"] is None:  # every rank gets here at its first attention call of the context
        _CONTEXT["layout"] = ring_layout(_CONTEXT["positions"], _CONTEXT["group"])
    return ring_attention(q, k, v, _CONTEXT["positions"], doc_ids=doc_ids, group=_CONTEXT["group"],
                          causal=causal, scale=scale, impl=_CONTEXT["impl"], layout=_CONTEXT["layout"])
