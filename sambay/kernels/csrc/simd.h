// One small float32 vector type for every kernel, in the spirit of ATen's Vectorized<T>: a kernel is
// written once over Vec<W> and compiles to AVX-512 (W = 16), AVX2 + FMA (W = 8) or plain C++
// (W = 1). `Native` is the widest this build's flags allow; kernels whose data layout was measured
// at 8 lanes (the decode attention's split order) ask for Vec<8> explicitly, which every AVX-512
// CPU has too. Header-only: every function inlines into the loops that call it.
#pragma once

#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

#if defined(__AVX2__) && defined(__FMA__)
#define SAMBAY_AVX2 1  // Vec<8> exists (AVX-512 machines have AVX2 too)
#endif

namespace simd {

template <int W>
struct Vec;

// ---- W = 1: plain C++, the fallback and the model the vector types follow ------------------------
template <>
struct Vec<1> {
  float v;
  static constexpr int size = 1;
  static Vec zero() { return {0.f}; }
  static Vec broadcast(float x) { return {x}; }
  static Vec load(const float* p) { return {*p}; }
  static Vec load(const c10::BFloat16* p) { return {static_cast<float>(*p)}; }
  static Vec load(const int8_t* p) { return {static_cast<float>(*p)}; }
  void store(float* p) const { *p = v; }
  float sum() const { return v; }
  float max() const { return v; }
};
inline Vec<1> operator+(Vec<1> a, Vec<1> b) { return {a.v + b.v}; }
inline Vec<1> operator-(Vec<1> a, Vec<1> b) { return {a.v - b.v}; }
inline Vec<1> operator*(Vec<1> a, Vec<1> b) { return {a.v * b.v}; }
inline Vec<1> operator/(Vec<1> a, Vec<1> b) { return {a.v / b.v}; }
inline Vec<1> fma(Vec<1> a, Vec<1> b, Vec<1> c) { return {a.v * b.v + c.v}; }   // a b + c
inline Vec<1> fnma(Vec<1> a, Vec<1> b, Vec<1> c) { return {c.v - a.v * b.v}; }  // c - a b
inline Vec<1> min(Vec<1> a, Vec<1> b) { return {std::min(a.v, b.v)}; }
inline Vec<1> max(Vec<1> a, Vec<1> b) { return {std::max(a.v, b.v)}; }
inline Vec<1> abs(Vec<1> a) { return {std::fabs(a.v)}; }
inline Vec<1> round(Vec<1> a) { return {std::nearbyint(a.v)}; }  // to nearest, ties to even
inline Vec<1> pow2(Vec<1> n) {  // 2^n for integral n in [-127, 128]
  const int32_t bits = (static_cast<int32_t>(n.v) + 127) << 23;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return {f};
}
inline Vec<1> zero_below(Vec<1> a, Vec<1> x, float limit) { return {x.v >= limit ? a.v : 0.f}; }

#if defined(SAMBAY_AVX2)
// ---- W = 8: AVX2 + FMA ------------------------------------------------------------------------------
template <>
struct Vec<8> {
  __m256 v;
  static constexpr int size = 8;
  static Vec zero() { return {_mm256_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm256_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm256_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16))};
  }
  static Vec load(const int8_t* p) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b))};
  }
  void store(float* p) const { _mm256_storeu_ps(p, v); }
  float sum() const {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  float max() const {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
  }
};
inline Vec<8> operator+(Vec<8> a, Vec<8> b) { return {_mm256_add_ps(a.v, b.v)}; }
inline Vec<8> operator-(Vec<8> a, Vec<8> b) { return {_mm256_sub_ps(a.v, b.v)}; }
inline Vec<8> operator*(Vec<8> a, Vec<8> b) { return {_mm256_mul_ps(a.v, b.v)}; }
inline Vec<8> operator/(Vec<8> a, Vec<8> b) { return {_mm256_div_ps(a.v, b.v)}; }
inline Vec<8> fma(Vec<8> a, Vec<8> b, Vec<8> c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec<8> fnma(Vec<8> a, Vec<8> b, Vec<8> c) { return {_mm256_fnmadd_ps(a.v, b.v, c.v)}; }
inline Vec<8> min(Vec<8> a, Vec<8> b) { return {_mm256_min_ps(a.v, b.v)}; }
inline Vec<8> max(Vec<8> a, Vec<8> b) { return {_mm256_max_ps(a.v, b.v)}; }
inline Vec<8> abs(Vec<8> a) { return {_mm256_andnot_ps(_mm256_set1_ps(-0.f), a.v)}; }
inline Vec<8> round(Vec<8> a) { return {_mm256_round_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec<8> pow2(Vec<8> n) {
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n.v), _mm256_set1_epi32(127)), 23);
  return {_mm256_castsi256_ps(e)};
}
inline Vec<8> zero_below(Vec<8> a, Vec<8> x, float limit) {
  return {_mm256_and_ps(a.v, _mm256_cmp_ps(x.v, _mm256_set1_ps(limit), _CMP_GE_OQ))};
}
#endif

#if defined(__AVX512F__)
// ---- W = 16: AVX-512 --------------------------------------------------------------------------------
template <>
struct Vec<16> {
  __m512 v;
  static constexpr int size = 16;
  static Vec zero() { return {_mm512_setzero_ps()}; }
  static Vec broadcast(float x) { return {_mm512_set1_ps(x)}; }
  static Vec load(const float* p) { return {_mm512_loadu_ps(p)}; }
  static Vec load(const c10::BFloat16* p) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return {_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16))};
  }
  static Vec load(const int8_t* p) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return {_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b))};
  }
  void store(float* p) const { _mm512_storeu_ps(p, v); }
  float sum() const { return _mm512_reduce_add_ps(v); }
  float max() const { return _mm512_reduce_max_ps(v); }
};
inline Vec<16> operator+(Vec<16> a, Vec<16> b) { return {_mm512_add_ps(a.v, b.v)}; }
inline Vec<16> operator-(Vec<16> a, Vec<16> b) { return {_mm512_sub_ps(a.v, b.v)}; }
inline Vec<16> operator*(Vec<16> a, Vec<16> b) { return {_mm512_mul_ps(a.v, b.v)}; }
inline Vec<16> operator/(Vec<16> a, Vec<16> b) { return {_mm512_div_ps(a.v, b.v)}; }
inline Vec<16> fma(Vec<16> a, Vec<16> b, Vec<16> c) { return {_mm512_fmadd_ps(a.v, b.v, c.v)}; }
inline Vec<16> fnma(Vec<16> a, Vec<16> b, Vec<16> c) { return {_mm512_fnmadd_ps(a.v, b.v, c.v)}; }
inline Vec<16> min(Vec<16> a, Vec<16> b) { return {_mm512_min_ps(a.v, b.v)}; }
inline Vec<16> max(Vec<16> a, Vec<16> b) { return {_mm512_max_ps(a.v, b.v)}; }
inline Vec<16> abs(Vec<16> a) { return {_mm512_abs_ps(a.v)}; }
inline Vec<16> round(Vec<16> a) { return {_mm512_roundscale_ps(a.v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)}; }
inline Vec<16> pow2(Vec<16> n) {
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n.v), _mm512_set1_epi32(127)), 23);
  return {_mm512_castsi512_ps(e)};
}
inline Vec<16> zero_below(Vec<16> a, Vec<16> x, float limit) {
  return {_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x.v, _mm512_set1_ps(limit), _CMP_GE_OQ), a.v)};
}
#endif

#if defined(__AVX512F__)
constexpr int kNative = 16;
#elif defined(SAMBAY_AVX2)
constexpr int kNative = 8;
#else
constexpr int kNative = 1;
#endif
using Native = Vec<kNative>;

// ---- written once over the types above ---------------------------------------------------------------

// exp for softmax weights, SSM decays and silu: Cephes' expf, 2^n * poly(r), about 1 ulp; below
// -87.3 (where expf is denormal or 0) it returns exactly 0.
template <int W>
inline Vec<W> exp(Vec<W> x0) {
  using V = Vec<W>;
  const V x = min(max(x0, V::broadcast(-87.3f)), V::broadcast(88.3f));
  const V n = round(x * V::broadcast(1.44269504088896341f));
  V r = fnma(n, V::broadcast(0.693359375f), x);
  r = fnma(n, V::broadcast(-2.12194440e-4f), r);
  V p = V::broadcast(1.9875691500e-4f);
  p = fma(p, r, V::broadcast(1.3981999507e-3f));
  p = fma(p, r, V::broadcast(8.3334519073e-3f));
  p = fma(p, r, V::broadcast(4.1665795894e-2f));
  p = fma(p, r, V::broadcast(1.6666665459e-1f));
  p = fma(p, r, V::broadcast(5.0000001201e-1f));
  p = fma(p * r, r, r + V::broadcast(1.f));
  return zero_below(p * pow2(n), x0, -87.3f);
}

// silu(x) = x / (1 + exp(-x))
template <int W>
inline Vec<W> silu(Vec<W> x) {
  return x / (Vec<W>::broadcast(1.f) + exp(Vec<W>::zero() - x));
}

// 2W consecutive values as two vectors in "split order": float32 as they are (the first W, the
// next W); bfloat16 as the even- and the odd-indexed W, which one load of 2W bf16 holds in the low
// and the high halves of its 32-bit lanes, so a shift and a mask convert them.
template <int W>
inline void load_split(const float* p, Vec<W>& lo, Vec<W>& hi) {
  lo = Vec<W>::load(p);
  hi = Vec<W>::load(p + W);
}
inline void load_split(const c10::BFloat16* p, Vec<1>& lo, Vec<1>& hi) {
  lo = Vec<1>::load(p);
  hi = Vec<1>::load(p + 1);
}
#if defined(SAMBAY_AVX2)
inline void load_split(const c10::BFloat16* p, Vec<8>& lo, Vec<8>& hi) {
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  lo = {_mm256_castsi256_ps(_mm256_slli_epi32(x, 16))};
  hi = {_mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
#endif
#if defined(__AVX512F__)
inline void load_split(const c10::BFloat16* p, Vec<16>& lo, Vec<16>& hi) {
  const __m512i x = _mm512_loadu_si512(p);
  lo = {_mm512_castsi512_ps(_mm512_slli_epi32(x, 16))};
  hi = {_mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(static_cast<int>(0xFFFF0000u))))};
}
#endif

// Which of 2W consecutive values sits at place i of the split order (see load_split).
template <typename T, int W>
inline int64_t split_dim(int64_t i) {
  return std::is_same<T, float>::value ? i : (i < W ? 2 * i : 2 * (i - W) + 1);
}

// The largest |p[i]| of n values, n a multiple of W.
template <int W>
inline float abs_max(const float* p, int64_t n) {
  Vec<W> m = Vec<W>::zero();
  for (int64_t i = 0; i < n; i += W) m = max(m, abs(Vec<W>::load(p + i)));
  return m.max();
}

}  // namespace simd
