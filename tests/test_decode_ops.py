"""The inference-only decode kernels (``ghostvis.ops.decode``) against float64 oracles.

``add_rms_norm`` (forward), ``rope_into_cache`` and the split-KV ``decode_attention`` run in
Triton's interpreter on CPU and compiled on a GPU (``gpu``-marked cases), and are
compared with float64 math written out here. The dispatch tests check they are
picked only where they apply (no gradient, one query against a cache), and the
generation tests that a decode built from them gives the reference tokens.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ghostvis as gv
import ghostvis.ops as ops
from ghostvis.infer.generate import generate, generate_uncached
from ghostvis.infer.kv_cache import attention_mask, key_valid
from ghostvis.ops import dispatch
from test_kernels import (CASES, TOL, budget, make, rel_err, rms_norm64, rope64, rope_angles, skip_without,
                          swiglu64)

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton")


def attention64(q, k, v, keep):
    """One query per row: q ``[B, Hq, 1, D]``, k/v ``[B, Hk, S, D]``, keep ``[B, S]`` bool; float64."""
    q, k, v = q.double().cpu(), k.double().cpu(), v.double().cpu()
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    keep = keep.cpu()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1).nan_to_num(0.0)
    return probs @ v


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(b=st.integers(1, 3), hk=st.integers(1, 3), group=st.sampled_from([1, 2, 3]), slots=st.integers(1, 100),
       d=st.sampled_from([16, 32, 64]), shared_mask=st.booleans(), seed=st.integers(0, 2**16))
def test_decode_attention_matches_float64(device, dtype, b, hk, group, slots, d, shared_mask, seed):
    skip_without(device)
    hq = hk * group
    q = make((b, 1, hq, d), device, dtype, seed=seed).transpose(1, 2)  # the decoder's [B, T, H, D] view
    k, v = make((b, hk, slots, d), device, dtype, seed=seed + 1), make((b, hk, slots, d), device, dtype, seed=seed + 2)
    g = torch.Generator().manual_seed(seed)
    pad = torch.randint(0, slots, (1 if shared_mask else b,), generator=g)
    pos = torch.randint(0, slots, (1,), generator=g)
    mask = attention_mask(pos, key_valid(pad, slots)).to(device)  # some rows may have no key at all
    with torch.no_grad():
        out = ops.attention(q, k, v, causal=False, mask=mask, backend="decode")
    ref = attention64(q, k, v, mask[:, 0, 0, :].expand(b, slots))
    assert out.shape == (b, hq, 1, d) and out.dtype == dtype
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_attention_row_without_keys_is_zero():
    skip_without("cpu")
    q, k, v = torch.randn(2, 2, 1, 16), torch.randn(2, 1, 40, 16), torch.randn(2, 1, 40, 16)
    mask = torch.zeros(2, 1, 1, 40, dtype=torch.bool)
    mask[0, ..., 3:9] = True
    with torch.no_grad():
        out = ops.attention(q, k, v, causal=False, mask=mask, backend="decode")
    assert out[1].abs().max() == 0
    assert rel_err(out[:1], attention64(q[:1], k[:1], v[:1], mask[:1, 0, 0])) < TOL[torch.float32]


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(rows=st.integers(1, 9), dim=st.sampled_from([1, 7, 32, 100, 257]), has_residual=st.booleans(),
       has_weight=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_add_rms_norm_matches_float64(device, dtype, rows, dim, has_residual, has_weight, strided, seed):
    skip_without(device)
    x = make((rows, dim), device, dtype, strided=strided, seed=seed)
    r = make((rows, dim), device, dtype, seed=seed + 1) if has_residual else None
    w = make((dim,), device, dtype, seed=seed + 2) if has_weight else None
    with torch.no_grad():
        s, y = ops.add_rms_norm(x, r, w, 1e-6, backend="triton")
    # the sum is rounded to the input dtype before the norm, as an add then a norm would store it
    s_ref = x if r is None else (x.double() + r.double()).to(dtype)
    assert torch.equal(s, s_ref)
    y64 = rms_norm64(s_ref.double().cpu(), w.double().cpu() if w is not None else None)
    assert y.dtype == dtype and rel_err(y, y64) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(b=st.integers(1, 2), hk=st.integers(1, 3), group=st.sampled_from([1, 2]), t=st.integers(1, 4),
       slots=st.integers(4, 12), d=st.sampled_from([2, 16, 40]), seed=st.integers(0, 2**16))
def test_rope_into_cache_matches_float64(device, dtype, b, hk, group, t, slots, d, seed):
    skip_without(device)
    hq = hk * group
    q = make((b, t, hq, d), device, dtype, seed=seed).transpose(1, 2)
    k = make((b, t, hk, d), device, dtype, seed=seed + 1).transpose(1, 2)
    v = make((b, t, hk, d), device, dtype, seed=seed + 2).transpose(1, 2)
    ang = rope_angles(torch.randn(b, t, d // 2, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)))
    cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    where = torch.randperm(slots, generator=torch.Generator().manual_seed(seed + 3))[:t].sort().values
    k_buf, v_buf = make((b, hk, slots, d), device, dtype, seed=seed + 4), make((b, hk, slots, d), device, dtype,
                                                                             seed=seed + 5)
    k_before, v_before = k_buf.clone(), v_buf.clone()
    with torch.no_grad():
        qo = ops.rope_into_cache(q, k, v, cos, sin, k_buf, v_buf, where.to(device), backend="triton")
    q64, k64 = rope64(q.double().cpu(), k.double().cpu(), cos.double().cpu(), sin.double().cpu())
    assert rel_err(qo, q64) < TOL[dtype]
    assert rel_err(k_buf[:, :, where], k64) < TOL[dtype]
    assert torch.equal(v_buf[:, :, where], v)
    others = torch.ones(slots, dtype=torch.bool)
    others[where] = False
    assert torch.equal(k_buf[:, :, others], k_before[:, :, others])
    assert torch.equal(v_buf[:, :, others], v_before[:, :, others])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_rope_into_cache_never_writes_outside_the_cache(device):
    """Slots past either end of the cache are not written by the kernel (no store outside the
    buffers); the in-range ones still are, and q is rotated as usual."""
    skip_without(device)
    b, hk, t, d, slots = 2, 2, 4, 16, 6
    q, k, v = (make((b, t, hk, d), device, torch.float32, seed=s).transpose(1, 2) for s in (1, 2, 3))
    cos, sin = torch.ones(b, t, d, device=device), torch.zeros(b, t, d, device=device)
    # one buffer holds the k and v caches among others: writes past their ends would land in the others
    whole = make((6 * b, hk, slots, d), device, torch.float32, seed=4)
    before = whole.clone()
    k_buf, v_buf = whole[b:2 * b], whole[4 * b:5 * b]
    where = torch.tensor([-1, 2, slots, slots + 5], device=device)
    with torch.no_grad():
        qo = ops.rope_into_cache(q, k, v, cos, sin, k_buf, v_buf, where, backend="triton")
    assert torch.equal(qo, q)  # cos 1, sin 0: the identity rotation
    for lo, hi in ((0, b), (2 * b, 4 * b), (5 * b, 6 * b)):
        assert torch.equal(whole[lo:hi], before[lo:hi])
    assert torch.equal(k_buf[:, :, 2], k[:, :, 1]) and torch.equal(v_buf[:, :, 2], v[:, :, 1])
    kept = [0, 1, 3, 4, 5]
    assert torch.equal(k_buf[:, :, kept], before[b:2 * b][:, :, kept])
    assert torch.equal(v_buf[:, :, kept], before[4 * b:5 * b][:, :, kept])


def test_programmatic_launch_is_scoped_and_cuda_only():
    """Kernels take PDL launch options only inside ``programmatic_launch`` and only for CUDA tensors
    (on a Hopper or later GPU); the scope nests and restores."""
    from ghostvis.ops import kernels

    x = torch.zeros(2)
    assert kernels.pdl(x) == {}
    with kernels.programmatic_launch():
        assert kernels.pdl(x) == {}  # CPU tensors run in the interpreter: never PDL
        with kernels.programmatic_launch(False):
            assert not kernels._PDL_ON[0]
        assert kernels._PDL_ON[0]
        if torch.cuda.is_available():
            want = kernels.HAS_PDL and torch.cuda.get_device_capability()[0] >= 9
            assert kernels.pdl(x.cuda()) == ({"PDL": True, "launch_pdl": True} if want else {})
    assert not kernels._PDL_ON[0]
    if torch.cuda.is_available():
        assert kernels.pdl(x.cuda()) == {}


def test_decode_backends_are_picked_only_without_gradients(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w = torch.randn(3, 8), torch.randn(8)
    q, k = torch.randn(1, 2, 1, 16), torch.randn(1, 1, 5, 16)
    mask = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    with torch.no_grad():
        assert dispatch.choose("add_rms_norm", x, x, w, 1e-6).name == "triton"
        assert dispatch.choose("attention", q, k, k, causal=False, mask=mask).name == "decode"
    # add_rms_norm has a backward: it stays on Triton with gradients
    assert dispatch.choose("add_rms_norm", x, x, w.requires_grad_(), 1e-6).name == "triton"
    assert dispatch.choose("attention", q.requires_grad_(), k, k, causal=False, mask=mask).name != "decode"
    with torch.no_grad():
        # more than one query, or causal / packed attention, is not a cache lookup
        assert dispatch.choose("attention", torch.randn(1, 2, 5, 16), k, k, causal=False,
                               mask=torch.ones(1, 1, 5, 5, dtype=torch.bool)).name != "decode"
        assert dispatch.choose("attention", q, k, k, causal=True).name != "decode"


def test_decode_backends_are_not_picked_under_transforms(monkeypatch):
    """Inside torch.func transforms (and compiled ones) requires_grad does not tell: the references run."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w, x = torch.randn(8, 64, dtype=torch.float16), torch.randn(1, 64, dtype=torch.float16)
    seen = []

    def probe(w, x):
        seen.append(dispatch.choose("linear", x, w).name)
        return ops.linear(x, w).float().sum()

    torch.func.grad(probe)(w, x)
    torch.func.jvp(lambda w: probe(w, x), (w,), (torch.ones_like(w),))
    compiled = torch.compile(torch.func.grad(lambda w, x: ops.linear(x, w).float().sum()), fullgraph=True)
    g = compiled(w.float(), x.float())  # float32: the GEMV would not take it anyway; this checks tracing
    assert seen == ["reference", "reference"] and g.shape == w.shape
    with torch.no_grad():
        assert dispatch.choose("linear", x, w).name == "gemv"


@pytest.mark.parametrize("qwen", [False, True], ids=["llama", "qwen-qk-norm-bias"])
def test_generation_on_the_decode_kernels_equals_the_uncached_reference(monkeypatch, qwen):
    """Prefill and decode through the interpreted kernels (eager and compiled) give the reference tokens."""
    import dataclasses

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    cfg = gv.presets.get("tiny")
    if qwen:
        cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, qk_norm=True, qkv_bias=True,
                                                                tie_embeddings=True))
    params = gv.init(cfg, seed=4)
    if qwen:  # biases and q/k norm weights start at 0 and 1: move them so they matter
        g = torch.Generator().manual_seed(5)
        params = gv.tree_map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g), params)
    prompts = [[11, 12, 13, 14, 15], [20, 21]]
    with dispatch.use(rms_norm="reference", add_rms_norm="reference", swiglu="reference", rope="reference",
                      linear_cross_entropy="reference"):
        ref = [generate_uncached(params, cfg, p, max_new_tokens=5) for p in prompts]
    seen = set()
    real_call = dispatch.call

    def spy(op, *args, **kwargs):
        seen.add((op, dispatch.choose(op, *args, backend=kwargs.get("backend"),
                                      **{k: v for k, v in kwargs.items() if k != "backend"}).name))
        return real_call(op, *args, **kwargs)

    monkeypatch.setattr(dispatch, "call", spy)
    assert generate(params, cfg, prompts, max_new_tokens=5) == ref
    assert {("attention", "decode"), ("add_rms_norm", "triton"), ("rope_into_cache", "triton")} <= seen
    # compiled, the prefill's q/k norm sees transposed [B, H, T, D] views (T > 1): fake and real strides must
    # agree; the step runs on stacked projections, so each norm goes with the projection after it
    seen.clear()
    assert generate(params, cfg, prompts, max_new_tokens=5, compile=True) == ref
    assert ("add_rms_norm_linear", "unfused") in seen  # the prefill's rows
    assert [generate(params, cfg, [p], max_new_tokens=5, compile=True)[0] for p in prompts] == ref
    assert ("add_rms_norm_linear", "gemv") in seen  # a one-row decoding step
    assert (("add_rms_norm_qkv_cache", "gemv") in seen) == (not qwen)  # q/k norm sits between q/k/v and RoPE
    monkeypatch.setattr(dispatch, "call", real_call)


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(n=st.integers(1, 70), k=st.integers(1, 300), int8=st.booleans(), has_bias=st.booleans(),
       whole_strip=st.booleans(), seed=st.integers(0, 2**16))
def test_gemv_matches_float64(device, dtype, n, k, int8, has_bias, whole_strip, seed):
    """The one-row matmul kernel: bf16/fp16/fp32 or INT8 weights, with or without a bias, each
    program holding its whole strip of the weight (the default here) or looping over K."""
    from ghostvis.ops import fused

    skip_without(device)
    x = make((1, k), device, dtype, seed=seed)
    w = make((n, k), device, dtype, seed=seed + 1)
    scale = None
    if int8:
        w = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(seed)).to(device, torch.int8)
        scale = make((n,), device, dtype, seed=seed + 2, scale=0.01)
    bias = make((n,), device, dtype, seed=seed + 3) if has_bias else None
    config = None if whole_strip else (2, 64, 4)  # BLOCK_K 64: loops whenever k > 64
    y = fused.gemv_launch(x, w, scale, bias, torch.empty(1, n, device=device, dtype=dtype), config=config)
    w64 = w.double().cpu() * (scale.double().cpu()[:, None] if int8 else 1)
    y64 = x.double().cpu() @ w64.T + (bias.double().cpu() if has_bias else 0)
    assert rel_err(y, y64) < TOL[dtype] * (4 if int8 else 1)


@pytest.mark.gpu
def test_one_row_int8_linear_of_an_lm_head_size():
    """An INT8 LM head (more than 16K rows) takes its own launch: short blocks looped over K."""
    from ghostvis.ops import fused

    skip_without("cuda")
    n, k = 20001, 1000  # neither a whole number of programs nor of K blocks: both edges masked
    assert fused.gemv_config(n, k, torch.int8) == (8, 256, 4)
    x = make((1, 1, k), "cuda", torch.bfloat16, seed=0)
    w = torch.randint(-127, 128, (n, k), generator=torch.Generator().manual_seed(1)).to("cuda", torch.int8)
    scale = make((n,), "cuda", torch.bfloat16, seed=2, scale=0.01)
    with torch.no_grad():
        y = ops.int8_linear(x, w, scale)
    y64 = x.double().cpu()[0] @ (w.double().cpu() * scale.double().cpu()[:, None]).T
    assert rel_err(y[0], y64) < TOL[torch.bfloat16] * 4


@pytest.mark.parametrize("device,dtype", [c for c in CASES if c.values[1] != torch.float32])
def test_one_row_linear_takes_the_gemv_only_without_gradients(device, dtype, monkeypatch):
    skip_without(device)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, w, b = make((1, 1, 96), device, dtype), make((40, 96), device, dtype, seed=1), make((40,), device, dtype, seed=2)
    with torch.no_grad():
        assert dispatch.choose("linear", x, w, b).name == "gemv"
        assert dispatch.choose("linear", make((2, 96), device, dtype), w, b).name == "reference"  # two rows
        y = ops.linear(x, w, b)
    assert y.shape == (1, 1, 40)
    assert rel_err(y, x.double().cpu() @ w.double().cpu().T + b.double().cpu()) < TOL[dtype]
    assert dispatch.choose("linear", x, w.requires_grad_(), b).name == "reference"


def _row_and_weight(device, dtype, rows, k, seed, has_residual, has_norm_weight, int8, has_bias):
    """One row ``x`` ``[1, 1, k]``, its residual and norm weight (or None), a ``[rows, k]`` weight
    (INT8 with its per-row scale, or of ``dtype`` and no scale) and a bias (or None)."""
    x = make((1, 1, k), device, dtype, seed=seed)
    r = make((1, 1, k), device, dtype, seed=seed + 1) if has_residual else None
    nw = make((k,), device, dtype, seed=seed + 2) if has_norm_weight else None
    w = make((rows, k), device, dtype, seed=seed + 3, scale=k ** -0.5)
    scale = None
    if int8:
        w = torch.randint(-127, 128, (rows, k), generator=torch.Generator().manual_seed(seed)).to(device, torch.int8)
        scale = make((rows,), device, dtype, seed=seed + 4, scale=0.01 * k ** -0.5)
    bias = make((rows,), device, dtype, seed=seed + 5) if has_bias else None
    return x, r, nw, w, scale, bias


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(n=st.integers(1, 40), k=st.sampled_from([1, 7, 32, 100, 257]), int8=st.booleans(), gate=st.booleans(),
       has_residual=st.booleans(), has_norm_weight=st.booleans(), has_bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_add_rms_norm_linear_gemv_matches_float64(device, dtype, n, k, int8, gate, has_residual, has_norm_weight,
                                                  has_bias, seed):
    """Add, RMSNorm and the one-row projection in one kernel (with SwiGLU of the two halves when
    ``gate``), bf16/fp16/fp32 or INT8 weights, against float64."""
    skip_without(device)
    rows = 2 * n if gate else n
    x, r, nw, w, scale, bias = _row_and_weight(device, dtype, rows, k, seed, has_residual, has_norm_weight, int8,
                                               has_bias)
    with torch.no_grad():
        s, y = ops.add_rms_norm_linear(x, r, nw, w, 1e-6, scale=scale, bias=bias, gate=gate, backend="gemv")
    s_ref = x if r is None else (x.double() + r.double()).to(dtype)
    assert torch.equal(s, s_ref) and s.data_ptr() != x.data_ptr()
    h64 = rms_norm64(s_ref.double().cpu(), nw.double().cpu() if has_norm_weight else None)
    w64 = w.double().cpu() * (scale.double().cpu()[:, None] if int8 else 1)
    y64 = h64 @ w64.T + (bias.double().cpu() if has_bias else 0)
    if gate:
        y64 = swiglu64(y64[..., :n], y64[..., n:])
    assert y.shape == (1, 1, n) and y.dtype == dtype
    assert rel_err(y, y64) < TOL[dtype] * (4 if int8 or gate else 1)


@pytest.mark.parametrize("gate", [False, True])
def test_add_rms_norm_linear_backends_agree(gate, monkeypatch):
    """The fused kernel, the dispatched pieces and the plain-torch reference give the same row."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, r, nw = make((1, 48), "cpu", torch.float16), make((1, 48), "cpu", torch.float16, seed=1), \
        make((48,), "cpu", torch.float16, seed=2)
    w = make((40, 48), "cpu", torch.float16, seed=3, scale=0.1)
    with torch.no_grad():
        outs = {b: ops.add_rms_norm_linear(x, r, nw, w, 1e-6, gate=gate, backend=b)
                for b in ("gemv", "unfused", "reference")}
    for name in ("unfused", "reference"):
        assert torch.equal(outs[name][0], outs["gemv"][0])
        assert rel_err(outs[name][1], outs["gemv"][1]) < TOL[torch.float16]


def test_add_rms_norm_linear_takes_the_gemv_only_for_one_row_without_gradients(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, nw = torch.randn(1, 1, 64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    w = torch.randn(32, 64, dtype=torch.float16)
    with torch.no_grad():
        assert dispatch.choose("add_rms_norm_linear", x, x, nw, w, 1e-6, gate=True).name == "gemv"
        assert dispatch.choose("add_rms_norm_linear", x, None, None, w.to(torch.int8), 1e-6,
                               scale=torch.ones(32, dtype=torch.float16)).name == "gemv"
        # two rows; an odd stacked gate/up; INT8 without its scale; a weight of another dtype
        assert dispatch.choose("add_rms_norm_linear", x.expand(1, 2, 64).contiguous(), None, nw, w,
                               1e-6).name == "unfused"
        assert dispatch.choose("add_rms_norm_linear", x, None, nw, w[:31], 1e-6, gate=True).name == "unfused"
        assert dispatch.choose("add_rms_norm_linear", x, None, nw, w.to(torch.int8), 1e-6).name == "unfused"
        assert dispatch.choose("add_rms_norm_linear", x, None, nw, w.float(), 1e-6).name == "unfused"
    assert dispatch.choose("add_rms_norm_linear", x, x, nw.requires_grad_(), w, 1e-6).name == "unfused"
    with pytest.raises(RuntimeError, match="cannot run"):
        ops.add_rms_norm_linear(x.expand(1, 2, 64).contiguous(), None, nw.detach(), w, backend="gemv")


def _qkv_cache_case(device, dtype, hk, group, d, k, n_slots, seed, int8=False, has_bias=False):
    rows = (hk * group + 2 * hk) * d
    x, r, nw, w, scale, bias = _row_and_weight(device, dtype, rows, k, seed, True, True, int8, has_bias)
    pos = torch.tensor([[seed % 50]], device=device)
    cos, sin = _rope_tables(d, pos)
    caches = [make((1, hk, n_slots, d), device, dtype, seed=seed + 6 + i) for i in range(2)]
    return x, r, nw, w, scale, bias, cos, sin, caches


def _rope_tables(d, pos):
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, device=pos.device, dtype=torch.float32) / d))
    emb = rope_angles(pos.float()[..., None] * inv)
    return emb.cos(), emb.sin()


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(hk=st.integers(1, 2), group=st.sampled_from([1, 2, 3]), d=st.sampled_from([2, 16, 32]),
       k=st.sampled_from([7, 32, 100]), n_slots=st.integers(1, 12), slot=st.integers(-1, 12), int8=st.booleans(),
       has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_add_rms_norm_qkv_cache_matches_the_reference(device, dtype, hk, group, d, k, n_slots, slot, int8, has_bias,
                                                      seed):
    """Add, norm, the q/k/v projection, RoPE and the cache writes in one kernel, against the same
    steps in float64: q, the cache column at the slot, and every other column (and every column
    when the slot is outside the cache) left as it was."""
    skip_without(device)
    x, r, nw, w, scale, bias, cos, sin, (kb, vb) = _qkv_cache_case(device, dtype, hk, group, d, k, n_slots, seed,
                                                                   int8, has_bias)
    slots = torch.tensor([slot], device=device)
    kb0, vb0 = kb.clone(), vb.clone()
    with torch.no_grad():
        s, q = ops.add_rms_norm_qkv_cache(x, r, nw, w, 1e-6, cos, sin, kb, vb, slots, scale=scale, bias=bias,
                                          backend="gemv")
    c64 = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    kb64, vb64 = c64(kb0), c64(vb0)
    s64, q64 = ops.reference.add_rms_norm_qkv_cache(  # (the reference takes slots inside the cache only)
        c64(x), c64(r), c64(nw), c64(w), 1e-6, c64(cos), c64(sin), kb64, vb64, slots.cpu().clamp(0, n_slots - 1),
        scale=c64(scale), bias=c64(bias))
    assert torch.equal(s, (x.double() + r.double()).to(dtype))
    tol = TOL[dtype] * (4 if int8 else 1)
    assert q.shape == (1, hk * group, 1, d) and rel_err(q, q64) < tol
    inside = 0 <= slot < n_slots
    others = [i for i in range(n_slots) if i != slot]
    assert torch.equal(kb[:, :, others], kb0[:, :, others]) and torch.equal(vb[:, :, others], vb0[:, :, others])
    if inside:
        assert rel_err(kb[:, :, slot], kb64[:, :, slot]) < tol and rel_err(vb[:, :, slot], vb64[:, :, slot]) < tol


def test_add_rms_norm_qkv_cache_backends_agree_and_pick(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x, r, nw, w, _, bias, cos, sin, (kb, vb) = _qkv_cache_case("cpu", torch.float16, 2, 2, 16, 48, 8, 3,
                                                               has_bias=True)
    slots = torch.tensor([5])
    outs = {}
    with torch.no_grad():
        assert dispatch.choose("add_rms_norm_qkv_cache", x, r, nw, w, 1e-6, cos, sin, kb, vb, slots,
                               bias=bias).name == "gemv"
        # two rows: the dispatched pieces
        x2 = x.expand(1, 2, 48).contiguous()
        assert dispatch.choose("add_rms_norm_qkv_cache", x2, None, nw, w, 1e-6, cos, sin, kb, vb, slots,
                               bias=bias).name == "unfused"
        for name in ("gemv", "unfused", "reference"):
            k_copy, v_copy = kb.clone(), vb.clone()
            s, q = ops.add_rms_norm_qkv_cache(x, r, nw, w, 1e-6, cos, sin, k_copy, v_copy, slots, bias=bias,
                                              backend=name)
            outs[name] = (s, q, k_copy, v_copy)
    for name in ("unfused", "reference"):
        assert torch.equal(outs[name][0], outs["gemv"][0])
        for a, b in zip(outs[name][1:], outs["gemv"][1:]):
            assert rel_err(a, b) < TOL[torch.float16]
    assert dispatch.choose("add_rms_norm_qkv_cache", x, r, nw.requires_grad_(), w, 1e-6, cos, sin, kb, vb,
                           slots).name == "unfused"


@pytest.mark.parametrize("rows_per_program", [2, 4, 8])
def test_fused_gemvs_with_programs_of_several_rows(rows_per_program, monkeypatch):
    """Programs holding several rows (as the INT8 gate/up at d20 does), whose row pairs straddle
    heads (head dim 10: five pairs a head), against the dispatched pieces: q and the cache
    column for the q/k/v op, and SwiGLU's output for the gated one."""
    from ghostvis.ops import decode

    skip_without("cpu")
    monkeypatch.setattr(decode, "norm_gemv_config", lambda n, k, dtype, gate: (rows_per_program, 64, 4))
    for int8 in (False, True):
        x, r, nw, w, scale, bias, cos, sin, (kb, vb) = _qkv_cache_case("cpu", torch.float32, 2, 2, 10, 48, 6, 7,
                                                                       int8, has_bias=True)
        slots = torch.tensor([4])
        outs = {}
        with torch.no_grad():
            for name in ("gemv", "unfused"):
                k_copy, v_copy = kb.clone(), vb.clone()
                _, q = ops.add_rms_norm_qkv_cache(x, r, nw, w, 1e-6, cos, sin, k_copy, v_copy, slots, scale=scale,
                                                  bias=bias, backend=name)
                _, act = ops.add_rms_norm_linear(x, r, nw, w, 1e-6, scale=scale, bias=bias, gate=True, backend=name)
                outs[name] = (q, k_copy, v_copy, act)
        for fast, want in zip(outs["gemv"], outs["unfused"]):
            assert rel_err(fast, want) < TOL[torch.float32] * (4 if int8 else 1)
