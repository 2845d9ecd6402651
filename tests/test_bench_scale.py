"""recipes/bench_scale.py on CPU with tiny shapes: every subcommand runs and writes sane JSON.

Single-process subcommands run in this process; the multi-rank ones under torchrun with gloo.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--preset", "tiny"]


def _load():
    spec = importlib.util.spec_from_file_location("recipe_bench_scale", ROOT / "recipes" / "bench_scale.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


bench_scale = _load()


def _torchrun(nproc: int, args: list[str]) -> str:
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "recipes" / "bench_scale.py"), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def _json(path: Path) -> dict:
    assert path.is_file(), f"{path} was not written"
    return json.loads(path.read_text())


DP = ["dp", *TINY, "--batch", "2", "--seq", "32", "--steps", "2", "--warmup", "1"]


def _check_dp(r: dict, n: int) -> None:
    assert r["world"] == n and r["batch_per_gpu"] == 2 and r["seq"] == 32
    assert r["step_s"] > 0 and r["loss_finite"]
    assert r["tokens_per_s"] == pytest.approx(n * r["tokens_per_s_per_gpu"])
    assert r["tokens_per_s_per_gpu"] == pytest.approx(2 * 32 / r["step_s"])
    assert r["compile"] is False and r["dtype"] == "float32"


@pytest.mark.distributed
def test_dp_two_ranks(tmp_path):
    out = _torchrun(2, [*DP, "--out", str(tmp_path)])
    assert "tok/s/GPU" in out
    r = _json(tmp_path / "dp_2.json")
    _check_dp(r, 2)
    assert r["dp_kwargs"].get("bucket_mb") == 25.0


def test_dp_one_rank_then_report(tmp_path, capsys):
    rec = bench_scale.main([*DP, "--out", str(tmp_path)])
    _check_dp(_json(tmp_path / "dp_1.json"), 1)
    one = rec["tokens_per_s_per_gpu"]
    for n, eff in ((2, 0.9), (4, 0.75)):  # as torchrun runs on 2 and 4 GPUs would write them
        write = {**rec, "world": n, "tokens_per_s_per_gpu": eff * one, "tokens_per_s": n * eff * one}
        (tmp_path / f"dp_{n}.json").write_text(json.dumps(write))

    capsys.readouterr()
    rep = bench_scale.main(["dp-report", "--out", str(tmp_path)])
    assert "efficiency" in capsys.readouterr().out
    assert [r["world"] for r in rep["rows"]] == [1, 2, 4]
    assert [r["efficiency"] for r in rep["rows"]] == pytest.approx([1.0, 0.9, 0.75])
    assert _json(tmp_path / "dp_report.json")["rows"] == rep["rows"]


def test_dp_report_needs_the_one_gpu_baseline(tmp_path):
    (tmp_path / "dp_2.json").write_text(json.dumps({"tokens_per_s_per_gpu": 1.0}))
    with pytest.raises(SystemExit, match="dp_1.json"):
        bench_scale.main(["dp-report", "--out", str(tmp_path)])


def test_extra_options_go_where_the_signature_takes_them():
    extra = bench_scale.parse_extra(["bucket_mb=50", "grad_clip=0.5", "name=x"])
    assert extra == {"bucket_mb": 50, "grad_clip": 0.5, "name": "x"}
    dp_kw, step_kw = bench_scale.split_step_kwargs({"bucket_mb": 50, "grad_clip": 0.5})
    assert dp_kw == {"bucket_mb": 50} and step_kw == {"grad_clip": 0.5}
    with pytest.raises(SystemExit, match="no_such_option"):
        bench_scale.split_step_kwargs({"no_such_option": 1})


@pytest.mark.distributed
def test_ring_two_ranks_matches_single_device(tmp_path):
    out = _torchrun(2, ["ring", "--seq", "128", "--heads", "4", "--kv-heads", "2", "--head-dim", "32",
                        "--iters", "1", "--warmup", "0", "--out", str(tmp_path)])
    assert "max rel err" in out
    r = _json(tmp_path / "ring_2.json")
    assert r["world"] == 2 and r["seq"] == 128 and r["dtype"] == "float32"
    assert set(r["rel_err"]) == {"out", "dq", "dk", "dv"}
    assert r["max_rel_err"] < 1e-5 and r["ok"]
    assert r["ring_fwd_bwd_ms"] > 0 and r["single_fwd_bwd_ms"] > 0


@pytest.mark.distributed
def test_context_parallel_two_ranks_trains_like_one_process(tmp_path):
    args = ["context", *TINY, "--seq", "64", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)]
    _torchrun(2, args)
    bench_scale.main(args)
    cp, single = _json(tmp_path / "context_2_64.json"), _json(tmp_path / "context_1_64.json")
    assert cp["context_parallel"] and not single["context_parallel"]
    for r in (cp, single):
        assert r["error"] is None and r["losses_finite"] and len(r["losses"]) == 2
        assert r["tokens_per_s"] == pytest.approx(64 / r["step_s"])
    # the same sequence and init: ring attention over two shards gives the same losses as one process
    assert cp["losses"] == pytest.approx(single["losses"], rel=1e-4)


def test_context_remat_writes_its_own_file(tmp_path):
    r = bench_scale.main(["context", *TINY, "--seq", "64", "--steps", "1", "--warmup", "0", "--remat",
                          "--out", str(tmp_path)])
    assert r["remat"] and r["remat_policy"] == "full" and r["error"] is None
    assert _json(tmp_path / "context_1_64_remat.json")["losses_finite"]


def test_context_reports_out_of_memory_cleanly(tmp_path, monkeypatch):
    import torch

    def oom(*a, **k):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")

    monkeypatch.setattr(bench_scale, "make_train_step", oom)
    r = bench_scale.main(["context", *TINY, "--seq", "64", "--steps", "1", "--out", str(tmp_path)])
    assert r["error"] == "out of memory"
    assert _json(tmp_path / "context_1_64.json")["error"] == "out of memory"


def test_remat_policies_and_longest_context(tmp_path, capsys):
    r = bench_scale.main(["remat", *TINY, "--batch", "2", "--seq", "32", "--steps", "1", "--warmup", "0",
                          "--policies", "full", "mlp", "--search-seqs", "32", "64", "--out", str(tmp_path)])
    assert "longest context" in capsys.readouterr().out
    rec = _json(tmp_path / "remat.json")
    assert [row["remat"] for row in rec["rows"]] == ["off", "full", "mlp"]
    for row in rec["rows"]:
        assert row["error"] is None and row["step_s"] > 0 and math.isfinite(row["loss"])
    assert rec["rows"][1]["time_overhead"] is not None
    assert set(rec["longest"]) == {"off", "full"}
    for res in rec["longest"].values():
        assert res["longest_seq"] == 64 and [t["seq"] for t in res["tried"]] == [32, 64]
    assert r["rows"] == rec["rows"]


def test_remat_search_stops_at_the_first_out_of_memory(tmp_path, monkeypatch):
    real = bench_scale._train_one_config

    def capped(cfg, params, opt, state, *, batch, **kw):
        if batch["tokens"].shape[1] > 32 and kw["remat_policy"] is None:
            return {"error": "out of memory"}
        return real(cfg, params, opt, state, batch=batch, **kw)

    monkeypatch.setattr(bench_scale, "_train_one_config", capped)
    rec = bench_scale.main(["remat", *TINY, "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                            "--policies", "full", "--search-seqs", "16", "32", "64", "128", "--out", str(tmp_path)])
    assert rec["longest"]["off"]["longest_seq"] == 32
    assert [t["seq"] for t in rec["longest"]["off"]["tried"]] == [16, 32, 64]
    assert rec["longest"]["full"]["longest_seq"] == 128


def test_remat_row_that_fails_is_recorded_and_the_others_run(tmp_path, monkeypatch, capsys):
    real = bench_scale.make_train_step

    def broken(cfg, opt, frozen, **kw):
        if kw.get("remat_blocks") and kw.get("remat_policy") == "mlp":
            raise NotImplementedError("no mlp remat here")
        return real(cfg, opt, frozen, **kw)

    monkeypatch.setattr(bench_scale, "make_train_step", broken)
    rec = bench_scale.main(["remat", *TINY, "--batch", "1", "--seq", "16", "--steps", "1", "--warmup", "0",
                            "--policies", "mlp", "full", "--search-seqs", "16", "--out", str(tmp_path)])
    errors = {row["remat"]: row["error"] for row in rec["rows"]}
    assert errors == {"off": None, "mlp": "failed: NotImplementedError: no mlp remat here", "full": None}
    assert "Traceback" in capsys.readouterr().err
    assert rec["rows"][1]["time_overhead"] is None and rec["rows"][2]["time_overhead"] is not None


def test_sft_like_lengths():
    a = bench_scale.Packing(docs=4000, mean_len=400, min_len=8, max_len=2048)
    lengths = [len(s) for s in bench_scale.sft_like_samples(a, vocab=100)]
    assert len(lengths) == 4000 and min(lengths) >= 8 and max(lengths) <= 2048
    assert 330 < sum(lengths) / len(lengths) < 430  # ~400, a little less for the clipping at 2048
    again = [len(s) for s in bench_scale.sft_like_samples(a, vocab=100)]
    assert again == lengths


def test_packing_packed_beats_padded_on_the_same_tokens(tmp_path):
    r = bench_scale.main(["packing", *TINY, "--docs", "40", "--mean-len", "40", "--max-len", "128",
                          "--padded-batch", "8", "--packed-batch", "2", "--out", str(tmp_path)])
    rec = _json(tmp_path / "packing.json")
    pad, pk = rec["padded"], rec["packed"]
    assert pad["useful_tokens"] == pk["useful_tokens"] > 0
    assert pk["token_slots"] < pad["token_slots"] and pk["pad_fraction"] < pad["pad_fraction"]
    assert pad["losses_finite"] and pk["losses_finite"]
    assert rec["speedup"] == pytest.approx(pk["useful_tokens_per_s"] / pad["useful_tokens_per_s"])
    assert pk["shapes"] == 1  # every packed batch has the same shape
    assert r["speedup"] == rec["speedup"]


def test_packing_falls_back_to_eager_for_both_modes_when_compilation_fails(tmp_path, monkeypatch):
    real = bench_scale._run_pass

    def failing_when_compiled(*args, compiled, **kw):
        if compiled:
            raise RuntimeError("dynamic shapes unsupported here")
        return real(*args, compiled=compiled, **kw)

    monkeypatch.setattr(bench_scale, "_run_pass", failing_when_compiled)
    rec = bench_scale.main(["packing", *TINY, "--docs", "16", "--mean-len", "30", "--max-len", "64",
                            "--padded-batch", "8", "--packed-batch", "2", "--compile", "True", "--out", str(tmp_path)])
    assert rec["compile"] is False and "dynamic shapes unsupported" in rec["compile_error"]
    assert rec["padded"]["useful_tokens"] == rec["packed"]["useful_tokens"] > 0
