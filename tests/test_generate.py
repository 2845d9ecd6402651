"""Generation: the KV-cache engine against repeated full forwards, sampling, stop tokens, streaming."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ghostvis as gv
from ghostvis.infer.generate import generate, generate_uncached, stream
from ghostvis.infer.sampling import sample, top_k_filter, top_p_filter


@pytest.fixture(scope="module")
def text_model():
    cfg = gv.presets.get("tiny")
    return gv.init(cfg, seed=1), cfg


@pytest.fixture(scope="module")
def vlm_model():
    cfg = gv.presets.get("tiny-vlm")
    return gv.init(cfg, seed=2), cfg


def _images(n, seed, side=None):
    side = side or gv.presets.get("tiny-vlm").vision.image_size
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, side, side, generator=g) * 2 - 1 for _ in range(n)]


def test_cached_equals_uncached_text_batch_of_mixed_lengths(text_model):
    params, cfg = text_model
    prompts = [[11, 12, 13, 14, 15, 16, 17], [20], [30, 31, 32], list(range(100, 124))]
    out = generate(params, cfg, prompts, max_new_tokens=8)
    ref = [generate_uncached(params, cfg, p, max_new_tokens=8) for p in prompts]
    assert out == ref
    assert all(len(o) == 8 for o in out)


def test_cached_equals_uncached_single_prompt(text_model):
    params, cfg = text_model
    assert generate(params, cfg, [[9, 8, 7]], max_new_tokens=10) == [
        generate_uncached(params, cfg, [9, 8, 7], max_new_tokens=10)]


def test_cached_equals_uncached_with_images(vlm_model):
    params, cfg = vlm_model
    n, img = cfg.num_image_tokens, cfg.image_token_id
    prompts = [[1, 4] + [img] * n + [50, 51, 7, 5],            # one image
               [1, 4, 60, 61, 62, 7, 5],                       # text only, shorter
               [1, 4, 70] + [img] * n + [71] + [img] * n + [5]]  # two images
    images = [_images(1, 0), [], _images(2, 1)]
    out = generate(params, cfg, prompts, images, max_new_tokens=5)
    ref = [generate_uncached(params, cfg, p, im, max_new_tokens=5) for p, im in zip(prompts, images)]
    assert out == ref


def test_image_count_mismatch_is_a_clear_error(vlm_model):
    params, cfg = vlm_model
    prompt = [1, 4] + [cfg.image_token_id] * cfg.num_image_tokens + [5]
    with pytest.raises(gv.ImageTokenMismatch, match="prompt 0"):
        generate(params, cfg, [prompt], [[]], max_new_tokens=2)
    text_cfg = gv.presets.get("tiny")
    with pytest.raises(gv.ImageTokenMismatch, match="text-only"):
        generate(gv.init(text_cfg, seed=0), text_cfg, [[1, 5]], [_images(1, 0)], max_new_tokens=2)


def test_prompt_longer_than_context_is_an_error(text_model):
    params, cfg = text_model
    with pytest.raises(ValueError, match="longer than the model's context"):
        generate(params, cfg, [[5] * (cfg.text.max_seq_len + 1)], max_new_tokens=1)
    with pytest.raises(ValueError, match="empty"):
        generate(params, cfg, [[5], []])
    with pytest.raises(ValueError, match="outside"):
        generate(params, cfg, [[cfg.text.vocab_size]])


def test_generation_stops_at_the_context_end():
    cfg = gv.ModelConfig(text=gv.TextConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                            head_dim=16, ffn_dim=64, max_seq_len=12))
    params = gv.init(cfg, seed=0)
    out = generate(params, cfg, [[1] * 9, [2] * 4], max_new_tokens=10)
    assert [len(o) for o in out] == [3, 3]  # the longest prompt fills the context after 3 new tokens
    assert out[0] == generate_uncached(params, cfg, [1] * 9, max_new_tokens=10)


def test_stop_tokens_end_each_row_separately(text_model):
    params, cfg = text_model
    prompts = [[11, 12, 13], [40, 41, 42, 43, 44]]
    free = generate(params, cfg, prompts, max_new_tokens=10)
    stop = free[0][3]  # row 0 stops right before its 4th token
    out = generate(params, cfg, prompts, max_new_tokens=10, stop_ids=[stop])
    expect = [row[:row.index(stop)] if stop in row else row for row in free]
    assert out == expect
    assert len(out[0]) == 3


def test_seeded_sampling_is_reproducible(text_model):
    params, cfg = text_model
    kw = dict(max_new_tokens=8, temperature=1.0, top_p=0.95)
    a = generate(params, cfg, [[3, 4, 5], [6]], seed=123, **kw)
    b = generate(params, cfg, [[3, 4, 5], [6]], seed=123, **kw)
    c = generate(params, cfg, [[3, 4, 5], [6]], seed=124, **kw)
    assert a == b
    assert a != c  # a near-uniform random model: two seeds agreeing on 16 draws would be a broken sampler


def test_top_k_one_equals_greedy(text_model):
    params, cfg = text_model
    prompts = [[3, 4, 5], [6, 7]]
    greedy = generate(params, cfg, prompts, max_new_tokens=10)
    assert generate(params, cfg, prompts, max_new_tokens=10, temperature=1.3, top_k=1, seed=0) == greedy


def test_streaming_yields_the_same_tokens(text_model):
    params, cfg = text_model
    prompts = [[11, 12, 13], [40, 41]]
    full = generate(params, cfg, prompts, max_new_tokens=6)
    steps = list(stream(params, cfg, prompts, max_new_tokens=6))
    assert len(steps) == 6
    assert [[s[r] for s in steps] for r in range(2)] == full
    seen = []
    assert generate(params, cfg, prompts, max_new_tokens=6, on_token=lambda r, t: seen.append((r, t))) == full
    assert [t for r, t in seen if r == 1] == full[1]


def test_quantized_params_generate(text_model):
    from ghostvis.infer.quantize import quantize
    params, cfg = text_model
    q = quantize(params)
    assert generate(q, cfg, [[5, 6, 7], [8]], max_new_tokens=5) == [
        generate_uncached(q, cfg, p, max_new_tokens=5) for p in ([5, 6, 7], [8])]


def test_bad_sampling_arguments_are_named(text_model):
    params, cfg = text_model
    for kw, name in [({"temperature": -1.0}, "temperature"), ({"top_k": 0}, "top_k"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=name):
            generate(params, cfg, [[1]], **kw)


@given(st.integers(0, 10_000), st.floats(0.05, 1.0))
def test_top_p_keeps_the_smallest_nucleus(seed, p):
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(seed)) * 3
    kept = top_p_filter(logits, p) > float("-inf")
    probs = torch.softmax(logits, -1)
    for row in range(3):
        order = probs[row].argsort(descending=True)
        n = int(kept[row].sum())
        assert kept[row, order[:n]].all()  # the kept tokens are the most likely ones
        mass = probs[row, order].cumsum(0)
        assert mass[n - 1] >= p - 1e-6  # they reach p ...
        assert n == 1 or mass[n - 2] < p + 1e-6  # ... and one fewer would not


@given(st.integers(0, 10_000), st.integers(1, 50))
def test_top_k_keeps_k_tokens(seed, k):
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(seed))
    kept = top_k_filter(logits, k) > float("-inf")
    assert (kept.sum(-1) == k).all()
    assert torch.equal(kept, torch.zeros_like(kept).scatter(-1, logits.topk(k).indices, True))


def test_sampling_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1, 0.0]]))
    draws = torch.stack([sample(logits, temperature=1.0, generator=torch.Generator().manual_seed(s))
                         for s in range(2000)])
    freq = torch.bincount(draws.flatten(), minlength=4).float() / 2000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1, 0.0]), atol=0.04)
    assert sample(logits, temperature=1.0, top_p=0.5, generator=torch.Generator().manual_seed(0)).item() == 0


@pytest.mark.gpu
def test_cuda_graph_decode_equals_eager():
    cfg = gv.presets.get("tiny-vlm")
    params = gv.init(cfg, seed=3, device="cuda")
    n, img = cfg.num_image_tokens, cfg.image_token_id
    prompts = [[1, 4] + [img] * n + [50, 51, 5], [1, 4, 60, 61, 62, 7, 5]]
    images = [[t.cuda() for t in _images(1, 0)], []]
    graphed = generate(params, cfg, prompts, images, max_new_tokens=16, cuda_graph=True)
    eager = generate(params, cfg, prompts, images, max_new_tokens=16, cuda_graph=False)
    ref = [generate_uncached(params, cfg, p, im, max_new_tokens=16) for p, im in zip(prompts, images)]
    assert graphed == eager == ref
    a = generate(params, cfg, prompts, images, max_new_tokens=16, temperature=0.8, top_k=50, seed=7)
    assert a == generate(params, cfg, prompts, images, max_new_tokens=16, temperature=0.8, top_k=50, seed=7)


def test_compiled_decode_equals_eager_with_stops(text_model):
    """compile=True (stacked projections, torch.compile'd step, rounded cache) gives the eager tokens."""
    params, cfg = text_model
    prompts = [[11, 12, 13, 14, 15, 16, 17], [20], [30, 31, 32]]
    eager = generate(params, cfg, prompts, max_new_tokens=12)
    stop = [eager[1][3]]  # row 1 stops early; the others continue past it
    expect = generate(params, cfg, prompts, max_new_tokens=12, stop_ids=stop)
    assert generate(params, cfg, prompts, max_new_tokens=12, stop_ids=stop, compile=True) == expect
    assert generate(params, cfg, prompts, max_new_tokens=12, compile=True) == eager


@pytest.mark.gpu
def test_compiled_cuda_graph_decode_equals_uncached():
    cfg = gv.presets.get("tiny")
    params = gv.init(cfg, seed=3, device="cuda")
    prompts = [[1, 4, 60, 61, 62, 7, 5], [9, 8]]
    ref = [generate_uncached(params, cfg, p, max_new_tokens=16) for p in prompts]
    assert generate(params, cfg, prompts, max_new_tokens=16, compile=True) == ref
    q = gv.quantize(params, "int8")
    assert generate(q, cfg, prompts, max_new_tokens=16, compile=True) == generate(q, cfg, prompts, max_new_tokens=16)
    qh = gv.quantize(params, "int8", lm_head=True)  # the LM head's GEMV too, one row and two
    for batch in (prompts[:1], prompts):
        assert generate(qh, cfg, batch, max_new_tokens=16, compile=True) == generate(qh, cfg, batch, max_new_tokens=16)


def test_compiled_decode_falls_back_past_the_recompile_limit(text_model, caplog):
    import torch._dynamo

    params, cfg = text_model
    torch._dynamo.reset()
    names = torch._dynamo.config.get_config_copy()
    name = "recompile_limit" if "recompile_limit" in names else "cache_size_limit"
    with torch._dynamo.config.patch(**{name: 1}):
        for prompts in ([[5, 6, 7]], [[5, 6, 7], [9, 10]]):  # a second batch size would need a recompile
            assert generate(params, cfg, prompts, max_new_tokens=4, compile=True) == \
                generate(params, cfg, prompts, max_new_tokens=4)
    assert "recompile limit" in caplog.text
    torch._dynamo.reset()


def test_reused_session_gives_the_same_tokens_and_notices_weight_updates(text_model):
    import importlib

    gen = importlib.import_module("ghostvis.infer.generate")  # the module (the package exports the function)
    params, cfg = text_model
    params = gv.tree_map(lambda t: t.clone(), params)
    prompts = [[11, 12, 13], [20, 21]]
    gen.release_decode_session()
    hits = gen._SESSION.get("hits", 0)
    first = generate(params, cfg, prompts, max_new_tokens=6, reuse=True)
    again = generate(params, cfg, [[30, 31, 32], [7]], max_new_tokens=6, reuse=True)  # same shapes: reused
    assert gen._SESSION["hits"] == hits + 1
    assert first == generate(params, cfg, prompts, max_new_tokens=6)
    assert again == generate(params, cfg, [[30, 31, 32], [7]], max_new_tokens=6)
    # compile=True keeps stacked copies of the projections: an in-place update must not reuse them
    generate(params, cfg, prompts, max_new_tokens=6, reuse=True, compile=True)
    params["text"]["layers"][0]["attn"]["wq"].mul_(3.0)
    assert generate(params, cfg, prompts, max_new_tokens=6, reuse=True, compile=True) == [
        generate_uncached(params, cfg, p, max_new_tokens=6) for p in prompts]
    assert gen._SESSION["hits"] == hits + 1
    # two live streams of the same shapes never share a session
    a = stream(params, cfg, prompts, max_new_tokens=6, reuse=True)
    b = stream(params, cfg, [[30, 31, 32], [7]], max_new_tokens=6, reuse=True)
    got_a, got_b = [[], []], [[], []]
    for sa, sb in zip(a, b):
        for row, (ta, tb) in enumerate(zip(sa, sb)):
            got_a[row] += [ta] if ta is not None else []
            got_b[row] += [tb] if tb is not None else []
    assert got_a == generate(params, cfg, prompts, max_new_tokens=6)
    assert got_b == generate(params, cfg, [[30, 31, 32], [7]], max_new_tokens=6)
    gen.release_decode_session()


def test_left_pad_to_a_given_width():
    from ghostvis.infer.kv_cache import left_pad

    tokens, pad = left_pad([[1, 2], [3]], 0, width=4)
    assert tokens.tolist() == [[0, 0, 1, 2], [0, 0, 0, 3]] and pad.tolist() == [2, 3]
    with pytest.raises(ValueError, match="shorter than the longest prompt"):
        left_pad([[1, 2, 3]], 0, width=2)


def test_compiled_decode_with_images_equals_eager(vlm_model):
    """compile=True with images: the compiled (bucketed) prefill takes the merged image embeddings."""
    params, cfg = vlm_model
    n, img = cfg.num_image_tokens, cfg.image_token_id
    prompts = [[1, 4] + [img] * n + [50, 51, 5], [1, 4, 60, 61, 62, 7, 5]]
    images = [_images(1, 0), []]
    eager = generate(params, cfg, prompts, images, max_new_tokens=8)
    assert generate(params, cfg, prompts, images, max_new_tokens=8, compile=True) == eager
