"""The benchmarks' code paths on the CPU (no timing is asserted): the GPU set in bf16 on a tiny model, so
``make bench-gpu`` cannot silently break again, and the reuse proxy's op accounting."""
from __future__ import annotations

import json

import torch


def test_gpu_set_runs_in_bf16_on_a_tiny_model(tmp_path):
    from benchmarks.__main__ import main

    main(["gpu", "--smoke", "--out", str(tmp_path)])
    res = json.loads((tmp_path / "summary_gpu.json").read_text())
    speed = res["speed"]["rows"]
    assert {r["policy"] for r in speed} >= {"full", "l2c", "toca", "fora"}
    assert all(r["dtype"] == "bfloat16" and r["efficiency"] > 0 for r in speed)
    peers = {r["model"]: r for r in res["peers"]["rows"]}
    assert peers["tiny_dit"]["max_abs_diff"] < 1e-4  # same weights, same math in fp32
    assert peers["tiny_dit bfloat16"]["max_abs_diff"] < 0.05  # and within bf16 round-off of an O(1) output
    train = res["train"][0]
    assert train["dtype"] == "bf16" and train["samples_per_s"] > 0
    assert train["peak_source"] == "measured bfloat16 matmul" and 0 < train["mfu"] < 1  # a CPU: its own GEMM rate
    assert (tmp_path / "speed_gpu.md").read_text().count("| eager |") == len(speed)
    assert "## Router-training throughput" in (tmp_path / "summary_gpu.md").read_text()


def test_reuse_proxy_sees_no_branch_op_in_a_fully_reused_evaluation():
    """The profiler's view of a fully reused forward: no branch GEMM, attention, GELU or modulation, and one
    LayerNorm (the final layer's); the full forward has every one of them (no shares are asserted)."""
    from benchmarks.reuse import reuse_row
    from diffcache.backbones import load_backbone

    model = load_backbone("tiny_dit", random_init=True)
    row = reuse_row(model, batch=2, dtype=torch.bfloat16, repeats=1)
    assert row["skippable_share_reused"] == 0 and row["layer_norm_calls_reused"] == 1
    assert row["skippable_share_full"] > 0 and 0 < row["floor_macs"] < 1  # the full forward has them
    # what remains is the gated residual adds, one per branch per block (the time-ranked top ops vary by run)
    assert row["gated_adds_reused"] == len(model.cache_sites()) == 2 * model.depth


def test_training_benchmark_times_a_compiled_step():
    """A config naming a backend times the step compiled as ``module.compile`` does (here ``aot_eager``:
    tracing and autograd, no code generation); the row says so."""
    from benchmarks import train

    try:
        rows = train.run((("tiny_dit", 2, "fp32", "batch", "aot_eager"),), repeats=1, search_samples=0)
    finally:
        torch._dynamo.reset()
    assert rows[0]["mode"] == "aot_eager" and rows[0]["draw"] == "batch" and rows[0]["samples_per_s"] > 0
