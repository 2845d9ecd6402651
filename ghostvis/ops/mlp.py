"""The SwiGLU MLP as one op, with SwiGLU's work done inside its matmuls' epilogues.

``swiglu_mlp(x, w_gate_up, w_down) = swiglu_stacked(x @ w_gate_up.T) @ w_down.T``, the MLP of a
block with stacked gate/up weights. As separate ops, SwiGLU's forward reads the gate/up product
back from memory to gate it, and its backward reads the gradient of the gated product that the
down projection's input-gradient matmul has just written. Here:

- the backward's ``dy @ w_down`` is a Triton matmul whose epilogue applies SwiGLU's backward to
  its tile in registers (``kernels.swiglu_bwd_matmul``): it reads the saved gate/up product and
  writes the gate/up gradient, and the ``[M, F]`` gradient of the gated product never exists;
- the forward's ``x @ w_gate_up.T`` may likewise gate in its epilogue
  (``kernels.gate_up_swiglu``, two accumulators per tile, one per half) where that is faster
  than cuBLAS followed by the SwiGLU kernel (:data:`FUSE_GATE_UP`);
- the other products (the down projection, the weight gradients and the input gradient) stay
  with cuBLAS.

The op saves what the unfused chain saves (``x``, the gate/up product and the gated product).
Run eagerly, it skips the weight-gradient products of weights that need none (frozen layers);
under ``torch.compile`` it always computes them (dynamo does not report which inputs need
gradients inside ``torch.func`` transforms).

**It is not picked unasked** (``ops.use(swiglu_mlp="epilogue")`` turns it on; it has a
backend name of its own, so ``ops.use(all="triton")`` leaves it off). On an H100 at the
d20 shapes (``scripts/mlp_gemm_probe.py``, BENCHMARKS.md) the fused backward took 0.82 ms
against 0.78 ms for cuBLAS's ``dy @ w_down`` (0.44 ms) then the SwiGLU kernel: these Triton
matmuls (tensor-descriptor loads, one tile per program) reach about 570 TFLOP/s where cuBLAS
reaches 670, which eats what the epilogue saves. The fused forward ties cuBLAS plus the
kernel. At d12 the backward wins by 4%. A persistent, warp-specialised matmul that overlaps
one tile's epilogue with the next tile's loads is what would make it pay.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch
import triton

from . import kernels as K
from .fused import _rows, _swiglu_launch
from .library import backward_only, differentiable

Tensor = torch.Tensor
HALF_DTYPES = (torch.bfloat16, torch.float16)

# (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages[, split]) on CUDA, the fastest of
# the probe's grid at d20 on an H100. BLOCK_N is the width of each half in the forward (its
# tile covers 2 * BLOCK_N columns of the gate/up product); ``split`` runs the backward's
# epilogue on the tile's column halves in turn (without it, tiles this large spill registers).
# Narrow models (K = dim <= 1024, d12) take smaller backward tiles.
FWD_CONFIG = (128, 128, 64, 8, 8, 4)
BWD_CONFIG = (128, 256, 64, 8, 8, 3, 1)
BWD_CONFIG_NARROW = (64, 128, 64, 8, 4, 3, 1)
# float32 tiles take twice the shared memory: smaller ones (float32 is a correctness path here)
FWD_CONFIG_FP32 = (64, 64, 32, 8, 4, 3)
BWD_CONFIG_FP32 = (64, 128, 32, 8, 4, 3, 1)
_INTERPRETED = (16, 16, 16, 2, 4, 1, 1)  # small tiles keep Triton's CPU interpreter quick (split epilogue)
# Whether the forward gates inside the gate/up matmul (True) or runs cuBLAS then the SwiGLU kernel.
FUSE_GATE_UP = False


@contextlib.contextmanager
def fuse_gate_up(on: bool = True) -> Iterator[None]:
    """Set :data:`FUSE_GATE_UP` for a block (read when the op runs, so compiled steps follow it)."""
    global FUSE_GATE_UP
    saved, FUSE_GATE_UP = FUSE_GATE_UP, on
    try:
        yield
    finally:
        FUSE_GATE_UP = saved


def _config(t: Tensor, config: Optional[tuple], default: tuple) -> tuple:
    return config if config is not None else (default if t.is_cuda else _INTERPRETED)


def _aligned(t: Tensor) -> Tensor:
    """``t`` (2-D) as a tensor descriptor can take: unit column stride, 16-byte aligned rows and base."""
    es = t.element_size()
    if t.stride(-1) == 1 and (t.stride(0) * es) % 16 == 0 and t.data_ptr() % 16 == 0:
        return t
    return t.contiguous() if t.stride(-1) != 1 or (t.stride(0) * es) % 16 else t.clone()


def _descriptor(t: Tensor, block: list[int]):
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor.from_tensor(t, block)


def gate_up_swiglu_launch(x: Tensor, w_gate_up: Tensor, config: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    """``(gate_up, h)``: ``gate_up = x @ w_gate_up.T`` ``[M, 2F]`` and ``h = silu(gate) * up`` ``[M, F]``
    from one Triton matmul (``x`` ``[M, K]``). ``config`` overrides the launch (see :data:`FWD_CONFIG`)."""
    m, k = x.shape
    f = w_gate_up.shape[0] // 2
    gu = torch.empty((m, 2 * f), dtype=x.dtype, device=x.device)
    h = torch.empty((m, f), dtype=x.dtype, device=x.device)
    if m == 0 or f == 0:
        return gu, h
    x, w = _aligned(x), _aligned(w_gate_up)
    default = FWD_CONFIG_FP32 if x.dtype == torch.float32 else FWD_CONFIG
    bm, bn, bk, group, warps, stages = _config(x, config, default)[:6]
    upcast, precision = K.dot_mode(x)
    K.gate_up_swiglu.on(x)[(triton.cdiv(m, bm) * triton.cdiv(f, bn),)](
        _descriptor(x, [bm, bk]), _descriptor(w[:f], [bn, bk]), _descriptor(w[f:], [bn, bk]), gu, h, m, f, k,
        gu.stride(0), h.stride(0), UPCAST=upcast, PRECISION=precision,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
    return gu, h


def swiglu_bwd_matmul_launch(dy: Tensor, w_down: Tensor, gate_up: Tensor, config: Optional[tuple] = None) -> Tensor:
    """The gate/up gradient ``[M, 2F]`` of SwiGLU at ``gate_up`` ``[M, 2F]``, for the gated product's
    gradient ``dy @ w_down`` (``dy`` ``[M, K]``, ``w_down`` ``[K, F]``), in one Triton matmul.
    ``config`` overrides the launch (see :data:`BWD_CONFIG`)."""
    m, k = dy.shape
    f = w_down.shape[1]
    dgu = torch.empty((m, 2 * f), dtype=gate_up.dtype, device=gate_up.device)
    if m == 0 or f == 0:
        return dgu
    # w_down.T contiguous (a copy of one weight): tiles of it are K-major, which the matmul wants
    dy, wt = _aligned(dy), w_down.t().contiguous()
    gate_up = gate_up if gate_up.stride(-1) == 1 else gate_up.contiguous()
    default = (BWD_CONFIG_FP32 if dy.dtype == torch.float32 else BWD_CONFIG_NARROW if k <= 1024
               else BWD_CONFIG)
    bm, bn, bk, group, warps, stages, *rest = _config(dy, config, default)
    split = bool(rest and rest[0])
    upcast, precision = K.dot_mode(dy)
    K.swiglu_bwd_matmul.on(dy)[(triton.cdiv(m, bm) * triton.cdiv(f, bn),)](
        _descriptor(dy, [bm, bk]), _descriptor(wt, [bn, bk]), gate_up, dgu, m, f, k,
        gate_up.stride(0), dgu.stride(0), UPCAST=upcast, PRECISION=precision, SPLIT=split,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group, num_warps=warps, num_stages=stages)
    return dgu


@torch.library.custom_op("ghostvis::swiglu_mlp_fwd", mutates_args=())
def swiglu_mlp_fwd(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(y, gate_up, h)``: the MLP's output ``[..., D]``, and the gate/up product ``[M, 2F]`` and
    gated product ``[M, F]`` the backward reads."""
    x2 = _rows(x)
    f = w_down.shape[1]
    if FUSE_GATE_UP:
        gu, h = gate_up_swiglu_launch(x2, w_gate_up)
    else:
        gu = x2 @ w_gate_up.t()
        h = _swiglu_launch(gu[:, :f], gu[:, f:])
    y = h @ w_down.t()
    return y.view(*x.shape[:-1], w_down.shape[0]), gu, h


@swiglu_mlp_fwd.register_fake
def _(x, w_gate_up, w_down):
    m = x.numel() // x.shape[-1] if x.shape[-1] else 0
    f = w_down.shape[1]
    return (x.new_empty((*x.shape[:-1], w_down.shape[0])), x.new_empty((m, 2 * f)), x.new_empty((m, f)))


@torch.library.custom_op("ghostvis::swiglu_mlp_bwd", mutates_args=())
def swiglu_mlp_bwd(dy: Tensor, x: Tensor, w_gate_up: Tensor, w_down: Tensor, gate_up: Tensor, h: Tensor,
                   weight_grads: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, d_w_gate_up, d_w_down)`` of :func:`swiglu_mlp_fwd`; the weight gradients are empty
    when ``weight_grads`` is False."""
    dy2, x2 = _rows(dy), _rows(x)
    dgu = swiglu_bwd_matmul_launch(dy2, w_down, gate_up)
    dx = (dgu @ w_gate_up).view(x.shape)
    if not weight_grads:
        return dx, w_gate_up.new_empty(0), w_down.new_empty(0)
    return dx, dgu.t() @ x2, dy2.t() @ h


@swiglu_mlp_bwd.register_fake
def _(dy, x, w_gate_up, w_down, gate_up, h, weight_grads):
    # contiguous, as the real outputs are (empty_like would copy a permuted input's strides)
    if not weight_grads:
        return x.new_empty(x.shape), w_gate_up.new_empty(0), w_down.new_empty(0)
    return x.new_empty(x.shape), w_gate_up.new_empty(w_gate_up.shape), w_down.new_empty(w_down.shape)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0], inputs[1], inputs[2], output[1], output[2])


def _backward(ctx, dy, *_):
    x, w_gate_up, w_down, gu, h = ctx.saved_tensors
    # traced by dynamo, needs_input_grad reads False for weights that torch.func.grad differentiates
    weight_grads = torch.compiler.is_compiling() or ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    dx, dwgu, dwd = swiglu_mlp_backward(dy.contiguous(), x, w_gate_up, w_down, gu, h, weight_grads)
    if not weight_grads:
        return dx, None, None
    return dx, dwgu, dwd


swiglu_mlp_backward = backward_only("swiglu_mlp_backward", swiglu_mlp_bwd)
swiglu_mlp_function = differentiable("SwiGLUMLPFunction", swiglu_mlp_fwd, _setup, _backward,
                                     non_differentiable=(1, 2))


def swiglu_mlp(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> Tensor:
    """See :func:`ghostvis.ops.reference.swiglu_mlp`; SwiGLU's backward runs in the epilogue of
    the down projection's input-gradient matmul."""
    return swiglu_mlp_function(x, w_gate_up, w_down)[0]


def swiglu_mlp_ok(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> bool:
    """Float ``x`` ``[..., D]``, ``w_gate_up`` ``[2F, D]`` and ``w_down`` ``[D, F]``, all one dtype,
    ``D`` and ``F`` whole multiples of 16 bytes, autocast off (under autocast the matmuls would run
    in another dtype than the inputs'; the unfused pieces handle it)."""
    # rows of x, w_gate_up and w_down must be whole multiples of 16 bytes (tensor descriptors)
    per_16 = 16 // x.element_size()
    if torch.is_autocast_enabled(x.device.type):
        return False
    return (x.dim() >= 1 and x.shape[-1] > 0 and w_gate_up.dim() == 2 and w_down.dim() == 2
            and w_down.shape[1] > 0 and x.dtype in (torch.float32, *HALF_DTYPES)
            and x.shape[-1] % per_16 == 0 and w_down.shape[1] % per_16 == 0
            and w_gate_up.dtype == x.dtype and w_down.dtype == x.dtype
            and w_gate_up.shape == (2 * w_down.shape[1], x.shape[-1]) and w_down.shape[0] == x.shape[-1])


def swiglu_mlp_auto(x: Tensor, w_gate_up: Tensor, w_down: Tensor) -> bool:
    """Never: measured slower than the unfused chain at d20 on an H100 (module docstring); forced only."""
    return False
