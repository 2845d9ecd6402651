"""Build a model from a preset, run it on a generated image, and print its parameter layout.

    python recipes/describe.py                 # the tiny VLM
    python recipes/describe.py --preset d20 --no-forward
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import tyro

import ghostvis as gv


@dataclass
class Describe:
    """Print a preset's parameter counts, FLOPs and tensor layout, and time one forward."""

    preset: str = "tiny-vlm"
    """Model preset (see ghostvis.presets.names())."""
    seed: int = 0
    """Initialisation seed."""
    forward: bool = True
    """Run one forward pass on a generated image and a short prompt."""
    max_rows: int = 40
    """Show at most this many tensors of the layout."""


def main(args: Describe) -> None:
    cfg = gv.presets.get(args.preset)
    params = gv.init(cfg, seed=args.seed, device="meta" if not args.forward else "cpu")
    flat = gv.flatten(params)
    total = gv.count_params(params)
    print(f"preset {args.preset}: {total / 1e6:.2f}M parameters "
          f"({gv.count_params(params, exclude_embedding=True) / 1e6:.2f}M without the token embedding)")
    for part in params:
        print(f"  {part:<10} {sum(t.numel() for k, t in flat.items() if k.startswith(part + '.')) / 1e6:8.3f}M")
    print(f"training FLOPs per token at {cfg.text.max_seq_len} context: {gv.flops_per_token(cfg) / 1e6:.1f}M")
    if cfg.is_vlm:
        print(f"each image becomes {cfg.num_image_tokens} tokens ({cfg.connector.kind} connector)")
    print("\nlayout (safetensors key: shape):")
    for i, (k, t) in enumerate(flat.items()):
        if i == args.max_rows:
            print(f"  ... {len(flat) - i} more")
            break
        print(f"  {k:<40} {list(t.shape)}")
    if not args.forward:
        return
    n_img = cfg.num_image_tokens
    tokens = torch.randint(8, cfg.text.vocab_size, (1, n_img + 16))
    images = None
    if cfg.is_vlm:
        tokens[0, 1:1 + n_img] = cfg.image_token_id
        side = cfg.vision.image_size
        yy, xx = torch.meshgrid(torch.linspace(-1, 1, side), torch.linspace(-1, 1, side), indexing="ij")
        disc = ((xx**2 + yy**2) < 0.4).float()  # a disc on a gradient background
        images = torch.stack([disc * 2 - 1, xx, yy])[None]
    t0 = time.perf_counter()
    logits = gv.forward(params, cfg, tokens, images)
    dt = time.perf_counter() - t0
    print(f"\nforward: tokens {list(tokens.shape)} -> logits {list(logits.shape)} in {dt * 1e3:.1f} ms; "
          f"next-token entropy {torch.distributions.Categorical(logits=logits[0, -1]).entropy():.2f} nats "
          f"(uniform: {torch.log(torch.tensor(float(cfg.text.vocab_size))):.2f})")


if __name__ == "__main__":
    main(tyro.cli(Describe))
