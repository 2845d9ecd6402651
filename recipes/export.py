"""Export a GhostVis checkpoint as a Hugging Face folder that transformers and vLLM load as-is.

    python recipes/export.py --checkpoint runs/sft --out out/tiny-vlm-hf
    python -c "from transformers import AutoModelForImageTextToText as M; M.from_pretrained('out/tiny-vlm-hf')"
    bash scripts/vllm_check.sh --vlm-checkpoint runs/sft/checkpoints/step_000200/model.safetensors \\
        --tokenizer runs/sft/tokenizer.json                  # and check it against vLLM

Text models become ``LlamaForCausalLM`` (``Qwen3ForCausalLM`` with QK-norm), VLMs
with the ``mlp`` connector ``LlavaForConditionalGeneration``; the folder also holds
the tokenizer, its chat template, the generation config and, for VLMs, the image
processor. See :func:`ghostvis.infer.export.export_hf`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source checkout without installing

from ghostvis.core.config import ConfigError  # noqa: E402
from ghostvis.infer.export import export_hf  # noqa: E402
from ghostvis.train.loop import ModelSource, load_initial  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig:
    """Export a checkpoint to a Hugging Face folder.

    Attributes:
        checkpoint: a GhostVis .safetensors file, a checkpoint folder or a run folder (its latest checkpoint).
        out: the folder to write (created; files of the same names are replaced).
        tokenizer: tokenizer.json (file or folder); default: the one found beside the checkpoint
            (that folder or up to three above). Without one, only weights and configs are written.
        dtype: weight dtype in the folder; ``auto`` keeps the checkpoint's own.
    """

    checkpoint: str
    out: str
    tokenizer: Optional[str] = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"


def find_tokenizer(checkpoint: str | Path) -> Optional[Path]:
    """``tokenizer.json`` in the checkpoint's folder or up to three folders above it, or None."""
    start = Path(checkpoint).resolve()
    folder = start if start.is_dir() else start.parent
    for candidate in [folder, *list(folder.parents)[:3]]:
        if (candidate / "tokenizer.json").is_file():
            return candidate / "tokenizer.json"
    return None


def main(cfg: ExportConfig) -> Path:
    """Write the folder; returns its path."""
    params, mcfg = load_initial(ModelSource(init=cfg.checkpoint))
    tokenizer = cfg.tokenizer or find_tokenizer(cfg.checkpoint)
    if tokenizer is None:
        print(f"warning: no tokenizer.json found beside {cfg.checkpoint}; writing weights and configs only "
              "(pass --tokenizer to make the folder loadable by vLLM)", file=sys.stderr)
    try:
        out = export_hf(params, mcfg, cfg.out, tokenizer, dtype=None if cfg.dtype == "auto" else DTYPES[cfg.dtype])
    except ConfigError as e:
        raise SystemExit(f"cannot export {cfg.checkpoint}: {e}") from None
    files = sorted(p.name for p in out.iterdir())
    print(f"exported {mcfg.name or 'model'} to {out}: {', '.join(files)}")
    return out


if __name__ == "__main__":
    main(tyro.cli(ExportConfig, description=__doc__))
