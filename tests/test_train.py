"""The loss, the train step's transforms (grad over the trainable subtree, accumulation, remat, compile),
the NaN/Inf guard and the training loop's outputs."""

import json
import math

import pytest
import torch

import ghostvis as gv
from ghostvis.core.config import ConnectorConfig, ModelConfig, TextConfig, VisionConfig
from ghostvis.core.tree import flatten, merge
from ghostvis.train import loop, optim, step as tstep
from ghostvis.train.loss import loss_fn
from ghostvis.train.optim import AdamW, make_optimizer

CFG = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                  ffn_dim=64, max_seq_len=64),
                  vision=VisionConfig(image_size=16, patch_size=8, dim=32, n_layers=1, n_heads=2, ffn_dim=64),
                  connector=ConnectorConfig("mlp"), image_token_id=3)


def random_batch(cfg=CFG, b=2, t=24, seed=0, images=True) -> dict:
    """Random tokens with one image per row, two packed documents per row, some unsupervised positions."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(8, cfg.text.vocab_size, (b, t), generator=g)
    n_img = cfg.num_image_tokens if images else 0
    if n_img:
        tokens[:, 1:1 + n_img] = cfg.image_token_id
    half = t // 2
    doc_ids = (torch.arange(t) >= half).long().expand(b, t).clone()
    positions = torch.cat([torch.arange(half), torch.arange(t - half)]).expand(b, t).clone()
    targets = torch.roll(tokens, -1, 1)
    targets[torch.rand(b, t, generator=g) < 0.3] = -100
    targets[:, :1 + n_img] = -100
    targets[:, half - 1] = -100  # no target across the document boundary
    targets[:, -1] = -100
    imgs = torch.rand(b, 3, 16, 16, generator=g) * 2 - 1 if images else None
    return {"tokens": tokens, "targets": targets, "positions": positions, "doc_ids": doc_ids, "images": imgs}


def cat_batches(*bs):
    out = {k: torch.cat([b[k] for b in bs]) for k in ("tokens", "targets", "positions", "doc_ids")}
    out["images"] = torch.cat([b["images"] for b in bs]) if bs[0]["images"] is not None else None
    return out


def test_loss_is_token_mean_cross_entropy():
    params, b = gv.init(CFG, seed=0), random_batch()
    logits = gv.forward(params, CFG, b["tokens"], b["images"], positions=b["positions"], doc_ids=b["doc_ids"])
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), b["targets"].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss_fn(params, b, CFG), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss_fn(params, b, CFG, select=False), want, atol=1e-5, rtol=1e-5)


def test_loss_under_autocast_runs_the_lm_head_in_the_autocast_dtype(monkeypatch):
    """Float32 params under bf16 autocast: the fused LM head + cross-entropy (a custom op autocast does not
    reach) gets bf16 inputs, as a matmul would, and the loss stays close to the float32 one, compiled too."""
    params, b = gv.init(CFG, seed=0), random_batch()
    seen = []
    real = gv.ops.linear_cross_entropy

    def spy(h, w, *a, **k):
        seen.append((h.dtype, w.dtype))
        return real(h, w, *a, **k)

    monkeypatch.setattr(gv.ops, "linear_cross_entropy", spy)
    want = loss_fn(params, b, CFG)
    assert seen == [(torch.float32, torch.float32)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss_fn(params, b, CFG)
        compiled = torch.compile(lambda p, b: loss_fn(p, b, CFG, select=False), backend="eager", fullgraph=True)
        got_compiled = compiled(params, b)
    assert seen[1] == (torch.bfloat16, torch.bfloat16)
    torch.testing.assert_close(got.float(), want, atol=0.05, rtol=0.02)
    torch.testing.assert_close(got_compiled.float(), want, atol=0.05, rtol=0.02)
    trainable, frozen = tstep.partition(params, "all")
    grads, _ = tstep.value_and_grad(CFG, frozen, autocast=torch.bfloat16)(trainable, b, None)
    assert grads["text.embed"].dtype == torch.float32 and grads["text.embed"].abs().sum() > 0


def test_accumulation_matches_one_big_batch():
    params = gv.init(CFG, seed=1)
    trainable, frozen = tstep.partition(params, "all")
    micro = [random_batch(seed=s) for s in range(3)]
    grad_fn = tstep.value_and_grad(CFG, frozen)
    n = sum((m["targets"] != -100).sum() for m in micro).float()
    g_acc, l_acc = tstep.accumulate(grad_fn, trainable, micro, n)
    g_big, l_big = grad_fn(trainable, cat_batches(*micro), n)
    torch.testing.assert_close(l_acc, l_big, atol=1e-5, rtol=1e-5)
    for k in g_big:
        torch.testing.assert_close(g_acc[k], g_big[k], atol=1e-6, rtol=1e-4)


def test_grad_only_over_trainable_and_frozen_stay_bit_identical():
    params = gv.init(CFG, seed=2)
    before = {k: v.clone() for k, v in flatten(params).items()}
    spec = "connector,text.layers.1"
    trainable, frozen = tstep.partition(params, spec)
    assert set(trainable) == {k for k in before if k.startswith(("connector.", "text.layers.1."))}
    opt = make_optimizer("muon", lr=1e-2)
    state = opt.init(trainable)
    train_step = tstep.make_train_step(CFG, opt, frozen)
    for s in range(3):
        trainable, state, res = train_step(trainable, state, [random_batch(seed=s)], s)
        assert not res.skipped
    after = flatten(merge(trainable, frozen))
    for k, v in before.items():
        if k in trainable:
            assert not torch.equal(after[k], v), f"{k} did not train"
        else:
            assert torch.equal(after[k], v), f"frozen {k} changed"


def test_partition_rejects_typos():
    with pytest.raises(ValueError, match="conector"):
        tstep.partition(gv.init(CFG), "conector")
    with pytest.raises(ValueError, match="names nothing"):
        tstep.trainable_predicate(" , ")


@pytest.mark.parametrize("policy", tstep.REMAT_POLICIES)
def test_remat_gives_the_same_gradients(policy):
    params = gv.init(CFG, seed=3)
    trainable, frozen = tstep.partition(params, "text")
    b = random_batch(seed=3)
    n = (b["targets"] != -100).sum().float()
    # remat's blocks keep the separate weights: the baseline too, so the results are bit-equal
    g0, l0 = tstep.value_and_grad(CFG, frozen, stacked=False)(trainable, b, n)
    g1, l1 = tstep.value_and_grad(CFG, frozen, remat_blocks=True, remat_policy=policy)(trainable, b, n)
    torch.testing.assert_close(l0, l1, atol=0, rtol=0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-6, rtol=1e-5)


def test_remat_policy_is_checked():
    with pytest.raises(ValueError, match="remat policy must be one of"):
        tstep.remat(policy="bogus")


def test_compile_transform_gives_the_same_gradients():
    params = gv.init(CFG, seed=4)
    trainable, frozen = tstep.partition(params, "all")
    b = random_batch(seed=4, images=False)
    n = (b["targets"] != -100).sum().float()
    g0, l0 = tstep.value_and_grad(CFG, frozen, select=False)(trainable, b, n)
    fn = tstep.compile(tstep.value_and_grad(CFG, frozen, select=False), backend="aot_eager")
    g1, l1 = fn(trainable, b, n)
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=1e-5)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_packed_documents_train_like_the_reference(compiled):
    # the training step is a torch.func transform: packed documents must take a backend that runs there
    params = gv.tree_map(lambda t: t.cuda(), gv.init(CFG, seed=5))
    trainable, frozen = tstep.partition(params, "all")
    b = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in random_batch(seed=5, images=False).items()}
    n = (b["targets"] != -100).sum().float()
    with gv.ops.dispatch.use(attention="reference"):
        g0, l0 = tstep.value_and_grad(CFG, frozen)(trainable, b, n)
    fn = tstep.value_and_grad(CFG, frozen, select=not compiled)
    g1, l1 = (tstep.compile(fn) if compiled else fn)(trainable, b, n)
    torch.testing.assert_close(l0, l1, atol=1e-4, rtol=1e-4)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-4, rtol=2e-3)


@pytest.mark.parametrize("policy", tstep.REMAT_POLICIES)
def test_remat_under_compile_gives_the_same_gradients(policy):
    params = gv.init(CFG, seed=4)
    trainable, frozen = tstep.partition(params, "all")
    b = random_batch(seed=4, images=False)
    n = (b["targets"] != -100).sum().float()
    g0, l0 = tstep.value_and_grad(CFG, frozen)(trainable, b, n)
    fn = tstep.value_and_grad(CFG, frozen, remat_blocks=True, remat_policy=policy, select=False)
    g1, l1 = tstep.compile(fn, backend="aot_eager")(trainable, b, n)
    torch.testing.assert_close(l0, l1, atol=1e-5, rtol=1e-5)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-6, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True])
def test_gpu_full_remat_cuts_peak_memory(compiled):
    # activations dominate at these shapes: keeping only block inputs must show in the peak
    cfg = ModelConfig(text=TextConfig(vocab_size=2048, dim=256, n_layers=8, n_heads=4, n_kv_heads=2, head_dim=64,
                                      ffn_dim=768, max_seq_len=1024))
    trainable = {k: v.cuda() for k, v in gv.flatten(gv.init(cfg, seed=0)).items()}
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(8, 2048, (8, 1024), generator=g).cuda()
    b = {"tokens": tokens, "targets": tokens.roll(-1, 1), "positions": None, "doc_ids": None, "images": None}
    n = torch.tensor(float(tokens.numel()), device="cuda")
    peaks = {}
    for remat in (False, True):
        torch._dynamo.reset()  # a second torch.func.grad variant compiled in one process trips dynamo
        fn = tstep.value_and_grad(cfg, {}, remat_blocks=remat, select=not compiled)
        if compiled:
            fn = tstep.compile_value_and_grad(fn, remat_blocks=remat)
        fn(trainable, b, n)  # warm-up (compilation, kernel caches)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        grads, _ = fn(trainable, b, n)
        torch.cuda.synchronize()
        peaks[remat] = torch.cuda.max_memory_allocated() - base
        del grads
    assert peaks[True] < 0.5 * peaks[False], peaks


def test_remat_tie_to_the_gradient_survives_inductor():
    # compiled, the recompute's input must really depend on the incoming gradient; a product with the
    # integer 0 is folded away by inductor, which a NaN reveals (NaN * 0.0 is NaN, a folded zero is not)
    x, dep = torch.ones(4), torch.full((3,), float("nan"))
    assert torch.equal(tstep._after(x, dep), x)  # eager: x itself
    tied = torch.compile(tstep._after, backend="inductor", fullgraph=True)(x, dep)
    assert torch.isnan(tied).all()


def test_compiled_remat_step_runs_kernels_with_their_own_autograd():
    # Triton kernels are autograd Functions; dynamo cannot trace those inside remat's recompute, so
    # the compiled remat step swaps them for plain torch. Stand-in: a Function-wrapped RMSNorm forced on.
    class Norm(torch.autograd.Function):
        @staticmethod
        def forward(x, w, eps):
            return gv.ops.rms_norm(x, w, eps, backend="reference")

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0], inputs[1])
            ctx.eps = inputs[2]

        @staticmethod
        def backward(ctx, dy):
            x, w = ctx.saved_tensors
            _, vjp = torch.func.vjp(lambda x, w: gv.ops.rms_norm(x, w, ctx.eps, backend="reference"), x, w)
            return (*vjp(dy), None)

    from ghostvis.ops import dispatch
    dispatch.register("rms_norm", "function", lambda x, w=None, eps=1e-6: Norm.apply(x, w, eps))
    try:
        params = gv.init(CFG, seed=6)
        opt = AdamW(lr=1e-3)
        b = random_batch(seed=6, images=False)
        with gv.ops.use(rms_norm="function"):
            step = tstep.make_train_step(CFG, opt, {}, remat_blocks=True, compile_grad=True,
                                         compile_kwargs={"backend": "aot_eager"})
            trainable = flatten(params)
            _, _, res = step(trainable, opt.init(trainable), [b], 0)
        assert math.isfinite(res.loss) and not res.skipped
    finally:
        dispatch._REGISTRY["rms_norm"] = [x for x in dispatch._REGISTRY["rms_norm"] if x.name != "function"]


@pytest.mark.parametrize("kind", ["adamw", "adamw-fused", "muon"])
def test_nonfinite_step_is_skipped_and_changes_nothing(kind):
    # fused AdamW skips on the device (found_inf); the others read the flag on the host
    params = gv.init(CFG, seed=5)
    trainable, frozen = tstep.partition(params, "all")
    opt = {"adamw": AdamW(lr=1e-2), "adamw-fused": AdamW(lr=1e-2, fused=True),
           "muon": make_optimizer("muon", lr=1e-2)}[kind]
    state = opt.init(trainable)
    train_step = tstep.make_train_step(CFG, opt, frozen)
    bad = random_batch(seed=5)
    bad["images"][0, 0, 0, 0] = float("nan")
    before = {k: v.clone() for k, v in {**trainable, **gv.flatten(state)}.items()}
    trainable, state, res = train_step(trainable, state, [bad], 0)
    assert res.skipped and math.isnan(res.loss) and optim.num_updates(state) == 0
    for k, v in {**trainable, **gv.flatten(state)}.items():
        assert torch.equal(v, before[k]), k
    trainable, state, res = train_step(trainable, state, [random_batch(seed=6)], 0)
    assert not res.skipped and optim.num_updates(state) == 1
    assert any(not torch.equal(v, before[k]) for k, v in trainable.items())


def test_step_result_reads_once_and_formats():
    r = tstep.StepResult.from_device(torch.tensor([2.5, 0.75, 40.0, 0.0], dtype=torch.float64))
    assert r.ready() and (r.loss, r.grad_norm, r.tokens, r.skipped) == (2.5, 0.75, 40, False)
    assert repr(r) == "StepResult(loss=2.5, grad_norm=0.75, tokens=40, skipped=False)"
    assert tstep.StepResult(1.0, 2.0, 3, True).skipped


def test_loop_checks_placeholders_on_the_host(tmp_path, monkeypatch):
    class Short(Batches):
        def __next__(self):
            b = super().__next__()
            b["images"] = b["images"][:1]  # two rows of placeholders, one image
            return b

    tc = loop.TrainConfig(steps=2, batch_size=2, seq_len=24)
    # the model's own check switched off: the loop's check on the host must still refuse the batch
    monkeypatch.setattr(gv.core.model, "check_image_tokens", lambda *a: None)
    with pytest.raises(gv.ImageTokenMismatch, match="2 images|1 images"):
        loop.train(gv.init(CFG), CFG, Short(), tc, loop.RunConfig(name="m", out_dir=str(tmp_path), progress=False))
    b = random_batch()
    assert loop.check_on_host(CFG, b) and not loop.check_on_host(CFG, {**b, "tokens": b["tokens"].to("meta")})


def test_loop_reads_each_step_after_queueing_the_next(tmp_path, monkeypatch):
    """The host queues step n + 1 before it reads step n's numbers (so it never waits for the GPU
    between steps), except after a skipped step and before a checkpoint."""
    events = []
    real = loop.make_train_step

    def spying(*a, **k):
        inner = real(*a, **k)

        def step_fn(trainable, state, micro, step):
            trainable, state, res = inner(trainable, state, micro, step)
            events.append(f"run {step}")
            read = res._read
            res._read = lambda: (events.append(f"read {step}") if res._pending is not None else None) or read()
            return trainable, state, res
        return step_fn

    monkeypatch.setattr(loop, "make_train_step", spying)
    tc = loop.TrainConfig(steps=7, batch_size=2, seq_len=24, warmup=1, lr=1e-2)
    rc = loop.RunConfig(name="q", out_dir=str(tmp_path), save_every=4, progress=False, plot=False)
    res = loop.train(gv.init(CFG, seed=0), CFG, Batches(poison={1}), tc, rc)
    assert events == ["run 0", "run 1", "read 0", "run 2", "read 1",
                      "read 2",  # step 1 was skipped: step 2 is read at once
                      "run 3", "read 3",  # a checkpoint after step 3
                      "run 4", "run 5", "read 4", "run 6", "read 5", "read 6"]
    assert res.skipped == 1 and [r["step"] for r in loop.read_metrics(tmp_path / "q")] == list(range(7))


class Batches:
    """A deterministic, resumable batch stream for loop tests; ``poison`` steps carry a NaN image."""

    def __init__(self, poison=()):
        self.i, self.poison = 0, set(poison)

    def __next__(self):
        b = random_batch(seed=100 + self.i)
        if self.i in self.poison:
            b["images"][:] = float("inf")
        self.i += 1
        return b

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def test_loop_writes_run_folder(tmp_path):
    tc = loop.TrainConfig(steps=6, batch_size=2, seq_len=24, warmup=2, lr=1e-2)
    rc = loop.RunConfig(name="t", out_dir=str(tmp_path), save_every=3, progress=False)
    res = loop.train(gv.init(CFG, seed=0), CFG, Batches(), tc, rc)
    run = tmp_path / "t"
    metrics = loop.read_metrics(run)
    assert [r["step"] for r in metrics] == list(range(6))
    assert all(r["loss"] == r["loss"] and r["lr"] > 0 for r in metrics)
    assert (run / "loss.png").stat().st_size > 1000
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]
    assert json.loads((run / "checkpoints" / "step_000006" / "state.json").read_text())["data"] == {"i": 6}
    assert res.skipped == 0 and res.steps == 6


def test_loop_skips_then_stops_on_a_nan_streak(tmp_path):
    tc = loop.TrainConfig(steps=10, batch_size=2, seq_len=24, max_bad_steps=3)
    rc = loop.RunConfig(name="nan", out_dir=str(tmp_path), progress=False, plot=False)
    res = loop.train(gv.init(CFG), CFG, Batches(poison={1}), tc, rc)  # one bad step: skipped, run goes on
    assert res.skipped == 1 and [r["skipped"] for r in res.history].count(True) == 1
    with pytest.raises(loop.TrainingDiverged, match=r"step 4: .*3 steps in a row"):
        loop.train(gv.init(CFG), CFG, Batches(poison={2, 3, 4}), tc, loop.RunConfig(name="nan2", out_dir=str(tmp_path),
                                                                                    progress=False, plot=False))
    saved, _ = gv.core.io.load_tree(tmp_path / "nan2" / "bad_batch_step000004.safetensors")
    assert torch.isinf(saved[0]["images"]).all()


def test_loop_with_one_bad_step_allowed_stops_before_the_next_step(tmp_path):
    """max_bad_steps=1: the run stops at the first bad step, before another batch is drawn or applied."""
    feed = Batches(poison={1})
    tc = loop.TrainConfig(steps=6, batch_size=2, seq_len=24, max_bad_steps=1)
    with pytest.raises(loop.TrainingDiverged, match=r"step 1: .*params are those of step 0"):
        loop.train(gv.init(CFG), CFG, feed, tc, loop.RunConfig(name="one", out_dir=str(tmp_path), progress=False,
                                                                plot=False))
    assert feed.i == 2


def test_loop_records_the_queued_step_when_the_data_runs_out(tmp_path):
    class Three(Batches):
        def __next__(self):
            if self.i == 3:
                raise StopIteration
            return super().__next__()

    tc = loop.TrainConfig(steps=6, batch_size=2, seq_len=24)
    with pytest.raises(StopIteration):
        loop.train(gv.init(CFG), CFG, Three(), tc, loop.RunConfig(name="short", out_dir=str(tmp_path),
                                                                   progress=False, plot=False))
    assert [r["step"] for r in loop.read_metrics(tmp_path / "short")] == [0, 1, 2]


def test_remat_policies_save_fewer_activations():
    """Bytes kept for the backward (plain autograd): full < mlp < none, and attention < none."""
    from ghostvis.core.model import hidden_states

    params = gv.tree_map(lambda t: t.clone().requires_grad_(), gv.init(CFG, seed=5))
    b = random_batch(seed=5, t=48, images=False)

    def saved_bytes(block_fn):
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            hidden_states(params, CFG, b["tokens"], positions=b["positions"], doc_ids=b["doc_ids"],
                          block_fn=block_fn).sum()
        return total

    none = saved_bytes(None)
    sizes = {p: saved_bytes(tstep.remat(policy=p)) for p in tstep.REMAT_POLICIES}
    assert sizes["full"] < sizes["mlp"] < none and sizes["attention"] < none, (none, sizes)
    # selective drops exactly the two normalised inputs and the SwiGLU output of every layer
    t = CFG.text
    dropped = t.n_layers * b["tokens"].numel() * (2 * t.dim + t.ffn_dim) * 4
    assert sizes["selective"] <= none - dropped, (none, sizes["selective"], dropped)


@pytest.mark.parametrize("fused,qk_norm", [(False, True), (True, True), (True, False)])
def test_selective_remat_with_biases_qk_norm_and_stacked_weights(fused, qk_norm):
    from ghostvis.core.decoder import fuse_projections

    cfg = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                      ffn_dim=64, max_seq_len=64, qkv_bias=True, qk_norm=qk_norm))
    params = gv.init(cfg, seed=4)
    params = gv.tree_map(lambda t: t + 0.05 * torch.randn_like(t), params)  # biases and norms matter
    if fused:
        params = {**params, "text": fuse_projections(params["text"])}
    trainable, frozen = tstep.partition(params, "all")
    b = random_batch(cfg, seed=4, images=False)
    n = (b["targets"] != -100).sum().float()
    g0, l0 = tstep.value_and_grad(cfg, frozen, stacked=False)(trainable, b, n)
    g1, l1 = tstep.value_and_grad(cfg, frozen, remat_blocks=True, remat_policy="selective")(trainable, b, n)
    torch.testing.assert_close(l0, l1, atol=0, rtol=0)
    for k in g0:
        torch.testing.assert_close(g0[k], g1[k], atol=1e-6, rtol=1e-5, msg=k)


def _ops_called(monkeypatch) -> set:
    """The names of the ``ghostvis.ops`` ops called from now on (a spy on the dispatcher)."""
    seen, real_call = set(), gv.ops.dispatch.call

    def spy(op, *args, **kwargs):
        seen.add(op)
        return real_call(op, *args, **kwargs)

    monkeypatch.setattr(gv.ops.dispatch, "call", spy)
    return seen


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"qk_norm": True}])
def test_stacked_projections_give_the_separate_loss_and_grads(backend, kw, monkeypatch):
    """value_and_grad stacks q/k/v and gate/up inside the loss by default: same loss, same
    gradients for the separate matrices as the unstacked step (Triton ops through the interpreter)."""
    if backend == "triton" and not gv.ops.HAS_TRITON:
        pytest.skip("needs triton")
    cfg = ModelConfig(text=TextConfig(vocab_size=64, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                                      ffn_dim=64, max_seq_len=64, **kw))
    params = gv.tree_map(lambda t: t + 0.05 * torch.randn_like(t), gv.init(cfg, seed=5))
    trainable, frozen = tstep.partition(params, "all")
    b = random_batch(cfg, seed=5, images=False)
    n = (b["targets"] != -100).sum().float()
    seen = _ops_called(monkeypatch)
    g0, l0 = tstep.value_and_grad(cfg, frozen, stacked=False)(trainable, b, n)
    assert not seen & {"qkv_rope", "swiglu_stacked"}
    names = ("rms_norm", "swiglu", "rope", "qkv_rope", "swiglu_stacked")
    with gv.ops.use(**dict.fromkeys(names, backend)):
        g1, l1 = tstep.value_and_grad(cfg, frozen)(trainable, b, n)
    # the stacked step really ran the stacked ops (qk-norm models keep the split q/k/v path)
    assert "swiglu_stacked" in seen and ("qkv_rope" in seen) == (not kw.get("qk_norm"))
    assert set(g1) == set(g0) == set(trainable)
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("kw,images", [({}, False), ({}, True), ({"qkv_bias": True, "qk_norm": True}, False)])
def test_default_step_fuses_residual_adds_and_matches_the_block_loop(backend, kw, images, monkeypatch):
    """value_and_grad runs decoder.fused_blocks (each residual add inside the next norm, forward and
    backward): same loss and gradients as the loop of decoder.block (Triton through the interpreter),
    for a VLM batch with images and a Qwen-style block too."""
    if backend == "triton" and not gv.ops.HAS_TRITON:
        pytest.skip("needs triton")
    import dataclasses

    from ghostvis.core import decoder

    cfg = CFG.replace(text=dataclasses.replace(CFG.text, **kw))
    params = gv.tree_map(lambda t: t + 0.05 * torch.randn_like(t), gv.init(cfg, seed=8))
    trainable, frozen = tstep.partition(params, "all")
    b = random_batch(cfg, seed=8, images=images)
    n = (b["targets"] != -100).sum().float()
    names = ("rms_norm", "add_rms_norm", "swiglu_stacked", "qkv_rope")
    with gv.ops.use(**dict.fromkeys(names, backend)):
        seen = _ops_called(monkeypatch)
        g0, l0 = tstep.value_and_grad(cfg, frozen, block_fn=decoder.block)(trainable, b, n)
        assert "add_rms_norm" not in seen
        g1, l1 = tstep.value_and_grad(cfg, frozen)(trainable, b, n)
    assert "add_rms_norm" in seen
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-4, msg=k)
    with pytest.raises(ValueError, match="remat_blocks or block_fn"):
        tstep.value_and_grad(cfg, frozen, remat_blocks=True, block_fn=decoder.block)


@pytest.mark.parametrize("trainable_spec", ["all", "connector"])
def test_training_step_with_the_mlp_op_matches_its_pieces(trainable_spec, monkeypatch):
    """The stacked step's MLP as one op (SwiGLU's backward inside the down projection's input-gradient
    matmul, Triton through the interpreter) under torch.func.grad: the loss and gradients of the
    dispatched pieces, with the decoder trained or frozen under a trained connector."""
    if not gv.ops.HAS_TRITON:
        pytest.skip("needs triton")
    from ghostvis.ops import mlp

    params = gv.tree_map(lambda t: t + 0.05 * torch.randn_like(t), gv.init(CFG, seed=9))
    trainable, frozen = tstep.partition(params, trainable_spec)
    b = random_batch(seed=9, images=True)
    n = (b["targets"] != -100).sum().float()
    g0, l0 = tstep.value_and_grad(CFG, frozen)(trainable, b, n)
    calls, real = [], mlp.swiglu_bwd_matmul_launch
    monkeypatch.setattr(mlp, "swiglu_bwd_matmul_launch", lambda *a, **k: calls.append(1) or real(*a, **k))
    with gv.ops.use(swiglu_mlp="epilogue"):
        g1, l1 = tstep.value_and_grad(CFG, frozen)(trainable, b, n)
    assert len(calls) == CFG.text.n_layers  # every block's backward ran the fused kernel
    torch.testing.assert_close(l1, l0, atol=1e-6, rtol=1e-5)
    assert set(g1) == set(g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], atol=1e-6, rtol=1e-4, msg=k)


@pytest.mark.parametrize("policy", tstep.REMAT_POLICIES)
def test_remat_with_stacked_weights_inside_gives_the_same_grads(policy, monkeypatch):
    """remat(policy, stacked=True) stacks each block's q/k/v and gate/up inside the recomputed part."""
    params = gv.tree_map(lambda t: t + 0.05 * torch.randn_like(t), gv.init(CFG, seed=7))
    b = random_batch(seed=7, images=False)

    def loss(p, block_fn):
        return loss_fn(p, b, CFG, block_fn=block_fn)

    g0 = torch.func.grad(loss)(params, None)
    seen = _ops_called(monkeypatch)
    g1 = torch.func.grad(loss)(params, tstep.remat(policy=policy, stacked=True))
    assert {"qkv_rope", "swiglu_stacked"} <= seen
    for k, v in flatten(g0).items():
        torch.testing.assert_close(flatten(g1)[k], v, atol=1e-6, rtol=1e-4, msg=k)


def test_selective_remat_under_bf16_autocast():
    params = gv.init(CFG, seed=6)
    trainable, frozen = tstep.partition(params, "text")
    b = random_batch(seed=6, images=False)
    n = (b["targets"] != -100).sum().float()
    g0, l0 = tstep.value_and_grad(CFG, frozen, autocast=torch.bfloat16, stacked=False)(trainable, b, n)
    g1, l1 = tstep.value_and_grad(CFG, frozen, autocast=torch.bfloat16, remat_blocks=True,
                                  remat_policy="selective")(trainable, b, n)
    torch.testing.assert_close(l0, l1, atol=0, rtol=0)
    for k in g0:
        assert g1[k].dtype == g0[k].dtype == torch.float32
        torch.testing.assert_close(g0[k], g1[k], atol=1e-2, rtol=2e-2, msg=k)


def test_cuda_graphs_are_checked():
    opt = AdamW(lr=1e-3)
    with pytest.raises(ValueError, match="needs compile_grad"):
        tstep.make_train_step(CFG, opt, {}, cuda_graphs=True)
    with pytest.raises(ValueError, match="needs compile_grad and no remat"):
        tstep.make_train_step(CFG, opt, {}, cuda_graphs=True, compile_grad=True, remat_blocks=True)
    with pytest.raises(ValueError, match="reduce-overhead"):
        tstep.graphed(tstep.value_and_grad(CFG, {}), {}, mode="default")
    assert tstep.graphed(tstep.value_and_grad(CFG, {}, select=False), {}).reuses_outputs


@pytest.mark.parametrize("reuses", [False, True])
def test_accumulate_copies_only_outputs_that_the_next_call_overwrites(reuses):
    """A gradient function that writes every call into one buffer (as a CUDA-graph replay does) still sums
    right; one that does not is not copied."""
    buf = {"w": torch.zeros(3)}

    def grad_fn(trainable, mb, normalizer):
        if reuses:
            buf["w"].copy_(mb["g"])
            return buf, mb["g"].sum()
        return {"w": mb["g"].clone()}, mb["g"].sum()

    grad_fn.reuses_outputs = reuses
    mbs = [{"g": torch.full((3,), v)} for v in (1.0, 10.0, 100.0)]
    total, loss = tstep.accumulate(grad_fn, {}, mbs, torch.ones(()))
    assert torch.equal(total["w"], torch.full((3,), 111.0)) and float(loss) == 333.0
    single, _ = tstep.accumulate(grad_fn, {}, mbs[:1], torch.ones(()))
    assert (single["w"] is buf["w"]) == reuses  # one micro-batch: the function's own output, no copy


def test_loop_refuses_cuda_graphs_without_cuda_and_negative_prefetch(tmp_path):
    tc = loop.TrainConfig(steps=1, batch_size=2, seq_len=16, cuda_graphs=True, compile=True)
    rc = loop.RunConfig(out_dir=str(tmp_path), progress=False, device="cpu")
    with pytest.raises(ValueError, match="cuda-graphs needs"):
        loop.train(gv.init(CFG), CFG, iter(()), tc, rc)
    with pytest.raises(ValueError, match="prefetch must be >= 0"):
        loop.train(gv.init(CFG), CFG, iter(()), loop.TrainConfig(steps=1), loop.RunConfig(out_dir=str(tmp_path),
                                                                                          prefetch=-1))


@pytest.mark.gpu
def test_gpu_cuda_graph_steps_match_compiled_steps():
    """Three steps (two micro-batches each, then one; VLM rows of two packed documents) replayed as CUDA
    graphs, none skipped, give the compiled steps' losses, gradient norms and parameters."""
    from torch._dynamo.utils import counters

    batches = []
    for s in range(3):
        mbs = []
        for m in range(2 if s < 2 else 1):
            b = random_batch(seed=10 * s + m, t=32)
            mbs.append({k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()})
        batches.append(mbs)
    finals, results = [], []
    for graphs in (False, True):
        torch._dynamo.reset()
        counters.clear()
        params = {k: v.cuda() for k, v in gv.flatten(gv.init(CFG, seed=3)).items()}
        opt = AdamW(lr=1e-3)
        state = opt.init(params)
        step = tstep.make_train_step(CFG, opt, {}, compile_grad=True, cuda_graphs=graphs)
        out = []
        for i, mbs in enumerate(batches):
            params, state, r = step(params, state, mbs, i)
            out.append((r.loss, r.grad_norm))
        finals.append(params)
        results.append(out)
    assert counters["inductor"]["cudagraph_skips"] == 0  # the graphed steps really ran as CUDA graphs
    for (l0, n0), (l1, n1) in zip(*results):
        assert l1 == pytest.approx(l0, rel=1e-5) and n1 == pytest.approx(n0, rel=1e-4)
    for k in finals[0]:
        torch.testing.assert_close(finals[1][k], finals[0][k], atol=1e-5, rtol=1e-4, msg=k)


@pytest.mark.gpu
@pytest.mark.parametrize("images", [False, True])
def test_gpu_train_step_never_waits_for_the_device(images):
    """With fused AdamW (the default on CUDA), a compiled step, a skipped one too (a NaN image), is
    queued without a host sync: torch's sync debug mode raises on any. Its numbers are read afterwards.
    (An eager step waits once, in the loss, to gather the supervised positions.)"""
    torch._dynamo.reset()
    params = {k: v.cuda() for k, v in gv.flatten(gv.init(CFG, seed=3)).items()}
    opt = AdamW(lr=1e-3)
    state = opt.init(params)
    step = tstep.make_train_step(CFG, opt, {}, grad_clip=0.1, compile_grad=True)

    def cuda(b):
        return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in b.items()}

    good, bad = cuda(random_batch(seed=1, t=32, images=images)), cuda(random_batch(seed=2, t=32))
    params, state, _ = step(params, state, [bad], 0)  # warm-up: compiles for both kinds of batch
    bad["images"][0, 0, 0, 0] = float("nan")
    params, state, _ = step(params, state, [good], 0)
    torch.cuda.synchronize()
    before = {k: v.clone() for k, v in params.items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        with gv.core.model.inputs_checked():  # as the loop calls it, having counted placeholders on the host
            params, state, r_bad = step(params, state, [bad], 1)
            after_bad = {k: v.clone() for k, v in params.items()}
            params, state, r_good = step(params, state, [good], 2)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert r_bad.skipped and not r_good.skipped and math.isfinite(r_good.loss)
    assert optim.num_updates(state) == 3
    assert all(torch.equal(v, before[k]) for k, v in after_bad.items())
    assert any(not torch.equal(v, before[k]) for k, v in params.items())


@pytest.mark.parametrize("feed", [{"prefetch": 2}, {"data_workers": 2}])
def test_loop_trains_the_same_from_a_thread_or_worker_processes(tmp_path, feed):
    """Batches drawn ahead (a thread, or two worker processes) give the losses and the checkpointed data
    cursor of batches drawn in the loop."""
    from ghostvis.train.data import BatchIterator
    from ghostvis.train.packing import Sample

    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(8, 64, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(60)]
    samples = [Sample(d, [True] * (len(d) - 1) + [False]) for d in docs]
    cfg = ModelConfig(text=CFG.text)
    tc = loop.TrainConfig(steps=7, batch_size=2, seq_len=24, warmup=2, lr=1e-2)
    runs = {}
    for name, kw in (("plain", {"prefetch": 0}), ("ahead", feed)):
        rc = loop.RunConfig(name=name, out_dir=str(tmp_path), save_every=3, progress=False, plot=False, **kw)
        loop.train(gv.init(cfg, seed=0), cfg, BatchIterator(samples, batch_size=2, seq_len=24, seed=1), tc, rc)
        runs[name] = ([r["loss"] for r in loop.read_metrics(tmp_path / name)],
                      [json.loads((tmp_path / name / "checkpoints" / c / "state.json").read_text())["data"]
                       for c in ("step_000006", "step_000007")])
    assert runs["ahead"] == runs["plain"]
    with pytest.raises(ValueError, match="data-workers must be >= 0"):
        loop.train(gv.init(cfg), cfg, iter(()), tc, loop.RunConfig(out_dir=str(tmp_path), data_workers=-1))
