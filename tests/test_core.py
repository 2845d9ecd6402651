"""The functional contract of the core: pure forward, torch.func gradients, compile, checkpoint I/O, configs."""

import struct

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import ghostvis as gv
from ghostvis.core.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from ghostvis.core.model import ImageTokenMismatch, inputs_checked


def small_text(**kw):
    base = dict(vocab_size=97, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, max_seq_len=64)
    return TextConfig(**(base | kw))


def small_vlm(kind="mlp"):
    vision = VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=2, n_heads=2, ffn_dim=48)
    conn = ConnectorConfig(kind, scale=2, num_latents=5, n_layers=1, n_heads=4)
    return ModelConfig(text=small_text(), vision=vision, connector=conn, image_token_id=3)


def vlm_inputs(cfg, n_text=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = cfg.num_image_tokens
    # row 0: one image; row 1: two images; row 2: text only
    t = 2 * n + n_text
    tokens = torch.randint(10, cfg.text.vocab_size, (3, t), generator=g)
    tokens[0, 1:1 + n] = cfg.image_token_id
    tokens[1, 0:n] = cfg.image_token_id
    tokens[1, n + 2:2 * n + 2] = cfg.image_token_id
    images = torch.randn(3, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g)
    return tokens, images


def perturb(params, seed=1):
    """Random values everywhere, so a mixed-up norm weight or bias cannot hide behind ones/zeros."""
    g = torch.Generator().manual_seed(seed)
    return gv.tree_map(lambda t: t + 0.05 * torch.randn(t.shape, generator=g), params)


@pytest.mark.parametrize("kind", ["mlp", "pixel_shuffle", "perceiver"])
def test_forward_is_pure_and_deterministic(kind):
    cfg = small_vlm(kind)
    params = perturb(gv.init(cfg, seed=0))
    before = {k: v.clone() for k, v in gv.flatten(params).items()}
    tokens, images = vlm_inputs(cfg)
    out1 = gv.forward(params, cfg, tokens, images)
    out2 = gv.forward(params, cfg, tokens, images)
    assert out1.shape == (*tokens.shape, cfg.text.vocab_size)
    assert torch.equal(out1, out2)
    for k, v in gv.flatten(params).items():
        assert torch.equal(v, before[k]), f"forward mutated {k}"


def test_init_is_seeded():
    cfg = small_vlm()
    a, b, c = gv.init(cfg, seed=0), gv.init(cfg, seed=0), gv.init(cfg, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(gv.flatten(a).values(), gv.flatten(b).values()))
    assert not torch.equal(gv.flatten(a)["text.embed"], gv.flatten(c)["text.embed"])


def test_images_land_on_their_placeholders():
    """Changing one image changes only logits at and after its own placeholders."""
    cfg = small_vlm("mlp")
    params = perturb(gv.init(cfg, seed=0))
    tokens, images = vlm_inputs(cfg)
    base = gv.forward(params, cfg, tokens, images)
    images2 = images.clone()
    images2[2] += 1.0  # the second image of row 1
    out = gv.forward(params, cfg, tokens, images2)
    n = cfg.num_image_tokens
    assert torch.equal(out[0], base[0]) and torch.equal(out[2], base[2])
    assert torch.equal(out[1, : n + 2], base[1, : n + 2])
    assert not torch.allclose(out[1, n + 2:], base[1, n + 2:])


@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 12), data=st.data())
def test_merge_images_matches_masked_scatter(b, t, data):
    """The running-count merge equals ``masked_scatter``, values and both gradients, for any placement."""
    from ghostvis.core.model import merge_images

    per_image = data.draw(st.integers(1, min(4, b * t)))
    n_images = data.draw(st.integers(1, (b * t) // per_image))
    slots = data.draw(st.permutations(range(b * t)))[: n_images * per_image]
    g = torch.Generator().manual_seed(b * 100 + t)
    tokens = torch.randint(4, 50, (b * t,), generator=g)
    tokens[sorted(slots)] = 3
    tokens = tokens.view(b, t)
    text = torch.randn(b, t, 5, generator=g, dtype=torch.float64, requires_grad=True)
    imgs = torch.randn(n_images, per_image, 5, generator=g, dtype=torch.float64, requires_grad=True)
    up = torch.randn(b, t, 5, generator=g, dtype=torch.float64)
    ours = merge_images(text, tokens, imgs, 3)
    ref = text.masked_scatter((tokens == 3)[..., None], imgs)
    assert torch.equal(ours, ref)
    grads = torch.autograd.grad((ours * up).sum(), (text, imgs))
    ref_grads = torch.autograd.grad((ref * up).sum(), (text, imgs))
    assert all(torch.equal(a, r) for a, r in zip(grads, ref_grads))
    # image tokens of another dtype are cast to the text's
    assert torch.equal(merge_images(text, tokens, imgs.float(), 3), text.masked_scatter((tokens == 3)[..., None],
                                                                                        imgs.float().double()))


def test_placeholder_mismatch_names_both_counts():
    cfg = small_vlm()
    params = gv.init(cfg, seed=0)
    tokens, images = vlm_inputs(cfg)
    with pytest.raises(ImageTokenMismatch, match=r"found 48 .* 2 images x 16 tokens per image = 32"):
        gv.forward(params, cfg, tokens, images[:2])
    text_cfg = ModelConfig(text=small_text())
    with pytest.raises(ImageTokenMismatch, match="text-only"):
        gv.forward(gv.init(text_cfg), text_cfg, tokens.clamp(max=96), images)
    with inputs_checked():  # the caller vouches for its inputs (the loop checks them on the host)
        assert gv.forward(params, cfg, tokens, images[:2]).isfinite().all()
    with pytest.raises(ImageTokenMismatch):  # and only inside the block
        gv.forward(params, cfg, tokens, images[:2])


@settings(max_examples=4)
@given(kind=st.sampled_from(["mlp", "pixel_shuffle", "perceiver"]), seed=st.integers(0, 100))
def test_func_grad_matches_autograd(kind, seed):
    cfg = small_vlm(kind)
    params = perturb(gv.init(cfg, seed=seed), seed)
    tokens, images = vlm_inputs(cfg, seed=seed)
    targets = torch.roll(tokens, -1, 1)

    def loss_fn(p):
        logits = gv.forward(p, cfg, tokens, images)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

    grads, loss = torch.func.grad_and_value(loss_fn)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in gv.flatten(params).items()}
    ref_loss = loss_fn(gv.unflatten(leaves))
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss)
    for k, g in gv.flatten(grads).items():
        ref = leaves[k].grad if leaves[k].grad is not None else torch.zeros_like(g)  # unused: post_norm
        assert torch.allclose(g, ref, atol=1e-6, rtol=1e-5), k


def test_compile_traces_vlm_without_graph_breaks_in_the_decoder():
    """Dynamo + AOT autograd over the whole VLM forward (cheap backend: checks the trace, not codegen)."""
    cfg = small_vlm("pixel_shuffle")
    params = perturb(gv.init(cfg, seed=0))
    tokens, images = vlm_inputs(cfg)
    eager = gv.forward(params, cfg, tokens, images)
    compiled = torch.compile(gv.forward, backend="aot_eager")(params, cfg, tokens, images)
    torch.testing.assert_close(compiled, eager, atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compile_inductor_matches_eager():
    cfg = ModelConfig(text=small_text(n_layers=1))
    params = perturb(gv.init(cfg, seed=0))
    tokens = torch.randint(0, 97, (2, 16))
    eager = gv.forward(params, cfg, tokens)
    compiled = torch.compile(gv.forward, fullgraph=True)(params, cfg, tokens)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)


def test_qk_norm_and_bias_and_tied_variants_run():
    for kw in ({"qk_norm": True}, {"qkv_bias": True}, {"tie_embeddings": True}):
        cfg = ModelConfig(text=small_text(**kw))
        params = gv.init(cfg, seed=0)
        assert ("lm_head" in params["text"]) != kw.get("tie_embeddings", False)
        out = gv.forward(params, cfg, torch.randint(0, 97, (2, 9)))
        assert torch.isfinite(out).all()


def test_causality():
    cfg = ModelConfig(text=small_text())
    params = perturb(gv.init(cfg, seed=0))
    tokens = torch.randint(0, 97, (1, 12))
    base = gv.forward(params, cfg, tokens)
    tokens2 = tokens.clone()
    tokens2[0, 8] = (tokens2[0, 8] + 1) % 97
    out = gv.forward(params, cfg, tokens2)
    assert torch.equal(out[0, :8], base[0, :8]) and not torch.allclose(out[0, 8:], base[0, 8:])


# ---- presets and counters ----

def test_preset_sizes():
    assert abs(gv.count_params(gv.presets.get("d12")) / 1e6 - 179) < 2
    assert abs(gv.count_params(gv.presets.get("d20")) / 1e6 - 530) < 5
    for name in gv.presets.names():
        cfg = gv.presets.get(name)
        assert cfg.text.head_dim >= 32
        if cfg.is_vlm:
            assert cfg.num_image_tokens > 0
    with pytest.raises(KeyError, match="unknown preset"):
        gv.presets.get("d13x")


def test_flops_per_token_formula():
    cfg = gv.presets.get("d20")
    n = gv.count_params(cfg) - cfg.text.vocab_size * cfg.text.dim
    assert gv.flops_per_token(cfg, 2048) == 6 * n + 12 * 20 * 1280 * 2048


@pytest.mark.parametrize("field,value,match", [
    ("n_kv_heads", 3, "n_kv_heads: 3 must divide n_heads=4"),
    ("head_dim", 15, "head_dim: must be even"),
    ("dim", 0, "dim: must be a positive int"),
])
def test_config_validation_names_the_field(field, value, match):
    with pytest.raises(gv.ConfigError, match=match):
        small_text(**{field: value})


def test_vlm_config_validation():
    vision = VisionConfig(image_size=16, patch_size=4, dim=32, n_layers=2, n_heads=2, ffn_dim=48)
    with pytest.raises(gv.ConfigError, match="connector.scale"):
        ModelConfig(text=small_text(), vision=vision, connector=ConnectorConfig("pixel_shuffle", scale=3),
                    image_token_id=3)
    with pytest.raises(gv.ConfigError, match="image_token_id"):
        ModelConfig(text=small_text(), vision=vision, connector=ConnectorConfig(), image_token_id=500)
    with pytest.raises(gv.ConfigError, match="patch_size"):
        VisionConfig(image_size=18, patch_size=4)
    with pytest.raises(gv.ConfigError, match="feature_layer"):
        VisionConfig(n_layers=2, feature_layer=0)


def test_config_json_roundtrip():
    for name in gv.presets.names():
        cfg = gv.presets.get(name)
        assert ModelConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(gv.ConfigError, match="does not describe"):
        ModelConfig.from_dict({"text": {"bogus": 1}})


# ---- checkpoint I/O ----

def test_save_load_bit_exact(tmp_path):
    for cfg, dtype in ((small_vlm("perceiver"), torch.float32), (ModelConfig(text=small_text()), torch.bfloat16)):
        params = perturb(gv.init(cfg, seed=3))
        params = gv.tree_map(lambda t: t.to(dtype), params)
        path = tmp_path / "ckpt.safetensors"
        gv.save(path, params, cfg)
        loaded, cfg2 = gv.load(path)
        assert cfg2 == cfg
        a, b = gv.flatten(params), gv.flatten(loaded)
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    assert not list(tmp_path.glob("*.tmp"))


def _write_raw(path, tensors, cfg):
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata={"config": cfg.to_json()})


def test_load_names_missing_unexpected_misshaped(tmp_path):
    cfg = ModelConfig(text=small_text())
    flat = gv.flatten(gv.init(cfg))
    flat = dict(flat)
    del flat["text.layers.1.mlp.w_up"]
    flat["text.layers.0.extra"] = torch.zeros(3)
    flat["text.norm"] = torch.ones(65)
    flat["text.layers.0.attn_norm"] = flat["text.layers.0.attn_norm"].double()
    path = tmp_path / "bad.safetensors"
    _write_raw(path, flat, cfg)
    with pytest.raises(gv.CheckpointError) as e:
        gv.load(path)
    msg = str(e.value)
    assert "text.layers.1.mlp.w_up: missing" in msg
    assert "text.layers.0.extra: unexpected tensor" in msg
    assert "text.norm: expected shape [64], got [65]" in msg
    assert "mixed parameter dtypes" in msg


def test_load_corrupt_and_truncated_files(tmp_path):
    cfg = ModelConfig(text=small_text())
    path = tmp_path / "ok.safetensors"
    gv.save(path, gv.init(cfg), cfg)
    data = path.read_bytes()
    cases = {
        "truncated": data[: len(data) // 2],
        "garbage": b"not a safetensors file at all",
        "bad_header_len": struct.pack("<Q", 10**12) + data[8:],
        "empty": b"",
    }
    for name, blob in cases.items():
        p = tmp_path / f"{name}.safetensors"
        p.write_bytes(blob)
        with pytest.raises(gv.CheckpointError, match="truncated or corrupt"):
            gv.load(p)
    with pytest.raises(gv.CheckpointError, match="no such checkpoint"):
        gv.load(tmp_path / "nope.safetensors")
    # a valid safetensors file without a GhostVis config
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(gv.CheckpointError, match="no GhostVis config"):
        gv.load(tmp_path / "foreign.safetensors")
    # a config that is not JSON
    from safetensors.torch import save_file as sf
    sf({"x": torch.zeros(2)}, str(tmp_path / "badcfg.safetensors"), metadata={"config": "{nope"})
    with pytest.raises(gv.CheckpointError, match="bad config"):
        gv.load(tmp_path / "badcfg.safetensors")


def test_tree_flatten_unflatten_roundtrip():
    cfg = small_vlm("perceiver")
    params = gv.init(cfg)
    flat = gv.flatten(params)
    assert "text.layers.1.attn.wq" in flat and "connector.layers.0.wq" in flat
    again = gv.flatten(gv.unflatten(flat))
    assert list(again) == list(flat)
    with pytest.raises(ValueError, match="dot-free"):
        gv.flatten({"a.b": torch.zeros(1)})


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True, "qk_norm": True}])
def test_fused_projection_layout_gives_the_same_logits_and_grads(kw):
    from ghostvis.core.decoder import fuse_projections

    cfg = ModelConfig(text=small_text(**kw))
    params = perturb(gv.init(cfg, seed=0))
    fused = {**params, "text": fuse_projections(params["text"])}
    layer = fused["text"]["layers"][0]
    assert "wqkv" in layer["attn"] and "wq" not in layer["attn"] and "w_gate_up" in layer["mlp"]
    assert ("bqkv" in layer["attn"]) == bool(kw)
    tokens = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(gv.forward(fused, cfg, tokens), gv.forward(params, cfg, tokens), atol=1e-5, rtol=1e-5)
    assert fuse_projections(fused["text"])["layers"][0]["attn"]["wqkv"] is layer["attn"]["wqkv"]  # idempotent
    # gradients of the stacked weight are the stacked gradients of the separate ones
    loss = lambda p: gv.forward(p, cfg, tokens).float().square().mean()  # noqa: E731
    g_sep = torch.func.grad(loss)(params)["text"]["layers"][0]
    g_fus = torch.func.grad(loss)(fused)["text"]["layers"][0]
    torch.testing.assert_close(g_fus["attn"]["wqkv"], torch.cat([g_sep["attn"][k] for k in ("wq", "wk", "wv")]),
                               atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_fus["mlp"]["w_gate_up"], torch.cat([g_sep["mlp"]["w_gate"], g_sep["mlp"]["w_up"]]),
                               atol=1e-5, rtol=1e-4)
