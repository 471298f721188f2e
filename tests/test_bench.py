"""`sambay bench decode` / `prefill` on a tiny model: they run, and their figures add up.

Speed itself is not asserted here (the machine is shared and noisy); the benchmarks report it.
"""

import json

import pytest
import torch

import sambay
from sambay.bench.prefill import time_prefill
from sambay.cli import main
from sambay.kernels import PackedLinear, prepare_for_inference
from sambay.models.config import KV_ATTENTION

pytestmark = pytest.mark.usefixtures("one_thread")  # and restores the thread count `--threads 1` sets


def last_json(capsys) -> dict:
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) > 1  # a table for people first
    return json.loads(out[-1])


@pytest.mark.slow  # two runs, each reading a 1 GiB buffer a dozen times for the bandwidth
@pytest.mark.parametrize("quantize", [[], ["--quantize", "int8"]])
def test_bench_decode_reports_consistent_figures(capsys, quantize):
    assert main(["--threads", "1", "bench", "decode", "--preset", "tiny", "--random-weights",
                 "--dtype", "float32", "--context", "100", "--tokens", "3", "--warmup", "1", *quantize]) == 0
    r = last_json(capsys)
    cfg = sambay.preset("tiny")
    b = r["bytes_breakdown"]
    assert r["bytes_per_step"] == b["total"] == b["weights"] + b["shared_kv"] + b["swa_kv"] + b["mamba_state"]
    if not quantize:  # float32 weights, each read once (the tied head reads the embedding once)
        assert abs(b["weights"] - 4 * cfg.num_parameters()) <= 4 * cfg.hidden_size
    else:
        assert b["weights"] < 2 * cfg.num_parameters()
    kv_per_token = cfg.state_bytes_per_token(4)
    readers = sum(k in ("A", "X") for k in cfg.layout)
    assert b["shared_kv"] == pytest.approx(kv_per_token * 101 * readers, rel=0.02)
    # each step is held against the bandwidth read just before and after it; the best bandwidth of
    # the run gives the stricter figure, never above the paired one
    ratios = sorted(r["bytes_per_step"] / (t * 1e-3) / (bw * 1e9) for t, bw in zip(r["steps_ms"], r["beside_gbs"]))
    assert len(ratios) == 3 and r["roofline_fraction"] == pytest.approx(ratios[1], rel=0.01, abs=1e-3)
    assert r["best_bandwidth_gbs"] >= max(r["beside_gbs"]) - 0.01
    assert r["roofline_fraction_vs_best"] == pytest.approx(r["achieved_gbs"] / r["best_bandwidth_gbs"],
                                                           rel=0.02, abs=1e-3)
    assert r["roofline_fraction_vs_best"] <= r["roofline_fraction"] + 1e-3
    # the step is the median of the timed steps, and tokens/s and GB/s follow from it
    step = sorted(r["steps_ms"])[1] * 1e-3
    assert r["step_ms"] == pytest.approx(step * 1e3, abs=0.01)
    assert r["tokens_per_s"] == pytest.approx(r["batch"] / step, rel=0.01)
    assert r["achieved_gbs"] == pytest.approx(r["bytes_per_step"] / step / 1e9, rel=0.01, abs=0.01)
    assert r["context"] == 100 and r["tokens"] == 3 and r["quantize"] == ("int8" if quantize else "none")


def test_bench_decode_counts_every_layers_kv_for_the_transformer_baseline(capsys):
    assert main(["--threads", "1", "bench", "decode", "--preset", "tiny-phi3", "--random-weights",
                 "--dtype", "float32", "--context", "100", "--tokens", "2", "--warmup", "1"]) == 0
    b = last_json(capsys)["bytes_breakdown"]
    cfg = sambay.preset("tiny-phi3")
    assert b["shared_kv"] == pytest.approx(cfg.state_bytes_per_token(4) * 101, rel=0.02)  # all 4 layers
    assert b["swa_kv"] == b["mamba_state"] == 0


def test_bench_prefill_reports_each_length(capsys):
    assert main(["--threads", "1", "bench", "prefill", "--preset", "tiny", "--random-weights",
                 "--dtype", "float32", "--lengths", "16,64"]) == 0
    r = last_json(capsys)
    assert r["bench"] == "prefill" and r["quantize"] == "none" and r["matmul_dtype"] == "float32"
    assert [row["tokens"] for row in r["results"]] == [16, 64]
    for row in r["results"]:  # tokens/s = tokens / seconds (each rounded)
        assert row["seconds"] == pytest.approx(row["tokens"] / row["tokens_per_s"], rel=0.01, abs=6e-4)


@torch.no_grad()
def test_prefill_flops_are_counted_per_linear_call():
    """The FLOPs bench prefill reports: every linear call's 2 x rows x in x out, so SambaY's
    cross-decoder (run only where logits are kept) does not count for every token."""
    model = prepare_for_inference(sambay.load_model("tiny", random_weights=True))  # as the bench runs it
    n, count = 24, [0]
    time_prefill(model, n, chunk=n, flops=count)

    def size(modules):  # Mamba's small dt_proj is applied through its weight (float32 bias): no hook sees it
        return sum(m.in_features * m.out_features for layer in modules for name, m in layer.named_modules()
                   if isinstance(m, PackedLinear) and not name.endswith("dt_proj"))

    layers = list(model.model.layers)
    split = model.config.layer_kinds.index(KV_ATTENTION) + 1  # the self-decoder; then the cross-decoder
    # the self-decoder runs all n positions, the cross-decoder and the head only the kept one
    assert count[0] == 2 * (n * size(layers[:split]) + size(layers[split:]) + size([model.lm_head]))


def test_bench_rejects_bad_arguments(capsys):
    assert main(["bench", "decode", "--preset", "tiny", "--random-weights", "--tokens", "0"]) == 2
    assert "--tokens" in capsys.readouterr().err
    assert main(["bench", "decode", "--preset", "tiny", "--random-weights", "--context", "5000"]) == 2
    assert "context" in capsys.readouterr().err
