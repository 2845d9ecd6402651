"""The Triton kernels against float64 oracles, and their composition with torch transforms.

On CPU the kernels run in Triton's interpreter (fp32/fp16, tiny shapes); on a
GPU the same property tests run in fp32/fp16/bf16 with the real compiler (the
``gpu``-marked parameters). Every comparison is ``|fast - oracle| / |oracle|``
against a float64 oracle written out here, at a tolerance per dtype.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ghostvis.ops as ops
from ghostvis.ops import dispatch
from ghostvis.ops import linear_ce as lce

pytestmark = pytest.mark.skipif(not ops.HAS_TRITON, reason="needs triton")

GPU = pytest.mark.gpu
CASES = [
    pytest.param("cpu", torch.float32, id="cpu-fp32"),
    pytest.param("cpu", torch.float16, id="cpu-fp16"),
    pytest.param("cuda", torch.float32, id="cuda-fp32", marks=GPU),
    pytest.param("cuda", torch.float16, id="cuda-fp16", marks=GPU),
    pytest.param("cuda", torch.bfloat16, id="cuda-bf16", marks=GPU),
]
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 2.5e-2}
# the interpreter is slow: a smaller example budget on CPU, the profile's on GPU
budget = settings(max_examples=5) if not torch.cuda.is_available() else settings()
GRAD_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.bfloat16: 4e-2}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    assert torch.isfinite(a).all(), "non-finite values in the fast result"
    # a floor keeps exact-zero oracles (e.g. RMSNorm's dx at dim 1) from dividing by ~0
    return ((a - b).norm() / b.norm().clamp(min=1e-2 * b.numel() ** 0.5)).item()


def make(shape, device, dtype, *, strided=False, seed=0, scale=1.0):
    """A random tensor; ``strided`` gives one whose rows are not packed (a slice of a wider one)."""
    g = torch.Generator().manual_seed(seed)
    if strided:
        wide = torch.randn(*shape[:-1], shape[-1] + 5, generator=g) * scale
        return wide[..., 2:2 + shape[-1]].to(device=device, dtype=dtype)
    return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)


def grads64(fn, inputs, grad_out):
    """Outputs and input gradients of ``fn`` evaluated in float64 on CPU."""
    xs = [t.detach().double().cpu().requires_grad_() for t in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    gs = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    grads = torch.autograd.grad(outs, xs, [g.double().cpu() for g in gs])
    return out, grads


def fast_grads(fn, inputs, grad_out):
    xs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*xs)
    outs = out if isinstance(out, tuple) else (out,)
    gs = grad_out if isinstance(grad_out, tuple) else (grad_out,)
    return out, torch.autograd.grad(outs, xs, gs)


def _triton_version() -> tuple[int, int]:
    import triton
    return tuple(int(p) for p in triton.__version__.split(".")[:2])


def skip_without(device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    if device == "cpu" and _triton_version() < (3, 7):
        pytest.skip("triton < 3.7's CPU interpreter cannot run kernels with runtime loops")


# ----------------------------------------------------------------------------- oracles (float64)


def rms_norm64(x, w=None, eps=1e-6):
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def swiglu64(g, u):
    return g * torch.sigmoid(g) * u


def rope64(q, k, cos, sin):
    def rot(x):
        x1, x2 = x.chunk(2, -1)
        return torch.cat((-x2, x1), -1)
    c, s = cos[:, None], sin[:, None]
    return q * c + rot(q) * s, k * c + rot(k) * s


def lce64(h, w, t, ignore_index=-100, reduction="mean"):
    logits = h @ w.T
    losses = torch.nn.functional.cross_entropy(logits, t, ignore_index=ignore_index, reduction="none")
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (t != ignore_index).sum().clamp(min=1)


# ----------------------------------------------------------------------------- rms_norm


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(rows=st.integers(1, 9), dim=st.sampled_from([1, 7, 32, 100, 257, 1000]),
       has_weight=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_rms_norm_matches_float64(device, dtype, rows, dim, has_weight, strided, seed):
    skip_without(device)
    x = make((rows, dim), device, dtype, strided=strided, seed=seed)
    inputs = [x] + ([make((dim,), device, dtype, seed=seed + 1)] if has_weight else [])
    dy = make((rows, dim), device, dtype, seed=seed + 2)
    y, grads = fast_grads(lambda *a: ops.rms_norm(*a, backend="triton"), inputs, dy)
    y64, grads64_ = grads64(rms_norm64, inputs, dy)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, y64) < TOL[dtype]
    for i, (g, g64) in enumerate(zip(grads, grads64_)):
        tol = GRAD_TOL[dtype] * (4 if g.dim() == 1 and dtype != torch.float32 else 1)
        if i == 0 and dim == 1:
            # at dim 1, dx is the difference of two terms of size |dy| * rstd that nearly cancel:
            # its error is measured against those terms, not against the tiny result
            terms = (dy.double().cpu() * torch.rsqrt(x.double().cpu() ** 2 + 1e-6)).norm()
            assert ((g.double().cpu() - g64).norm() / terms).item() < tol
        else:
            assert rel_err(g, g64) < tol


@pytest.mark.parametrize("device,dtype", CASES[:1] + CASES[2:])
def test_rms_norm_large_hidden_and_3d(device, dtype):
    skip_without(device)
    x = make((2, 3, 4096), device, dtype).transpose(0, 1)  # non-contiguous leading dims
    w = make((4096,), device, dtype, seed=3)
    y = ops.rms_norm(x, w, backend="triton")
    assert rel_err(y, rms_norm64(x.double().cpu(), w.double().cpu())) < TOL[dtype]


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(rows=st.integers(1, 9), dim=st.sampled_from([7, 32, 257, 1000]), has_weight=st.booleans(), use_s=st.booleans(),
       strided=st.booleans(), seed=st.integers(0, 2**16))
def test_add_rms_norm_grads_match_float64(device, dtype, rows, dim, has_weight, use_s, strided, seed):
    """The training form of add + RMSNorm: gradients of x, residual and weight (through s and y, or
    through y alone, where the backward has no incoming gradient of s)."""
    skip_without(device)
    x = make((rows, dim), device, dtype, strided=strided, seed=seed)
    r = make((rows, dim), device, dtype, seed=seed + 1)
    inputs = [x, r] + ([make((dim,), device, dtype, seed=seed + 2)] if has_weight else [])
    dy, ds = make((rows, dim), device, dtype, seed=seed + 3), make((rows, dim), device, dtype, seed=seed + 4)

    def fast(*a):
        s, y = ops.add_rms_norm(a[0], a[1], a[2] if has_weight else None, 1e-6, backend="triton")
        return (y, s) if use_s else y

    def ref(*a):
        s = a[0] + a[1]
        y = rms_norm64(s, a[2] if has_weight else None)
        return (y, s) if use_s else y

    grad_out = (dy, ds) if use_s else dy
    out, grads = fast_grads(fast, inputs, grad_out)
    out64, g64 = grads64(ref, inputs, grad_out)
    y, y64 = (out[0], out64[0]) if use_s else (out, out64)
    assert rel_err(y, y64) < TOL[dtype]
    for g, ref_g in zip(grads, g64):
        tol = GRAD_TOL[dtype] * (4 if g.dim() == 1 and dtype != torch.float32 else 1)
        assert rel_err(g, ref_g) < tol


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
@pytest.mark.parametrize("dim", [768, 1000, 1280, 2048])
def test_rms_norm_backward_launch_over_many_rows(device, dim):
    """Widths 513-2048 run the backward two rows per iteration. Odd row counts (a masked row in the
    last pair), several iterations per program and, on a GPU, one program per SM (long loops
    adding up the weight gradient) must all give float64's gradients, the residual's included."""
    skip_without(device)
    from ghostvis.ops import fused

    assert fused._rms_bwd_shape(dim)[0] == 2
    for rows in [1, 3, 37] + ([4097] if device == "cuda" else []):
        for per_sm in [None, 1] if device == "cuda" else [None]:
            x, dy, ds = (make((rows, dim), device, torch.float32, seed=rows + i) for i in range(3))
            w = make((dim,), device, torch.float32, seed=rows + 3)
            _, _, rstd = fused.rms_norm_launch(x, None, w, 1e-6)
            dx, dw = fused.rms_norm_bwd_launch(dy, x, w, rstd, ds, per_sm=per_sm)
            _, (dx64, dw64) = grads64(rms_norm64, [x, w], dy)
            assert rel_err(dx, dx64 + ds.double().cpu()) < 1e-4, (rows, per_sm)
            assert rel_err(dw, dw64) < 1e-4, (rows, per_sm)


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float16), pytest.param("cuda", torch.bfloat16, marks=GPU)])
def test_add_rms_norm_takes_a_narrower_residual(device, dtype):
    """Under autocast the residual stream is float32 and each branch output half precision: the fused
    op takes them as ``x + residual`` would (sum in float32), and the residual's gradient comes back
    in its own dtype."""
    skip_without(device)
    from ghostvis.ops import fused

    x, r = make((5, 96), device, torch.float32, seed=1), make((5, 96), device, dtype, seed=2)
    w = make((96,), device, torch.float32, seed=3)
    dy, ds = make((5, 96), device, torch.float32, seed=4), make((5, 96), device, torch.float32, seed=5)
    assert fused.add_rms_norm_ok(x, r, w, 1e-6)
    out, grads = fast_grads(lambda *a: ops.add_rms_norm(*a, 1e-6, backend="triton")[::-1], [x, r, w], (dy, ds))
    out64, g64 = grads64(lambda a, b, c: (rms_norm64(a + b, c), a + b), [x, r, w], (dy, ds))
    assert out[1].dtype == out[0].dtype == torch.float32 and grads[1].dtype == dtype
    assert rel_err(out[0], out64[0]) < 1e-4 and rel_err(out[1], out64[1]) < 1e-5
    for g, ref_g, tol in zip(grads, g64, (1e-4, GRAD_TOL[dtype], 1e-4)):
        assert rel_err(g, ref_g) < tol
    # a residual wider than x would change the sum's dtype: that one is left to the reference
    assert not fused.add_rms_norm_ok(r, x, None, 1e-6)


def test_fake_impls_give_the_kernels_shapes_and_strides():
    """torch.compile plans memory from the fake impls: their outputs must match the kernels' layouts,
    including for transposed inputs (the q/k norm of qk-norm models sees ``[B, H, T, D]`` views)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ghostvis.ops import fused, mlp

    x = torch.randn(2, 5, 3, 8).transpose(1, 2)
    w, dy, r = torch.randn(8), torch.randn(2, 3, 5, 8), torch.randn(2, 3, 5, 8)
    _, rstd = fused.rms_norm_fwd(x, w, 1e-6)
    s, _, rstd_s = fused.add_rms_norm_fwd(x, r, w, 1e-6)
    qkv, gu = torch.randn(2, 5, 4 * 8)[..., :32], torch.randn(2, 5, 12)
    cos, sin = torch.randn(5, 8), torch.randn(5, 8)
    q, k, v = fused.qkv_rope_fwd(qkv, cos, sin, 2, 1)
    x8, wgu, wd = torch.randn(2, 5, 8), torch.randn(16, 8), torch.randn(8, 8)
    saved = mlp.swiglu_mlp_fwd(x8, wgu, wd)[1:]
    x8p = torch.randn(5, 2, 8).transpose(0, 1)  # a permuted input: the gradient is still contiguous
    cases = [(fused.rms_norm_fwd, (x, w, 1e-6)), (fused.rms_norm_bwd, (dy, x, w, rstd)),
             (fused.add_rms_norm_fwd, (x, r, w, 1e-6)), (fused.add_rms_norm_bwd, (dy, None, s, w, rstd_s)),
             (fused.add_rms_norm_bwd, (dy.transpose(1, 2), dy, s, None, rstd_s)),
             (fused.rope_fwd, (x, x[:, :1], cos, sin)), (fused.rope_bwd, (x, x[:, :1], cos, sin)),
             (fused.qkv_rope_fwd, (qkv, cos, sin, 2, 1)), (fused.qkv_rope_bwd, (q, k, v, cos, sin)),
             (fused.swiglu_stacked_fwd, (gu,)), (fused.swiglu_stacked_bwd, (torch.randn(2, 5, 6), gu)),
             (mlp.swiglu_mlp_fwd, (x8, wgu, wd)), (mlp.swiglu_mlp_bwd, (x8, x8, wgu, wd, *saved, True)),
             (mlp.swiglu_mlp_bwd, (x8, x8, wgu, wd, *saved, False)),
             (mlp.swiglu_mlp_bwd, (x8, x8p, wgu, wd, *saved, True)),
             (mlp.swiglu_mlp_bwd, (x8, x8, wgu.t().contiguous().t(), wd, *saved, True))]
    for op, args in cases:
        real = op(*args)
        with FakeTensorMode() as mode:
            fake = op(*(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args))
        for a, f in zip(real if isinstance(real, tuple) else (real,), fake if isinstance(fake, tuple) else (fake,)):
            assert (a.shape, a.stride(), a.dtype) == (f.shape, f.stride(), f.dtype), op


def test_lower_as_fallbacks_registers_every_kernel_with_inductor():
    """The compile transforms register the custom ops with inductor up front (deep training graphs
    stalled inductor's own first-use registration on torch 2.11), with the layout constraint
    inductor's first-use registration would have chosen."""
    from torch._inductor import lowering as L

    from ghostvis.ops.library import lower_as_fallbacks

    lower_as_fallbacks()
    ops_ = [getattr(getattr(torch.ops.ghostvis, n), o) for n in dir(torch.ops.ghostvis)
            if isinstance(getattr(torch.ops.ghostvis, n), torch._ops.OpOverloadPacket)
            for o in getattr(torch.ops.ghostvis, n).overloads()]
    names = {op.name() for op in ops_}
    assert {"ghostvis::add_rms_norm", "ghostvis::add_rms_norm_bwd", "ghostvis::rms_norm_bwd",
            "ghostvis::qkv_rope_bwd", "ghostvis::swiglu_stacked_bwd"} <= names
    missing = [op.name() for op in ops_ if op not in L.lowerings]
    assert not missing, missing
    for op in ops_:  # the layout constraint inductor's own first-use registration would pick
        want = L.tag_to_layout_constraint(L.get_layout_constraint_tag(op, with_default=True))
        assert L.maybe_layout_constraints(op) is want, op.name()
    lower_as_fallbacks()  # a second call changes nothing


# ----------------------------------------------------------------------------- swiglu


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(rows=st.integers(1, 6), cols=st.sampled_from([1, 5, 64, 129, 700]), fused_input=st.booleans(),
       seed=st.integers(0, 2**16))
def test_swiglu_matches_float64(device, dtype, rows, cols, fused_input, seed):
    skip_without(device)
    if fused_input:  # gate and up as the two halves of one projection: strided views
        both = make((rows, 2 * cols), device, dtype, seed=seed, scale=3.0)
        gate, up = both[:, :cols], both[:, cols:]
    else:
        gate = make((rows, cols), device, dtype, seed=seed, scale=3.0)
        up = make((rows, cols), device, dtype, seed=seed + 1)
    dy = make((rows, cols), device, dtype, seed=seed + 2)
    y, grads = fast_grads(lambda g, u: ops.swiglu(g, u, backend="triton"), [gate, up], dy)
    y64, g64 = grads64(swiglu64, [gate, up], dy)
    assert rel_err(y, y64) < TOL[dtype]
    for a, b in zip(grads, g64):
        assert rel_err(a, b) < GRAD_TOL[dtype]


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(lead=st.sampled_from([(3,), (2, 3), (1, 1)]), cols=st.sampled_from([1, 5, 64, 129]), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_swiglu_stacked_matches_float64(device, dtype, lead, cols, strided, seed):
    skip_without(device)
    gate_up = make((*lead, 2 * cols), device, dtype, strided=strided, seed=seed, scale=3.0)
    dy = make((*lead, cols), device, dtype, seed=seed + 2)
    y, (g,) = fast_grads(lambda a: ops.swiglu_stacked(a, backend="triton"), [gate_up], dy)
    y64, (g64,) = grads64(lambda a: swiglu64(*a.chunk(2, -1)), [gate_up], dy)
    assert y.shape == (*lead, cols) and g.shape == gate_up.shape and g.is_contiguous()
    assert rel_err(y, y64) < TOL[dtype]
    assert rel_err(g, g64) < GRAD_TOL[dtype]


# ----------------------------------------------------------------------------- swiglu_mlp


def swiglu_mlp64(x, w_gate_up, w_down):
    return swiglu64(*(x @ w_gate_up.T).chunk(2, -1)) @ w_down.T


def mlp_inputs(lead, dim, ffn, device, dtype, seed):
    x = make((*lead, dim), device, dtype, seed=seed)
    w_gate_up = make((2 * ffn, dim), device, dtype, seed=seed + 1, scale=2 * dim ** -0.5)
    w_down = make((dim, ffn), device, dtype, seed=seed + 2, scale=ffn ** -0.5)
    return x, w_gate_up, w_down, make((*lead, dim), device, dtype, seed=seed + 3)


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(lead=st.sampled_from([(3,), (2, 5), (1, 1), (37,)]), dim=st.sampled_from([8, 16, 40]),
       ffn=st.sampled_from([8, 32, 48]), fuse_forward=st.booleans(), seed=st.integers(0, 2**16))
def test_swiglu_mlp_matches_float64(device, dtype, lead, dim, ffn, fuse_forward, seed):
    """The MLP op with SwiGLU's backward in the down projection's input-gradient matmul (and, with
    ``fuse_forward``, its forward in the gate/up matmul): output and all three gradients."""
    from ghostvis.ops import mlp

    skip_without(device)
    x, w_gate_up, w_down, dy = mlp_inputs(lead, dim, ffn, device, dtype, seed)
    with mlp.fuse_gate_up(fuse_forward):
        y, grads = fast_grads(lambda *a: ops.swiglu_mlp(*a, backend="epilogue"), [x, w_gate_up, w_down], dy)
    y64, g64 = grads64(swiglu_mlp64, [x, w_gate_up, w_down], dy)
    assert y.shape == x.shape and y.dtype == dtype
    assert rel_err(y, y64) < TOL[dtype]
    for a, b, name in zip(grads, g64, ("x", "w_gate_up", "w_down")):
        assert a.shape == b.shape, name
        assert rel_err(a, b) < GRAD_TOL[dtype], name


@pytest.mark.parametrize("split", [0, 1])
def test_swiglu_backward_matmul_epilogue_whole_and_split(split):
    """The backward matmul's epilogue on the whole tile and on its column halves in turn, with
    tiles past the row and column edges (CPU interpreter, explicit launch shapes)."""
    from ghostvis.ops import mlp

    x, _, w_down, dy = mlp_inputs((37,), 40, 48, "cpu", torch.float32, split)
    gate_up = make((37, 96), "cpu", torch.float32, seed=9, scale=2.0)
    dgu = mlp.swiglu_bwd_matmul_launch(dy, w_down, gate_up, config=(16, 32, 16, 2, 4, 1, split))
    g64 = gate_up.double().requires_grad_()
    swiglu64(*g64.chunk(2, -1)).backward(dy.double() @ w_down.double())
    assert rel_err(dgu, g64.grad) < GRAD_TOL[torch.float32]


@pytest.mark.parametrize("device,dtype", CASES)
def test_swiglu_mlp_with_frozen_weights_gives_the_input_gradient(device, dtype, monkeypatch):
    """Weights that need no gradient (a frozen decoder under a trained connector) skip their
    weight-gradient matmuls; the input's gradient is unchanged."""
    from ghostvis.ops import mlp

    skip_without(device)
    x, w_gate_up, w_down, dy = mlp_inputs((2, 9), 24, 40, device, dtype, 3)
    seen, real = [], mlp.swiglu_mlp_backward

    def spy(*args):
        seen.append(args[-1])  # weight_grads
        return real(*args)

    monkeypatch.setattr(mlp, "swiglu_mlp_backward", spy)
    xr = x.clone().requires_grad_()
    (dx,) = torch.autograd.grad(ops.swiglu_mlp(xr, w_gate_up, w_down, backend="epilogue"), [xr], dy)
    _, (dx64,) = grads64(lambda a: swiglu_mlp64(a, w_gate_up.double().cpu(), w_down.double().cpu()), [x], dy)
    assert seen == [False]
    assert rel_err(dx, dx64) < GRAD_TOL[dtype]


@GPU
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,dim,ffn", [(300, 200, 296), (1000, 256, 384), (129, 64, 136)])
def test_swiglu_mlp_at_the_gpu_tile_sizes(dtype, rows, dim, ffn):
    """The CUDA launch shapes (128-row tiles, 64-deep K steps): edges of every kind, K a multiple of
    the step and not, against float64; the forward fused and not."""
    from ghostvis.ops import mlp

    skip_without("cuda")
    x, w_gate_up, w_down, dy = mlp_inputs((rows,), dim, ffn, "cuda", dtype, rows)
    y64, g64 = grads64(swiglu_mlp64, [x, w_gate_up, w_down], dy)
    for fuse_forward in (False, True):
        with mlp.fuse_gate_up(fuse_forward):
            y, grads = fast_grads(lambda *a: ops.swiglu_mlp(*a, backend="epilogue"), [x, w_gate_up, w_down], dy)
        assert rel_err(y, y64) < TOL[dtype]
        for a, b in zip(grads, g64):
            assert rel_err(a, b) < GRAD_TOL[dtype]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_swiglu_mlp_runs_its_pieces_unless_forced(device):
    """The fused MLP op measured slower than its pieces at d20, so nothing picks it unasked: not
    bf16 training on CUDA, not inference; forced, it takes only shapes its tensor descriptors can."""
    from ghostvis.ops import mlp

    skip_without(device)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    x, w_gate_up, w_down, _ = mlp_inputs((4,), 16, 24, device, dtype, 0)
    assert dispatch.choose("swiglu_mlp", x.requires_grad_(), w_gate_up, w_down).name == "unfused"
    with torch.no_grad():
        assert dispatch.choose("swiglu_mlp", x, w_gate_up, w_down).name == "unfused"
    assert dispatch.choose("swiglu_mlp", x, w_gate_up, w_down, backend="epilogue").name == "epilogue"
    with ops.use(swiglu_mlp="epilogue"):
        assert dispatch.choose("swiglu_mlp", x, w_gate_up, w_down).name == "epilogue"
    torch.testing.assert_close(ops.swiglu_mlp(x, w_gate_up, w_down),
                               ops.swiglu_mlp(x, w_gate_up, w_down, backend="reference"))
    with pytest.raises(RuntimeError, match="cannot run these inputs"):
        ops.swiglu_mlp(x, w_gate_up[:-1], w_down, backend="epilogue")
    # fp16 rows of 12 elements are 24 bytes: not a whole number of 16-byte units for a tensor descriptor
    h, w_gate_up, w_down, _ = mlp_inputs((4,), 12, 8, device, torch.float16, 0)
    assert not mlp.swiglu_mlp_ok(h, w_gate_up, w_down)
    assert mlp.swiglu_mlp_ok(*mlp_inputs((4,), 16, 8, device, torch.float16, 0)[:3])
    # under autocast its matmuls would run in another dtype than its inputs': the pieces take it
    with torch.autocast(device, dtype=torch.bfloat16):
        assert not mlp.swiglu_mlp_ok(*mlp_inputs((4,), 16, 8, device, torch.float32, 0)[:3])


# ----------------------------------------------------------------------------- rope


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(b=st.integers(1, 2), hk=st.integers(1, 3), group=st.sampled_from([1, 2, 3]), t=st.integers(1, 5),
       d=st.sampled_from([2, 6, 16, 40]), bhtd_layout=st.booleans(), shared_tables=st.booleans(),
       seed=st.integers(0, 2**16))
def test_rope_matches_float64(device, dtype, b, hk, group, t, d, bhtd_layout, shared_tables, seed):
    skip_without(device)
    hq = hk * group
    if bhtd_layout:
        q, k = make((b, hq, t, d), device, dtype, seed=seed), make((b, hk, t, d), device, dtype, seed=seed + 1)
    else:  # [B, T, H, D] projections viewed as [B, H, T, D]: the decoder's layout
        q = make((b, t, hq, d), device, dtype, seed=seed).transpose(1, 2)
        k = make((b, t, hk, d), device, dtype, seed=seed + 1).transpose(1, 2)
    pos = torch.arange(t, dtype=torch.float64)[None].expand(1 if shared_tables else b, t) + seed % 7
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = rope_angles(pos[..., None] * inv)
    cos, sin = ang.cos().float().to(device), ang.sin().float().to(device)
    dq, dk = make(q.shape, device, dtype, seed=seed + 2), make(k.shape, device, dtype, seed=seed + 3)
    (qo, ko), (gq, gk) = fast_grads(lambda a, c: ops.rope(a, c, cos, sin, backend="triton"), [q, k], (dq, dk))
    (q64, k64), (gq64, gk64) = grads64(lambda a, c: rope64(a, c, cos.double().cpu(), sin.double().cpu()),
                                       [q, k], (dq, dk))
    for a, ref in ((qo, q64), (ko, k64)):
        assert rel_err(a, ref) < TOL[dtype]
    for a, ref in ((gq, gq64), (gk, gk64)):
        assert rel_err(a, ref) < GRAD_TOL[dtype]


def rope_angles(half):
    """Both halves of a RoPE angle table from its first half ``[..., D/2]``.

    A model's table repeats the first half, so a kernel that read one half where it should
    read the other would pass every test on it. Here the second half differs (scaled and
    shifted), and the references apply the table element by element, as the contract says.
    """
    return torch.cat([half, half * 1.3 + 0.5], -1)


def rope_tables64(b, t, d, offset=0):
    pos = torch.arange(t, dtype=torch.float64)[None].expand(b, t) + offset
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = rope_angles(pos[..., None] * inv)
    return ang.cos(), ang.sin()


def qkv_rope64(qkv, cos, sin, hq, hk):
    x = qkv.unflatten(-1, (hq + 2 * hk, qkv.shape[-1] // (hq + 2 * hk))).transpose(1, 2)
    q, k, v = x.split([hq, hk, hk], dim=1)
    return (*rope64(q, k, cos, sin), v)


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(b=st.integers(1, 2), hk=st.integers(1, 3), group=st.sampled_from([1, 2, 3]), t=st.integers(1, 5),
       d=st.sampled_from([2, 6, 16]), shared_tables=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_qkv_rope_matches_float64(device, dtype, b, hk, group, t, d, shared_tables, strided, seed):
    skip_without(device)
    hq = hk * group
    qkv = make((b, t, (hq + 2 * hk) * d), device, dtype, strided=strided, seed=seed)
    cos, sin = rope_tables64(1 if shared_tables else b, t, d, offset=seed % 7)
    heads = [make(s, device, dtype, seed=seed + 2 + i) for i, s in enumerate(((b, hq, t, d), (b, hk, t, d),
                                                                               (b, hk, t, d)))]
    out, (g,) = fast_grads(lambda a: ops.qkv_rope(a, cos.float().to(device), sin.float().to(device), hq, hk,
                                                  backend="triton"), [qkv], tuple(heads))
    out64, (g64,) = grads64(lambda a: qkv_rope64(a, cos, sin, hq, hk), [qkv], tuple(heads))
    for a, ref in zip(out, out64):
        assert a.shape == ref.shape and a.transpose(1, 2).is_contiguous()  # laid out [B, T, H, D]
        assert rel_err(a, ref) < TOL[dtype]
    assert g.shape == qkv.shape and g.is_contiguous()
    assert rel_err(g, g64) < GRAD_TOL[dtype]


def test_qkv_rope_unused_outputs_give_zero_grads():
    qkv = torch.randn(1, 3, 4 * 8, requires_grad=True)
    cos, sin = (t.float() for t in rope_tables64(1, 3, 8))
    q, _, v = ops.qkv_rope(qkv, cos, sin, 2, 1, backend="triton")
    g = torch.autograd.grad((q.sum() + v.sum()), qkv)[0]
    ref = torch.autograd.grad(sum(o.sum() for o in ops.reference.qkv_rope(qkv, cos, sin, 2, 1)[::2]), qkv)[0]
    assert rel_err(g, ref) < 1e-5 and torch.count_nonzero(g[..., 16:24]) == 0


def test_rope_only_q_used_gives_k_zero_grad():
    q, k = torch.randn(1, 2, 3, 8, requires_grad=True), torch.randn(1, 1, 3, 8, requires_grad=True)
    cos, sin = torch.randn(3, 8), torch.randn(3, 8)
    qo, _ = ops.rope(q, k, cos, sin, backend="triton")
    gq, gk = torch.autograd.grad(qo.sum(), (q, k), allow_unused=True)
    assert gk is None or torch.count_nonzero(gk) == 0
    ref = torch.autograd.grad(ops.reference.rope(q, k, cos, sin)[0].sum(), q)[0]
    assert rel_err(gq, ref) < 1e-5


# ----------------------------------------------------------------------------- linear cross-entropy


@pytest.fixture
def small_chunks(monkeypatch):
    # several chunks even at test sizes, so the chunk loop and the dW accumulation are exercised
    monkeypatch.setattr(lce, "CHUNK_ELEMENTS", 96)


@pytest.mark.gpu
@pytest.mark.parametrize("v", [5000, 20001])
def test_cross_entropy_rows_gpu_launch_matches_torch(v):
    """The row kernel's GPU launch (``ROWS_LAUNCH``: 8192 columns a step, 16 warps), in one step
    (v < 8192) and looped with a ragged last step, against the plain-torch rows."""
    skip_without("cuda")
    g = torch.Generator().manual_seed(v)
    logits = (torch.randn(9, v, generator=g) * 4).to("cuda", torch.bfloat16)
    t = torch.randint(0, v, (9,), generator=g)
    t[2] = -100
    t = t.to("cuda")
    scale = torch.full((1,), 0.25, device="cuda")
    a, b = logits.clone(), logits.clone()
    loss, lse = lce._rows_triton(a, t, scale, -100, True)
    loss_ref, lse_ref = lce._rows_torch(b, t, scale, -100, True)
    assert torch.allclose(loss, loss_ref, atol=1e-3, rtol=1e-4) and torch.allclose(lse, lse_ref, atol=1e-3, rtol=1e-4)
    assert (a.float() - b.float()).abs().max() <= 1e-3  # the gradients written over the logits
    assert a[2].abs().max() == 0  # an ignored row gets no gradient


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(n=st.integers(1, 11), d=st.sampled_from([3, 16, 33]), v=st.sampled_from([2, 17, 130, 1100]),
       reduction=st.sampled_from(["mean", "sum", "none"]), ignored=st.sampled_from(["none", "some", "all"]),
       seed=st.integers(0, 2**16))
def test_linear_cross_entropy_matches_float64(small_chunks, device, dtype, n, d, v, reduction, ignored, seed):
    skip_without(device)
    h = make((n, d), device, dtype, seed=seed)
    w = make((v, d), device, dtype, seed=seed + 1, scale=0.5)
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, v, (n,), generator=g)
    if ignored == "some":
        t[torch.rand(n, generator=g) < 0.4] = -100
    elif ignored == "all":
        t[:] = -100
    t = t.to(device)
    out_shape = (n,) if reduction == "none" else ()
    dl = make(out_shape, device, torch.float32, seed=seed + 2) if out_shape else torch.tensor(0.7, device=device)
    fast = lambda a, b: ops.linear_cross_entropy(a, b, t, reduction=reduction, backend="triton")  # noqa: E731
    loss, (gh, gw) = fast_grads(fast, [h, w], dl)
    loss64, (gh64, gw64) = grads64(lambda a, b: lce64(a, b, t.cpu(), reduction=reduction), [h, w], dl)
    assert loss.dtype == torch.float32 and loss.shape == out_shape
    if ignored == "all":
        assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(gh) == 0 and torch.count_nonzero(gw) == 0
        return
    assert rel_err(loss, loss64) < TOL[dtype] * 2
    assert rel_err(gh, gh64) < GRAD_TOL[dtype]
    assert rel_err(gw, gw64) < GRAD_TOL[dtype]


def test_linear_cross_entropy_no_grad_paths_match(small_chunks):
    skip_without("cpu")
    h, w = torch.randn(7, 8), torch.randn(40, 8)
    t = torch.tensor([1, -100, 3, 39, 0, -100, 5])
    for reduction in ("mean", "sum", "none"):
        with torch.no_grad():
            fast = ops.linear_cross_entropy(h, w, t, reduction=reduction, backend="triton")
            torch_rows = ops.linear_cross_entropy(h, w, t, reduction=reduction, backend="chunked")
        ref = ops.reference.linear_cross_entropy(h, w, t, reduction=reduction)
        assert rel_err(fast, ref) < 1e-5 and rel_err(torch_rows, ref) < 1e-5


def test_chunk_rows_bounds_the_logits():
    assert lce.chunk_rows(16384, 65536) * 65536 <= lce.CHUNK_ELEMENTS
    assert lce.chunk_rows(3, 10) == 3 and lce.chunk_rows(5, 10**12) == 1


# ----------------------------------------------------------------------------- int8_linear


@pytest.mark.parametrize("device,dtype", CASES)
@budget
@given(m=st.sampled_from([1, 3, 17, 70]), k=st.sampled_from([8, 40, 200, 1100]), n=st.sampled_from([1, 30, 130]),
       has_bias=st.booleans(), seed=st.integers(0, 2**16))
def test_int8_linear_matches_float64(device, dtype, m, k, n, has_bias, seed):
    skip_without(device)
    g = torch.Generator().manual_seed(seed)
    x = make((m, k), device, dtype, seed=seed)
    wq = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8).to(device)
    scale = (torch.rand(n, generator=g) * 0.02 + 1e-3).to(device)
    bias = make((n,), device, dtype, seed=seed + 1) if has_bias else None
    y = ops.int8_linear(x, wq, scale, bias, backend="triton")
    ref = x.double().cpu() @ (wq.double().cpu() * scale.double().cpu()[:, None]).T
    if bias is not None:
        ref = ref + bias.double().cpu()
    assert y.dtype == dtype and y.shape == (m, n)
    assert rel_err(y, ref) < TOL[dtype] * (4 if dtype == torch.float32 and device == "cuda" else 1)


def test_int8_linear_grad_flows_to_activations():
    skip_without("cpu")
    x = torch.randn(2, 3, 16, requires_grad=True)
    wq = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    scale = torch.rand(8) * 0.1
    gx = torch.autograd.grad(ops.int8_linear(x, wq, scale, backend="triton").sum(), x)[0]
    gref = torch.autograd.grad(ops.reference.int8_linear(x, wq, scale).sum(), x)[0]
    assert rel_err(gx, gref) < 1e-5


# ----------------------------------------------------------------------------- composition


def _model_loss(x, w_norm, w_head, t, cos, sin):
    """A tiny stand-in for a block: every Triton op in one differentiable function."""
    h = ops.rms_norm(x, w_norm)
    gate, up = h[..., :8], h[..., 8:]
    a = ops.swiglu(gate, up)  # [B, T, 8]
    q = a.reshape(a.shape[0], a.shape[1], 2, 4).transpose(1, 2)
    q, k = ops.rope(q, q[:, :1], cos, sin)
    z = torch.cat([q.transpose(1, 2).reshape(a.shape), k.transpose(1, 2).reshape(a.shape[0], a.shape[1], 4)], -1)
    return ops.linear_cross_entropy(z.reshape(-1, 12), w_head, t)


def _composition_inputs(device="cpu"):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 16, generator=g).to(device)
    w_norm = (1 + 0.1 * torch.randn(16, generator=g)).to(device)
    w_head = torch.randn(11, 12, generator=g).to(device)
    t = torch.tensor([1, 2, -100, 4, 5, 10]).to(device)
    ang = torch.arange(3.0)[:, None] * torch.tensor([1.0, 0.5])
    ang = rope_angles(ang).to(device)
    return x, w_norm, w_head, t, ang.cos(), ang.sin()


def _reference_grads(inputs):
    with ops.use(all="reference"):
        return torch.func.grad(_model_loss, argnums=(0, 1, 2))(*inputs)


def test_dispatch_picks_triton_under_interpreter(monkeypatch):
    # the env var only gates the automatic choice: forced kernels interpret CPU tensors regardless.
    # It is set for this test alone: triton 3.6 reads it at launch and would interpret CUDA launches too.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    x = torch.randn(2, 4)
    assert dispatch.choose("rms_norm", x, None, 1e-6).name == "triton"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_func_grad_composes(device):
    skip_without(device)
    inputs = _composition_inputs(device)
    with ops.use(rms_norm="triton", swiglu="triton", rope="triton", linear_cross_entropy="triton"):
        grads = torch.func.grad(_model_loss, argnums=(0, 1, 2))(*inputs)
    for g, r in zip(grads, _reference_grads(inputs)):
        assert rel_err(g, r) < 1e-4


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_checkpoint_composes(device):
    skip_without(device)
    inputs = list(_composition_inputs(device))
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    with ops.use(rms_norm="triton", swiglu="triton", rope="triton", linear_cross_entropy="triton"):
        loss = torch.utils.checkpoint.checkpoint(_model_loss, *leaves, *inputs[3:], use_reentrant=False)
        loss.backward()
    for leaf, r in zip(leaves, _reference_grads(inputs)):
        assert rel_err(leaf.grad, r) < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=GPU)])
def test_compile_fullgraph_composes(device):
    skip_without(device)
    torch._dynamo.reset()
    inputs = list(_composition_inputs(device))
    leaves = [t.clone().requires_grad_() for t in inputs[:3]]
    backend = "inductor" if device == "cuda" else "aot_eager"  # no C++ toolchain needed on CPU
    compiled = torch.compile(_model_loss, fullgraph=True, backend=backend)
    with ops.use(rms_norm="triton", swiglu="triton", rope="triton", linear_cross_entropy="triton"):
        loss = compiled(*leaves, *inputs[3:])
        loss.backward()
    for leaf, r in zip(leaves, _reference_grads(inputs)):
        assert rel_err(leaf.grad, r) < 1e-4
    x = torch.randn(3, 16, device=device)
    wq = torch.randint(-127, 128, (5, 16), dtype=torch.int8, device=device)
    scale = torch.rand(5, device=device)
    y = torch.compile(lambda a: ops.int8_linear(a, wq, scale, backend="triton"), fullgraph=True, backend=backend)(x)
    assert rel_err(y, ops.reference.int8_linear(x, wq, scale)) < 1e-4


@pytest.mark.gpu
def test_bf16_model_ops_on_gpu_use_triton_automatically():
    x = torch.randn(4, 64, device="cuda", dtype=torch.bfloat16)
    assert dispatch.choose("rms_norm", x, None, 1e-6).name == "triton"
    assert dispatch.choose("swiglu", x, x).name == "triton"
