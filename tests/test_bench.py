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
    ("triton_poi_fused__unsafe_view_add_5", "norms/elementwise"),
    ("rms_norm_fwd", "norms/elementwise"),
    ("cross_entropy_rows", "loss"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<FusedAdamMathFunctor>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "other"),
])
def test_profile_categories(name, category):
    assert bench_train.categorize(name) == category
