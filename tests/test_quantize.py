"""INT8 weight-only quantization: the transform, its error bound, held-out loss, save/load, generation."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import ghostvis as gv
from ghostvis.infer.generate import generate, generate_uncached
from ghostvis.infer.quantize import PROJECTIONS, dequantize, dequantize_weight, quantize, quantize_weight, weight_bytes
from ghostvis.train.loss import loss_fn

STATES, OFFSET = 48, 8  # a Markov chain over token ids 8..55


def markov_batch(rows: int, length: int, gen: torch.Generator) -> torch.Tensor:
    """Sequences from a fixed random Markov chain (4 successors per state): learnable, with ~1 nat of entropy."""
    chain = torch.Generator().manual_seed(1234)
    succ = torch.randint(0, STATES, (STATES, 4), generator=chain)
    prob = torch.softmax(torch.randn(STATES, 4, generator=chain) * 1.5, -1)
    x = torch.zeros(rows, length, dtype=torch.long)
    s = torch.randint(0, STATES, (rows,), generator=gen)
    for t in range(length):
        x[:, t] = s
        s = succ[s, torch.multinomial(prob[s], 1, generator=gen).squeeze(1)]
    return x + OFFSET


def lm_loss(params, cfg, x) -> float:
    with torch.no_grad():
        return F.cross_entropy(gv.forward(params, cfg, x[:, :-1]).flatten(0, 1), x[:, 1:].flatten()).item()


@pytest.fixture(scope="module")
def trained():
    """A tiny text model trained for a few dozen AdamW steps on the Markov chain, and held-out data."""
    cfg = gv.ModelConfig(text=gv.TextConfig(vocab_size=128, dim=64, n_layers=2, n_heads=2, n_kv_heads=1,
                                            head_dim=32, ffn_dim=192, max_seq_len=64))
    params = gv.init(cfg, seed=0)
    leaves = list(gv.flatten(params).values())
    for t in leaves:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(leaves, lr=1e-2, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = markov_batch(8, 33, gen)
        loss = F.cross_entropy(gv.forward(params, cfg, x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    params = gv.tree_map(lambda t: t.detach(), params)
    held_out = markov_batch(32, 33, torch.Generator().manual_seed(99))
    return params, cfg, held_out


def test_held_out_loss_rises_at_most_one_percent(trained):
    params, cfg, held_out = trained
    base = lm_loss(params, cfg, held_out)
    assert base < 2.0, f"the fixture model did not train (held-out loss {base:.3f}; uniform is {4.85:.2f})"
    q = lm_loss(quantize(params), cfg, held_out)
    assert (q - base) / base <= 0.01, (base, q)


def test_quantized_tree_layout(trained):
    params, cfg, _ = trained
    q = quantize(params)
    for layer in q["text"]["layers"]:
        for sub in ("attn", "mlp"):
            for name, w in layer[sub].items():
                if name in PROJECTIONS:
                    assert set(w) == {"q", "scale"} and w["q"].dtype == torch.int8
                    assert w["scale"].shape == (w["q"].shape[0],)
                else:
                    assert isinstance(w, torch.Tensor)
    for name in ("embed", "lm_head", "norm"):
        assert q["text"][name] is params["text"][name]  # untouched leaves are shared
    assert weight_bytes(q) < weight_bytes(params)
    assert isinstance(params["text"]["layers"][0]["attn"]["wq"], torch.Tensor)  # the input is not modified
    with pytest.raises(ValueError, match="already"):
        quantize(q)
    with pytest.raises(ValueError, match="int4"):
        quantize(params, "int4")


@given(st.integers(0, 10_000), st.integers(1, 40), st.integers(1, 40))
def test_quantize_weight_error_is_at_most_half_a_step(seed, rows, cols):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * torch.rand(rows, 1) * 3
    w[0] = 0.0  # an all-zero row must stay finite and exact
    qw = quantize_weight(w)
    err = (dequantize_weight(qw) - w).abs()
    assert torch.isfinite(err).all()
    assert (err <= qw["scale"][:, None] / 2 + 1e-7).all()
    assert (qw["q"].abs().amax(1)[1:] == 127).all() or rows == 1  # every nonzero row uses the full range
    assert torch.equal(dequantize_weight(qw)[0], torch.zeros(cols))


def test_dequantize_inverts_quantize_within_the_step(trained):
    params, cfg, held_out = trained
    back = dequantize(quantize(params))
    w, wb = params["text"]["layers"][1]["mlp"]["w_down"], back["text"]["layers"][1]["mlp"]["w_down"]
    assert wb.dtype == w.dtype and (wb - w).abs().max() <= w.abs().max() / 254 + 1e-7
    assert gv.flatten(back).keys() == gv.flatten(params).keys()


def test_quantized_save_load_generate(trained, tmp_path):
    params, cfg, held_out = trained
    q = quantize(params)
    path = tmp_path / "int8.safetensors"
    gv.save(path, q, cfg)
    q2, cfg2 = gv.load(path)
    assert cfg2 == cfg
    assert torch.equal(q2["text"]["layers"][0]["attn"]["wq"]["q"], q["text"]["layers"][0]["attn"]["wq"]["q"])
    assert lm_loss(q2, cfg2, held_out) == lm_loss(q, cfg, held_out)
    prompts = [held_out[0, :5].tolist(), held_out[1, :9].tolist()]
    out = generate(q2, cfg2, prompts, max_new_tokens=8)
    assert out == [generate_uncached(q2, cfg2, p, max_new_tokens=8) for p in prompts]
    # the trained model follows its chain: every generated token is one of the chain's states
    assert all(OFFSET <= t < OFFSET + STATES for row in out for t in row)


def test_quantized_vlm_generates():
    cfg = gv.presets.get("tiny-vlm")
    q = quantize(gv.init(cfg, seed=0))
    assert "q" not in gv.flatten(q["vision"])  # the image path stays in float
    prompt = [1, 4] + [cfg.image_token_id] * cfg.num_image_tokens + [5]
    image = torch.zeros(3, cfg.vision.image_size, cfg.vision.image_size)
    assert generate(q, cfg, [prompt], [[image]], max_new_tokens=3) == [
        generate_uncached(q, cfg, prompt, [image], max_new_tokens=3)]


def test_lm_head_quantized_on_request(trained, tmp_path):
    params, cfg, held_out = trained
    q = quantize(params, lm_head=True)
    head = q["text"]["lm_head"]
    assert set(head) == {"q", "scale"} and head["q"].dtype == torch.int8
    assert torch.equal(dequantize_weight(head), dequantize(q)["text"]["lm_head"])
    assert isinstance(params["text"]["lm_head"], torch.Tensor)  # the input is not modified
    assert isinstance(quantize(params)["text"]["lm_head"], torch.Tensor)  # off unless asked for
    # rounding the head as well costs little more on the held-out data
    base, body = lm_loss(params, cfg, held_out), lm_loss(quantize(params), cfg, held_out)
    both = lm_loss(q, cfg, held_out)
    assert both != body and (both - base) / base <= 0.02, (base, body, both)
    # the logits are those of the dequantized head
    x = held_out[:2, :9]
    with torch.no_grad():
        ref = gv.forward(dequantize(q), cfg, x)
        assert torch.allclose(gv.forward(q, cfg, x), ref, atol=1e-4, rtol=1e-4)
    # a tree with only the head quantized counts as quantized: a second pass refuses it
    only_head = {**params, "text": {**params["text"], "lm_head": head}}
    with pytest.raises(ValueError, match="already"):
        quantize(only_head)
    path = tmp_path / "int8-head.safetensors"
    gv.save(path, q, cfg)
    q2, _ = gv.load(path)
    assert torch.equal(q2["text"]["lm_head"]["q"], head["q"])
    prompts = [held_out[0, :5].tolist(), held_out[1, :9].tolist()]
    out = generate(q2, cfg, prompts, max_new_tokens=8)
    assert out == [generate_uncached(q2, cfg, p, max_new_tokens=8) for p in prompts]


def test_lm_head_quantization_refuses_a_tied_head():
    cfg = gv.presets.get("tiny")
    cfg = gv.ModelConfig(text=gv.TextConfig(**{**cfg.text.__dict__, "tie_embeddings": True}))
    params = gv.init(cfg, seed=0)
    with pytest.raises(ValueError, match="tie"):
        quantize(params, lm_head=True)
    assert "lm_head" not in quantize(params)["text"]


def test_training_loss_runs_on_an_int8_head(trained):
    params, cfg, held_out = trained
    q = quantize(params, lm_head=True)
    batch = {"tokens": held_out[:4, :-1], "targets": held_out[:4, 1:]}
    norm = q["text"]["norm"].clone().requires_grad_(True)
    loss = loss_fn({**q, "text": {**q["text"], "norm": norm}}, batch, cfg)
    loss.backward()
    assert torch.isfinite(loss) and norm.grad is not None and norm.grad.abs().sum() > 0
    ref = loss_fn(dequantize(q), batch, cfg)
    assert torch.allclose(loss, ref, atol=1e-5), (loss, ref)
