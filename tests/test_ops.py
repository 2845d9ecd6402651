"""The dispatch seam and the attention backends against float64 oracles.

CPU runs the reference attention (and the dispatch rules); the ``gpu``-marked
tests run SDPA, FlexAttention and (when installed) flash_attn against the same
oracle, and check that packed documents never see each other, bit for bit.
"""

import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ghostvis.ops as ops
from ghostvis.ops import attention_backends as attn
from ghostvis.ops import dispatch

GPU = pytest.mark.gpu
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}


def rel_err(a, b):
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all()
    return ((a - b).norm() / b.norm().clamp(min=1e-2 * b.numel() ** 0.5)).item()


def doc_ids_from_lengths(lengths_per_row):
    rows = [torch.repeat_interleave(torch.arange(len(ls)), torch.tensor(ls)) for ls in lengths_per_row]
    return torch.stack(rows)


def attention64(q, k, v, *, causal=True, doc_ids=None, scale=None):
    """Float64 oracle with K/V repeated explicitly (the simplest correct GQA)."""
    q, k, v = (t.double().cpu() for t in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    tq, tk = q.shape[2], k.shape[2]
    allowed = torch.ones(tq, tk, dtype=torch.bool)
    if causal:
        allowed = torch.arange(tk)[None, :] <= (torch.arange(tq) + tk - tq)[:, None]
    allowed = allowed[None, None]
    if doc_ids is not None:
        d = doc_ids.cpu()
        allowed = allowed & (d[:, None, :, None] == d[:, None, None, :])
    s = s.masked_fill(~allowed, float("-inf"))
    return torch.nan_to_num(torch.softmax(s, -1)) @ v


@st.composite
def packed_layout(draw, max_t=24, lengths=None):
    b = draw(st.integers(1, 2))
    t = draw(st.sampled_from(lengths)) if lengths else draw(st.integers(1, max_t))
    rows = []
    for _ in range(b):
        lengths, left = [], t
        while left:
            n = draw(st.integers(1, left))
            lengths.append(n)
            left -= n
        rows.append(lengths)
    return doc_ids_from_lengths(rows)


def qkv(b, hq, hk, tq, tk, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda h, t: torch.randn(b, h, t, d, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    return mk(hq, tq), mk(hk, tk), mk(hk, tk)


# ----------------------------------------------------------------------------- dispatch


def test_cpu_default_is_reference(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 8)
    int8_args = (x, torch.zeros(2, 8, dtype=torch.int8), torch.ones(2), None)
    for op, args in [("rms_norm", (x, None, 1e-6)), ("swiglu", (x, x)), ("int8_linear", int8_args)]:
        assert dispatch.choose(op, *args).name == "reference"
    q = torch.randn(1, 2, 4, 16)
    assert dispatch.choose("attention", q, q, q, doc_ids=torch.zeros(1, 4, dtype=torch.long)).name == "reference"


def test_force_per_call_and_context(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(3, 8)
    with ops.use(rms_norm="reference"):
        assert dispatch.choose("rms_norm", x, None, 1e-6).name == "reference"
    if ops.HAS_TRITON:
        assert dispatch.choose("rms_norm", x, None, 1e-6, backend="triton").name == "triton"
        with ops.use(rms_norm="triton"):
            assert dispatch.choose("rms_norm", x, None, 1e-6).name == "triton"
    assert dispatch.choose("rms_norm", x, None, 1e-6).name == "reference"  # the context restored it
    q = torch.randn(1, 2, 4, 16)
    with pytest.raises(RuntimeError, match="sdpa"):  # a forced backend never silently falls back
        ops.attention(q, q, q, backend="sdpa")
    with pytest.raises(KeyError, match="nope"):
        ops.rms_norm(x, backend="nope")


def test_logs_once_per_op_and_backend(caplog):
    dispatch._LOGGED.discard(("gelu", "reference"))
    with caplog.at_level(logging.INFO, logger="ghostvis.ops"):
        for _ in range(3):
            ops.gelu(torch.randn(4))
    assert sum("op gelu uses backend reference" in r.getMessage() for r in caplog.records) == 1


# ----------------------------------------------------------------------------- attention on CPU (reference)


@given(layout=packed_layout(), hk=st.integers(1, 2), group=st.sampled_from([1, 2, 3]), d=st.sampled_from([8, 12]),
       seed=st.integers(0, 2**16))
def test_reference_attention_packed_gqa_matches_float64(layout, hk, group, d, seed):
    b, t = layout.shape
    q, k, v = qkv(b, hk * group, hk, t, t, d, "cpu", torch.float32, seed)
    out = ops.attention(q, k, v, causal=True, doc_ids=layout)
    assert rel_err(out, attention64(q, k, v, doc_ids=layout)) < TOL[torch.float32]


@given(tq=st.integers(1, 5), extra=st.integers(0, 7), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_reference_attention_decode_against_cache(tq, extra, causal, seed):
    q, k, v = qkv(2, 4, 2, tq, tq + extra, 8, "cpu", torch.float32, seed)
    out = ops.attention(q, k, v, causal=causal)
    assert rel_err(out, attention64(q, k, v, causal=causal)) < TOL[torch.float32]


def _assert_documents_isolated(device, dtype, backend, layout, seed):
    """Changing one document's q/k/v leaves every other document's outputs bit-identical."""
    b, t = layout.shape
    q, k, v = qkv(b, 4, 2, t, t, 16 if device == "cpu" else 64, device, dtype, seed)
    layout = layout.to(device)
    out = ops.attention(q, k, v, causal=True, doc_ids=layout, backend=backend)
    victim = layout[0, t // 2]
    in_doc = (layout == victim)[:, None, :, None]
    q2, k2, v2 = (torch.where(in_doc, x + 3 * torch.randn_like(x), x) for x in (q, k, v))
    out2 = ops.attention(q2, k2, v2, causal=True, doc_ids=layout, backend=backend)
    others = ~in_doc.expand_as(out)
    assert torch.equal(out[others], out2[others])
    assert not torch.equal(out[~others], out2[~others])  # the edit did reach its own document


@given(layout=packed_layout(), seed=st.integers(0, 2**16))
def test_reference_packed_documents_never_mix(layout, seed):
    _assert_documents_isolated("cpu", torch.float32, "reference", layout, seed)


def test_sdpa_and_flex_refuse_cpu_and_flash_attn_is_optional():
    q = torch.randn(1, 2, 4, 16)
    assert not attn.sdpa_ok(q, q, q) and not attn.flex_ok(q, q, q)
    assert ("flash_attn" in ops.backends("attention")) and not attn.flash_attn_ok(q, q, q)


# ----------------------------------------------------------------------------- attention on GPU

GPU_BACKENDS = ["sdpa", "flex"] + (["flash_attn"] if attn.flash_attn_module() is not None else [])
GPU_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@GPU
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@settings(max_examples=10)
@given(layout=packed_layout(lengths=(64, 200, 256)), hk=st.integers(1, 2), group=st.sampled_from([1, 2, 4]),
       seed=st.integers(0, 2**16))
def test_gpu_attention_packed_matches_float64(backend, dtype, layout, hk, group, seed):
    if backend == "flash_attn" and dtype == torch.float32:
        pytest.skip("flash_attn takes half precision only")
    b, t = layout.shape
    q, k, v = qkv(b, hk * group, hk, t, t, 64, "cuda", dtype, seed)
    out = ops.attention(q, k, v, causal=True, doc_ids=layout.cuda(), backend=backend)
    assert out.shape == q.shape and out.dtype == dtype
    assert rel_err(out, attention64(q, k, v, doc_ids=layout)) < TOL[dtype] * (100 if dtype == torch.float32 else 1)


@GPU
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@settings(max_examples=10)
@given(layout=packed_layout(lengths=(64, 200, 256)), seed=st.integers(0, 2**16))
def test_gpu_packed_documents_never_mix(backend, layout, seed):
    _assert_documents_isolated("cuda", torch.bfloat16, backend, layout, seed)


@GPU
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@given(tq=st.integers(1, 9), extra=st.integers(0, 200), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_gpu_sdpa_dense_and_decode_match_float64(dtype, tq, extra, causal, seed):
    q, k, v = qkv(2, 8, 2, tq, tq + extra, 64, "cuda", dtype, seed)
    out = ops.attention(q, k, v, causal=causal, backend="sdpa")
    assert rel_err(out, attention64(q, k, v, causal=causal)) < TOL[dtype] * (100 if dtype == torch.float32 else 1)


@GPU
def test_gpu_attention_grads_match_reference():
    layout = doc_ids_from_lengths([[100, 28, 1, 127]]).cuda()
    q, k, v = (x.requires_grad_() for x in qkv(1, 4, 2, 256, 256, 64, "cuda", torch.float32, 0))
    g = torch.randn_like(q)
    ref = torch.autograd.grad(ops.attention(q, k, v, doc_ids=layout, backend="reference"), (q, k, v), g)
    for backend in ("sdpa", "flex"):
        fast = torch.autograd.grad(ops.attention(q, k, v, doc_ids=layout, backend=backend), (q, k, v), g)
        for a, r in zip(fast, ref):
            assert rel_err(a, r) < 2e-3


@GPU
def test_block_mask_is_cached_per_doc_ids_tensor():
    ids = doc_ids_from_lengths([[64, 64, 128]]).cuda()
    first = attn.document_block_mask(ids, 256, 256, batch=1, device=ids.device)
    assert attn.document_block_mask(ids, 256, 256, batch=1, device=ids.device) is first
    other = attn.document_block_mask(ids.clone(), 256, 256, batch=1, device=ids.device)
    assert other is not first


@GPU
def test_gpu_auto_choice_packed_uses_flex():
    q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(1, 128, dtype=torch.long, device="cuda")
    assert dispatch.choose("attention", q, q, q, doc_ids=ids).name == "flex"
    expected = "flash_attn" if attn.flash_attn_module() is not None else "sdpa"
    assert dispatch.choose("attention", q, q, q).name == expected


def test_under_transform_sees_torch_func_and_compile():
    x = torch.randn(3)
    seen = []

    def f(y):
        seen.append(attn.under_transform(y))
        return (y * 2).sum()

    f(x)
    torch.func.grad(f)(x)
    torch.compile(f, backend="eager", fullgraph=True)(x)
    assert seen == [False, True, True]


@GPU
def test_gpu_auto_choice_packed_inside_torch_func_grad_is_not_flex():
    q = torch.randn(1, 4, 128, 64, device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(1, 128, dtype=torch.long, device="cuda")
    names = []

    def f(q):
        names.append(dispatch.choose("attention", q, q, q, doc_ids=ids).name)
        return ops.attention(q, q, q, doc_ids=ids).float().sum()

    torch.func.grad(f)(q)
    assert names == ["sdpa"]


def test_block_mask_cache_works_inside_torch_func_grad():
    # tensors made inside a torch.func transform have no storage to key the cache by
    ids = doc_ids_from_lengths([[64, 64, 128]])

    def f(w, ids):
        bm = attn.document_block_mask(ids * 1, 256, 256, batch=1, device=ids.device)
        return (w * bm.kv_num_blocks.sum()).sum()

    n_blocks = attn.document_block_mask(ids, 256, 256, batch=1, device=ids.device).kv_num_blocks.sum()
    torch.testing.assert_close(torch.func.grad(f)(torch.ones(3), ids), torch.full((3,), float(n_blocks)))


def test_log_once_says_each_thing_once(caplog):
    key = "test-log-once-key"
    dispatch._SAID.discard(key)
    with caplog.at_level("INFO", logger="ghostvis.ops"):
        for i in range(3):
            dispatch.log_once(key, "fallback number %d", i)
    assert [r.getMessage() for r in caplog.records] == ["fallback number 0"]
