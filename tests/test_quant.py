"""The native GEMV and int8 quantization against their references."""

import copy
import os
import subprocess
import sys

from pathlib import Path

import pytest
import torch

import sambay
from decoding import Recording, decoder
from conftest import GOLDEN as GOLDEN_DIR
from sambay import ops
from sambay.kernels import native as kernels
from sambay.kernels import NativeOps, PackedLinear, pack_model, prepare_for_inference, quantization_of, quantize_model
from sambay.kernels import linear as quant
from sambay.quant import quantize_int8

GOLDEN = str(GOLDEN_DIR)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("M", [1, 2, 3, 4, 7, 16, 40])  # 40: a prefill of int8 weights (int8_rows_fast)
@pytest.mark.parametrize("K", [160, 1027, 2560, 10240])
def test_gemv_equals_reference(dtype, M, K):
    g = torch.Generator().manual_seed(M * K)
    N = 37
    w = (torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8) if dtype == torch.int8
         else torch.randn(N, K, generator=g).to(dtype))
    scale = torch.rand(N, generator=g) if dtype == torch.int8 else None
    x = torch.randn(M, K, generator=g)
    ref = kernels.gemv_ref(x, w, scale)
    tol = dict(rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    torch.testing.assert_close(kernels.gemv(x, w, scale, exact=True), ref, **tol)
    # the default path may round the activations (int8 per 64-block / bf16) exactly as its
    # reference does, and stays close to the float32 result
    torch.testing.assert_close(kernels.gemv(x, w, scale), kernels.gemv_lowp_ref(x, w, scale), **tol)
    assert (kernels.gemv(x, w, scale) - ref).norm() / ref.norm() < 0.01


needs_tiles = pytest.mark.skipif(not kernels.tiles_int8(), reason="this CPU's int8 GEMV reads plain rows")


@needs_tiles
@pytest.mark.parametrize("M", [1, 2, 3, 16])
@pytest.mark.parametrize("K", [64, 2560, 10240])
def test_tiled_int8_gemv_equals_the_row_kernel(M, K):
    """Int8 weights in 4-row tiles: the same products as row by row, bit for bit (the same
    arithmetic per row), with and without a bias; the layout round-trips."""
    g = torch.Generator().manual_seed(M + K)
    w = torch.randint(-127, 128, (44, K), generator=g, dtype=torch.int8)
    scale, bias, x = torch.rand(44, generator=g), torch.randn(44, generator=g), torch.randn(M, K, generator=g)
    tiled = kernels.tile_int8(w)
    assert tiled.shape == (11, K // 64, 4, 64) and torch.equal(kernels.untile_int8(tiled), w)
    assert torch.equal(kernels.gemv(x, tiled, scale), kernels.gemv(x, w, scale))
    assert torch.equal(kernels.gemv(x, tiled, scale, bias=bias), kernels.gemv(x, w, scale, bias=bias))
    torch.testing.assert_close(kernels.gemv(x, tiled, scale, exact=True), kernels.gemv(x, w, scale, exact=True))
    ref = kernels.gemv_lowp_ref(x, tiled, scale)
    torch.testing.assert_close(kernels.gemv(x, tiled, scale), ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


@needs_tiles
@torch.no_grad()
def test_tiled_packed_linear_keeps_its_results_and_its_checkpoint_layout():
    lin = torch.nn.Linear(128, 24)
    a = PackedLinear.from_linear(lin, int8=True)
    b = PackedLinear.from_linear(lin, int8=True)
    b.tile()
    assert b.weight.dim() == 4 and "4-row tiles" in repr(b)
    for rows in (1, 3, 40):  # the GEMV, and the matmul of a prefill
        x = torch.randn(rows, 128)
        assert torch.equal(a(x), b(x))
    assert torch.equal(b.state_dict()["weight"], a.weight)  # saved as plain rows
    c = PackedLinear.from_linear(torch.nn.Linear(128, 24), int8=True)
    c.tile()
    c.load_state_dict(a.state_dict())  # plain rows into a tiled layer
    assert torch.equal(c.weight, b.weight)
    odd = PackedLinear.from_linear(torch.nn.Linear(100, 24), int8=True)
    odd.tile()
    assert odd.weight.dim() == 2  # K not a multiple of 64: stays in rows


def test_native_kernels_are_built_here():
    """This machine has a compiler: the fast path must really be in use (not silently the fallback)."""
    assert kernels.native_status().startswith("native"), kernels.native_status()
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):  # int8 activations: AVX2 or VNNI
        assert any(p in kernels.fast_paths() for p in ("int8-avx2", "int8-vnni")), kernels.fast_paths()


def test_native_kernels_use_torchs_threads():
    """The kernels' parallel loops must run on torch's thread pool (a build without OpenMP silently
    ran them on one thread), and give the same results whatever the thread count."""
    before = torch.get_num_threads()
    g = torch.Generator().manual_seed(3)
    x, w, s = torch.randn(3, 256, generator=g), torch.randint(-127, 127, (512, 256), dtype=torch.int8), torch.rand(512)
    try:
        torch.set_num_threads(2)
        assert kernels.parallel_threads() == 2
        two = kernels.gemv(x, w, s)
        torch.set_num_threads(1)
        assert kernels.parallel_threads() == 1
        assert torch.equal(kernels.gemv(x, w, s), two)
    finally:
        torch.set_num_threads(before)


def test_fallback_without_native_kernels_gives_same_results():
    code = ("import torch; from sambay.kernels import native as kernels; torch.manual_seed(0); "
            "x=torch.randn(2,64); w=torch.randint(-127,127,(8,64),dtype=torch.int8); s=torch.rand(8); "
            "print(kernels.native_status()); print(torch.allclose(kernels.gemv(x,w,s), kernels.gemv_ref(x,w,s)))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "SAMBAY_NATIVE": "0"},
                         capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0].startswith("pytorch (disabled") and out[1] == "True"


def test_int8_quantization_error_is_bounded():
    w = torch.randn(64, 300)
    q, s = quantize_int8(w, rows_per_chunk=10)
    assert q.dtype == torch.int8 and int(q.abs().max()) == 127
    err = (q.float() * s[:, None] - w).abs()
    assert bool((err <= s[:, None] * (0.5 + 1e-4)).all())  # round-to-nearest: half a step


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 40])  # decode (GEMV) and prefill (matmul) paths
def test_packed_linear_matches_nn_linear(rows):
    lin = torch.nn.Linear(96, 50, bias=True)
    x = torch.randn(rows, 96)
    torch.testing.assert_close(PackedLinear.from_linear(lin, int8=False)(x), lin(x), rtol=1e-5, atol=1e-5)
    q = PackedLinear.from_linear(lin, int8=True)(x)
    assert (q - lin(x)).norm() / lin(x).norm() < 0.01


@torch.no_grad()
@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("fast_bf16", [False, True])
def test_prefill_matmul_in_blocks_equals_the_reference(int8, fast_bf16, monkeypatch):
    """The prefill matmul: dequantize, then matmul, in bf16 where the CPU multiplies it fast, otherwise
    in float32; a large weight in blocks of rows (a multiple of 4, tiled or not) gives the same result."""
    from sambay.kernels import linear as quant

    monkeypatch.setattr(quant, "fast_cpu_matmul", lambda dt: fast_bf16 or dt == torch.float32)
    lin = torch.nn.Linear(128, 100, bias=True).to(torch.bfloat16)
    packed = PackedLinear.from_linear(lin, int8=int8)
    packed.bias = packed.bias.float()  # as float32_activations leaves it
    x = torch.randn(40, 128)
    dt = torch.bfloat16 if fast_bf16 else torch.float32
    w = packed.weight.to(dt) * (packed.weight_scale.to(dt)[:, None] if int8 else 1)
    want = torch.nn.functional.linear(x.to(dt), w, packed.bias.to(dt))
    one = packed._matmul(x)
    assert one.dtype == dt
    torch.testing.assert_close(one, want)  # the dtype's default tolerance (bf16: the scale's rounding)
    monkeypatch.setattr(quant, "MATMUL_BLOCK_ELEMENTS", 128 * 10)  # blocks of 8 rows: 13 blocks, the last of 4
    blocks = packed._matmul(x)
    torch.testing.assert_close(blocks, one, rtol=1e-6, atol=1e-6)  # BLAS may round a narrower product apart
    if int8 and kernels.tiles_int8():
        packed.tile()
        assert packed.weight.dim() == 4 and torch.equal(packed._matmul(x), blocks)
    # What a prefill of 40 rows runs: the GEMV for int8 weights where it multiplies int8 activations,
    # and for bf16 weights that a matmul would first convert (up to GEMV_CONVERT_MAX_ROWS rows).
    many = packed(x)
    if (kernels.int8_rows_fast() if int8 else not fast_bf16):
        assert torch.equal(many, kernels.gemv(x, packed.weight, packed.weight_scale, bias=packed.bias))
        assert (many - want.float()).norm() / want.float().norm() < 0.01
    else:
        assert torch.equal(many, packed._matmul(x))
    if not int8:
        x = torch.randn(quant.GEMV_CONVERT_MAX_ROWS + 1, 128)
        assert torch.equal(packed(x), packed._matmul(x))


def test_loading_work_shows_progress_on_a_terminal_only(monkeypatch):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        prepare_for_inference(sambay.load_model(GOLDEN), "int8")
        out = stream.getvalue()
        for bar in ("quantizing to int8", "reading weights into memory"):
            assert (f"{bar}: " in out) == shown, out


def test_fast_cpu_matmul_follows_the_cpus_bf16_support():
    """float32 is always fast; bf16 only where the CPU multiplies it natively (AVX512-BF16 or AMX)."""
    from sambay.kernels import fast_cpu_matmul

    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not flags:
        pytest.skip("no /proc/cpuinfo to read the CPU's features from")
    native_bf16 = "avx512_bf16" in flags or "amx_bf16" in flags
    assert fast_cpu_matmul(torch.float32)
    assert fast_cpu_matmul(torch.bfloat16) == native_bf16


@pytest.fixture(scope="module")
def model():
    return sambay.load_model(GOLDEN)


@torch.no_grad()
def test_packed_model_equals_reference_model(model):
    ids = torch.randint(0, 511, (2, 24), generator=torch.Generator().manual_seed(1))
    packed = pack_model(copy.deepcopy(model))
    assert packed.lm_head.weight.data_ptr() == packed.model.embed_tokens.weight.data_ptr()  # no copy
    ref = model(ids)
    torch.testing.assert_close(packed(ids), ref, rtol=1e-4, atol=1e-4)
    state = packed.new_state(2, 24)
    steps = [packed(ids[:, :10], state=state)] + [packed(ids[:, t:t + 1], state=state) for t in range(10, 24)]
    torch.testing.assert_close(torch.cat(steps, 1), ref[:, 9:], rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_int8_model_within_stated_tolerance_and_round_trips(model, tmp_path):
    """Stated tolerance: int8 logits within 8% relative (norm) of float32 where the activations are
    rounded to int8 too (the native int8 GEMV: decode, and prefill where kernels.int8_rows_fast),
    5% where a prefill dequantizes to a float32 matmul, on the tiny golden model, whose random
    weights are harsher on 8-bit rounding than trained ones; and the same greedy tokens for most steps."""
    ids = torch.randint(0, 511, (2, 24), generator=torch.Generator().manual_seed(2))
    q = quantize_model(copy.deepcopy(model))
    ref, out = model(ids), q(ids)
    assert (out - ref).norm() / ref.norm() < (0.08 if kernels.int8_rows_fast() else 0.05)
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.8
    # decode path (int8 GEMV, activations also rounded to int8 per 64 values): within 8%; this
    # tiny random model (64-wide) is the harshest case, trained wider models do far better
    state = q.new_state(2, 24)
    steps = torch.cat([q(ids[:, :10], state=state)] + [q(ids[:, t:t + 1], state=state)
                                                       for t in range(10, 24)], 1)
    assert (steps - ref[:, 9:]).norm() / ref[:, 9:].norm() < 0.08
    assert (steps.argmax(-1) == ref[:, 9:].argmax(-1)).float().mean() > 0.8
    saved = sambay.save_model(q, tmp_path / "int8")
    again = sambay.load_model(saved)
    assert quantization_of(again) == "int8" and again.model.layers[0].mlp.fc1.weight.dtype == torch.int8
    assert torch.equal(again(ids), out)
    # Prepared for inference (int8 in 4-row tiles where the CPU streams those), it saves the same file.
    prepare_for_inference(again)
    assert again.model.layers[0].mlp.fc1.weight.dim() == (4 if kernels.tiles_int8() else 2)
    resaved = sambay.save_model(again, tmp_path / "int8-again")
    assert (resaved / "model.safetensors").read_bytes() == (saved / "model.safetensors").read_bytes()
    fp32_bytes = os.path.getsize(f"{GOLDEN}/model.safetensors")
    assert (saved / "model.safetensors").stat().st_size < 0.5 * fp32_bytes


def test_quantize_command(tmp_path, capsys):
    from sambay.cli import main

    assert main(["quantize", "--model", GOLDEN, "--out", str(tmp_path / "q")]) == 0
    assert quantization_of(sambay.load_model(tmp_path / "q")) == "int8"
    assert main(["quantize", "--model", "/no/such", "--out", str(tmp_path / "x")]) == 2
    assert "no model folder" in capsys.readouterr().err


BLOCK_VARIANTS = {"tiny": {}, "no-differential": {"differential_attention": False},
                  "window-1": {"sliding_window": 1}, "gqa-4": {"num_attention_heads": 8, "num_key_value_heads": 2},
                  "mamba-biases": {"mamba_proj_bias": True, "mamba_conv_bias": False}}


@torch.no_grad()
@pytest.mark.parametrize("variant", BLOCK_VARIANTS)
@pytest.mark.parametrize("int8", [False, True])
def test_native_decode_levels_equal_the_modules(variant, int8):
    """A packed model decodes a step's whole layer stack in one native call (level "stack"), or one
    native call per mixer and per MLP ("layers"): the same kernels in the same order, so the same
    logits and states bit for bit. The modules op by op with native operations ("ops") and with
    PyTorch's (the reference) agree with them to rounding.
    A ragged batch: one left-padded row, so rows sit at different positions and slots."""
    cfg = sambay.preset("tiny").replace(**BLOCK_VARIANTS[variant])
    model = sambay.build_model(cfg, dtype=torch.bfloat16, seed=0)
    g = torch.Generator().manual_seed(4)
    for p in model.parameters():
        if p.dim() == 2:  # larger than init, so that every layer visibly matters
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
        elif p.dtype.is_floating_point and "A_log" not in p.__repr__():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
    model = prepare_for_inference(model, "int8" if int8 else None)  # packed; int8 in tiles on AVX2
    assert isinstance(model.ops, NativeOps) and model.ops.level == "stack"
    ids = torch.randint(0, 500, (3, 24), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    calls = []
    lib = Recording(kernels.library(), calls, ("mlp_step", "gmu_step", "mamba_step", "attention_step", "decode_layers"))

    decode = decoder(model, ids, mask, lib, calls)

    ref, _ = decode(None)
    op_by_op, _ = decode("ops")
    assert not calls
    layers, layers_state = decode("layers")
    assert set(calls) == {"mlp_step", "gmu_step", "mamba_step", "attention_step"}
    assert len(calls) == 14 * 2 * cfg.num_hidden_layers  # a mixer and an MLP per layer and step
    got, state = decode("stack")
    assert calls == ["decode_layers"] * 14  # one call per step
    assert torch.equal(got, layers)
    for a, b in zip(state.conv + state.ssm + state.k + state.v,
                    layers_state.conv + layers_state.ssm + layers_state.k + layers_state.v):
        assert (a is None and b is None) or torch.equal(a, b)
    # The PyTorch decode attention rounds the query to the bf16 cache's dtype, the kernels keep it
    # float32 (and int8 rounds each GEMV's activations): agreement to that rounding, and the same
    # next token almost everywhere.
    # int8 also feeds bf16-rounded activations to the bf16 dt_proj where the CPU has bf16 dot
    # products, and dt goes through exp(): this deliberately large-weighted model magnifies that.
    bound, agree = (0.05, 0.85) if int8 else (0.02, 0.9)
    for other in (op_by_op, got):
        assert (other - ref).norm() / ref.norm() < bound
        assert (other.argmax(-1) == ref.argmax(-1)).float().mean() > agree
    (key, plan), = state.derived.items()  # built once, kept for the same rows
    assert plan.current(model)
    model.model.layers[0].mlp.fc1.weight = model.model.layers[0].mlp.fc1.weight.clone()  # new weights
    assert not plan.current(model)
    model(ids[:, :1], state=state.rows(slice(0, 3)))
    assert len(state.derived) == 1 and state.derived[key] is not plan  # rebuilt


@torch.no_grad()
def test_a_packed_model_runs_one_token_without_a_state():
    """A stateless call of one token runs the modules (no decode plan): native operations and
    PyTorch's give the same logits."""
    model = prepare_for_inference(sambay.build_model(sambay.preset("tiny"), dtype=torch.bfloat16, seed=0))
    assert isinstance(model.ops, NativeOps)
    ids = torch.tensor([[5], [7]])
    got = model(ids)
    model.ops = ops.TORCH
    torch.testing.assert_close(got, model(ids), rtol=1e-4, atol=1e-4)
