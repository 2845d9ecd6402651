"""The whole model: ``init`` builds the parameter pytree, ``forward`` maps tokens (and images) to logits.

Top-level layout: ``{"text": ..., "vision": ..., "connector": ...}`` (the last two
only for VLMs); see :mod:`.decoder`, :mod:`.vision` and :mod:`.connector`.

Images enter the sequence through placeholders: every ``image_token_id`` in
``tokens`` is replaced, in reading order (row by row, left to right), by the
next connector output token. So a batch may mix text-only rows and rows with
several images, and ``images`` is simply all images of the batch in order.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional

import torch

from . import connector as _connector
from . import decoder as _decoder
from . import vision as _vision
from .config import ModelConfig
from .init_utils import Init

Tensor = torch.Tensor


class ImageTokenMismatch(ValueError):
    """The number of ``<|image|>`` placeholders does not match the images given."""


def init(cfg: ModelConfig, seed: int = 0, *, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32) -> dict:
    """A freshly initialised parameter pytree (nested dict of tensors) for ``cfg``.

    Drawn on the CPU from ``seed`` (identical on every machine), then moved to
    ``device`` and cast to ``dtype``. ``device="meta"`` gives a shape-only tree.
    """
    ini = Init(seed, "meta" if str(device) == "meta" else "cpu")
    params = {"text": _decoder.init_text(cfg.text, ini)}
    if cfg.is_vlm:
        params["vision"] = _vision.init_vision(cfg.vision, ini)
        params["connector"] = _connector.init_connector(cfg, ini)
    from .tree import tree_map
    return tree_map(lambda t: t.to(device=device, dtype=dtype), params)


def encode_images(params: dict, cfg: ModelConfig, images: Tensor) -> Tensor:
    """Connector outputs ``[N, num_image_tokens, text_dim]`` for images ``[N, C, H, W]``."""
    feats = _vision.encode(params["vision"], cfg.vision, images, n_layers=cfg.vision.layers_used, post_norm=False)
    return _connector.connect(params["connector"], cfg, feats)


def check_image_tokens(cfg: ModelConfig, tokens: Tensor, n_images: int) -> None:
    """Raise :class:`ImageTokenMismatch` unless placeholders == images * tokens per image."""
    if cfg.image_token_id is None:
        if n_images:
            raise ImageTokenMismatch(f"got {n_images} images for a text-only model")
        return
    found = int((tokens == cfg.image_token_id).sum())
    expected = n_images * cfg.num_image_tokens
    if found != expected:
        raise ImageTokenMismatch(
            f"found {found} <|image|> placeholder tokens but {n_images} images x {cfg.num_image_tokens} "
            f"tokens per image = {expected}")


_INPUTS_CHECKED = contextvars.ContextVar("ghostvis_inputs_checked", default=False)


@contextlib.contextmanager
def inputs_checked() -> Iterator[None]:
    """Within this block :func:`embed` skips :func:`check_image_tokens`: the caller has checked the
    batches on the host already (the training loop does, on its CPU batches). On a GPU the check
    reads a count back, which makes the host wait for the device at the start of every forward."""
    token = _INPUTS_CHECKED.set(True)
    try:
        yield
    finally:
        _INPUTS_CHECKED.reset(token)


def merge_images(text_embeds: Tensor, tokens: Tensor, image_embeds: Tensor, image_token_id: int) -> Tensor:
    """Place ``image_embeds`` (all images' tokens, flattened in order) at the placeholder positions.

    The k-th placeholder in reading order takes row k of the flattened image tokens,
    found by a running count over the mask. This is ``masked_scatter``'s result with
    shapes that do not depend on the data, so neither direction waits on the host
    (``masked_scatter``'s backward, a ``masked_select``, does) and the training step
    can be captured in a CUDA graph. Placeholders beyond the image tokens reuse the
    last row: :func:`check_image_tokens` rejects such inputs in eager calls of
    :func:`embed`, which skips the check (a host sync) under ``torch.compile`` and
    :func:`inputs_checked`.
    """
    b, t, d = text_embeds.shape
    is_image = (tokens == image_token_id).reshape(-1)
    flat = image_embeds.reshape(-1, d).to(text_embeds.dtype)
    index = (torch.cumsum(is_image, 0) - 1).clamp_(0, flat.shape[0] - 1)
    merged = torch.where(is_image[:, None], flat[index], text_embeds.reshape(-1, d))
    return merged.view(b, t, d)


def embed(params: dict, cfg: ModelConfig, tokens: Tensor, images: Optional[Tensor] = None,
          image_embeds: Optional[Tensor] = None) -> Tensor:
    """Input embeddings ``[B, T, dim]`` with images merged in.

    Pass ``images`` (encoded here) or precomputed ``image_embeds`` from :func:`encode_images`.
    """
    x = params["text"]["embed"][tokens]
    source = image_embeds if image_embeds is not None else images
    n_images = 0 if source is None else source.shape[0]
    if not torch.compiler.is_compiling() and not _INPUTS_CHECKED.get():
        check_image_tokens(cfg, tokens, n_images)
    if n_images and image_embeds is None:
        image_embeds = encode_images(params, cfg, images)
    if n_images:
        x = merge_images(x, tokens, image_embeds, cfg.image_token_id)
    return x


def hidden_states(params: dict, cfg: ModelConfig, tokens: Tensor, images: Optional[Tensor] = None, *,
                  positions: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None, **decode_kw) -> Tensor:
    """Final-normed decoder hidden states ``[B, T, dim]`` (what the LM head and the fused loss read)."""
    x = embed(params, cfg, tokens, images)
    return _decoder.decode_hidden(params["text"], cfg.text, x, positions, doc_ids=doc_ids, **decode_kw)


def forward(params: dict, cfg: ModelConfig, tokens: Tensor, images: Optional[Tensor] = None, *,
            positions: Optional[Tensor] = None, doc_ids: Optional[Tensor] = None) -> Tensor:
    """Logits ``[B, T, vocab]``: a pure function of ``params`` and its inputs.

    Args:
        params: the pytree from :func:`init`, :func:`ghostvis.load` or :func:`ghostvis.import_hf`.
        cfg: the model's :class:`ModelConfig`.
        tokens: ``[B, T]`` token ids.
        images: ``[N, C, H, W]`` normalised images, one per group of ``<|image|>`` placeholders.
        positions: ``[B, T]`` RoPE positions (default ``0..T-1``; per-document for packed rows).
        doc_ids: ``[B, T]`` document ids of packed rows; documents never attend to each other.
    """
    h = hidden_states(params, cfg, tokens, images, positions=positions, doc_ids=doc_ids)
    return _decoder.logits(params["text"], h)


def count_params(params_or_cfg, *, exclude_embedding: bool = False) -> int:
    """Number of parameters of a pytree or a config (optionally without the token embedding)."""
    from .tree import flatten
    params = init(params_or_cfg, device="meta") if isinstance(params_or_cfg, ModelConfig) else params_or_cfg
    flat = flatten(params)
    return sum(t.numel() for k, t in flat.items() if not (exclude_embedding and k == "text.embed"))


def flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None) -> int:
    """Training FLOPs per text token: ``6*(decoder params - embedding) + 12*layers*attn_dim*seq``.

    The convention of the project's MFU figures (vision encoder not counted).
    """
    t = cfg.text
    seq_len = t.max_seq_len if seq_len is None else seq_len
    n = count_params(ModelConfig(text=t), exclude_embedding=True)
    return 6 * n + 12 * t.n_layers * t.n_heads * t.head_dim * seq_len
