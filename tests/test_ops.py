"""Fast kernels against their obviously-right references."""

import os
import subprocess
import sys

import pytest
import torch

from sambay import ops
from sambay.ops import attend
from sambay.kernels import NativeOps
from sambay.kernels import native as kernels


def scan_inputs(B=2, T=150, e=24, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, e, generator=g)
    dt = torch.nn.functional.softplus(torch.randn(B, T, e, generator=g) - 2)
    A = -torch.exp(torch.rand(e, n, generator=g) * 3)
    Bm, Cm = torch.randn(B, T, n, generator=g), torch.randn(B, T, n, generator=g)
    D = torch.randn(e, generator=g)
    s0 = torch.randn(B, e, n, generator=g)
    return x, dt, A, Bm, Cm, D, s0


@pytest.mark.parametrize("chunk", [1, 7, 64, 1000])
@pytest.mark.parametrize("with_state", [False, True])
def test_chunked_scan_equals_reference(chunk, with_state):
    x, dt, A, Bm, Cm, D, s0 = scan_inputs()
    s0 = s0 if with_state else None
    y_ref, s_ref = ops.selective_scan_ref(x, dt, A, Bm, Cm, D, s0)
    y, s = ops.selective_scan(x, dt, A, Bm, Cm, D, s0, chunk=chunk)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)
    if s0 is not None:
        assert not torch.equal(s, s0)  # the caller's state is not modified in place


def test_decode_steps_equal_reference():
    x, dt, A, Bm, Cm, D, s0 = scan_inputs(T=20)
    y_ref, s_ref = ops.selective_scan_ref(x, dt, A, Bm, Cm, D, s0)
    s = s0.clone()
    ys = [ops.selective_state_step(x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D, s) for t in range(20)]
    torch.testing.assert_close(torch.stack(ys, 1), y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("n", [16, 5])  # vector lanes only; a scalar tail
def test_native_decode_step_equals_reference(n):
    x, dt, A, Bm, Cm, D, s0 = scan_inputs(B=3, T=30, e=300, n=n)
    dt[0, 3, :7] = 40.0  # decays that underflow to 0
    s_ref, s = s0.clone(), s0.clone()
    for t in range(30):
        args = (x[:, t], dt[:, t], A, Bm[:, t], Cm[:, t], D)
        y = kernels.ssm_step(*args, s)
        assert y is not None  # native kernels are built on this machine
        torch.testing.assert_close(y, ops.selective_state_step(*args, s_ref), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s, s_ref, rtol=1e-5, atol=1e-5)


def test_scan_gradients_equal_reference():
    inputs = [t.double().requires_grad_() for t in scan_inputs(T=40)]
    y_ref, s_ref = ops.selective_scan_ref(*inputs)
    grads_ref = torch.autograd.grad((y_ref.sum() + s_ref.square().sum()), inputs)
    y, s = ops.selective_scan(*inputs[:-1], state=inputs[-1], chunk=16)
    grads = torch.autograd.grad((y.sum() + s.square().sum()), inputs)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b)


def attention_inputs(B=2, Hq=4, Hk=2, Tq=37, Tk=37, dk=8, dv=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, Tq, dk, generator=g)
    k = torch.randn(B, Hk, Tk, dk, generator=g)
    v = torch.randn(B, Hk, Tk, dv, generator=g)
    k_pos = torch.arange(Tk).expand(B, Tk)
    q_pos = k_pos[:, Tk - Tq:]
    valid = torch.ones(B, Tk, dtype=torch.bool)
    valid[1, :5] = False  # left padding in row 1
    return q, k, v, q_pos, k_pos, valid


@pytest.mark.parametrize("window", [None, 1, 6])
@pytest.mark.parametrize("budget", [None, 500])
def test_chunked_attention_equals_reference(window, budget, monkeypatch):
    if budget:  # force many small query chunks
        monkeypatch.setattr(attend, "_SCORE_BUDGET", budget)
    q, k, v, q_pos, k_pos, valid = attention_inputs()
    ref = ops.attention_ref(q, k, v, q_pos, k_pos, valid, window)
    out = ops.attention(q, k, v, q_pos, k_pos, valid, window)
    assert torch.isfinite(out).all()
    real = valid[:, :, None].expand(-1, -1, q.shape[1]).permute(0, 2, 1)  # (B, H, T) queries that are real
    torch.testing.assert_close(out[real], ref[real], rtol=1e-5, atol=1e-5)


def test_attention_mask_semantics():
    q_pos = torch.tensor([[5]])
    k_pos = torch.arange(8)[None]
    valid = torch.ones(1, 8, dtype=torch.bool)
    valid[0, 3] = False
    m = ops.attention_mask(q_pos, k_pos, valid, window=4)[0, 0, 0]
    assert m.tolist() == [False, False, True, False, True, True, False, False]  # keys 2..5 minus 3


MEMORY_PROBE = r"""
import resource, sys, torch
import sambay
from sambay.ops import attend
attend._SCORE_BUDGET = 2**20
torch.manual_seed(0)
cfg = sambay.preset("tiny").replace(max_position_embeddings=1 << 16, sliding_window=64, mamba_d_state=64)
model = sambay.build_model(cfg)
T = int(sys.argv[1])
ids = torch.randint(0, 500, (1, T))
with torch.no_grad():
    model(ids, state=model.new_state(1, T))
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


def test_long_prefill_memory_grows_linearly():
    """Peak memory per extra prompt token, from T=4096 to T=16384. A (T x e x n) scan tensor would
    cost e*n*4 = 32 KiB per token here, a (T x T) score matrix (T1+T2)*4 = 80 KiB per token per
    head; the chunked paths need only a few (T x e) activations. glibc is told to map every large
    block separately so that freed memory leaves the peak resident size (no allocator retention)."""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    peak = {}
    for T in (4096, 16384):
        out = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(T)], capture_output=True,
                             text=True, check=True, env=env)
        peak[T] = int(out.stdout.split()[-1])
    per_token = (peak[16384] - peak[4096]) / (16384 - 4096)
    scan_tensor_per_token = 128 * 64 * 4
    assert per_token < scan_tensor_per_token / 2, peak


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_reference(window, dtype):
    """One query per row, rows at different positions, grouped-query heads."""
    q, k, v, _, k_pos, valid = attention_inputs(Tq=1, Tk=30)
    q_pos = torch.tensor([[29], [17]])  # row 1 decodes at an earlier position
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    ref = ops.attention_ref(q.float(), k.float(), v.float(), q_pos, k_pos, valid, window)
    out = ops.attention(q, k, v, q_pos, k_pos, valid, window)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S, dk, dv, Hq, masked", [(200, 16, 32, 6, 17),  # vector paths
                                                   (300, 64, 128, 15, 130),  # phi4-mini-flash heads, g=5
                                                   (90, 12, 20, 6, 3)])  # dims not a multiple of 8
def test_grouped_decode_attention_equals_reference(dtype, S, dk, dv, Hq, masked, native):
    """Two query groups over two key halves of one tensor and shared values (differential
    attention's decode step): PyTorch's version (queries rounded to the cache dtype) and the native
    kernel (float32 queries, K and V read once for both groups)."""
    g = torch.Generator().manual_seed(1)
    B, Hk = 2, 3
    k = torch.randn(B, 2 * Hk, S, dk, generator=g).to(dtype)
    v = torch.randn(B, Hk, S, dv, generator=g).to(dtype)
    q1, q2 = (torch.randn(B, Hq, 1, dk, generator=g) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :masked] = False  # whole masked blocks of keys before the first valid one
    q_pos, k_pos = torch.tensor([[S - 1], [150]]), torch.arange(S).expand(B, S)
    mask = ops.attention_mask(q_pos, k_pos, valid, None)
    fast, called = native
    a1, a2 = ops.decode_attention_groups([q1, q2], [k[:, :Hk], k[:, Hk:]], v, mask)
    n1, n2 = fast.decode_attention([q1, q2], [k[:, :Hk], k[:, Hk:]], v, mask).unbind(1)  # (B, Hq, dv) each
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    for a, n, q, kk in ((a1, n1, q1, k[:, :Hk]), (a2, n2, q2, k[:, Hk:])):
        ref = ops.attention_ref(q, kk.float(), v.float(), q_pos, k_pos, valid, None)
        torch.testing.assert_close(a.float(), ref, rtol=tol, atol=tol)
        torch.testing.assert_close(n.float(), ref[:, :, 0], rtol=2e-5, atol=2e-5)
    assert attend._stack_views([k[:, :Hk], k[:, Hk:]]) is not None  # really the one-pass path
    assert called == {"decode_attention"}


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S, dk, dv, Hq, masked", [(203, 16, 32, 6, 17),  # vector paths, ragged tails
                                                   (300, 64, 128, 6, 130),  # phi4-mini-flash: g = 2
                                                   (300, 64, 128, 15, 70),  # g = 5: pairs and a single
                                                   (90, 12, 20, 6, 3)])  # dims not a multiple of 8
@pytest.mark.parametrize("blocks", [False, True])
def test_differential_decode_attention_equals_reference(dtype, S, dk, dv, Hq, masked, blocks, native):
    """softmax(q1.k1) V - lam softmax(q2.k2) V from one pass over V (the native kernel) equals the
    two groups' attention computed apart and subtracted; V as rows or in column blocks (the decode
    state's layout: 32 wide where dv allows, else 2 blocks, which takes the scalar path)."""
    g = torch.Generator().manual_seed(2)
    B, Hk, lam = 2, 3, 0.37
    k = torch.randn(B, 2 * Hk, S, dk, generator=g).to(dtype)
    v = torch.randn(B, Hk, S, dv, generator=g).to(dtype)
    q1, q2 = (torch.randn(B, Hq, 1, dk, generator=g) for _ in range(2))
    valid = torch.ones(B, S, dtype=torch.bool)
    valid[1, :masked] = False
    q_pos, k_pos = torch.tensor([[S - 1], [S - 1]]), torch.arange(S).expand(B, S)
    mask = ops.attention_mask(q_pos, k_pos, valid, None)
    vin = ops.value_blocks(v, 32 if dv % 32 == 0 else dv // 2).contiguous() if blocks else v
    assert torch.equal(ops.value_rows(vin), v)
    a1 = ops.attention_ref(q1, k[:, :Hk].float(), v.float(), q_pos, k_pos, valid, None)
    a2 = ops.attention_ref(q2, k[:, Hk:].float(), v.float(), q_pos, k_pos, valid, None)
    expect = (a1 - lam * a2)[:, :, 0]
    torch_out = ops.decode_diff_attention([q1, q2], [k[:, :Hk], k[:, Hk:]], vin, mask, lam)  # (B, 1, Hq, dv)
    tol = 2e-5 if dtype == torch.float32 else 3e-2  # PyTorch's rounds the queries to the cache dtype
    torch.testing.assert_close(torch_out[:, 0], expect, rtol=tol, atol=tol)
    fast, called = native
    with torch.no_grad():
        got = fast.decode_diff_attention([q1, q2], [k[:, :Hk], k[:, Hk:]], vin, mask, lam)
    torch.testing.assert_close(got[:, 0], expect, rtol=2e-5, atol=2e-5)
    assert called == {"decode_diff_attention"}  # the kernel ran


def test_a_build_stopped_midway_does_not_hang_the_next_load(tmp_path):
    """torch's builder leaves its `lock` file behind when a build is stopped (Ctrl-C during the
    first compile); the next process must load the kernels, not wait for that file forever."""
    import shutil

    from sambay.kernels import loader

    if kernels._load() is None:
        pytest.skip(kernels.native_status())
    build = loader.build_dir(loader.build_key(sources=loader.Sources.read()))
    copy = tmp_path / "kernels" / build.relative_to(loader.cache_root())
    shutil.copytree(build, copy)  # already built: no recompile
    (copy / "lock").touch()
    env = {**os.environ, "SAMBAY_CACHE": str(tmp_path)}
    try:
        out = subprocess.run([sys.executable, "-c", "from sambay.kernels import native as kernels; print(kernels.native_status())"],
                             capture_output=True, text=True, env=env, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the kernels' load waited on a stale build lock")
    assert out.returncode == 0 and out.stdout.startswith("native"), out.stderr


# ---- decode glue: each fused op against its PyTorch twin ---------------------------------------------


class _Recording:
    """The native library, noting the name of every function called through it."""

    def __init__(self, lib, called: set):
        self._lib, self._called = lib, called

    def __getattr__(self, name):
        fn = getattr(self._lib, name)
        return lambda *a: self._called.add(name) or fn(*a)


@pytest.fixture
def native():
    """(NativeOps over the native library, the names of the library functions it called): a silent
    fallback to the PyTorch version, which would compare the reference with itself, fails the test."""
    lib, called = kernels.library(), set()
    assert lib is not None, kernels.native_status()
    return NativeOps(_Recording(lib, called), level="ops"), called


@torch.no_grad()
@pytest.mark.parametrize("rows, d", [(1, 2560), (3, 77)])
def test_add_layer_norm_equals_reference(rows, d, native):
    fast, called = native
    g = torch.Generator().manual_seed(rows)
    h, delta = torch.randn(rows, d, generator=g) * 3 + 1, torch.randn(rows, d, generator=g)
    w, b = torch.randn(d, generator=g), torch.randn(d, generator=g)
    for dl, bias in ((delta, b), (None, b), (delta, None)):
        got, ref = fast.add_layer_norm(h, dl, w, bias, 1e-5), ops.add_layer_norm(h, dl, w, bias, 1e-5)
        for x, y in zip(got, ref):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)
    assert fast.add_layer_norm(h, None, w, b, 1e-5)[0] is h  # no copy without delta
    assert called == {"add_layer_norm"}


@torch.no_grad()
def test_silu_mul_equals_reference(native):
    fast, called = native
    g = torch.Generator().manual_seed(0)
    gu = torch.randn(3, 1, 2 * 1003, generator=g) * 30  # large values: exp over- and underflow
    gate, up = gu.chunk(2, -1)  # strided rows, as the MLP's views are
    torch.testing.assert_close(fast.silu_mul(gate, up), ops.silu_mul(gate, up), rtol=1e-6, atol=1e-6)
    assert called == {"silu_mul"}


@torch.no_grad()
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k, bias", [(4, True), (3, False)])
def test_conv_step_equals_reference(state_dtype, k, bias, native):
    fast, called = native
    g = torch.Generator().manual_seed(k)
    B, e = 2, 37
    w, b = torch.randn(e, k, generator=g), (torch.randn(e, generator=g) if bias else None)
    s1 = torch.randn(B, k - 1, e, generator=g).to(state_dtype)
    s2 = s1.clone()
    for _ in range(5):  # the window shifts: later steps read what earlier ones wrote
        x = torch.randn(B, 2 * e, generator=g)[:, :e]
        torch.testing.assert_close(fast.conv_step(x, s1, w, b), ops.conv_step(x, s2, w, b), rtol=1e-5, atol=1e-5)
        assert torch.equal(s1, s2)
    assert called == {"conv_step"}


@torch.no_grad()
def test_diff_combine_equals_reference(native):
    fast, called = native
    g = torch.Generator().manual_seed(0)
    o, w = torch.randn(2, 2, 3, 5, 24, generator=g), torch.randn(24, generator=g)
    torch.testing.assert_close(fast.diff_combine(o, 0.37, w, 1e-5, 0.8), ops.diff_combine(o, 0.37, w, 1e-5, 0.8),
                               rtol=1e-5, atol=1e-5)
    combined = o[:, :1] - 0.37 * o[:, 1:]  # (B, 1, ...): the difference already taken
    torch.testing.assert_close(fast.diff_combine(combined, 0.37, w, 1e-5, 0.8), ops.diff_combine(o, 0.37, w, 1e-5, 0.8),
                               rtol=1e-5, atol=1e-5)
    assert called == {"diff_combine"}


@torch.no_grad()
@pytest.mark.parametrize("diff, blocks", [(True, False), (True, True), (False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_write_equals_reference(diff, blocks, dtype, native):
    fast, called = native
    g = torch.Generator().manual_seed(0)
    B, Hkv, hd, S = 3, 4, 8, 6
    qkv = torch.randn(B, 5 * Hkv * hd, generator=g)  # some query heads first, as projected
    kv = qkv[:, 3 * Hkv * hd:]
    vshape = (B, Hkv // 2, S, 2 * hd) if diff else (B, Hkv, S, hd)
    if blocks:  # values in column blocks, as the differential decode state keeps them
        vshape = (B, Hkv // 2, 4, S, 2 * hd // 4)
    caches = [(torch.zeros(B, Hkv, S, hd, dtype=dtype), torch.zeros(vshape, dtype=dtype)) for _ in range(2)]
    slot = torch.tensor([0, 5, 2])
    fast.kv_write(kv, *caches[0], slot, diff)
    ops.kv_write(kv, *caches[1], slot, diff)
    assert torch.equal(caches[0][0], caches[1][0]) and torch.equal(caches[0][1], caches[1][1])
    assert caches[0][0].abs().sum() > 0 and caches[0][1].abs().sum() > 0
    if blocks:  # the same values as a write into rows
        rows = (torch.zeros(B, Hkv, S, hd, dtype=dtype), torch.zeros(B, Hkv // 2, S, 2 * hd, dtype=dtype))
        ops.kv_write(kv, *rows, slot, diff)
        assert torch.equal(ops.value_rows(caches[0][1]), rows[1])
    assert called == {"kv_write"}
