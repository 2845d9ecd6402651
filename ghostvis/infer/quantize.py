"""INT8 weight-only quantization as a transform over the parameter pytree.

    qparams = quantize(params, "int8")     # same tree, decoder projections now {"q", "scale"}
    qparams = quantize(params, "int8", lm_head=True)   # the LM head too
    gv.save("model-int8.safetensors", qparams, cfg)   # saves and loads like any other tree

Every 2-D projection weight of the decoder blocks (``wq wk wv wo w_gate w_up
w_down``) ``[out, in]`` becomes ``{"q": int8 [out, in], "scale": [out]}`` with
a symmetric per-output-channel scale ``max|w_row| / 127``, so ``q * scale``
reconstructs each row to within half a step. The decoder's ``project`` sends
such dicts to ``ops.int8_linear``. Embeddings, norms, biases and the vision
encoder/connector stay as they are: the embedding is a gather (no matmul to
speed up), and the image path is where rounding errors hurt accuracy most for
the least memory saved in small models.

The LM head stays in float unless asked for (``lm_head=True``): it is the largest
single matrix a decode step reads (about a fifth of a d20 step's bytes), so quantizing it too
makes a batch-1 step faster, at the cost of rounding every logit. A head tied to the
embedding cannot be quantized alone.
"""

from __future__ import annotations

import torch

from ..core.tree import tree_map

Tensor = torch.Tensor

PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
MODES = ("int8",)


def quantize_weight(w: Tensor) -> dict[str, Tensor]:
    """``{"q": int8 [out, in], "scale": [out]}`` for a float ``[out, in]`` weight (symmetric, per row)."""
    if w.dim() != 2 or not w.is_floating_point():
        raise ValueError(f"quantize_weight needs a 2-D float weight, got {w.dtype} {list(w.shape)}")
    wf = w.float()
    scale = (wf.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # an all-zero row keeps a finite scale
    q = torch.round(wf / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return {"q": q, "scale": scale.to(w.dtype)}


def dequantize_weight(qw: dict[str, Tensor]) -> Tensor:
    """The float ``[out, in]`` weight an INT8 ``{"q", "scale"}`` pair stands for (in the scale's dtype)."""
    return (qw["q"].float() * qw["scale"].float()[:, None]).to(qw["scale"].dtype)


def is_quantized(w) -> bool:
    """True for an INT8 ``{"q", "scale"}`` weight."""
    return isinstance(w, dict) and set(w) == {"q", "scale"}


def _map_projections(params: dict, fn, *, lm_head: bool = False) -> dict:
    """A copy of ``params`` with ``fn`` applied to every decoder block projection, and with
    ``lm_head`` to the untied LM head where there is one (other leaves shared)."""
    text = dict(params["text"])
    layers = []
    for layer in text["layers"]:
        layer = {k: dict(v) if isinstance(v, dict) else v for k, v in layer.items()}
        for sub in ("attn", "mlp"):
            for name in PROJECTIONS:
                if name in layer[sub]:
                    layer[sub][name] = fn(layer[sub][name])
        layers.append(layer)
    text["layers"] = layers
    if lm_head and "lm_head" in text:
        text["lm_head"] = fn(text["lm_head"])
    return {**params, "text": text}


def quantize(params: dict, mode: str = "int8", *, lm_head: bool = False) -> dict:
    """The pytree with every decoder block projection quantized (see the module docstring).

    Args:
        params: a GhostVis parameter tree (float).
        mode: ``"int8"``, the only mode.
        lm_head: quantize the (untied) LM head as well.

    Pure: ``params`` is not modified; untouched leaves are shared, not copied.
    Quantizing an already-quantized tree is an error rather than a silent no-op.
    """
    if mode not in MODES:
        raise ValueError(f"quantize mode {mode!r} is not supported; choose from {MODES}")
    if "text" not in params or "layers" not in params["text"]:
        raise ValueError("quantize expects a GhostVis param tree with params['text']['layers']")
    if lm_head and "lm_head" not in params["text"]:
        raise ValueError("lm_head=True needs an untied LM head; this model's head is its embedding "
                         "(tie_embeddings), which the token lookup reads in float")
    if has_quantized(params):
        raise ValueError("params are already INT8-quantized")
    return _map_projections(params, quantize_weight, lm_head=lm_head)


def dequantize(params: dict) -> dict:
    """The float pytree an INT8-quantized one stands for (float trees pass through unchanged)."""
    return _map_projections(params, lambda w: dequantize_weight(w) if is_quantized(w) else w, lm_head=True)


def has_quantized(params: dict) -> bool:
    """True if any decoder projection (or the LM head) in ``params`` is INT8-quantized."""
    found = []
    _map_projections(params, lambda w: found.append(is_quantized(w)) or w, lm_head=True)
    return any(found)


def weight_bytes(params: dict) -> int:
    """Bytes held by all tensors of a pytree (to show what quantization saves)."""
    total = []
    tree_map(lambda t: total.append(t.numel() * t.element_size()), params)
    return sum(total)
