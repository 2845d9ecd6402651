"""Check that vLLM serves a GhostVis export exactly as GhostVis does: same prompt ids, same greedy tokens.

Run it through ``bash scripts/vllm_check.sh`` (which builds ``.venv-vllm/`` first). Two halves:

* the GhostVis half (project venv): makes or loads a text model (``tiny``) and a VLM
  (``tiny-vlm``, head_dim 32) and a tokenizer, exports both with ``export_hf``,
  renders a chat prompt per model with :func:`render_chat` (one with an image),
  and generates greedily with GhostVis's own engine;
* the vLLM half (``--vllm-side``, run in ``.venv-vllm`` in a subprocess per model,
  never importing ghostvis): renders the same conversation with the exported
  chat template, lets vLLM's tokenizer and LLaVA processor build the prompt ids,
  and generates greedily.

Prompt ids and generated ids must be equal; the exit code says whether they are.
vLLM on this CPU: the entry point is guarded by ``__main__``, no ``device=``,
``VLLM_CPU_KVCACHE_SPACE=1`` and ``enforce_eager=True`` (fast start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CORPUS = [
    "What is in this picture? A red square on a blue background.",
    "Describe the image in one sentence.",
    "The quick brown fox jumps over the lazy dog.",
    "Hello! How are you today? I am fine, thank you.",
    "Count the shapes: one circle, two squares and three triangles.",
] * 40
TEXT_MESSAGES = [{"role": "user", "content": "Hello! How are you today?"}]
IMAGE_MESSAGES = [{"role": "user", "content": [{"type": "image"}, "What is in this picture?"]}]


# ----------------------------------------------------------------------------------------------
# GhostVis half


def make_image(path: Path, side: int):
    """A deterministic test image already at the encoder's size, so no two resamplers can differ."""
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (side, side), (30, 60, 200))
    draw = ImageDraw.Draw(img)
    draw.rectangle([side * 0.15, side * 0.2, side * 0.6, side * 0.7], fill=(220, 40, 40))
    draw.ellipse([side * 0.55, side * 0.45, side * 0.95, side * 0.9], fill=(250, 230, 40))
    img.save(path)
    return img


def ghostvis_cases(args, work: Path) -> list[dict]:
    """Export the models and record GhostVis's prompt ids and greedy output for each case."""
    import torch

    import ghostvis as gv
    from ghostvis.infer.export import export_hf
    from ghostvis.infer.generate import generate
    from ghostvis.train.chat import render_chat
    from ghostvis.train.data.images import load_image
    from ghostvis.train.tokenizer import Tokenizer, train_tokenizer

    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else train_tokenizer(CORPUS, 512)
    cases = []
    for name, ckpt, messages in (("text", args.text_checkpoint, TEXT_MESSAGES),
                                 ("image", args.vlm_checkpoint, IMAGE_MESSAGES)):
        if ckpt:
            params, cfg = gv.load(ckpt, dtype=torch.float32)
        else:
            cfg = gv.presets.get("tiny" if name == "text" else "tiny-vlm")
            params = gv.init(cfg, seed=args.seed)
        folder = work / name
        export_hf(params, cfg, folder, tok, dtype=torch.float32)
        ids, _ = render_chat(tok, messages, cfg.num_image_tokens, add_generation_prompt=True)
        images, image_path = [], None
        if name == "image":
            image_path = work / "image.png"
            make_image(image_path, cfg.vision.image_size)
            images = [load_image(image_path, cfg.vision.image_size)]
        out = generate(params, cfg, [ids], [images], max_new_tokens=args.max_new_tokens,
                       stop_ids=[tok.end_id, tok.eos_id])[0]
        cases.append({"name": name, "model": str(folder), "messages": messages, "image": str(image_path or ""),
                      "max_new_tokens": args.max_new_tokens, "stop_ids": [tok.end_id, tok.eos_id],
                      "ghostvis_prompt_ids": ids, "ghostvis_output_ids": out})
    return cases


def run_vllm(vllm_python: str, case: dict, work: Path) -> dict:
    """Run one case in the vLLM venv (a fresh process per model); returns its result dict."""
    req, res = work / f"{case['name']}.request.json", work / f"{case['name']}.result.json"
    req.write_text(json.dumps(case))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)
    t0 = time.time()
    proc = subprocess.run([vllm_python, __file__, "--vllm-side", str(req), str(res)], env=env,
                          capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not res.exists():
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"vLLM run for case {case['name']!r} failed (exit {proc.returncode})")
    return {**json.loads(res.read_text()), "seconds": round(time.time() - t0, 1)}


def strip_stop(ids: list[int], stop_ids: list[int]) -> list[int]:
    """vLLM reports the stop token in its output ids; GhostVis never returns it."""
    return ids[:-1] if ids and ids[-1] in stop_ids else ids


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vllm-python", default=".venv-vllm/bin/python", help="python of the vLLM venv")
    ap.add_argument("--workdir", default=None, help="where exports and results go (default: a temp dir)")
    ap.add_argument("--text-checkpoint", default=None, help="a GhostVis text checkpoint (default: random tiny)")
    ap.add_argument("--vlm-checkpoint", default=None, help="a GhostVis VLM checkpoint, mlp connector "
                                                           "(default: random tiny-vlm)")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: trained on a built-in corpus)")
    ap.add_argument("--max-new-tokens", type=int, default=16, help="greedy tokens compared per case")
    ap.add_argument("--seed", type=int, default=0, help="init seed of the random models")
    args = ap.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ghostvis-vllm-"))
    work.mkdir(parents=True, exist_ok=True)
    cases = ghostvis_cases(args, work)
    ok = True
    for case in cases:
        got = run_vllm(args.vllm_python, case, work)
        out = strip_stop(got["output_ids"], case["stop_ids"])
        same_prompt = got["prompt_ids"] == case["ghostvis_prompt_ids"]
        same_output = out == case["ghostvis_output_ids"]
        ok &= same_prompt and same_output
        print(f"[{case['name']}] prompt ids {'equal' if same_prompt else 'DIFFER'} ({len(got['prompt_ids'])} tokens), "
              f"greedy output {'equal' if same_output else 'DIFFERS'} ({len(out)} tokens), vLLM run {got['seconds']} s")
        if not (same_prompt and same_output):
            print(f"  ghostvis prompt: {case['ghostvis_prompt_ids']}\n  vllm prompt:     {got['prompt_ids']}\n"
                  f"  ghostvis output: {case['ghostvis_output_ids']}\n  vllm output:     {out}")
    print(f"vllm check {'PASSED' if ok else 'FAILED'} (exports in {work})")
    return 0 if ok else 1


# ----------------------------------------------------------------------------------------------
# vLLM half (runs in .venv-vllm; imports no ghostvis)


def vllm_side(request: str, result: str) -> None:
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    case = json.loads(Path(request).read_text())
    tok = AutoTokenizer.from_pretrained(case["model"])
    text = tok.apply_chat_template(case["messages"], add_generation_prompt=True, tokenize=False)
    prompt = {"prompt": text}
    kw = {}
    if case["image"]:
        prompt["multi_modal_data"] = {"image": Image.open(case["image"]).convert("RGB")}
        kw["limit_mm_per_prompt"] = {"image": 1}
    llm = LLM(model=case["model"], dtype="float32", enforce_eager=True, seed=0, max_num_seqs=1, **kw)
    params = SamplingParams(temperature=0.0, max_tokens=case["max_new_tokens"], stop_token_ids=case["stop_ids"])
    out = llm.generate([prompt], params)[0]
    Path(result).write_text(json.dumps({"prompt_text": text, "prompt_ids": list(out.prompt_token_ids),
                                        "output_ids": list(out.outputs[0].token_ids)}))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--vllm-side":
        vllm_side(sys.argv[2], sys.argv[3])
    else:
        sys.exit(main())
