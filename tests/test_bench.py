"""recipes/bench.py without a GPU: every mode parses, documents its flags, and refuses to run on the CPU."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "recipes"))

import bench_train  # noqa: E402


@pytest.mark.parametrize("mode,flag", [("train", "--rows"), ("decode", "--batches"), ("vlm", "--preset"),
                                       ("kernels", "--only")])
def test_every_mode_has_help(mode, flag):
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "bench.py"), mode, "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert flag in out.stdout


def test_modes_need_cuda_and_say_so():
    if __import__("torch").cuda.is_available():
        pytest.skip("has CUDA")
    out = subprocess.run([sys.executable, str(ROOT / "recipes" / "bench.py"), "decode"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode != 0 and "needs a CUDA device" in out.stderr


@pytest.mark.parametrize("name,category", [
    ("nvjet_sm90_tst_320x128_64x3_1x2_h_bz_coopB_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16_knob_26", "attention"),
    ("triton_tem_fused_flex_attention_0", "attention"),
    ("swiglu_bwd", "norms/elementwise"),
    ("gemv", "matmul"),
    ("triton_poi_fused__unsafe_view_add_5", "norms/elementwise"),
    ("rms_norm_fwd", "norms/elementwise"),
    ("cross_entropy_rows", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_profile_categories(name, category):
    assert bench_train.categorize(name) == category


@pytest.mark.parametrize("preset,vlm", [("tiny", False), ("tiny-vlm", True)])
def test_train_and_vlm_steps_run_on_cpu(preset, vlm):
    """The step builders of the train / vlm modes (timing aside): every row's step runs and lowers the loss."""
    import torch

    import ghostvis as gv

    cfg = gv.presets.get(preset)
    batch = (bench_train.vlm_batch if vlm else bench_train.random_batch)(cfg, 2, 32, device="cpu")
    for which, layout in (("default", "stacked"), ("reference", "separate"), ("inductor", "stored")):
        step = bench_train.ghostvis_step(cfg, batch, compiled=False, which=which, layout=layout, dtype=torch.float32)
        losses = [float(step()) for _ in range(3)]
        assert losses[-1] < losses[0], (which, losses)


def test_plain_decoder_runs_on_cpu():
    import torch

    import bench_decode
    import ghostvis as gv

    t = gv.presets.get("tiny").text
    model = bench_decode.PlainDecoder(t, batch=2, slots=16)
    logits = model(torch.randint(0, t.vocab_size, (2, 5)), torch.arange(5))
    assert logits.shape == (2, t.vocab_size) and torch.isfinite(logits).all()
    nxt = model(logits.argmax(-1)[:, None], torch.tensor([5]))
    assert nxt.shape == (2, t.vocab_size)


def test_bench_decode_reaches_the_generate_module():
    # ``ghostvis.infer.generate`` the attribute is the function; the bench needs the module's session API
    import importlib

    mod = importlib.import_module("ghostvis.infer.generate")
    assert callable(mod.release_decode_session) and isinstance(mod.COMPILED_DECODE_OPS, dict)
    src = (Path(__file__).parent.parent / "recipes" / "bench_decode.py").read_text()
    assert 'import_module("ghostvis.infer.generate")' in src
