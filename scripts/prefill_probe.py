"""Times the compiled prefill of ``generate(compile=True)`` (d20, one 128-token prompt) with the decode
kernels and without them, host time and GPU time apart, and lists its slowest kernels.

    python scripts/prefill_probe.py [BATCH]
"""

from __future__ import annotations

import importlib
import sys
import time

import torch

import ghostvis as gv
from ghostvis.infer.kv_cache import left_pad

gen = importlib.import_module("ghostvis.infer.generate")
UNFUSED = dict(attention="sdpa", add_rms_norm="reference", rope_into_cache="reference", linear="reference")


def main(batch: int) -> None:
    cfg = gv.presets.get("d20")
    params = gv.init(cfg, seed=0, device="cuda", dtype=torch.bfloat16)
    prompts = torch.randint(8, 60000, (batch, 128), generator=torch.Generator().manual_seed(0)).tolist()
    for name, forced in (("decode kernels", {}), ("unfused", UNFUSED)):
        gen.release_decode_session()
        gen.COMPILED_DECODE_OPS.clear()
        gen.COMPILED_DECODE_OPS.update(forced)
        torch._dynamo.reset()
        gv.generate(params, cfg, prompts, max_new_tokens=8, compile=True, reuse=True)  # compiles
        s = gen._SESSION["entry"]
        tokens, _ = left_pad(prompts, 0, "cuda", width=128)

        def run():
            return gen.prefill(s["params"], cfg, tokens, s["pad"], s["valid"], s["cache"], None, s["prefill"])

        for _ in range(3):
            run()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            run()
        host = (time.perf_counter() - t0) / 10
        torch.cuda.synchronize()
        total = (time.perf_counter() - t0) / 10
        t0 = time.perf_counter()
        for _ in range(10):
            run()
            torch.cuda.synchronize()
        each = (time.perf_counter() - t0) / 10
        print(f"{name}: prefill host {1e3 * host:.2f} ms, queued {1e3 * total:.2f} ms, one at a time "
              f"{1e3 * each:.2f} ms", flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                                torch.profiler.ProfilerActivity.CPU]) as prof:
            run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=8, max_name_column_width=60))


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 1)
