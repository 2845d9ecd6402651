"""Vision alignment: train only the connector of a VLM while the decoder and the vision encoder stay frozen.

    python recipes/align.py                                   # tiny VLM, synthetic VQA, connector only
    python recipes/align.py --model.init hf_llava_dir/        # align imported HF weights
    python recipes/align.py --train.trainable connector,text.layers.3   # also tune the last block
    python recipes/align.py --help                            # every flag, documented

The usual first stage of a VLM (LLaVA's pretraining stage): a pretrained
decoder and encoder are kept fixed and the connector learns to map image
features into the decoder's embedding space. Frozen parameters are closed over
by the train step and come back bit-identical. The same flags as
``recipes/sft.py`` apply (this recipe is SFT with other defaults); follow it
with ``recipes/sft.py --model.init runs/align``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # spinning OpenMP threads collapse on a busy CPU

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import tyro  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sft  # noqa: E402
from ghostvis.train.loop import RunConfig, TrainConfig  # noqa: E402


def align_defaults() -> sft.SFTConfig:
    """SFT's config with alignment defaults: only ``connector`` trains, at a higher learning rate."""
    return sft.SFTConfig(
        train=TrainConfig(steps=200, batch_size=8, seq_len=256, optimizer="muon", lr=1e-2, muon_lr=0.03, warmup=10,
                          trainable="connector"),
        run=RunConfig(name="align"))


def main(cfg: sft.SFTConfig) -> dict:
    """Run alignment (the SFT loop with alignment defaults)."""
    return sft.main(cfg)


if __name__ == "__main__":
    main(tyro.cli(sft.SFTConfig, default=align_defaults(), description=__doc__))
