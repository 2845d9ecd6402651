"""Image preprocessing: any PIL image -> a normalised ``[3, S, S]`` float32 tensor.

SigLIP's convention: RGB, resized to the encoder's square ``image_size`` with
bicubic resampling, scaled to [0, 1], then normalised with mean = std = 0.5 to
[-1, 1]. The HF ``SiglipImageProcessor`` written at export does the same, so a
model trained here sees the same pixels when served elsewhere.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image

MEAN = STD = 0.5


def preprocess_image(image: Image.Image, image_size: int) -> torch.Tensor:
    """``image`` as ``[3, image_size, image_size]`` float32 in [-1, 1] (RGB, bicubic resize)."""
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    # in NumPy, in place, on one contiguous array: the same float32 operations as torch's
    # ``(x / 255 - MEAN) / STD`` (bit-identical) without launching torch's threads for each of
    # them, and a contiguous result for the batch's stack
    pixels = np.asarray(image, dtype=np.float32)
    if not pixels.flags.writeable:
        pixels = pixels.copy()
    pixels /= 255.0
    pixels -= MEAN
    pixels /= STD
    return torch.from_numpy(np.ascontiguousarray(pixels.transpose(2, 0, 1)))


def load_image(path: str | os.PathLike, image_size: int) -> torch.Tensor:
    """Open, fully decode and preprocess the image at ``path``.

    Raises ``FileNotFoundError`` for a missing file and ``OSError`` for a
    truncated or unreadable one (decoding is forced here, not deferred).
    """
    with Image.open(path) as im:
        im.load()  # PIL opens lazily; a truncated file only fails on decode
        return preprocess_image(im, image_size)


def to_pil(pixels: torch.Tensor) -> Image.Image:
    """Invert :func:`preprocess_image`'s normalisation: ``[3, H, W]`` in [-1, 1] -> an RGB PIL image."""
    arr = ((pixels.detach().float().cpu() * STD + MEAN).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")
