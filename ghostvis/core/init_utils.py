"""Small helpers that initialise parameter tensors from a seeded generator.

Initialisation happens on the CPU in float32 from one ``torch.Generator``, so a
seed gives the same parameters on every machine; ``gv.init`` then moves and
casts. On the ``meta`` device nothing is drawn (shape-only trees for checks).
"""

from __future__ import annotations

import torch


class Init:
    """Draws tensors for one model; ``device="meta"`` gives shapes only."""

    def __init__(self, seed: int, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.gen = None if self.device.type == "meta" else torch.Generator().manual_seed(seed)

    def normal(self, *shape: int, std: float = 0.02) -> torch.Tensor:
        """A tensor of N(0, std^2) draws."""
        if self.gen is None:
            return torch.empty(shape, device="meta")
        return torch.randn(shape, generator=self.gen) * std

    def zeros(self, *shape: int) -> torch.Tensor:
        """A zero tensor (biases)."""
        return torch.zeros(shape, device="meta" if self.gen is None else "cpu")

    def ones(self, *shape: int) -> torch.Tensor:
        """A tensor of ones (norm weights)."""
        return torch.ones(shape, device="meta" if self.gen is None else "cpu")
