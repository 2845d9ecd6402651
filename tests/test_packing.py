"""Sequence packing: best-fit decreasing, batch invariants, truncation, and packed logits == each document alone."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ghostvis as gv
from ghostvis.train.packing import IGNORE, Sample, best_fit_decreasing, collate_padded, image_runs, pack, truncate

IMG = 3      # image token id
N_IMG = 4    # placeholders per image in these tests
PAD = 0


@given(st.lists(st.integers(1, 32), min_size=1, max_size=40), st.integers(32, 64))
def test_best_fit_decreasing_places_every_item_once(lengths, cap):
    bins = best_fit_decreasing(lengths, cap)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= cap for b in bins)
    # best fit never opens a bin while an earlier bin could still take the item
    total = sum(lengths)
    assert len(bins) <= 2 * (-(-total // cap)) + 1


def test_best_fit_picks_tightest_bin():
    # decreasing: 6 -> bin0 (room 4), 5 -> bin1 (room 5), 4 -> bin0 (the tighter fit, room 0), 3 -> bin1
    assert best_fit_decreasing([4, 6, 3, 5], 10) == [[1, 0], [3, 2]]
    with pytest.raises(ValueError, match="item 1"):
        best_fit_decreasing([3, 11], 10)


def make_sample(seed: int, n_text: int, n_images: int) -> Sample:
    """A document with distinctive ids, a random mask and images whose pixels encode (seed, k)."""
    g = torch.Generator().manual_seed(seed)
    ids = [1, 100 + seed]  # a unique id per document, so tests can tell documents apart
    images = []
    for k in range(n_images):
        ids += [IMG] * N_IMG
        images.append(torch.full((3, 2, 2), float(seed * 10 + k)))
    ids += torch.randint(8, 100, (n_text,), generator=g).tolist()
    mask = [False] + torch.rand(len(ids) - 1, generator=g).lt(0.7).tolist()
    mask = [m and t != IMG for m, t in zip(mask, ids)]
    return Sample(ids, mask, images)


docs_strategy = st.lists(st.tuples(st.integers(0, 20), st.integers(0, 2)), min_size=1, max_size=12)


def split_docs(batch):
    """Per row, the documents recovered from doc_ids: list of (tokens, targets, positions)."""
    out = []
    for b in range(batch["tokens"].shape[0]):
        d = batch["doc_ids"][b]
        row = []
        for doc in d.unique_consecutive().tolist():
            sel = d == doc
            row.append((batch["tokens"][b][sel].tolist(), batch["targets"][b][sel].tolist(),
                        batch["positions"][b][sel].tolist()))
        out.append(row)
    return out


@given(docs_strategy, st.integers(24, 48))
def test_packed_batch_invariants(spec, seq_len):
    samples = [make_sample(i, n_text, n_img) for i, (n_text, n_img) in enumerate(spec)]
    samples = [s for s in samples if len(s) <= seq_len]
    if not samples:
        return
    batch = pack(samples, seq_len, PAD)
    B, T = batch["tokens"].shape
    assert T == seq_len and all(batch[k].shape == (B, T) and batch[k].dtype == torch.long
                                for k in ("tokens", "targets", "positions", "doc_ids"))
    # doc ids are 0, 1, ... within each row and never decrease; padding is the last document
    for row in batch["doc_ids"]:
        assert row[0] == 0 and bool((row.diff() >= 0).all()) and bool((row.diff() <= 1).all())
    seen = []
    images_in_order = []
    for row in split_docs(batch):
        for tokens, targets, positions in row:
            assert positions == list(range(len(tokens)))  # restart at each document
            assert targets[-1] == IGNORE                  # never cross into the next document
            match = [i for i, s in enumerate(samples) if s.ids == tokens and i not in seen]
            if not match:  # the padding document
                assert set(tokens) == {PAD} and set(targets) == {IGNORE}
                continue
            i = match[0]
            seen.append(i)
            s = samples[i]
            assert targets == [s.ids[t + 1] if s.loss_mask[t + 1] else IGNORE for t in range(len(s) - 1)] + [IGNORE]
            images_in_order += s.images
    assert sorted(seen) == list(range(len(samples)))  # every token of every sample lands exactly once
    n_images = sum(len(s.images) for s in samples)
    assert int((batch["tokens"] == IMG).sum()) == n_images * N_IMG
    if n_images:
        assert torch.equal(batch["images"], torch.stack(images_in_order))
    else:
        assert batch["images"] is None


def test_padded_collate_one_sample_per_row():
    samples = [make_sample(0, 5, 1), make_sample(1, 9, 0)]
    batch = collate_padded(samples, 24)
    assert batch["tokens"].shape == (2, 24)
    assert batch["tokens"][1, :len(samples[1])].tolist() == samples[1].ids
    assert batch["doc_ids"][1].tolist() == [0] * len(samples[1]) + [1] * (24 - len(samples[1]))
    assert (batch["targets"][:, -1] == IGNORE).all()
    assert batch["images"].shape == (1, 3, 2, 2)
    with pytest.raises(ValueError, match="seq_len"):
        collate_padded([make_sample(0, 30, 0)], 24)


def test_truncation_never_splits_an_image_run():
    s = make_sample(7, 10, 2)  # [bos] [id] [img x4] [img x4] text x10: the two runs merge into 2..10
    assert image_runs(s.ids, IMG) == [(2, 10)]
    assert truncate(s, 5, IMG) is None           # cut inside the placeholders: drop the sample
    cut = truncate(s, 12, IMG)
    assert cut.ids == s.ids[:12] and cut.loss_mask == s.loss_mask[:12] and len(cut.images) == 2
    assert truncate(s, 100, IMG) is s
    text_then_image = Sample([1, 9, 9, 9] + [IMG] * N_IMG + [9, 9], [False] + [True] * 9, [torch.zeros(3, 2, 2)])
    kept = truncate(text_then_image, 4, IMG)     # cut right before the image: the image goes with its run
    assert kept.ids == [1, 9, 9, 9] and kept.images == []
    assert truncate(text_then_image, 6, IMG) is None


def test_sample_validates_mask_length():
    with pytest.raises(ValueError, match="loss_mask"):
        Sample([1, 2, 3], [True])


def test_packed_logits_equal_each_document_alone():
    """The core's doc_ids masking + per-document positions make packing exact (fp32)."""
    cfg = gv.ModelConfig(
        text=gv.TextConfig(vocab_size=128, dim=64, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=32, ffn_dim=128,
                           max_seq_len=128),
        vision=gv.VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, ffn_dim=64),
        connector=gv.ConnectorConfig("mlp"), image_token_id=IMG)
    assert cfg.num_image_tokens == N_IMG
    params = gv.init(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i, (n_text, n_img) in enumerate([(20, 1), (7, 0), (11, 2), (3, 0), (15, 1)]):
        s = make_sample(i, n_text, n_img)
        s.images = [torch.rand(3, 16, 16, generator=g) * 2 - 1 for _ in s.images]
        samples.append(s)
    batch = pack(samples, 48, PAD)
    assert batch["tokens"].shape[0] < len(samples)  # some rows really hold several documents
    with torch.no_grad():
        packed = gv.forward(params, cfg, batch["tokens"], batch["images"], positions=batch["positions"],
                            doc_ids=batch["doc_ids"])
        checked = 0
        for b in range(batch["tokens"].shape[0]):
            for d in batch["doc_ids"][b].unique().tolist():
                sel = batch["doc_ids"][b] == d
                tokens = batch["tokens"][b][sel]
                match = [s for s in samples if s.ids == tokens.tolist()]
                if not match:
                    continue  # padding
                s = match[0]
                alone = gv.forward(params, cfg, tokens[None], torch.stack(s.images) if s.images else None)
                torch.testing.assert_close(packed[b][sel], alone[0], atol=1e-5, rtol=1e-5)
                checked += 1
    assert checked == len(samples)
