// Memory-bound matrix-vector products for decoding on CPU: y = x @ W^T (* scale).
//
// Decoding reads every weight once per token, so speed is bytes/second. These kernels stream each
// weight row once for a small batch of activation rows (M <= 16), convert the weights to float32
// in registers and accumulate with FMA. W is float32, bfloat16 or int8 with one float32 scale per
// output row. Python keeps a reference (dequantize, then torch.matmul) and the tests hold them equal.
// The generic and the exact bf16 kernels are written once over simd::Vec (the native width); the
// int8 and bf16-dot ones use the instruction that makes them fast (vpdpbusd, vpmaddubsw, vdpbf16ps).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <memory>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

using simd::Vec;

// Runs f over [0, n) on all threads: one contiguous part per thread, handed out in chunks from its
// own counter, and a thread done with its part takes chunks from the others'. With a static split
// (at::parallel_for), a thread slowed by a neighbour holds up the call: on this shared AVX2 EPYC the
// two threads of an int8 GEMV finished a mean 11-21% of the call apart, 5.6% with 8 chunks per part
// (paired, one step's GEMVs: 1.01-1.05x int8, 1.02x bf16; whole int8 decode steps 1.01-1.04x).
// ggml hands out matmul chunks from a counter too. Owners read their chunks in order, so each part
// stays one stream.
template <typename F>
void parallel_steal(int64_t n, int64_t chunks_per_thread, const F& f) {
  const int64_t T = at::get_num_threads();
  const int64_t part = (n + T - 1) / T, grain = std::max<int64_t>(1, part / chunks_per_thread);
  std::unique_ptr<std::atomic<int64_t>[]> next(new std::atomic<int64_t>[T]);
  for (int64_t t = 0; t < T; ++t) next[t] = t * part;
  at::parallel_for(0, T, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t)
      for (int64_t k = 0; k < T; ++k) {
        const int64_t v = (t + k) % T, end = std::min(n, (v + 1) * part);
        for (int64_t i0; (i0 = next[v].fetch_add(grain)) < end;) f(i0, std::min(end, i0 + grain));
      }
  });
}

// Measured on an AVX-512 EPYC with matrices far larger than cache: up to K = 5120 one weight row
// at a time (4 FMA chains) streams best; beyond, where the float32 activation row no longer sits
// in L1, 8 weight rows sharing each activation load do.
// With AVX2's 16 vector registers, 4 weight rows x 2 activation rows of accumulators fit.
constexpr int64_t K_SHARE = 8192;
// Software prefetch distance (bytes ahead in a weight row) of the AVX2 kernels: one thread must keep
// enough reads in flight to stream at full bandwidth (measured +10-25% on an AVX2 EPYC).
constexpr int64_t PF = 1024;
#if defined(__AVX512F__)
constexpr int64_t R_SHARE = 8;
#else
constexpr int64_t R_SHARE = 4;
#endif

// out[r][m] = dot(w row r, x row m) for R weight rows and M_ activation rows, at the native vector
// width. U-fold unrolling keeps at least 4 independent FMA chains in flight (FMA latency).
template <typename W, int R, int M_>
inline void micro(const W* w, int64_t K, const float* x, int64_t ldx, float out[8][4]) {
  using V = simd::Native;
  constexpr int L = V::size;
  constexpr int U = (R * M_ >= 4) ? 1 : 4 / (R * M_);
  V acc[R][M_][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = V::zero();
  int64_t k = 0;
  for (; k + L * U <= K; k += L * U) {
    for (int u = 0; u < U; ++u) {
      V wv[R];
      for (int r = 0; r < R; ++r) wv[r] = V::load(w + r * K + k + L * u);
      for (int m = 0; m < M_; ++m) {
        const V xv = V::load(x + m * ldx + k + L * u);
        for (int r = 0; r < R; ++r) acc[r][m][u] = fma(wv[r], xv, acc[r][m][u]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m) {
      V a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a = a + acc[r][m][u];
      float s = a.sum();
      for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[r * K + kk]) * x[m * ldx + kk];
      out[r][m] = s;
    }
}

template <typename W>
void gemv_impl(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t N,
               int64_t K) {
  const bool share = K > K_SHARE;
  const int64_t R = share ? R_SHARE : 1, MBLK = share ? 2 : 4;  // accumulators stay in registers
  const int64_t tiles = (N + R - 1) / R;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    float out[8][4];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * R, rows = std::min(R, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += MBLK) {
        const int64_t mb = std::min(MBLK, M - m0);
        const float* xm = x + m0 * K;
        if (share && rows == R_SHARE) {
          if (mb == 1) micro<W, R_SHARE, 1>(w + n0 * K, K, xm, K, out);
          else micro<W, R_SHARE, 2>(w + n0 * K, K, xm, K, out);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            float one[8][4];
            const W* wr = w + (n0 + r) * K;
            switch (mb) {
              case 1: micro<W, 1, 1>(wr, K, xm, K, one); break;
              case 2: micro<W, 1, 2>(wr, K, xm, K, one); break;
              case 3: micro<W, 1, 3>(wr, K, xm, K, one); break;
              default: micro<W, 1, 4>(wr, K, xm, K, one); break;
            }
            for (int64_t m = 0; m < mb; ++m) out[r][m] = one[0][m];
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float s = scale ? scale[n0 + r] : 1.f;
          for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n0 + r] = out[r][m] * s;
        }
      }
    }
  });
}


#ifdef SAMBAY_VNNI
// ---- int8 weights x int8 activations (VNNI) ------------------------------------------------------
// Activations are quantized per call in blocks of 64: xq = round(x / xs), |xq| <= 127, stored
// offset by +128 as unsigned bytes (vpdpbusd multiplies unsigned by signed bytes). The offset is
// removed with the block's weight sum: dot(xq + 128, w) - 128 * sum(w). One vpdpbusd covers 64
// weight bytes, so the loop stays memory-bound.
constexpr int64_t QB = 64;

void quantize_activations(const float* x, int64_t M, int64_t K, uint8_t* xu, float* xs) {
  const int64_t nb = K / QB;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * K + b * QB;
      const float mx = simd::abs_max<16>(p, QB);
      const float scale = mx > 0.f ? mx / 127.f : 1.f;
      xs[m * nb + b] = scale;
      const __m512 inv = _mm512_set1_ps(1.f / scale);
      for (int i = 0; i < QB; i += 16) {
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(p + i), inv));  // round to nearest
        q = _mm512_add_epi32(q, _mm512_set1_epi32(128));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(xu + m * K + b * QB + i), _mm512_cvtepi32_epi8(q));
      }
    }
}

template <int M_>
inline void vnni_row(const int8_t* w, int64_t K, const uint8_t* xu, const float* xs, float* out) {
  const int64_t nb = K / QB;
  const __m512i ones = _mm512_set1_epi8(1);
  __m512 acc[M_][2];
  for (int m = 0; m < M_; ++m) acc[m][0] = acc[m][1] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const __m512i wv = _mm512_loadu_si512(w + b * QB);
    // 128 * (sum of each 4 weights), the offset the unsigned activations add
    const __m512i corr = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv), 7);
    for (int m = 0; m < M_; ++m) {
      const __m512i xv = _mm512_loadu_si512(xu + m * K + b * QB);
      const __m512i p = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv), corr);
      acc[m][b & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), _mm512_set1_ps(xs[m * nb + b]), acc[m][b & 1]);
    }
  }
  for (int m = 0; m < M_; ++m) out[m] = _mm512_reduce_add_ps(_mm512_add_ps(acc[m][0], acc[m][1]));
}

void gemv_vnni(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N,
               int64_t K) {
  std::vector<uint8_t> xu(M * K);
  std::vector<float> xs(M * (K / QB));
  quantize_activations(x, M, K, xu.data(), xs.data());
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float out[4];
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        const uint8_t* xm = xu.data() + m0 * K;
        const float* sm = xs.data() + m0 * (K / QB);
        switch (mb) {
          case 1: vnni_row<1>(w + n * K, K, xm, sm, out); break;
          case 2: vnni_row<2>(w + n * K, K, xm, sm, out); break;
          case 3: vnni_row<3>(w + n * K, K, xm, sm, out); break;
          default: vnni_row<4>(w + n * K, K, xm, sm, out); break;
        }
        for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n] = out[m] * scale[n];
      }
    }
  });
}
#endif

#ifdef SAMBAY_Q8AVX2
// ---- int8 weights x int8 activations (AVX2) -------------------------------------------------------
// The activations are rounded exactly as on the VNNI path (int8 per block of 64, the same reference)
// but kept signed: vpmaddubsw multiplies |x| (unsigned) by sign(x) * w (signed); with |x|, |w| <= 127
// a pair sums to at most 32258, so the 16-bit step cannot saturate. vpmaddwd widens to 32 bits.
constexpr int64_t QB = 64;

// xq = round(x / xs) per block of 64 and xa = |xq|, which vpmaddubsw takes as its unsigned operand.
void quantize_activations_s8(const float* x, int64_t M, int64_t K, int8_t* xq, uint8_t* xa, float* xs) {
  const int64_t nb = K / QB;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t b = 0; b < nb; ++b) {
      const float* p = x + m * K + b * QB;
      const float mx = simd::abs_max<simd::kNative>(p, QB);
      __m256 v[8];
      for (int i = 0; i < 8; ++i) v[i] = _mm256_loadu_ps(p + 8 * i);
      const float scale = mx > 0.f ? mx / 127.f : 1.f;
      xs[m * nb + b] = scale;
      const __m256 inv = _mm256_set1_ps(1.f / scale);
      const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undo the packs' lane interleave
      for (int i = 0; i < 8; i += 4) {  // round half to even (the default rounding mode), as torch.round
        const __m256i q0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
        const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 1], inv));
        const __m256i q2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 2], inv));
        const __m256i q3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i + 3], inv));
        const __m256i q = _mm256_permutevar8x32_epi32(
            _mm256_packs_epi16(_mm256_packs_epi32(q0, q1), _mm256_packs_epi32(q2, q3)), order);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + m * K + b * QB + 8 * i), q);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(xa + m * K + b * QB + 8 * i), _mm256_abs_epi8(q));
      }
    }
}

// out[r * 4 + m] = dot(weight row r, activation row m) for R weight rows and M_ activation rows;
// xa holds |xq| (see quantize_activations_s8). Tiled: the R = 4 rows are stored block by block
// (kernels.tile_int8: [row 0 block 0][row 1 block 0]...[row 0 block 1]...), one sequential stream.
template <int R, int M_, bool Tiled = false>
inline void q8_tile(const int8_t* w, int64_t K, const int8_t* xq, const uint8_t* xa, const float* xs,
                    float* out) {
  static_assert(!Tiled || R == 4, "tiles hold 4 rows");
  const int64_t nb = K / QB;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[R][M_];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m) acc[r][m] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m256i w0[R], w1[R];
    // Prefetch well ahead: one thread must keep enough reads in flight. Non-temporal (the weights
    // are read once a step): paired on an AVX2 EPYC against T0, 1.02-1.04x one step's GEMVs and
    // 1.015-1.02x whole int8 decode steps.
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = Tiled ? w + (b * R + r) * QB : w + r * K + b * QB;
      _mm_prefetch(reinterpret_cast<const char*>(wr + PF), _MM_HINT_NTA);
      w0[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr));
      w1[r] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wr + 32));
    }
    for (int m = 0; m < M_; ++m) {
      const int64_t off = m * K + b * QB;
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + off));
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + off + 32));
      const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + off));
      const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xa + off + 32));
      const __m256 sc = _mm256_set1_ps(xs[m * nb + b]);
      for (int r = 0; r < R; ++r) {
        const __m256i p0 = _mm256_madd_epi16(_mm256_maddubs_epi16(a0, _mm256_sign_epi8(w0[r], x0)), ones);
        const __m256i p1 = _mm256_madd_epi16(_mm256_maddubs_epi16(a1, _mm256_sign_epi8(w1[r], x1)), ones);
        acc[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(p0, p1)), sc, acc[r][m]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m) out[r * 4 + m] = Vec<8>{acc[r][m]}.sum();
}

// in_tiles: w is in 4-row tiles (q8_tile's Tiled layout, N % 4 == 0): each tile one sequential
// stream, each activation block loaded once for its 4 rows (4 independent accumulator chains), the
// same arithmetic per row. Measured on an AVX2 EPYC with K = 2560 or 5120: 1.1-1.2x the rows from
// memory (where one row at a time is compute-bound), 1.4x in cache.
void gemv_q8(const float* x, const int8_t* w, const float* scale, float* y, int64_t M, int64_t N,
             int64_t K, bool in_tiles) {
  std::vector<int8_t> xq(M * K);
  std::vector<uint8_t> xa(M * K);
  std::vector<float> xs(M * (K / QB));
  quantize_activations_s8(x, M, K, xq.data(), xa.data(), xs.data());
  // Rows: long ones (K > 4096) 4 at a time, x loaded once for them; shorter rows stream best one
  // at a time (measured on an AVX2 EPYC), unless stored in tiles.
  const bool tiled = in_tiles || K > 4096;
  const int64_t R = tiled ? 4 : 1;
  parallel_steal((N + R - 1) / R, 8, [&](int64_t t0, int64_t t1) {
    float out[16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * R, rows = std::min(R, N - n0);
      const bool full = tiled && rows == 4;
      const int64_t step = full ? 2 : 4;  // activation rows per tile: accumulators fit in registers
      for (int64_t m0 = 0; m0 < M; m0 += step) {
        const int64_t mb = std::min<int64_t>(step, M - m0);
        const int8_t* xm = xq.data() + m0 * K;
        const uint8_t* am = xa.data() + m0 * K;
        const float* sm = xs.data() + m0 * (K / QB);
        if (full && in_tiles) {
          if (mb == 1) q8_tile<4, 1, true>(w + n0 * K, K, xm, am, sm, out);
          else q8_tile<4, 2, true>(w + n0 * K, K, xm, am, sm, out);
        } else if (full) {
          if (mb == 1) q8_tile<4, 1>(w + n0 * K, K, xm, am, sm, out);
          else q8_tile<4, 2>(w + n0 * K, K, xm, am, sm, out);
        } else {
          for (int64_t r = 0; r < rows; ++r) {
            float one[16];
            switch (mb) {
              case 1: q8_tile<1, 1>(w + (n0 + r) * K, K, xm, am, sm, one); break;
              case 2: q8_tile<1, 2>(w + (n0 + r) * K, K, xm, am, sm, one); break;
              case 3: q8_tile<1, 3>(w + (n0 + r) * K, K, xm, am, sm, one); break;
              default: q8_tile<1, 4>(w + (n0 + r) * K, K, xm, am, sm, one); break;
            }
            for (int64_t m = 0; m < mb; ++m) out[r * 4 + m] = one[m];
          }
        }
        for (int64_t r = 0; r < rows; ++r)
          for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n0 + r] = out[r * 4 + m] * scale[n0 + r];
      }
    }
  });
}
#endif

#if defined(SAMBAY_AVX2) && !defined(__AVX512F__)
#define SAMBAY_BF16SPLIT 1
// ---- bf16 weights, float32 activations ------------------------------------------------------------
// Exact like the generic path, with less work per weight: 2L bf16 weights in one load hold the
// even-indexed ones in the low halves of the 32-bit lanes and the odd ones in the high halves, so a
// shift and a mask give both as float32 (simd::load_split). The activations are deinterleaved to
// match, once per call. Written for any width, used at 8 lanes: with AVX-512 the generic `micro`
// streamed bf16 rows 1.2x faster than this at 16 (10240 x 2560, one activation row).
template <int M_>
inline void bf16_row(const c10::BFloat16* w, int64_t K, const float* xp, float* out) {
  using V = simd::Native;
  constexpr int L = V::size;
  // U blocks of 2L per iteration, 2U independent accumulators per activation row: one FMA chain
  // would be latency-bound below memory bandwidth.
  constexpr int U = M_ <= 2 ? 2 : 1;
  constexpr int64_t bytes = 2 * L * U * sizeof(c10::BFloat16);  // weights per iteration
  V acc[M_][2 * U];
  for (int m = 0; m < M_; ++m)
    for (int u = 0; u < 2 * U; ++u) acc[m][u] = V::zero();
  const int64_t KU = K / (2 * L * U) * (2 * L * U);
  for (int64_t k = 0; k < KU; k += 2 * L * U) {
    for (int64_t o = 0; o < bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(w + k) + PF + o, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      V even, odd;
      simd::load_split(w + k + 2 * L * u, even, odd);
      for (int m = 0; m < M_; ++m) {
        acc[m][2 * u] = fma(even, V::load(xp + m * K + k + 2 * L * u), acc[m][2 * u]);
        acc[m][2 * u + 1] = fma(odd, V::load(xp + m * K + k + 2 * L * u + L), acc[m][2 * u + 1]);
      }
    }
  }
  const int64_t KG = K / (2 * L) * (2 * L);  // xp is in split order up to here (gemv_bf16)
  for (int m = 0; m < M_; ++m) {
    V a = acc[m][0];
    for (int u = 1; u < 2 * U; ++u) a = a + acc[m][u];
    float s = a.sum();
    for (int64_t kk = KU; kk < K; ++kk) {
      const int64_t wk = kk < KG ? kk / (2 * L) * (2 * L) + simd::split_dim<c10::BFloat16, L>(kk % (2 * L)) : kk;
      s += static_cast<float>(w[wk]) * xp[m * K + kk];
    }
    out[m] = s;
  }
}

void gemv_bf16(const float* x, const c10::BFloat16* w, const float* scale, float* y, int64_t M, int64_t N,
               int64_t K) {
  constexpr int64_t G = 2 * simd::kNative;  // in the weights' split order: per G values, even then odd
  std::vector<float> xp(M * K);
  const int64_t KG = K / G * G;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < KG; k += G)
      for (int64_t i = 0; i < G; ++i) xp[m * K + k + i] = x[m * K + k + simd::split_dim<c10::BFloat16, G / 2>(i)];
    for (int64_t k = KG; k < K; ++k) xp[m * K + k] = x[m * K + k];
  }
  parallel_steal(N, 8, [&](int64_t n0, int64_t n1) {
    float out[4];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        const float* xm = xp.data() + m0 * K;
        switch (mb) {
          case 1: bf16_row<1>(w + n * K, K, xm, out); break;
          case 2: bf16_row<2>(w + n * K, K, xm, out); break;
          case 3: bf16_row<3>(w + n * K, K, xm, out); break;
          default: bf16_row<4>(w + n * K, K, xm, out); break;
        }
        for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n] = out[m] * (scale ? scale[n] : 1.f);
      }
  });
}
#endif

#ifdef SAMBAY_BF16DOT
// ---- bf16 weights x bf16 activations (vdpbf16ps, float32 accumulation) -------------------------
template <int M_>
inline void bf16dot_row(const c10::BFloat16* w, int64_t K, const c10::BFloat16* xb, float* out) {
  constexpr int U = M_ == 1 ? 4 : 2;
  __m512 acc[M_][U];
  for (int m = 0; m < M_; ++m)
    for (int u = 0; u < U; ++u) acc[m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 * U <= K; k += 32 * U)
    for (int u = 0; u < U; ++u) {
      const __m512bh wv = (__m512bh)_mm512_loadu_si512(w + k + 32 * u);
      for (int m = 0; m < M_; ++m)
        acc[m][u] = _mm512_dpbf16_ps(acc[m][u], (__m512bh)_mm512_loadu_si512(xb + m * K + k + 32 * u), wv);
    }
  for (int m = 0; m < M_; ++m) {
    __m512 a = acc[m][0];
    for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[m][u]);
    float s = _mm512_reduce_add_ps(a);
    for (int64_t kk = k; kk < K; ++kk) s += static_cast<float>(w[kk]) * static_cast<float>(xb[m * K + kk]);
    out[m] = s;
  }
}

void gemv_bf16dot(const float* x, const c10::BFloat16* w, const float* scale, float* y, int64_t M,
                  int64_t N, int64_t K) {
  std::vector<c10::BFloat16> xb(M * K);
  for (int64_t i = 0; i < M * K; ++i) xb[i] = c10::BFloat16(x[i]);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    float out[4];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        const c10::BFloat16* xm = xb.data() + m0 * K;
        switch (mb) {
          case 1: bf16dot_row<1>(w + n * K, K, xm, out); break;
          case 2: bf16dot_row<2>(w + n * K, K, xm, out); break;
          case 3: bf16dot_row<3>(w + n * K, K, xm, out); break;
          default: bf16dot_row<4>(w + n * K, K, xm, out); break;
        }
        for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n] = out[m] * (scale ? scale[n] : 1.f);
      }
  });
}
#endif


// y (M, N) += bias, added after the scale, in float32, as PackedLinear's reference does.
at::Tensor add_bias(at::Tensor y, const at::Tensor& bias) {
  if (bias.numel()) {
    const int64_t M = y.size(0), N = y.size(1);
    TORCH_CHECK(bias.scalar_type() == at::kFloat && bias.numel() == N, "gemv: bias must be float32 (N,)");
    const auto bc = bias.contiguous();
    const float* bp = bc.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) yp[m * N + n] += bp[n];
  }
  return y;
}

}  // namespace

// x (M, K) float32; w (N, K) float32 / bfloat16 / int8, or int8 in 4-row tiles (N / 4, K / 64, 4, 64);
// scale (N,) float32 or empty; bias (N,) float32 or empty -> (M, N) float32. exact = 1 keeps the
// activations in float32 (no int8 / bf16 rounding of x), for testing.
at::Tensor gemv(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t exact, at::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "gemv: x must be float32 (M, K)");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0);
  scale = scale.contiguous();
  const float* sp = scale.numel() ? scale.data_ptr<float>() : nullptr;
  if (w.dim() == 4) {  // int8 in 4-row tiles (N / 4, K / 64, 4, 64), see gemv_q8
    TORCH_CHECK(w.scalar_type() == at::kChar && w.size(2) == 4 && w.size(3) == 64 && sp,
                "gemv: a tiled weight is int8 (N / 4, K / 64, 4, 64) with a scale");
    const int64_t N = w.size(0) * 4, K = w.size(1) * 64;
    TORCH_CHECK(x.size(1) == K, "gemv: shape mismatch");
    auto y = at::empty({M, N}, x.options());
#ifdef SAMBAY_Q8AVX2
    TORCH_CHECK(exact == 0, "gemv: tiled int8 weights have the int8-activation path only");
    gemv_q8(x.data_ptr<float>(), w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, N, K, true);
#else
    TORCH_CHECK(false, "gemv: this build has no kernel for tiled int8 weights (see fast_paths)");
#endif
    return add_bias(y, bias);
  }
  TORCH_CHECK(w.dim() == 2 && x.size(1) == w.size(1), "gemv: shape mismatch");
  const int64_t N = w.size(0), K = w.size(1);
  auto y = at::empty({M, N}, x.options());
  switch (w.scalar_type()) {
    case at::kFloat:
      gemv_impl(x.data_ptr<float>(), w.data_ptr<float>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    case at::kBFloat16:
#ifdef SAMBAY_BF16DOT
      if (exact == 0) {
        gemv_bf16dot(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), sp, y.data_ptr<float>(), M, N, K);
        break;
      }
#endif
#ifdef SAMBAY_BF16SPLIT
      if (M <= 16) {  // exact: float32 activations
        gemv_bf16(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), sp, y.data_ptr<float>(), M, N, K);
        break;
      }
#endif
      gemv_impl(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    case at::kChar:
      TORCH_CHECK(sp, "gemv: int8 weights need a scale");
#ifdef SAMBAY_VNNI
      if (exact == 0 && K % QB == 0) {
        gemv_vnni(x.data_ptr<float>(), w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, N, K);
        break;
      }
#endif
#ifdef SAMBAY_Q8AVX2
      if (exact == 0 && K % QB == 0) {
        gemv_q8(x.data_ptr<float>(), w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, N, K, false);
        break;
      }
#endif
      gemv_impl(x.data_ptr<float>(), w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    default:
      TORCH_CHECK(false, "gemv: unsupported weight dtype ", w.scalar_type());
  }
  return add_bias(y, bias);
}
