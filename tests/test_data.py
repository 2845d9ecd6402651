"""Datasets and the batch iterator: synthetic VQA, LLaVA files, text corpora, bad records, resume, sharding."""

import json
import random
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from ghostvis.train.data import (
    BatchIterator,
    DataError,
    DataWarning,
    SyntheticVQA,
    default_tokenizer,
    exact_match,
    load_llava,
    load_text,
    preprocess_image,
    synthetic_corpus,
    text_samples,
)
from ghostvis.train.data.synthetic import COLORS, QUADRANTS, QUESTION_KINDS, SHAPES, layout, split_of
from ghostvis.train.packing import IGNORE, Sample

N_IMG = 64  # tiny-vlm: 64 px images, 8 px patches


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer()


# ---------------------------------------------------------------- synthetic VQA

def test_synthetic_is_deterministic_per_seed(tok):
    a = SyntheticVQA(tok, N_IMG, 64, size=20, seed=3)
    b = SyntheticVQA(tok, N_IMG, 64, size=20, seed=3)
    c = SyntheticVQA(tok, N_IMG, 64, size=20, seed=4)
    for i in (0, 7, 19):
        assert a[i].ids == b[i].ids and a[i].loss_mask == b[i].loss_mask
        assert torch.equal(a[i].images[0], b[i].images[0])
    assert [a.item(i) for i in range(20)] != [c.item(i) for i in range(20)]


def test_synthetic_sample_shape_and_answers(tok):
    ds = SyntheticVQA(tok, N_IMG, 64, size=200, questions_per_image=2, max_objects=3, kinds=QUESTION_KINDS)
    answers = set(COLORS) | set(SHAPES) | set(QUADRANTS) | {"1", "2", "3", "yes", "no"}
    assert ds.lengths == [len(ds[i].ids) for i in range(len(ds))]
    for i in range(0, 200, 9):
        s, item = ds[i], ds.item(i)
        assert len(s.images) == 1 and s.images[0].shape == (3, 64, 64) and s.images[0].dtype == torch.float32
        assert -1 <= s.images[0].min() and s.images[0].max() <= 1
        assert s.ids.count(tok.image_id) == N_IMG
        assert len(item.qa) == 2 and all(a in answers for _, a in item.qa)
        supervised = tok.decode([t for t, m in zip(s.ids, s.loss_mask) if m])
        assert supervised == "".join(a for _, a in item.qa)  # only the answers (and their <|end|>) are targets


def test_synthetic_answers_match_the_pixels(tok):
    """Each occupied quadrant's centre has the shape's colour; the count answer counts the shapes."""
    ds = SyntheticVQA(tok, N_IMG, 64, size=60, max_objects=4, kinds=QUESTION_KINDS)
    for i in range(60):
        item = ds.item(i)
        pixels = ds[i].images[0]
        for s in item.scene:
            row, col = QUADRANTS.index(s.quadrant) // 2, QUADRANTS.index(s.quadrant) % 2
            y, x = 16 + 32 * row + s.dy, 16 + 32 * col + s.dx
            y += 3 if s.shape == "triangle" else 0  # a triangle's centroid sits below the box centre
            expected = (torch.tensor(COLORS[s.color], dtype=torch.float32) / 255 - 0.5) / 0.5
            assert torch.allclose(pixels[:, y, x], expected, atol=0.05), (i, s)
        for q, a in item.qa:
            if q.startswith("How many"):
                assert a == str(len(item.scene))
            if q.startswith("What color is the shape in the "):
                quadrant = q.removeprefix("What color is the shape in the ").rstrip("?")
                assert a == next(s.color for s in item.scene if s.quadrant == quadrant)


def test_held_out_split_is_disjoint(tok):
    train = SyntheticVQA(tok, N_IMG, 64, size=400, split="train", max_objects=3)
    test = SyntheticVQA(tok, N_IMG, 64, size=100, split="test", max_objects=3)
    train_layouts = {layout(train.item(i).scene) for i in range(400)}
    test_layouts = {layout(test.item(i).scene) for i in range(100)}
    assert not train_layouts & test_layouts
    assert all(split_of(test.item(i).scene) == "test" for i in range(100))
    with pytest.raises(ValueError, match="split"):
        SyntheticVQA(tok, N_IMG, 64, split="val")


def test_default_task_is_single_object_colour_and_position(tok):
    ds = SyntheticVQA(tok, N_IMG, 64, size=50)
    for i in range(50):
        item = ds.item(i)
        assert len(item.scene) == 1
        assert item.qa[0][1] in set(COLORS) | set(QUADRANTS)
    with pytest.raises(ValueError, match="kinds"):
        SyntheticVQA(tok, N_IMG, 64, kinds=["colour"])


def test_eval_examples_are_generation_prompts(tok):
    ex = SyntheticVQA(tok, N_IMG, 64, size=3, split="test", questions_per_image=2).eval_examples()
    assert len(ex) == 6
    for e in ex:
        assert e.prompt[0] == tok.bos_id and e.prompt[-1] == tok.assistant_id
        assert e.prompt.count(tok.image_id) == N_IMG and len(e.images) == 1
        assert e.question in tok.decode(e.prompt)
    assert exact_match(" Red\n", "red") and not exact_match("re", "red")


def test_default_tokenizer_caches_to_disk(tmp_path, tok):
    path = tmp_path / "tok.json"
    first = default_tokenizer(path)
    assert path.exists() and first.to_str() == tok.to_str()
    assert default_tokenizer(path).to_str() == tok.to_str()
    corpus = synthetic_corpus(50)
    assert len(corpus) == 50 and corpus == synthetic_corpus(50)
    assert all(tok.decode(tok.encode(t)) == t for t in corpus)


def test_image_preprocessing():
    rgba = Image.new("RGBA", (30, 20), (255, 0, 0, 128))
    x = preprocess_image(rgba, 16)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    assert torch.allclose(x[0], torch.ones(16, 16)) and torch.allclose(x[1], -torch.ones(16, 16))
    gray = preprocess_image(Image.new("L", (16, 16), 0), 16)
    assert torch.allclose(gray, -torch.ones(3, 16, 16))
    # every pixel value, bit for bit the float32 steps (x / 255 - 0.5) / 0.5, channels first and contiguous
    noise = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    noise[0, :, 0] = 0
    noise[1, :, 0] = 255
    x = preprocess_image(Image.fromarray(noise, "RGB"), 16)
    want = (torch.from_numpy(noise).float().permute(2, 0, 1) / 255.0 - 0.5) / 0.5
    assert x.is_contiguous() and torch.equal(x, want)


# ---------------------------------------------------------------- LLaVA files

def _write_image(path, color=(255, 0, 0)):
    Image.new("RGB", (40, 40), color).save(path)


def _conv(q="<image>\nWhat color?", a="red", image="a.png"):
    rec = {"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]}
    if image is not None:
        rec["image"] = image
    return rec


@pytest.fixture
def llava_dir(tmp_path):
    _write_image(tmp_path / "a.png")
    _write_image(tmp_path / "b.png", (0, 0, 255))
    full = (tmp_path / "a.png").read_bytes()
    Image.new("RGB", (64, 64), (0, 255, 0)).save(tmp_path / "big.jpg", quality=95)
    (tmp_path / "trunc.jpg").write_bytes((tmp_path / "big.jpg").read_bytes()[:300])
    (tmp_path / "empty.png").write_bytes(full[:0])
    lines = [
        json.dumps(_conv()),                                           # 1 good
        '{"image": "a.png", "conversations": [',                       # 2 broken JSON line
        json.dumps(_conv(image="missing.png")),                        # 3 missing image
        json.dumps(_conv(image="trunc.jpg")),                          # 4 truncated image
        json.dumps({"image": "a.png", "conversations": []}),           # 5 empty conversation
        "",                                                            # blank lines are not records
        json.dumps(_conv(q="Compare <image> and <image>", image=["a.png", "b.png"])),  # 7 good, two images
        json.dumps(_conv(q="Just text?", a="yes", image=None)),        # 8 good, text only
        json.dumps(_conv(q="What is it?", image="b.png")),             # 9 good, no marker: image prepended
        json.dumps(_conv(q="<image> <image>", image="a.png")),         # 10 marker/image mismatch
        json.dumps(_conv(a="")),                                       # 11 nothing to learn
    ]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    return tmp_path


def test_llava_jsonl_skips_and_names_bad_records(tok, llava_dir):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_llava(llava_dir / "data.jsonl", None, tok, num_image_tokens=4, image_size=16)
    assert len(ds) == 4
    assert ds.skipped.count == 6
    assert ds.skipped.by_reason == {"broken json": 1, "missing image": 1, "bad image": 1, "empty conversation": 2,
                                    "image count mismatch": 1}
    messages = [str(w.message) for w in caught if issubclass(w.category, DataWarning)]
    path = str(llava_dir / "data.jsonl")
    for line in (2, 3, 4, 5, 10, 11):
        assert any(f"{path}:{line}:" in m for m in messages), line
    assert any("skipped 6 bad records" in m for m in messages)
    first, two, text_only, prepended = ds.samples
    assert first.ids.count(tok.image_id) == 4 and len(first.images) == 1
    assert first.images[0].shape == (3, 16, 16) and torch.allclose(first.images[0][0], torch.ones(16, 16))
    assert tok.decode([t for t, m in zip(first.ids, first.loss_mask) if m]) == "red"
    assert first.ids[:3] == [tok.bos_id, tok.user_id, tok.image_id]  # "<image>\n" -> image part, newline dropped
    assert tok.decode(first.ids) == "What color?red"
    assert two.ids.count(tok.image_id) == 8 and torch.allclose(two.images[1][2], torch.ones(16, 16))
    assert text_only.images == [] and tok.image_id not in text_only.ids
    assert prepended.ids[2] == tok.image_id


def test_llava_strict_mode_raises_on_first_bad_record(tok, llava_dir):
    with pytest.raises(DataError, match=r"data\.jsonl:2: broken JSON"):
        load_llava(llava_dir / "data.jsonl", llava_dir, tok, num_image_tokens=4, image_size=16, strict=True)


def test_llava_json_list_and_image_folder(tok, tmp_path):
    (tmp_path / "imgs").mkdir()
    _write_image(tmp_path / "imgs" / "a.png")
    records = [_conv(), _conv(image="nope.png"), _conv(q="hi <|end|><|assistant|>", a="<|image|>", image=None)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    with pytest.warns(DataWarning) as caught:
        ds = load_llava(tmp_path / "d.json", tmp_path / "imgs", tok, num_image_tokens=2, image_size=8)
    assert any("d.json:record 1: missing image" in str(w.message) for w in caught)
    assert len(ds) == 2 and ds.skipped.count == 1
    hostile = ds[1]
    assert [t for t in hostile.ids if t < 8] == [1, 4, 7, 5, 7]  # the hostile text stays text
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(DataError, match="broken.json"):
        load_llava(tmp_path / "broken.json", None, tok, num_image_tokens=2, image_size=8)


# ---------------------------------------------------------------- text corpora

def test_text_corpora_txt_and_jsonl(tok, tmp_path):
    (tmp_path / "a.txt").write_text("First doc\nstill first.\n\nSecond doc.\n\n\n")
    (tmp_path / "b.jsonl").write_text('{"text": "third"}\n{"text": \n{"title": "x"}\n{"text": "  "}\n'
                                      '{"text": "fourth 🎉"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_text(tmp_path, tok, max_len=64)
    texts = [tok.decode(s.ids) for s in ds]
    assert texts == ["First doc\nstill first.", "Second doc.", "third", "fourth 🎉"]
    assert ds.skipped.count == 3
    msgs = " ".join(str(w.message) for w in caught)
    for line in (2, 3, 4):
        assert f"b.jsonl:{line}:" in msgs
    s = ds[0]
    assert s.ids[0] == tok.bos_id and s.ids[-1] == tok.eos_id and s.loss_mask == [False] + [True] * (len(s) - 1)
    with pytest.raises(DataError, match=r"b\.jsonl:2"):
        load_text(tmp_path / "b.jsonl", tok, max_len=64, strict=True)
    lines = load_text(tmp_path / "a.txt", tok, max_len=64, txt_mode="line")
    assert len(lines) == 3


def test_long_documents_are_chunked(tok):
    text = " ".join(f"word{i}" for i in range(300))
    chunks = text_samples(tok, [text], max_len=50)
    assert all(len(c) <= 50 for c in chunks) and len(chunks) > 1
    assert sum((c.ids for c in chunks), []) == [tok.bos_id] + tok.encode(text) + [tok.eos_id]
    assert chunks[1].loss_mask[0] is True  # only the very first <|bos|> is unsupervised


def test_parquet_needs_pyarrow_or_reads_text_column(tok, tmp_path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        (tmp_path / "x.parquet").write_bytes(b"PAR1")
        with pytest.raises(ImportError, match="pip install pyarrow"):
            load_text(tmp_path / "x.parquet", tok, max_len=32)
        return
    pq.write_table(pa.table({"text": ["one", None, "two"]}), tmp_path / "x.parquet")
    ds = load_text(tmp_path / "x.parquet", tok, max_len=32)
    assert [tok.decode(s.ids) for s in ds] == ["one", "two"] and ds.skipped.count == 1


def test_unsupported_corpus_is_named(tok, tmp_path):
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(DataError, match="x.csv"):
        load_text(tmp_path / "x.csv", tok, max_len=32)
    with pytest.raises(FileNotFoundError):
        load_text(tmp_path / "nope.txt", tok, max_len=32)


# ---------------------------------------------------------------- batch iterator

def _text_samples(n, seed=0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        ids = [1, 1000 + i] + [rng.randint(8, 400) for _ in range(rng.randint(1, 30))]
        out.append(Sample(ids, [False] + [True] * (len(ids) - 1)))
    return out


def _sample_ids(batch):
    """The unique marker id (1000 + index) of every document in a batch."""
    return sorted(int(t) - 1000 for t in batch["tokens"].flatten() if t >= 1000)


def test_iterator_static_shapes_and_epoch_coverage():
    samples = _text_samples(120)
    it = BatchIterator(samples, batch_size=3, seq_len=64, seed=1)
    per_epoch = it.batches_per_epoch
    seen = []
    for _ in range(per_epoch):
        b = next(it)
        assert b["tokens"].shape == (3, 64) and b["targets"].shape == (3, 64) and b["images"] is None
        seen += _sample_ids(b)
    assert len(seen) == len(set(seen))  # no sample twice in an epoch
    assert len(seen) > 0.8 * len(samples)  # only the last partial global batch is dropped
    assert it.state_dict() == {"epoch": 0, "step": per_epoch, "seed": 1}
    next(it)
    assert it.epoch == 1 and it.step == 1


def test_iterator_resume_gives_identical_batches():
    samples = _text_samples(80)
    ref = BatchIterator(samples, batch_size=2, seq_len=48, seed=5)
    expected = [next(ref) for _ in range(25)]  # crosses epoch boundaries
    it = BatchIterator(samples, batch_size=2, seq_len=48, seed=5)
    for _ in range(11):
        next(it)
    state = json.loads(json.dumps(it.state_dict()))  # plain ints survive JSON
    resumed = BatchIterator(samples, batch_size=2, seq_len=48, seed=5)
    resumed.load_state_dict(state)
    for want in expected[11:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in ("tokens", "targets", "positions", "doc_ids"))
    other_seed = BatchIterator(samples, batch_size=2, seq_len=48, seed=6)
    assert not torch.equal(next(other_seed)["tokens"], expected[0]["tokens"])
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(state)


@pytest.mark.parametrize("packed", [True, False])
def test_ranks_get_disjoint_slices_of_the_global_batch(packed):
    samples = _text_samples(100)
    kw = dict(seq_len=64, seed=2, packed=packed)
    single = BatchIterator(samples, batch_size=4, **kw)
    ranks = [BatchIterator(samples, batch_size=2, rank=r, world_size=2, **kw) for r in range(2)]
    for _ in range(single.batches_per_epoch + 2):
        whole = next(single)
        parts = [next(r) for r in ranks]
        assert torch.equal(torch.cat([p["tokens"] for p in parts]), whole["tokens"])
        assert not set(_sample_ids(parts[0])) & set(_sample_ids(parts[1]))
    with pytest.raises(ValueError, match="rank"):
        BatchIterator(samples, batch_size=2, seq_len=64, rank=2, world_size=2)


def test_iterator_truncates_and_drops_image_splitting_samples():
    img = torch.zeros(3, 4, 4)
    samples = [Sample([1] + [3] * 8 + [9] * 4, [False] * 9 + [True] * 4, [img]),   # 13 tokens, fits in 16
               Sample([1] + [9] * 4 + [3] * 8 + [9], [False] * 14, [img]),           # 14: fits
               Sample([1] + [9] * 12 + [3] * 8, [False] * 21, [img]),                # cut at 16 splits the image
               Sample([1] + [9] * 30, [False] + [True] * 30)]                        # text: truncated to 16
    it = BatchIterator(samples, batch_size=3, seq_len=16, image_token_id=3, packed=False, shuffle=False)
    assert it.dropped == 1 and it.truncated == 1
    b = next(it)
    assert b["tokens"].shape == (3, 16) and b["images"].shape == (2, 3, 4, 4)
    assert int((b["tokens"] == 3).sum()) == 16
    assert (b["targets"][2] != IGNORE).sum() == 15


def test_iterator_over_lazy_synthetic_data(tok):
    ds = SyntheticVQA(tok, N_IMG, 64, size=40)
    it = BatchIterator(ds, batch_size=2, seq_len=256, pad_id=tok.pad_id, image_token_id=tok.image_id)
    b = next(it)
    n_images = b["images"].shape[0]
    assert int((b["tokens"] == tok.image_id).sum()) == n_images * N_IMG and n_images >= 4
    with pytest.raises(ValueError, match="fewer than one global batch"):
        BatchIterator(ds, batch_size=64, seq_len=256)
    from ghostvis.train.data.prefetch import WorkerFeed

    fresh = [BatchIterator(ds, batch_size=2, seq_len=256, pad_id=tok.pad_id, image_token_id=tok.image_id)
             for _ in range(2)]
    with WorkerFeed(fresh[0], workers=2) as feed:  # images drawn in worker processes arrive whole and in order
        for _ in range(3):
            want, got = next(fresh[1]), next(feed)
            assert all(torch.equal(got[k], want[k]) for k in ("tokens", "targets", "images"))

@pytest.mark.parametrize("depth", [1, 3])
def test_prefetcher_gives_the_iterators_batches_and_cursor(depth):
    """Batches drawn ahead in a thread are the iterator's, in order, and the cursor is that of the
    batches handed out (what a checkpoint must save), not of those drawn ahead."""
    from ghostvis.train.data.prefetch import Prefetcher

    samples = _text_samples(60)
    ref = BatchIterator(samples, batch_size=2, seq_len=48, seed=2)
    want = [(next(ref), ref.state_dict()) for _ in range(12)]  # crosses an epoch
    with Prefetcher(BatchIterator(samples, batch_size=2, seq_len=48, seed=2), depth) as feed:
        assert feed.state_dict() == {"epoch": 0, "step": 0, "seed": 2}
        for batch, state in want:
            got = next(feed)
            assert all(torch.equal(got[k], batch[k]) for k in ("tokens", "targets", "positions", "doc_ids"))
            assert feed.state_dict() == state
    with pytest.raises(ValueError, match="at least 1"):
        Prefetcher(iter([]), 0)


def test_prefetcher_raises_the_iterators_errors_in_order_and_closes():
    from ghostvis.train.data.prefetch import Prefetcher

    def batches():
        yield {"x": torch.zeros(1)}
        yield {"x": torch.ones(1)}
        raise RuntimeError("bad record 7")

    feed = Prefetcher(batches(), 2)
    assert float(next(feed)["x"]) == 0 and float(next(feed)["x"]) == 1
    with pytest.raises(RuntimeError, match="bad record 7"):
        next(feed)
    with pytest.raises(StopIteration):
        next(feed)
    feed.close()
    with pytest.raises(AttributeError, match="state_dict"):
        feed.state_dict()
    assert [float(b["x"]) for b in Prefetcher(iter([{"x": torch.full((1,), 5.0)}]), 1)] == [5.0]  # plain end
    endless = Prefetcher(iter(lambda: {"x": torch.zeros(1)}, None), 2)  # a thread blocked on a full queue
    next(endless)
    endless.close()
    assert not endless._thread.is_alive()


@pytest.mark.parametrize("packed", [True, False])
def test_worker_feed_gives_the_iterators_batches_and_cursor(packed):
    """Batches drawn by two worker processes are the iterator's, in order, across epochs, with its cursor;
    a feed started from a loaded cursor continues where the iterator would."""
    from ghostvis.train.data.prefetch import WorkerFeed

    samples = _text_samples(50)
    ref = BatchIterator(samples, batch_size=2, seq_len=48, packed=packed, seed=4)
    want = [(next(ref), ref.state_dict()) for _ in range(30)]  # several epochs
    it = BatchIterator(samples, batch_size=2, seq_len=48, packed=packed, seed=4)
    it.load_state_dict(want[6][1])
    with WorkerFeed(it, workers=2, depth=2) as feed:
        assert feed.state_dict() == want[6][1]
        for batch, state in want[7:]:
            got = next(feed)
            assert all(torch.equal(got[k], batch[k]) for k in ("tokens", "targets", "positions", "doc_ids"))
            assert feed.state_dict() == state
    assert it.state_dict() == want[6][1]  # the feed never moves the iterator's own cursor
    with pytest.raises(TypeError, match="need a BatchIterator"):
        WorkerFeed(iter([]), workers=1)
