// The element-wise glue between a decode step's matrix products, fused.
//
// At batch 1 a decode step is a few hundred GEMVs that stream the weights and, between them,
// small vector operations: norms, activations, the residual stream, the Mamba conv window, the
// K/V cache write. As separate PyTorch ops those cost far more than the arithmetic (an op call,
// an allocation and often a dtype conversion each, with caches that the weight stream has just
// evicted). Each function here does one such group in one pass; sambay/ops.py holds its PyTorch
// twin and the tests hold them equal. Activations are float32 throughout; states (conv window,
// K/V cache) may be bfloat16. Rows are the leading dimension and may be strided (views of a wider
// matrix product output); the last dimension is contiguous.

#include "kernels.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <cmath>

#include "simd.h"

namespace {

void check_rows(const at::Tensor& t, const char* fn, const char* name) {
  TORCH_CHECK(t.dim() == 2 && t.scalar_type() == at::kFloat && (t.size(1) <= 1 || t.stride(1) == 1),
              fn, ": ", name, " must be a float32 (rows, n) tensor with contiguous rows");
}

// silu(x) = x / (1 + exp(-x)): simd::silu at the native width, this for the tails.
inline float silu1(float x) { return x / (1.f + std::exp(-x)); }

// out[i] = silu(a[i]) * b[i]
inline void silu_mul_row(const float* a, const float* b, float* out, int64_t n) {
  using V = simd::Native;
  int64_t i = 0;
  if constexpr (V::size > 1)
    for (; i + V::size <= n; i += V::size) (simd::silu(V::load(a + i)) * V::load(b + i)).store(out + i);
  for (; i < n; ++i) out[i] = silu1(a[i]) * b[i];
}

// x[i] = silu(x[i]), in place.
inline void silu_row(float* x, int64_t n) {
  using V = simd::Native;
  int64_t i = 0;
  if constexpr (V::size > 1)
    for (; i + V::size <= n; i += V::size) simd::silu(V::load(x + i)).store(x + i);
  for (; i < n; ++i) x[i] = silu1(x[i]);
}

template <typename S, int KC = 0>  // KC: the kernel width when known at compile time (4 in Mamba)
void conv_step_impl(const float* x, int64_t ldx, S* state, const float* w, const float* bias, float* out,
                    int64_t B, int64_t E, int64_t Kr) {
  const int64_t K = KC ? KC : Kr;
  // state (B, K-1, E): the last K-1 inputs, oldest first; w (E, K): tap j multiplies input t-(K-1)+j.
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      S* s = state + b * (K - 1) * E;
      const float* xb = x + b * ldx;
      float* ob = out + b * E;
      for (int64_t c = 0; c < E; ++c) {
        const float* wc = w + c * K;
        float acc = 0.f;
        for (int64_t j = 0; j < K - 1; ++j) acc += static_cast<float>(s[j * E + c]) * wc[j];
        acc += xb[c] * wc[K - 1];
        ob[c] = bias ? acc + bias[c] : acc;
      }
      silu_row(ob, E);
      for (int64_t j = 0; j + 1 < K - 1; ++j)
        for (int64_t c = 0; c < E; ++c) s[j * E + c] = s[(j + 1) * E + c];
      for (int64_t c = 0; c < E; ++c) s[(K - 2) * E + c] = static_cast<S>(xb[c]);
    }
  });
}

template <typename S>
void kv_write_impl(const float* kv, int64_t ldkv, S* kc, S* vc, const int64_t* slot, bool diff, int64_t B,
                   int64_t Hkv, int64_t hd, int64_t Hv, int64_t dv, int64_t vb, const int64_t* ks, const int64_t* vs) {
  for (int64_t b = 0; b < B; ++b) {
    const float* src = kv + b * ldkv;
    for (int64_t i = 0; i < Hkv; ++i) {  // differential: cache heads are [even..., odd...]
      const int64_t from = !diff ? i : (i < Hkv / 2 ? 2 * i : 2 * (i - Hkv / 2) + 1);
      S* dst = kc + b * ks[0] + i * ks[1] + slot[b] * ks[2];
      for (int64_t d = 0; d < hd; ++d) dst[d] = static_cast<S>(src[from * hd + d]);
    }
    const float* v = src + Hkv * hd;  // values: Hkv * hd numbers, cut into Hv heads of dv
    for (int64_t j = 0; j < Hv; ++j) {
      S* dst = vc + b * vs[0] + j * vs[1] + slot[b] * vs[3];
      const float* vj = v + j * dv;
      for (int64_t c = 0; c < dv / vb; ++c)  // column block c holds dims [c vb, (c + 1) vb)
        for (int64_t i = 0; i < vb; ++i) dst[c * vs[2] + i] = static_cast<S>(vj[c * vb + i]);
    }
  }
}

}  // namespace

// h (R, d) float32 [+ delta (R, d)]: returns {h + delta, layer_norm(h + delta) * w + b}. Without
// delta (empty tensor) the first is h itself. w, b (d,) float32; b may be empty.
std::vector<at::Tensor> add_layer_norm(at::Tensor h, at::Tensor delta, at::Tensor w, at::Tensor b, double eps) {
  check_rows(h, "add_layer_norm", "h");
  const int64_t R = h.size(0), d = h.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == d && (!b.numel() || b.numel() == d),
              "add_layer_norm: weight and bias must be float32 of the hidden size");
  at::Tensor sum = h;
  if (delta.numel()) {
    check_rows(delta, "add_layer_norm", "delta");
    TORCH_CHECK(delta.sizes() == h.sizes(), "add_layer_norm: h and delta shapes differ");
    sum = at::empty({R, d}, h.options());
  }
  w = w.contiguous();
  b = b.contiguous();
  auto out = at::empty({R, d}, h.options());
  const float *wp = w.data_ptr<float>(), *bp = b.numel() ? b.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < R; ++r) {
    const float* hr = h.data_ptr<float>() + r * h.stride(0);
    float* sr = sum.data_ptr<float>() + r * sum.stride(0);
    if (delta.numel()) {
      const float* dr = delta.data_ptr<float>() + r * delta.stride(0);
      for (int64_t i = 0; i < d; ++i) sr[i] = hr[i] + dr[i];
    }
    float mean = 0.f;
    for (int64_t i = 0; i < d; ++i) mean += sr[i];
    mean /= d;
    float var = 0.f;
    for (int64_t i = 0; i < d; ++i) var += (sr[i] - mean) * (sr[i] - mean);
    const float rstd = 1.f / std::sqrt(var / d + static_cast<float>(eps));
    float* o = out.data_ptr<float>() + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = (sr[i] - mean) * rstd * wp[i] + (bp ? bp[i] : 0.f);
  }
  return {sum, out};
}

// Phi-3's RMSNorm as add_layer_norm takes it: returns {h + delta, w * ((h + delta) * rsqrt(mean((h +
// delta)^2) + eps))} (normalize, then scale, as models.phi3.RMSNorm in float32). w (d,) float32.
std::vector<at::Tensor> add_rms_norm(at::Tensor h, at::Tensor delta, at::Tensor w, double eps) {
  check_rows(h, "add_rms_norm", "h");
  const int64_t R = h.size(0), d = h.size(1);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == d, "add_rms_norm: weight must be float32 (d,)");
  at::Tensor sum = h;
  if (delta.numel()) {
    check_rows(delta, "add_rms_norm", "delta");
    TORCH_CHECK(delta.sizes() == h.sizes(), "add_rms_norm: h and delta shapes differ");
    sum = at::empty({R, d}, h.options());
  }
  w = w.contiguous();
  auto out = at::empty({R, d}, h.options());
  const float* wp = w.data_ptr<float>();
  for (int64_t r = 0; r < R; ++r) {
    const float* hr = h.data_ptr<float>() + r * h.stride(0);
    float* sr = sum.data_ptr<float>() + r * sum.stride(0);
    if (delta.numel()) {
      const float* dr = delta.data_ptr<float>() + r * delta.stride(0);
      for (int64_t i = 0; i < d; ++i) sr[i] = hr[i] + dr[i];
    }
    float ms = 0.f;
    for (int64_t i = 0; i < d; ++i) ms += sr[i] * sr[i];
    const float rstd = 1.f / std::sqrt(ms / d + static_cast<float>(eps));
    float* o = out.data_ptr<float>() + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = wp[i] * (sr[i] * rstd);
  }
  return {sum, out};
}

// RoPE in place on the first `heads` heads (width head_dim) of each row of x (B, n) float32: the first
// r = cos.size(1) dims of each head rotate in RoPE's half-split layout (models.phi3.apply_rope):
// x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. cos, sin (B, r) float32, each row's position.
void rope_rows(at::Tensor x, int64_t heads, int64_t head_dim, at::Tensor cos, at::Tensor sin) {
  check_rows(x, "rope_rows", "x");
  const int64_t B = x.size(0), r = cos.size(-1);
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == B && cos.scalar_type() == at::kFloat &&
              sin.scalar_type() == at::kFloat, "rope_rows: cos and sin must be float32 (B, rotary_dim)");
  TORCH_CHECK(r % 2 == 0 && r <= head_dim && heads * head_dim <= x.size(1), "rope_rows: shapes");
  cos = cos.contiguous();
  sin = sin.contiguous();
  const int64_t half = r / 2;
  for (int64_t b = 0; b < B; ++b) {
    const float *c = cos.data_ptr<float>() + b * r, *s = sin.data_ptr<float>() + b * r;
    for (int64_t h = 0; h < heads; ++h) {
      float* v = x.data_ptr<float>() + b * x.stride(0) + h * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const float x1 = v[i], x2 = v[i + half];
        v[i] = x1 * c[i] - x2 * s[i];
        v[i + half] = x2 * c[i + half] + x1 * s[i + half];
      }
    }
  }
}

// silu(a) * b for a, b (R, n) -> (R, n): the SwiGLU MLP, the GMU gate, Mamba's output gate.
at::Tensor silu_mul(at::Tensor a, at::Tensor b) {
  check_rows(a, "silu_mul", "a");
  check_rows(b, "silu_mul", "b");
  TORCH_CHECK(a.sizes() == b.sizes(), "silu_mul: shapes differ");
  const int64_t R = a.size(0), n = a.size(1);
  auto out = at::empty({R, n}, a.options());
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      silu_mul_row(a.data_ptr<float>() + r * a.stride(0), b.data_ptr<float>() + r * b.stride(0),
                   out.data_ptr<float>() + r * n, n);
  });
  return out;
}

// Mamba's causal depthwise conv for one new input per row, then silu: x (B, E) float32; state
// (B, K-1, E) float32 or bfloat16, the previous inputs, shifted in place to take x; w (E, K);
// b (E,) or empty. Returns (B, E) float32.
at::Tensor conv_step(at::Tensor x, at::Tensor state, at::Tensor w, at::Tensor b) {
  check_rows(x, "conv_step", "x");
  const int64_t B = x.size(0), E = x.size(1);
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous() && state.size(0) == B && state.size(2) == E,
              "conv_step: state must be a contiguous (B, K-1, E) tensor");
  const int64_t K = state.size(1) + 1;
  TORCH_CHECK(K >= 2 && w.scalar_type() == at::kFloat && w.dim() == 2 && w.size(0) == E && w.size(1) == K,
              "conv_step: weight must be float32 (E, K)");
  TORCH_CHECK(!b.numel() || (b.scalar_type() == at::kFloat && b.numel() == E), "conv_step: bias");
  w = w.contiguous();
  b = b.contiguous();
  auto out = at::empty({B, E}, x.options());
  const float* bp = b.numel() ? b.data_ptr<float>() : nullptr;
  TORCH_CHECK(state.scalar_type() == at::kBFloat16 || state.scalar_type() == at::kFloat,
              "conv_step: state must be float32 or bfloat16");
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, state.scalar_type(), "conv_step", [&] {
    if (K == 4)
      conv_step_impl<scalar_t, 4>(x.data_ptr<float>(), x.stride(0), state.data_ptr<scalar_t>(), w.data_ptr<float>(),
                                  bp, out.data_ptr<float>(), B, E, K);
    else
      conv_step_impl<scalar_t>(x.data_ptr<float>(), x.stride(0), state.data_ptr<scalar_t>(), w.data_ptr<float>(),
                               bp, out.data_ptr<float>(), B, E, K);
  });
  return out;
}

// Differential attention's combination of its two groups: o (B, 2, Hk, g, dv) float32, the
// attention outputs of q1 and q2 -> rms_norm(o[:, 0] - lam * o[:, 1]) * w * scale, (B, Hk * g * dv).
// o (B, 1, Hk, g, dv) is that difference already (decode_diff_attention's output).
at::Tensor diff_combine(at::Tensor o, double lam, at::Tensor w, double eps, double scale) {
  TORCH_CHECK(o.dim() == 5 && (o.size(1) == 1 || o.size(1) == 2) && o.scalar_type() == at::kFloat,
              "diff_combine: o (B, 2 or 1, Hk, g, dv)");
  o = o.contiguous();
  const int64_t B = o.size(0), G = o.size(1), heads = o.size(2) * o.size(3), dv = o.size(4);
  TORCH_CHECK(w.scalar_type() == at::kFloat && w.numel() == dv, "diff_combine: weight must be float32 (dv,)");
  w = w.contiguous();
  auto out = at::empty({B, heads * dv}, o.options());
  const float *op = o.data_ptr<float>(), *wp = w.data_ptr<float>();
  float* outp = out.data_ptr<float>();
  const float l = static_cast<float>(lam), s = static_cast<float>(scale);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < heads; ++h) {
      const float* a1 = op + (b * G * heads + h) * dv;
      const float* a2 = a1 + heads * dv;
      float* dst = outp + (b * heads + h) * dv;
      float ms = 0.f;
      for (int64_t i = 0; i < dv; ++i) {
        dst[i] = G == 2 ? a1[i] - l * a2[i] : a1[i];
        ms += dst[i] * dst[i];
      }
      const float r = 1.f / std::sqrt(ms / dv + static_cast<float>(eps));
      for (int64_t i = 0; i < dv; ++i) dst[i] = dst[i] * r * wp[i] * s;
    }
  return out;
}

// Write one new position per row into the K/V cache, converting to the cache's dtype.
// kv (B, 2 * Hkv * hd) float32: the keys then the values of the QKV projection; kc (B, Hkv, S, hd)
// and vc (B, Hv, S, dv) with Hv * dv = Hkv * hd (any strides, contiguous rows), or vc in column
// blocks (B, Hv, nb, S, vb) with nb * vb = dv (Attention.cache_shapes); slot (B,) int64.
// diff: key heads are stored [even..., odd...], as Attention.to_cache_layout does.
void kv_write(at::Tensor kv, at::Tensor kc, at::Tensor vc, at::Tensor slot, bool diff) {
  check_rows(kv, "kv_write", "kv");
  if (vc.dim() == 4) vc = vc.unsqueeze(2);  // rows: one column block
  TORCH_CHECK(kc.dim() == 4 && vc.dim() == 5 && kc.scalar_type() == vc.scalar_type() && kc.stride(3) == 1 &&
              vc.stride(4) == 1, "kv_write: caches must be (B, H, S, d) (values maybe in column blocks) with "
              "contiguous rows");
  const int64_t B = kv.size(0), Hkv = kc.size(1), hd = kc.size(3), Hv = vc.size(1), vb = vc.size(4);
  const int64_t dv = vc.size(2) * vb;
  TORCH_CHECK(kc.size(0) == B && vc.size(0) == B && Hv * dv == Hkv * hd && kv.size(1) == 2 * Hkv * hd,
              "kv_write: shapes");
  TORCH_CHECK(slot.scalar_type() == at::kLong && slot.numel() == B, "kv_write: slot must be int64 (B,)");
  slot = slot.contiguous();
  const int64_t* sp = slot.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b)
    TORCH_CHECK(sp[b] >= 0 && sp[b] < kc.size(2) && sp[b] < vc.size(3), "kv_write: slot out of range");
  const int64_t ks[3] = {kc.stride(0), kc.stride(1), kc.stride(2)};
  const int64_t vs[4] = {vc.stride(0), vc.stride(1), vc.stride(2), vc.stride(3)};
  if (kc.scalar_type() == at::kBFloat16)
    kv_write_impl(kv.data_ptr<float>(), kv.stride(0), kc.data_ptr<c10::BFloat16>(), vc.data_ptr<c10::BFloat16>(),
                  sp, diff, B, Hkv, hd, Hv, dv, vb, ks, vs);
  else if (kc.scalar_type() == at::kFloat)
    kv_write_impl(kv.data_ptr<float>(), kv.stride(0), kc.data_ptr<float>(), vc.data_ptr<float>(), sp, diff, B,
                  Hkv, hd, Hv, dv, vb, ks, vs);
  else
    TORCH_CHECK(false, "kv_write: cache must be float32 or bfloat16");
}
