"""Functional optimizers, routing/decay rules, clipping, LR schedules, optimizer-state I/O."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import ghostvis as gv
from ghostvis.core.io import CheckpointError
from ghostvis.train import optim, schedule
from ghostvis.train.optim import AdamW, Muon, clip_by_global_norm, is_muon_param, make_optimizer, newton_schulz


def _problem(seed=0):
    g = torch.Generator().manual_seed(seed)
    params = {"a.w": torch.randn(8, 5, generator=g), "a.b": torch.randn(5, generator=g),
              "c.w": torch.randn(3, 4, 2, generator=g)}
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(20)]
    return params, grads


@pytest.mark.parametrize("fused", [False, True])
def test_adamw_matches_torch_over_20_steps(fused):
    params, grads = _problem()
    ref = {k: torch.nn.Parameter(v.clone()) for k, v in params.items()}
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    try:
        torch_opt = torch.optim.AdamW(ref.values(), fused=fused, **kw)
    except RuntimeError:
        pytest.skip("fused AdamW not available on this device")
    opt = AdamW(decay=lambda name, t: True, fused=fused, **kw)
    mine = {k: v.clone() for k, v in params.items()}
    state = opt.init(mine)
    for step, g in enumerate(grads):
        for k, p in ref.items():
            p.grad = g[k].clone()
        torch_opt.step()
        mine, state = opt.update(mine, {k: v.clone() for k, v in g.items()}, state, step)
    for k in params:
        torch.testing.assert_close(mine[k], ref[k].detach(), atol=1e-6, rtol=0)
    assert int(state["count"]) == 20


def test_adamw_lr_schedule_is_called_with_step():
    seen = []
    opt = AdamW(lr=lambda s: seen.append(s) or 0.0)
    params, grads = _problem()
    before = {k: v.clone() for k, v in params.items()}
    state = opt.init(params)
    for step in (0, 1, 7):
        opt.update(params, grads[step], state, step)
    assert seen == [0, 1, 7]
    for k in params:  # lr 0 changes nothing
        torch.testing.assert_close(params[k], before[k], atol=0, rtol=0)


def test_weight_decay_rules_on_model_names():
    cfg = gv.presets.get("tiny-vlm")
    flat = gv.flatten(gv.init(cfg, device="meta"))
    assert not optim.decays("text.embed", flat["text.embed"])
    assert not optim.decays("vision.pos_embed", flat["vision.pos_embed"])
    assert not optim.decays("text.norm", flat["text.norm"])
    assert not optim.decays("connector.b1", flat["connector.b1"])
    assert optim.decays("text.layers.0.attn.wq", flat["text.layers.0.attn.wq"])
    assert optim.decays("text.lm_head", flat["text.lm_head"])


def test_weight_decay_applies_only_where_the_rule_says():
    params = {"text.embed": torch.ones(4, 3), "text.norm": torch.ones(3), "text.layers.0.mlp.w_up": torch.ones(4, 3)}
    grads = {k: torch.zeros_like(v) for k, v in params.items()}
    opt = AdamW(lr=0.1, weight_decay=0.5)
    opt.update(params, grads, opt.init(params), 0)
    assert torch.equal(params["text.embed"], torch.ones(4, 3))
    assert torch.equal(params["text.norm"], torch.ones(3))
    torch.testing.assert_close(params["text.layers.0.mlp.w_up"], torch.full((4, 3), 0.95))


def test_muon_routing_rule():
    for preset in ("tiny-vlm", "tiny-vlm-perceiver"):
        flat = gv.flatten(gv.init(gv.presets.get(preset), device="meta"))
        muon = {k for k, v in flat.items() if is_muon_param(k, v)}
        for k in muon:
            assert flat[k].ndim == 2 and k.startswith(("text.layers.", "vision.layers.", "connector."))
        for k in ("text.embed", "text.lm_head", "text.norm", "vision.pos_embed", "vision.patch_embed.weight",
                  "vision.layers.0.ln1.weight", "vision.layers.0.attn.bq", "text.layers.0.attn_norm"):
            assert k not in muon, k
        for k in ("text.layers.0.attn.wq", "text.layers.3.mlp.w_down", "vision.layers.1.mlp.w1"):
            assert k in muon, k
        if preset == "tiny-vlm-perceiver":
            assert "connector.latents" not in muon and "connector.in_proj" in muon
        else:
            assert {"connector.w1", "connector.w2"} <= muon


@given(st.sampled_from([(16, 16), (8, 24), (24, 8)]), st.integers(0, 100))
def test_newton_schulz_orthogonalises_and_batches(shape, seed):
    gen = torch.Generator().manual_seed(seed)
    u, _, vt = torch.linalg.svd(torch.randn(3, *shape, generator=gen), full_matrices=False)
    s = torch.rand(3, min(shape), generator=gen) * 0.9 + 0.1  # condition number <= 10
    g = u @ torch.diag_embed(s) @ vt
    out = newton_schulz(g)
    for i in range(3):  # batched == one at a time
        torch.testing.assert_close(out[i], newton_schulz(g[i]), atol=1e-5, rtol=1e-5)
    sv = torch.linalg.svdvals(out)
    assert sv.min() > 0.6 and sv.max() < 1.25, sv


def test_muon_matches_a_per_matrix_reference():
    g = torch.Generator().manual_seed(1)
    params = {f"text.layers.{i}.attn.wq": torch.randn(6, 4, generator=g) for i in range(3)}
    params["connector.w1"] = torch.randn(4, 6, generator=g)
    ref = {k: v.clone() for k, v in params.items()}
    bufs = {k: torch.zeros_like(v) for k, v in params.items()}
    opt = Muon(lr=0.05, momentum=0.9, weight_decay=0.1)
    state = opt.init(params)
    for step in range(3):
        grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        opt.update(params, grads, state, step)
        for k, p in ref.items():
            bufs[k] = 0.9 * bufs[k] + 0.1 * grads[k]
            d = newton_schulz(0.1 * grads[k] + 0.9 * bufs[k])
            p.mul_(1 - 0.05 * 0.1).add_(d, alpha=-0.05 * max(1, p.shape[0] / p.shape[1]) ** 0.5)
    for k in params:
        torch.testing.assert_close(params[k], ref[k], atol=1e-5, rtol=1e-5)


def leaves(params, state):
    return list(params.values()) + list(gv.flatten(state).values())


@pytest.mark.parametrize("kind", ["adamw-fused", "adamw-foreach", "muon"])
def test_found_inf_skips_the_update_and_zero_applies_it(kind):
    """A set flag leaves params and state as they were; a clear flag is the plain update."""
    g = torch.Generator().manual_seed(3)
    params = {"text.layers.0.attn.wq": torch.randn(6, 4, generator=g), "text.norm": torch.randn(4, generator=g)}
    opt = {"adamw-fused": AdamW(lr=0.1, weight_decay=0.1, fused=True),
           "adamw-foreach": AdamW(lr=0.1, weight_decay=0.1, fused=False),
           "muon": make_optimizer("muon", lr=0.1, muon_lr=0.1, weight_decay=0.1)}[kind]
    try:
        mine, ref = ({k: v.clone() for k, v in params.items()} for _ in range(2))
        s_mine, s_ref = opt.init(mine), opt.init(ref)
        for step in range(3):
            grads = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
            before = [t.clone() for t in leaves(mine, s_mine)]
            nan = {k: torch.full_like(v, float("nan")) for k, v in grads.items()}
            opt.update(mine, nan, s_mine, step, found_inf=torch.tensor(1.0))
            for a, b in zip(before, leaves(mine, s_mine)):
                assert torch.equal(a, b)
            opt.update(mine, grads, s_mine, step, found_inf=torch.tensor(0.0))
            opt.update(ref, {k: v.clone() for k, v in grads.items()}, s_ref, step)
    except RuntimeError as e:
        if "fused" in str(e).lower():
            pytest.skip(f"fused AdamW not available here: {e}")
        raise
    for a, b in zip(leaves(mine, s_mine), leaves(ref, s_ref)):
        assert torch.equal(a, b)
    assert optim.num_updates(s_mine) == 3  # skipped steps are not counted


def test_an_optimizer_without_found_inf_is_skipped_on_the_host():
    class SGD:  # a user's optimizer: update takes no found_inf
        def init(self, params):
            return {}

        def update(self, params, grads, state, step):
            for k in params:
                params[k].sub_(0.1 * grads[k])
            return params, state

    assert not optim.takes_found_inf(SGD()) and optim.takes_found_inf(AdamW())
    opt = optim.Partitioned({"sgd": SGD(), "adamw": AdamW(lr=0.1)},
                            assign=lambda name, t: "sgd" if name.startswith("a") else "adamw")
    params = {"a.w": torch.ones(3), "c.w": torch.ones(2)}
    state = opt.init(params)
    grads = {"a.w": torch.full((3,), float("nan")), "c.w": torch.full((2,), float("inf"))}
    optim.update_or_skip(opt, params, grads, state, 0, torch.tensor(1.0))
    assert torch.equal(params["a.w"], torch.ones(3)) and torch.equal(params["c.w"], torch.ones(2))
    optim.update_or_skip(opt, params, {k: torch.ones_like(v) for k, v in params.items()}, state, 0, torch.tensor(0.0))
    assert torch.allclose(params["a.w"], torch.full((3,), 0.9)) and (params["c.w"] < 1).all()


def test_muon_rejects_non_matrices():
    with pytest.raises(ValueError, match="2-D"):
        Muon().init({"text.norm": torch.ones(3)})


def test_clip_matches_torch_clip_grad_norm():
    _, grads = _problem()
    g = grads[0]
    ref = [torch.nn.Parameter(torch.zeros_like(v)) for v in g.values()]
    for p, v in zip(ref, g.values()):
        p.grad = v.clone()
    want = torch.nn.utils.clip_grad_norm_(ref, 1.5)
    mine = {k: v.clone() for k, v in g.items()}
    _, norm = clip_by_global_norm(mine, 1.5)
    torch.testing.assert_close(norm, want)
    for p, v in zip(ref, mine.values()):
        torch.testing.assert_close(v, p.grad)
    small = {"x": torch.tensor([0.3, 0.4])}
    clip_by_global_norm(small, 1.0)
    assert torch.equal(small["x"], torch.tensor([0.3, 0.4]))  # under the limit: untouched
    for bad in (float("nan"), float("inf")):  # a non-finite norm (a skipped step) leaves them too
        odd = {"x": torch.tensor([0.3, bad])}
        clip_by_global_norm(odd, 1.0)
        assert torch.equal(odd["x"][:1], torch.tensor([0.3]))


@pytest.mark.parametrize("norm", [0.5, 1.0, 2.5, 40.0])
def test_clip_by_a_float_norm_and_by_a_tensor_norm_agree(norm):
    _, grads = _problem()
    a, b = ({k: v.clone() for k, v in grads[1].items()} for _ in range(2))
    optim.scale_to_max_norm_(a, 1.0, norm)
    optim.scale_to_max_norm_(b, 1.0, torch.tensor(norm))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=1e-6)
        if norm <= 1.0:
            assert torch.equal(a[k], grads[1][k])


@given(st.sampled_from(schedule.KINDS), st.integers(0, 20), st.integers(21, 200), st.floats(0.0, 0.5))
def test_schedules(kind, warmup, total, final):
    m = [schedule.multiplier(kind, s, total=total, warmup=warmup, final=final) for s in range(total + 5)]
    assert all(0 < v <= 1 + 1e-12 for v in m[:total])
    if warmup:
        assert m[0] == pytest.approx(1 / warmup) and m[warmup - 1] == pytest.approx(1.0)
        assert all(a <= b + 1e-12 for a, b in zip(m[:warmup], m[1:warmup]))
    after = m[warmup:]
    assert all(b <= a + 1e-12 for a, b in zip(after, after[1:]))  # never increases after warmup
    if kind != "constant":
        assert m[total] == pytest.approx(final) and m[-1] == pytest.approx(final)


def test_linear_decays_to_zero_and_lr_schedule_scales():
    f = schedule.lr_schedule(0.5, "linear", total=10, warmup=0)
    assert f(0) == pytest.approx(0.5) and f(5) == pytest.approx(0.25) and f(10) == 0.0
    with pytest.raises(ValueError, match="schedule"):
        schedule.lr_schedule(1.0, "cosyne", total=10)


def test_state_saves_and_resumes_exactly(tmp_path):
    cfg = gv.presets.get("tiny-vlm")
    params = gv.flatten(gv.init(cfg, seed=0))
    params = {k: v for k, v in params.items() if k.startswith(("connector", "text.layers.0", "text.norm"))}
    opt = make_optimizer("muon", lr=1e-2, muon_lr=0.02, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    grads = [{k: torch.randn(v.shape, generator=g) for k, v in params.items()} for _ in range(4)]
    state = opt.init(params)
    for s in range(2):
        opt.update(params, grads[s], state, s)
    optim.save_state(tmp_path / "opt.safetensors", state)
    p2 = {k: v.clone() for k, v in params.items()}
    s2 = optim.load_state(tmp_path / "opt.safetensors", opt.init(p2))
    for s in range(2, 4):
        opt.update(params, grads[s], state, s)
        opt.update(p2, grads[s], s2, s)
    for k in params:
        assert torch.equal(params[k], p2[k]), k
    with pytest.raises(CheckpointError, match="does not match"):
        optim.load_state(tmp_path / "opt.safetensors", make_optimizer("adamw").init(params))


@pytest.mark.gpu
def test_fused_adamw_on_cuda_matches_torch():
    params, grads = _problem()
    ref = {k: torch.nn.Parameter(v.clone().cuda()) for k, v in params.items()}
    torch_opt = torch.optim.AdamW(ref.values(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    opt = AdamW(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1, decay=lambda name, t: True)  # fused picked on CUDA
    mine = {k: v.clone().cuda() for k, v in params.items()}
    state = opt.init(mine)
    for step, g in enumerate(grads):
        for k, p in ref.items():
            p.grad = g[k].cuda()
        torch_opt.step()
        opt.update(mine, {k: v.cuda() for k, v in g.items()}, state, step)
    for k in params:
        torch.testing.assert_close(mine[k], ref[k].detach(), atol=1e-6, rtol=0)
