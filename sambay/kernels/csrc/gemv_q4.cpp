// 4-bit weights x int8 activations: y = x @ W^T + bias for a few activation rows (decode, batched
// decode, and prefill as a small GEMM), W in sambay.quant.int4's stored layout:
//   packed (N/4, K/32, 4, 16) uint8: per 4-row block and 32 columns, row r's 16 bytes hold
//          columns j (low nibble) and j + 16 (high nibble): u in 0..15;
//   scales (N/4, K/G, 4) float16 (w = scale * (u - 8)) or (N/4, K/G, 8): 4 scales, then 4 mins
//          (w = scale * u + min).
// Activations are rounded to int8 per block of 32 (xq = round(x / xs), xs = max|x| / 127, as the
// int8 path does per 64), so that y_r = sum_b xs_b * scale_rg * dot(u, xq)_b + sum_g min_rg * X_g
// with X_g = sum over the group's blocks of xs_b * sum(xq_b) (the activation sums per group).
// One 64-byte read holds the same 32 columns of 4 rows: unpacking is an and and a shift, the
// integer dot one vpdpbusd pair (AVX-512 VNNI) or vpmaddubsw + vpmaddwd (AVX2), and each weight
// is read once for all the activation rows of a call. The body is written once over an ISA type
// (Scalar, Avx2, Vnni); `path` picks one, so the tests hold each to the reference in one build.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

constexpr int64_t QB4 = 32;  // columns per stored block and per activation block

// ---- the ISAs: unpack 4 rows x 32 columns, integer dot with 32 activations, per-lane scales ------
// A block's dot comes out as P float vectors of W lanes; lane l of vector p belongs to row
// (p * W + l) / (P * W / 4). expand() lays 4 row scales out the same way.

struct Scalar {
  static constexpr int P = 4;
  using F = simd::Vec<1>;
  struct U { const uint8_t* p; };
  static U unpack(const uint8_t* p) { return {p}; }
  static void dot(const U& u, const int8_t* x, F d[P]) {
    for (int r = 0; r < 4; ++r) {
      int32_t s = 0;
      for (int j = 0; j < 16; ++j) s += (u.p[r * 16 + j] & 15) * x[j] + (u.p[r * 16 + j] >> 4) * x[j + 16];
      d[r] = {static_cast<float>(s)};
    }
  }
  static void expand(const c10::Half* s, F out[P]) {
    for (int r = 0; r < 4; ++r) out[r] = {static_cast<float>(s[r])};
  }
  static void rows(const F acc[P], float out[4]) {
    for (int r = 0; r < 4; ++r) out[r] = acc[r].v;
  }
};

#if defined(SAMBAY_AVX2) && defined(__F16C__)
#define SAMBAY_Q4AVX2 1
struct Avx2 {
  static constexpr int P = 2;  // rows 0-1, rows 2-3
  using F = simd::Vec<8>;
  struct U { __m256i lo[2], hi[2]; };
  static U unpack(const uint8_t* p) {
    _mm_prefetch(reinterpret_cast<const char*>(p + 1024), _MM_HINT_NTA);
    const __m256i m = _mm256_set1_epi8(15);
    U u;
    for (int i = 0; i < 2; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 32 * i));
      u.lo[i] = _mm256_and_si256(v, m);
      u.hi[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
    }
    return u;
  }
  static void dot(const U& u, const int8_t* x, F d[P]) {
    const __m256i xl = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    const __m256i xh = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
    const __m256i ones = _mm256_set1_epi16(1);
    for (int i = 0; i < 2; ++i) {  // u <= 15, |x| <= 127: a pair sums to <= 3810, two to <= 7620
      const __m256i s = _mm256_add_epi16(_mm256_maddubs_epi16(u.lo[i], xl), _mm256_maddubs_epi16(u.hi[i], xh));
      d[i] = {_mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones))};
    }
  }
  static void expand(const c10::Half* s, F out[P]) {
    const __m256 v = _mm256_castps128_ps256(_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s))));
    out[0] = {_mm256_permutevar8x32_ps(v, _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1))};
    out[1] = {_mm256_permutevar8x32_ps(v, _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3))};
  }
  static void rows(const F acc[P], float out[4]) {
    alignas(32) float t[16];
    acc[0].store(t);
    acc[1].store(t + 8);
    for (int r = 0; r < 4; ++r) out[r] = t[4 * r] + t[4 * r + 1] + t[4 * r + 2] + t[4 * r + 3];
  }
};
#endif

#if defined(SAMBAY_VNNI) && defined(__F16C__)
#define SAMBAY_Q4VNNI 1
struct Vnni {
  static constexpr int P = 1;  // lanes 4r..4r+3: row r
  using F = simd::Vec<16>;
  struct U { __m512i lo, hi; };
  static U unpack(const uint8_t* p) {
    const __m512i v = _mm512_loadu_si512(p), m = _mm512_set1_epi8(15);
    return {_mm512_and_si512(v, m), _mm512_and_si512(_mm512_srli_epi16(v, 4), m)};
  }
  static void dot(const U& u, const int8_t* x, F d[P]) {
    const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x)));
    const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x + 16)));
    d[0] = {_mm512_cvtepi32_ps(_mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), u.lo, xl), u.hi, xh))};
  }
  static void expand(const c10::Half* s, F out[P]) {
    const __m128 v = _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(s)));
    const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    out[0] = {_mm512_permutexvar_ps(idx, _mm512_castps128_ps512(v))};
  }
  static void rows(const F acc[P], float out[4]) {
    alignas(64) float t[16];
    acc[0].store(t);
    for (int r = 0; r < 4; ++r) out[r] = t[4 * r] + t[4 * r + 1] + t[4 * r + 2] + t[4 * r + 3];
  }
};
#endif

struct Acts {  // the activations as the kernels read them
  std::vector<int8_t> q;   // (M, K)
  std::vector<float> xs;   // (M, K / 32)
  std::vector<float> sum;  // (M, K / G): X_g
};

// The rounding the reference (native.gemv_q4_ref) repeats: x * (1 / xs), to nearest, ties to even.
Acts quantize_acts(const float* x, int64_t M, int64_t K, int64_t G) {
  const int64_t nb = K / QB4, ng = K / G;
  Acts a{std::vector<int8_t>(M * K), std::vector<float>(M * nb), std::vector<float>(M * ng, 0.f)};
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * K + b * QB4;
      float mx = 0.f;
      for (int64_t i = 0; i < QB4; ++i) mx = std::max(mx, std::fabs(p[i]));
      const float s = mx > 0.f ? mx / 127.f : 1.f, inv = 1.f / s;
      int32_t total = 0;
      for (int64_t i = 0; i < QB4; ++i) {
        const int32_t q = static_cast<int32_t>(std::nearbyint(p[i] * inv));
        a.q[m * K + b * QB4 + i] = static_cast<int8_t>(q);
        total += q;
      }
      a.xs[m * nb + b] = s;
      a.sum[m * ng + b * QB4 / G] += s * static_cast<float>(total);
    }
  return a;
}

// Rows n0 .. n0 + 3 (block `blk`) for activation rows m0 .. m0 + MB - 1.
template <class I, int MB>
void block(const uint8_t* w, const c10::Half* sc, int64_t sw, const Acts& a, int64_t m0, int64_t K,
           int64_t G, int64_t blk, int64_t N, float* y) {
  using F = typename I::F;
  const int64_t nb = K / QB4, ng = K / G, per = G / QB4;
  F acc[MB][I::P];
  float mins[MB][4] = {};
  for (int m = 0; m < MB; ++m)
    for (int p = 0; p < I::P; ++p) acc[m][p] = F::zero();
  const uint8_t* wb = w + blk * nb * 64;
  const c10::Half* sb = sc + blk * ng * sw;
  F s[I::P];
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t g = b / per;
    if (b % per == 0) {
      I::expand(sb + g * sw, s);
      for (int r = 0; r < 4; ++r) {
        const float mn = sw == 8 ? static_cast<float>(sb[g * sw + 4 + r]) : -8.f * static_cast<float>(sb[g * sw + r]);
        for (int m = 0; m < MB; ++m) mins[m][r] += mn * a.sum[(m0 + m) * ng + g];
      }
    }
    const typename I::U u = I::unpack(wb + b * 64);
    for (int m = 0; m < MB; ++m) {
      F d[I::P];
      I::dot(u, a.q.data() + (m0 + m) * K + b * QB4, d);
      const F xs = F::broadcast(a.xs[(m0 + m) * nb + b]);
      for (int p = 0; p < I::P; ++p) acc[m][p] = fma(d[p], s[p] * xs, acc[m][p]);
    }
  }
  for (int m = 0; m < MB; ++m) {
    float out[4];
    I::rows(acc[m], out);
    for (int r = 0; r < 4; ++r) y[(m0 + m) * N + blk * 4 + r] = out[r] + mins[m][r];
  }
}

template <class I, int MBMAX>
void run(const uint8_t* w, const c10::Half* sc, int64_t sw, const Acts& a, int64_t M, int64_t N, int64_t K,
         int64_t G, float* y) {
  at::parallel_for(0, N / 4, 8, [&](int64_t b0, int64_t b1) {
    for (int64_t blk = b0; blk < b1; ++blk)
      for (int64_t m0 = 0; m0 < M; m0 += MBMAX) {
        switch (std::min<int64_t>(MBMAX, M - m0)) {
          case 1: block<I, 1>(w, sc, sw, a, m0, K, G, blk, N, y); break;
          case 2: block<I, 2>(w, sc, sw, a, m0, K, G, blk, N, y); break;
          case 3: block<I, (MBMAX >= 3 ? 3 : 1)>(w, sc, sw, a, m0, K, G, blk, N, y); break;
          default: block<I, MBMAX>(w, sc, sw, a, m0, K, G, blk, N, y); break;
        }
      }
  });
}

}  // namespace

std::vector<std::string> q4_paths() {
  std::vector<std::string> p;
#ifdef SAMBAY_Q4VNNI
  p.push_back("vnni");
#endif
#ifdef SAMBAY_Q4AVX2
  p.push_back("avx2");
#endif
  p.push_back("scalar");
  return p;
}

// x (M, K) float32; packed, scales as above; bias (N,) float32 or empty; path "" (the fastest this
// build has) or one of q4_paths() -> (M, N) float32.
at::Tensor gemv_q4(at::Tensor x, at::Tensor packed, at::Tensor scales, at::Tensor bias, std::string path) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemv_q4: x must be float32 (M, K)");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 4 && packed.size(2) == 4 && packed.size(3) == 16,
              "gemv_q4: packed must be uint8 (N / 4, K / 32, 4, 16)");
  TORCH_CHECK(scales.scalar_type() == at::kHalf && scales.dim() == 3 && scales.size(0) == packed.size(0) &&
                  (scales.size(2) == 4 || scales.size(2) == 8),
              "gemv_q4: scales must be float16 (N / 4, K / G, 4 or 8)");
  x = x.contiguous();
  packed = packed.contiguous();
  scales = scales.contiguous();
  const int64_t M = x.size(0), N = packed.size(0) * 4, K = packed.size(1) * QB4, ng = scales.size(1);
  TORCH_CHECK(x.size(1) == K && ng > 0 && K % ng == 0 && (K / ng) % QB4 == 0, "gemv_q4: shape mismatch");
  const int64_t G = K / ng, sw = scales.size(2);
  const Acts a = quantize_acts(x.data_ptr<float>(), M, K, G);
  auto y = at::empty({M, N}, x.options());
  const uint8_t* w = packed.data_ptr<uint8_t>();
  const c10::Half* sc = scales.data_ptr<c10::Half>();
  float* yp = y.data_ptr<float>();
  if (path.empty()) path = q4_paths().front();
  if (path == "scalar") {
    run<Scalar, 4>(w, sc, sw, a, M, N, K, G, yp);
#ifdef SAMBAY_Q4AVX2
  } else if (path == "avx2") {
    run<Avx2, 2>(w, sc, sw, a, M, N, K, G, yp);
#endif
#ifdef SAMBAY_Q4VNNI
  } else if (path == "vnni") {
    run<Vnni, 4>(w, sc, sw, a, M, N, K, G, yp);
#endif
  } else {
    TORCH_CHECK(false, "gemv_q4: this build has no path ", path);
  }
  if (bias.numel()) {
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == N, "gemv_q4: bias must be float32 (N,)");
    y.add_(bias.view({1, N}));
  }
  return y;
}
