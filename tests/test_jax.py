"""JAX interop: zero-copy DLPack conversion both ways, and the jax.numpy forward against GhostVis.

The JAX model is an independent implementation, so matching logits and
gradients (fp32, <= 1e-4) on every architecture switch checks both sides.
Parameters are randomised away from their init (biases and norm weights are
0/1 there) so that a dropped bias or norm weight would show.
"""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import ghostvis as gv
from ghostvis.interop import from_jax, load_jax, to_jax

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
jm = pytest.importorskip("ghostvis.interop.jax_model")

TOL = 1e-4
PAD = 0


def randomized(cfg, seed=0):
    """Init params, then every leaf nudged so biases/norm weights are not 0/1."""
    params = gv.init(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    return gv.tree_map(lambda t: t + (0.1 if t.dim() == 1 else 0.02) * torch.randn(t.shape, generator=g), params)


def jax_names(tree):
    """Dotted names of a JAX pytree, built from its key paths (the same rule as ``gv.flatten``)."""
    def part(k):
        return str(k.key) if hasattr(k, "key") else str(k.idx)
    return {".".join(part(k) for k in path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def packed_batch(cfg, seed=0):
    """Two packed rows: several documents each, images inside documents, a padding document at the end.

    Returns torch tensors ``tokens, targets, positions, doc_ids, images``.
    """
    g = torch.Generator().manual_seed(seed)
    n_img = cfg.num_image_tokens
    text = lambda k: torch.randint(8, cfg.text.vocab_size, (k,), generator=g).tolist()  # noqa: E731
    img = [cfg.image_token_id] * n_img if cfg.is_vlm else []
    rows = [[text(6), text(2) + img + text(4), [PAD] * 4],
            [text(3) + img + text(3), text(10)]]
    n_images = 2 if cfg.is_vlm else 0
    tokens, positions, doc_ids, targets = [], [], [], []
    for docs in rows:
        tok, pos, doc, tgt = [], [], [], []
        for d, ids in enumerate(docs):
            tok += ids
            pos += list(range(len(ids)))
            doc += [d] * len(ids)
            supervised = ids[0] != PAD
            tgt += [t if supervised else -100 for t in ids[1:]] + [-100]
        tokens.append(tok), positions.append(pos), doc_ids.append(doc), targets.append(tgt)
    assert len(tokens[0]) == len(tokens[1])
    images = torch.randn(n_images, 3, cfg.vision.image_size, cfg.vision.image_size, generator=g) if n_images else None
    return tuple(torch.tensor(x) for x in (tokens, targets, positions, doc_ids)) + (images,)


def as_jax(*xs):
    return [None if x is None else jnp.asarray(x.numpy()) for x in xs]


def torch_loss(params, cfg, tokens, targets, positions, doc_ids, images):
    logits = gv.forward(params, cfg, tokens, images, positions=positions, doc_ids=doc_ids)
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- DLPack conversion


def test_to_jax_is_zero_copy_and_keeps_names():
    cfg = gv.presets.get("tiny-vlm-perceiver")
    params = gv.tree_map(lambda t: t.requires_grad_(), gv.init(cfg))  # detaching must be handled for the user
    tree = to_jax(params)
    flat_torch, flat_jax = gv.flatten(params), jax_names(tree)
    assert sorted(flat_jax) == sorted(flat_torch)  # jax orders dict keys; the names are what matter
    for name, t in flat_torch.items():
        a = flat_jax[name]
        assert isinstance(a, jax.Array), name
        assert a.unsafe_buffer_pointer() == t.data_ptr(), f"{name} was copied"
        assert a.shape == tuple(t.shape) and a.dtype == jnp.float32


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_exact_and_zero_copy(dtype):
    params = gv.init(gv.presets.get("tiny-vlm-shuffle"), dtype=dtype)
    back = from_jax(to_jax(params))
    for name, t in gv.flatten(params).items():
        b = gv.flatten(back)[name]
        assert b.data_ptr() == t.data_ptr() and b.dtype == dtype and torch.equal(b, t), name


def test_from_jax_is_zero_copy_and_round_trips():
    tree = {"a": jnp.arange(12.0).reshape(3, 4), "b": [jnp.ones(5, jnp.bfloat16), {"c": jnp.zeros((2, 2))}],
            "t": (jnp.full((2,), 7.0),), "none": None}
    torch_tree = from_jax(tree)
    assert isinstance(torch_tree["b"], list) and isinstance(torch_tree["t"], tuple) and torch_tree["none"] is None
    again = to_jax(torch_tree)
    for (name, a), (_, t), (_, a2) in zip(jax_names(tree).items(), jax_names(torch_tree).items(),
                                          jax_names(again).items()):
        assert t.data_ptr() == a.unsafe_buffer_pointer() == a2.unsafe_buffer_pointer(), name
        assert np.array_equal(np.asarray(a2), np.asarray(a)), name
    assert torch.equal(torch_tree["a"].cpu(), torch.arange(12.0).reshape(3, 4))  # on the GPU where jax defaults to it


def test_conversion_aliases_memory():
    """The documented caveat: an in-place torch update after to_jax is visible through the JAX array."""
    t = torch.zeros(4)
    a = to_jax({"w": t})["w"]
    t.add_(1.0)
    assert np.array_equal(np.asarray(a), np.ones(4, np.float32))


def test_conversion_names_bad_leaves():
    with pytest.raises(TypeError, match=r"text\.layers\.0"):
        to_jax({"text": {"layers": [np.ones(3)]}})
    with pytest.raises(TypeError, match=r"w"):
        from_jax({"w": 3.0})


def test_load_jax_reads_a_ghostvis_checkpoint(tmp_path):
    cfg = gv.presets.get("tiny-vlm-shuffle")
    params = randomized(cfg)
    gv.save(tmp_path / "m.safetensors", params, cfg)
    tree, cfg2 = load_jax(tmp_path / "m.safetensors")
    assert cfg2 == cfg
    flat = jax_names(tree)
    assert set(flat) == set(gv.flatten(params))
    for name, t in gv.flatten(params).items():
        assert np.array_equal(np.asarray(flat[name]), t.numpy()), name


@pytest.mark.gpu
def test_cuda_round_trip_is_zero_copy():
    if not any(d.platform == "gpu" for d in jax.devices()):
        pytest.skip("jax has no GPU backend here")
    params = gv.init(gv.presets.get("tiny"), device="cuda")
    tree = to_jax(params)
    back = from_jax(tree)
    for name, t in gv.flatten(params).items():
        a = jax_names(tree)[name]
        assert a.unsafe_buffer_pointer() == t.data_ptr(), name
        assert gv.flatten(back)[name].data_ptr() == t.data_ptr() and gv.flatten(back)[name].is_cuda
    logits = gv.forward(params, gv.presets.get("tiny"), torch.arange(16, device="cuda")[None])
    jl = jm.forward(tree, gv.presets.get("tiny"), jnp.arange(16)[None])
    assert np.abs(np.asarray(jl) - logits.cpu().numpy()).max() < 1e-2  # TF32-class matmuls on GPU


# ----------------------------------------------------------------------------- the JAX forward


# XLA's CPU backend optimisations cost more compile time than these tiny graphs ever run
FAST_COMPILE = {"xla_backend_optimization_level": 0}
jit_forward = jax.jit(jm.forward, static_argnums=1, compiler_options=FAST_COMPILE)


def check_logits(cfg, seed=0):
    params = randomized(cfg, seed)
    tokens, targets, positions, doc_ids, images = packed_batch(cfg, seed)
    ref = gv.forward(params, cfg, tokens, images, positions=positions, doc_ids=doc_ids)
    jt, jp, jd, ji = as_jax(tokens, positions, doc_ids, images)
    out = jit_forward(to_jax(params), cfg, jt, ji, positions=jp, doc_ids=jd)
    err = np.abs(np.asarray(out) - ref.numpy()).max()
    assert ref.abs().max() > 0.5  # the comparison is not between two near-zero tensors
    assert err <= TOL, f"{cfg.name}: max |jax - torch| = {err:.2e}"


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"qkv_bias": True}, {"tie_embeddings": True}])
def test_text_logits_match(variant):
    cfg = gv.presets.get("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, n_layers=2, **variant))
    check_logits(cfg)


@pytest.mark.parametrize("preset", ["tiny-vlm", "tiny-vlm-shuffle", "tiny-vlm-perceiver"])
def test_vlm_logits_match(preset):
    check_logits(gv.presets.get(preset))


def test_packing_isolates_documents():
    """A document's logits do not depend on the other documents packed in its row."""
    cfg = gv.presets.get("tiny")
    params = to_jax(randomized(cfg))
    tokens, _, positions, doc_ids, _ = packed_batch(cfg)
    jt, jp, jd = as_jax(tokens, positions, doc_ids)
    packed = jit_forward(params, cfg, jt, positions=jp, doc_ids=jd)
    alone = jit_forward(params, cfg, jt[1:, :6])  # row 1's first document, on its own
    assert np.abs(np.asarray(packed[1, :6]) - np.asarray(alone[0])).max() <= TOL


def test_image_placeholder_mismatch_raises():
    cfg = gv.presets.get("tiny-vlm-shuffle")
    params = to_jax(gv.init(cfg))
    tokens = jnp.full((1, cfg.num_image_tokens + 1), cfg.image_token_id)
    with pytest.raises(ValueError, match="placeholder"):
        jm.forward(params, cfg, tokens, jnp.zeros((1, 3, 64, 64)))


def test_grad_matches_torch_func():
    """jax.grad of the JAX loss == torch.func.grad of the GhostVis loss, leaf by leaf.

    The perceiver VLM with QK-norm reads vision block 1 of 2: block 2 and the
    post-norm must get exactly zero gradient on both sides, everything else a
    real one.
    """
    cfg = gv.presets.get("tiny-vlm-perceiver")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, n_layers=2, qk_norm=True),
                      vision=dataclasses.replace(cfg.vision, feature_layer=-2))
    params = randomized(cfg)
    tokens, targets, positions, doc_ids, images = packed_batch(cfg)
    ref_loss = torch_loss(params, cfg, tokens, targets, positions, doc_ids, images)
    ref = gv.flatten(torch.func.grad(torch_loss)(params, cfg, tokens, targets, positions, doc_ids, images))
    jt, jtg, jp, jd, ji = as_jax(tokens, targets, positions, doc_ids, images)
    batch = {"tokens": jt, "targets": jtg, "positions": jp, "doc_ids": jd, "images": ji}
    loss_and_grad = jax.jit(jax.value_and_grad(jm.loss), static_argnums=1, compiler_options=FAST_COMPILE)
    value, grads = loss_and_grad(to_jax(params), cfg, batch)
    assert abs(float(value) - float(ref_loss)) <= TOL
    grads = jax_names(grads)
    assert set(grads) == set(ref)
    unused = ("vision.layers.1.", "vision.post_norm.")
    for name, g in ref.items():
        if name.startswith(unused):
            assert g.abs().max() == 0 and np.abs(np.asarray(grads[name])).max() == 0, name
            continue
        assert g.abs().max() > 0, f"{name}: no gradient reaches it, so the comparison proves nothing"
        err = np.abs(np.asarray(grads[name]) - g.numpy()).max()
        assert err <= TOL, f"{name}: max |jax grad - torch grad| = {err:.2e}"


def test_jax_loss_equals_the_training_loss():
    """jm.loss is the quantity ghostvis.train.loss.loss_fn trains on (mean over supervised tokens)."""
    loss_fn = pytest.importorskip("ghostvis.train.loss").loss_fn
    cfg = gv.presets.get("tiny")
    cfg = cfg.replace(text=dataclasses.replace(cfg.text, n_layers=2))  # the compile test_text_logits_match made
    params = randomized(cfg)
    tokens, targets, positions, doc_ids, images = packed_batch(cfg)
    ref = loss_fn(params, {"tokens": tokens, "targets": targets, "positions": positions, "doc_ids": doc_ids,
                           "images": None}, cfg)
    jt, jtg, jp, jd = as_jax(tokens, targets, positions, doc_ids)
    value = jm.cross_entropy(jit_forward(to_jax(params), cfg, jt, None, positions=jp, doc_ids=jd), jtg)
    assert abs(float(value) - float(ref)) <= TOL
