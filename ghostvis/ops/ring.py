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
accumulators and arrive home after one extra hop.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import torch.distributed as dist

Tensor = torch.Tensor


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
    """Scores of local queries against one K/V block: (out, lse) in float32, GQA by grouping."""
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


def _merge(out, lse, blk_out, blk_lse):
    """Combine two softmax-normalised partial results by their log-sum-exp."""
    new_lse = torch.logaddexp(lse, blk_lse)
    w_old = torch.exp(lse - new_lse).nan_to_num(0.0)[..., None]
    w_new = torch.exp(blk_lse - new_lse).nan_to_num(0.0)[..., None]
    return out * w_old + blk_out * w_new, new_lse


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


def _skip(qpos, kpos, causal) -> bool:
    return causal and bool(kpos.min() > qpos.max())


def _gather(t: Tensor, group) -> list[Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


class _RingAttention(torch.autograd.Function):
    """Forward and backward rings. Written with ``setup_context`` so ``torch.func.grad`` can see through it."""

    @staticmethod
    def forward(q, k, v, qpos, qdoc, scale, causal, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, hq, tq, d = q.shape
        hk = k.shape[1]
        out = torch.zeros(b, hk, hq // hk, tq, d, dtype=torch.float32, device=q.device)
        lse = torch.full((b, hk, hq // hk, tq), float("-inf"), device=q.device)
        all_pos = torch.stack(_gather(qpos, group))
        all_doc = torch.stack(_gather(qdoc, group)) if qdoc is not None else None
        kb, vb = k, v
        for step in range(world):
            reqs = None
            if step < world - 1:
                (kn, vn), reqs = _ring_pass([kb, vb], group)
            src = (rank - step) % world
            if not _skip(qpos, all_pos[src], causal):
                allowed = _allowed(qpos, all_pos[src], qdoc, None if all_doc is None else all_doc[src], causal)
                blk_out, blk_lse = _block_forward(q, kb, vb, allowed, scale)
                out, lse = _merge(out, lse, blk_out, blk_lse)
            if reqs is not None:
                for r in reqs:
                    r.wait()
                kb, vb = kn, vn
        return out.reshape(b, hq, tq, d).to(q.dtype), out, lse, all_pos, all_doc

    @staticmethod
    def setup_context(ctx, inputs, output):
        q, k, v, qpos, qdoc, scale, causal, group = inputs
        _, out, lse, all_pos, all_doc = output
        ctx.save_for_backward(q, k, v, qpos, qdoc, out, lse, all_pos, all_doc)
        ctx.scale, ctx.causal, ctx.group = scale, causal, group
        ctx.mark_non_differentiable(out, lse, all_pos, *([all_doc] if all_doc is not None else []))

    @staticmethod
    def backward(ctx, grad_out, *_):
        q, k, v, qpos, qdoc, out, lse, all_pos, all_doc = ctx.saved_tensors
        scale, causal, group = ctx.scale, ctx.causal, ctx.group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        b, hq, tq, d = q.shape
        hk = k.shape[1]
        do = grad_out.float().reshape(b, hk, hq // hk, tq, d)
        qg = q.float().reshape(b, hk, hq // hk, tq, d)
        delta = (do * out).sum(-1)  # rowsum(dO * O)
        lse_safe = lse.nan_to_num(neginf=0.0)
        dq = torch.zeros_like(qg)
        kb, vb = k.float(), v.float()
        dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        for step in range(world):
            src = (rank - step) % world
            if not _skip(qpos, all_pos[src], causal):
                allowed = _allowed(qpos, all_pos[src], qdoc, None if all_doc is None else all_doc[src], causal)
                s = torch.einsum("bhgqd,bhkd->bhgqk", qg, kb) * scale
                if allowed is not None:
                    s = s.masked_fill(~allowed, float("-inf"))
                p = torch.exp(s - lse_safe[..., None])
                dvb = dvb + torch.einsum("bhgqk,bhgqd->bhkd", p, do)
                dp = torch.einsum("bhgqd,bhkd->bhgqk", do, vb)
                ds = p * (dp - delta[..., None]) * scale
                dq = dq + torch.einsum("bhgqk,bhkd->bhgqd", ds, kb)
                dkb = dkb + torch.einsum("bhgqk,bhgqd->bhkd", ds, qg)
            # after the last step one more hop brings each block's gradients home
            (kb2, vb2, dkb, dvb), reqs = _ring_pass([kb, vb, dkb, dvb], group)
            for r in reqs:
                r.wait()
            kb, vb = kb2, vb2
        return (dq.reshape(b, hq, tq, d).to(q.dtype), dkb.to(k.dtype), dvb.to(v.dtype),
                None, None, None, None, None)


def ring_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, *, doc_ids: Optional[Tensor] = None,
                   group=None, causal: bool = True, scale: Optional[float] = None) -> Tensor:
    """Attention of this rank's queries over the whole sequence held across ``group``.

    Args:
        q: ``[B, Hq, Tl, D]`` local queries; k, v: ``[B, Hkv, Tl, D]`` local keys/values (GQA allowed).
        positions: ``[Tl]`` global positions of the local tokens (e.g. :func:`shard_positions`); the
            same length on every rank.
        doc_ids: ``[B, Tl]`` document ids of the local tokens of packed rows (sharded like the
            tokens); tokens attend only within their document.
        group: the context-parallel process group (default: the world).
        causal: mask keys at later global positions.

    Returns the local shard of the output, ``[B, Hq, Tl, D]``. Differentiable.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return _RingAttention.apply(q, k, v, positions, doc_ids, scale, causal, group)[0]


# ----------------------------------------------------------------------------- context parallelism

_CONTEXT: dict = {}


@contextlib.contextmanager
def context_parallel(group, positions: Tensor) -> Iterator[None]:
    """Inside this context, causal self-attention runs as ring attention over ``group``.

    ``positions`` ``[Tl]`` are the global sequence positions of this rank's tokens (its shard, e.g.
    :func:`shard_positions`); the ``attention`` op's ``ring`` backend picks itself up from here, so the
    model functions need no change. Only causal self-attention qualifies (queries and keys of the
    same shard, no padding-key or explicit masks); packed documents are supported through ``doc_ids``.
    """
    saved = dict(_CONTEXT)
    _CONTEXT.update(group=group, positions=positions)
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
    return ring_attention(q, k, v, _CONTEXT["positions"], doc_ids=doc_ids, group=_CONTEXT["group"],
                          causal=causal, scale=scale)
