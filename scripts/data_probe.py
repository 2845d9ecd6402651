"""How fast batches of the built-in synthetic VQA data are drawn: in the loop, by one thread, by worker processes.

    python scripts/data_probe.py [--preset d12-vlm] [--batch 16] [--seq 1024] [--batches 12] [--workers 1 2 4]

Prints milliseconds per batch for each way of drawing (after one batch of warm-up), and how
many images a batch holds. Compare the figure with the step time of ``recipes/bench.py vlm``:
a training loop whose batches take longer to draw than a step waits on its data.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ghostvis as gv  # noqa: E402
from ghostvis.train.data import BatchIterator, SyntheticVQA, default_tokenizer  # noqa: E402
from ghostvis.train.data.prefetch import Prefetcher, WorkerFeed  # noqa: E402


def ms_per_batch(feed, n: int) -> float:
    next(feed)  # warm-up: workers start, caches fill
    t0 = time.perf_counter()
    for _ in range(n):
        next(feed)
    return (time.perf_counter() - t0) / n * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="d12-vlm")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--batches", type=int, default=12)
    ap.add_argument("--workers", type=int, nargs="*", default=[1, 2])
    args = ap.parse_args()
    cfg = gv.presets.get(args.preset)
    tok = default_tokenizer()
    ds = SyntheticVQA(tok, cfg.num_image_tokens, cfg.vision.image_size, size=4000, split="train", seed=0)

    def iterator() -> BatchIterator:
        return BatchIterator(ds, batch_size=args.batch, seq_len=args.seq, pad_id=tok.pad_id,
                             image_token_id=cfg.image_token_id, seed=0)

    images = next(iterator())["images"].shape[0]
    print(f"{args.preset}: {args.batch} rows x {args.seq} tokens, {images} images of {cfg.vision.image_size} px "
          f"in the first batch")
    rows = [("in the loop", lambda: iterator()), ("one thread (Prefetcher)", lambda: Prefetcher(iterator(), 2))]
    rows += [(f"{w} worker processes (WorkerFeed)", lambda w=w: WorkerFeed(iterator(), w, 2)) for w in args.workers]
    for name, make in rows:
        feed = make()
        try:
            print(f"{name:<34} {ms_per_batch(feed, args.batches):8.1f} ms per batch", flush=True)
        finally:
            if hasattr(feed, "close"):
                feed.close()


if __name__ == "__main__":
    main()
