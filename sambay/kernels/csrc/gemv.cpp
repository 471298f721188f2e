// Memory-bound matrix-vector products for decoding on CPU: y = x @ W^T (* scale).
//
// Decoding reads every weight once per token, so speed is bytes/second. These kernels stream each
// weight row once for a small batch of activation rows (M <= 16), convert the weights to float32
// in registers and accumulate with FMA. W is float32, bfloat16 or int8 with one float32 scale per
// output row. Python keeps a reference (dequantize, then torch.matmul) and the tests hold them equal.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "simd.h"
#include "kernels.h"

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace {

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

template <typename W>
inline float to_float(W v) { return static_cast<float>(v); }

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {  // bf16 -> fp32 is a 16-bit shift
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const int8_t* p) {
  __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

// out[r][m] = dot(w row r, x row m) for R weight rows and M_ activation rows. U-fold unrolling
// keeps at least 4 independent FMA chains in flight (FMA latency).
template <typename W, int R, int M_>
inline void micro(const W* w, int64_t K, const float* x, int64_t ldx, float out[8][4]) {
  constexpr int U = (R * M_ >= 4) ? 1 : 4 / (R * M_);
  __m512 acc[R][M_][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 * U <= K; k += 16 * U) {
    for (int u = 0; u < U; ++u) {
      __m512 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load16(w + r * K + k + 16 * u);
      for (int m = 0; m < M_; ++m) {
        const __m512 xv = _mm512_loadu_ps(x + m * ldx + k + 16 * u);
        for (int r = 0; r < R; ++r) acc[r][m][u] = _mm512_fmadd_ps(wv[r], xv, acc[r][m][u]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m) {
      __m512 a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a = _mm512_add_ps(a, acc[r][m][u]);
      float s = _mm512_reduce_add_ps(a);
      for (int64_t kk = k; kk < K; ++kk) s += to_float(w[r * K + kk]) * x[m * ldx + kk];
      out[r][m] = s;
    }
}
#elif defined(__AVX2__) && defined(__FMA__)
inline __m256 load8(const int8_t* p) {
  __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

// The AVX-512 micro-kernel above at 8 lanes.
template <typename W, int R, int M_>
inline void micro(const W* w, int64_t K, const float* x, int64_t ldx, float out[8][4]) {
  constexpr int U = (R * M_ >= 4) ? 1 : 4 / (R * M_);
  __m256 acc[R][M_][U];
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m)
      for (int u = 0; u < U; ++u) acc[r][m][u] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      __m256 wv[R];
      for (int r = 0; r < R; ++r) wv[r] = load8(w + r * K + k + 8 * u);
      for (int m = 0; m < M_; ++m) {
        const __m256 xv = _mm256_loadu_ps(x + m * ldx + k + 8 * u);
        for (int r = 0; r < R; ++r) acc[r][m][u] = _mm256_fmadd_ps(wv[r], xv, acc[r][m][u]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m) {
      __m256 a = acc[r][m][0];
      for (int u = 1; u < U; ++u) a = _mm256_add_ps(a, acc[r][m][u]);
      float s = hsum8(a);
      for (int64_t kk = k; kk < K; ++kk) s += to_float(w[r * K + kk]) * x[m * ldx + kk];
      out[r][m] = s;
    }
}
#else
template <typename W, int R, int M_>
inline void micro(const W* w, int64_t K, const float* x, int64_t ldx, float out[8][4]) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < M_; ++m) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += to_float(w[r * K + k]) * x[m * ldx + k];
      out[r][m] = s;
    }
}
#endif

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


#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
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
      __m512 amax = _mm512_setzero_ps();
      for (int i = 0; i < QB; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(p + i)));
      const float mx = _mm512_reduce_max_ps(amax);
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
#define SAMBAY_VNNI 1
#endif

#if !defined(SAMBAY_VNNI) && defined(__AVX2__) && defined(__FMA__)
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
      const __m256 sign = _mm256_set1_ps(-0.f);
      __m256 v[8], amax = _mm256_setzero_ps();
      for (int i = 0; i < 8; ++i) {
        v[i] = _mm256_loadu_ps(p + 8 * i);
        amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v[i]));
      }
      const float mx = hmax8(amax);
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
    for (int m = 0; m < M_; ++m) out[r * 4 + m] = hsum8(acc[r][m]);
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
#define SAMBAY_Q8AVX2 1
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
// ---- bf16 weights, float32 activations (AVX2) -----------------------------------------------------
// Exact like the generic path, with less work per weight: 16 bf16 weights in one 256-bit load hold
// the even-indexed ones in the low halves of the 32-bit lanes and the odd ones in the high halves,
// so a shift and a mask give both as float32. The activations are deinterleaved to match, once per call.
template <int M_>
inline void bf16_row_avx2(const c10::BFloat16* w, int64_t K, const float* xp, float* out) {
  // U blocks of 16 per iteration, 2U independent accumulators per activation row: one FMA chain
  // would be latency-bound below memory bandwidth.
  constexpr int U = M_ <= 2 ? 2 : 1;
  __m256 acc[M_][2 * U];
  for (int m = 0; m < M_; ++m)
    for (int u = 0; u < 2 * U; ++u) acc[m][u] = _mm256_setzero_ps();
  const int64_t KU = K / (16 * U) * (16 * U);
  for (int64_t k = 0; k < KU; k += 16 * U) {
    _mm_prefetch(reinterpret_cast<const char*>(w + k) + PF, _MM_HINT_T0);
    for (int u = 0; u < U; ++u) {
      __m256 even, odd;
      load16(w + k + 16 * u, even, odd);
      for (int m = 0; m < M_; ++m) {
        acc[m][2 * u] = _mm256_fmadd_ps(even, _mm256_loadu_ps(xp + m * K + k + 16 * u), acc[m][2 * u]);
        acc[m][2 * u + 1] = _mm256_fmadd_ps(odd, _mm256_loadu_ps(xp + m * K + k + 16 * u + 8), acc[m][2 * u + 1]);
      }
    }
  }
  for (int m = 0; m < M_; ++m) {
    __m256 a = acc[m][0];
    for (int u = 1; u < 2 * U; ++u) a = _mm256_add_ps(a, acc[m][u]);
    float s = hsum8(a);
    for (int64_t kk = KU; kk < K; ++kk) s += static_cast<float>(w[kk]) * xp[m * K + kk];
    out[m] = s;
  }
}

void gemv_bf16_avx2(const float* x, const c10::BFloat16* w, const float* scale, float* y, int64_t M,
                    int64_t N, int64_t K) {
  std::vector<float> xp(M * K);  // in the weights' split order (load16): per 16, even then odd
  const int64_t K16 = K / 16 * 16;
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t k = 0; k < K16; k += 16)
      for (int64_t i = 0; i < 16; ++i) xp[m * K + k + i] = x[m * K + k + split_dim<c10::BFloat16>(i)];
    for (int64_t k = K16; k < K; ++k) xp[m * K + k] = x[m * K + k];
  }
  parallel_steal(N, 8, [&](int64_t n0, int64_t n1) {
    float out[4];
    for (int64_t n = n0; n < n1; ++n)
      for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int64_t mb = std::min<int64_t>(4, M - m0);
        const float* xm = xp.data() + m0 * K;
        switch (mb) {
          case 1: bf16_row_avx2<1>(w + n * K, K, xm, out); break;
          case 2: bf16_row_avx2<2>(w + n * K, K, xm, out); break;
          case 3: bf16_row_avx2<3>(w + n * K, K, xm, out); break;
          default: bf16_row_avx2<4>(w + n * K, K, xm, out); break;
        }
        for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n] = out[m] * (scale ? scale[n] : 1.f);
      }
  });
}
#define SAMBAY_BF16AVX2 1
#endif

#if defined(__AVX512BF16__)
// ---- bf16 weights x bf16 activations (vdpbf16ps, float32 accumulation) -------------------------
template <int M_>
inline void bf16_row(const c10::BFloat16* w, int64_t K, const c10::BFloat16* xb, float* out) {
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
          case 1: bf16_row<1>(w + n * K, K, xm, out); break;
          case 2: bf16_row<2>(w + n * K, K, xm, out); break;
          case 3: bf16_row<3>(w + n * K, K, xm, out); break;
          default: bf16_row<4>(w + n * K, K, xm, out); break;
        }
        for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n] = out[m] * (scale ? scale[n] : 1.f);
      }
  });
}
#define SAMBAY_BF16DOT 1
#endif

// y (M, N) += bias, added after the scale, in float32, as PackedLinear's reference does.
torch::Tensor add_bias(torch::Tensor y, const torch::Tensor& bias) {
  if (bias.numel()) {
    const int64_t M = y.size(0), N = y.size(1);
    TORCH_CHECK(bias.scalar_type() == torch::kFloat32 && bias.numel() == N, "gemv: bias must be float32 (N,)");
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
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale, int64_t exact, torch::Tensor bias) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32, "gemv: x must be float32 (M, K)");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0);
  const float* sp = scale.numel() ? scale.contiguous().data_ptr<float>() : nullptr;
  if (w.dim() == 4) {  // int8 in 4-row tiles (N / 4, K / 64, 4, 64), see gemv_q8
    TORCH_CHECK(w.scalar_type() == torch::kInt8 && w.size(2) == 4 && w.size(3) == 64 && sp,
                "gemv: a tiled weight is int8 (N / 4, K / 64, 4, 64) with a scale");
    const int64_t N = w.size(0) * 4, K = w.size(1) * 64;
    TORCH_CHECK(x.size(1) == K, "gemv: shape mismatch");
    auto y = torch::empty({M, N}, x.options());
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
  auto y = torch::empty({M, N}, x.options());
  switch (w.scalar_type()) {
    case torch::kFloat32:
      gemv_impl(x.data_ptr<float>(), w.data_ptr<float>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    case torch::kBFloat16:
#ifdef SAMBAY_BF16DOT
      if (exact == 0) {
        gemv_bf16dot(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), sp, y.data_ptr<float>(), M, N, K);
        break;
      }
#endif
#ifdef SAMBAY_BF16AVX2
      if (M <= 16) {  // exact: float32 activations
        gemv_bf16_avx2(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), sp, y.data_ptr<float>(), M, N, K);
        break;
      }
#endif
      gemv_impl(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    case torch::kInt8:
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


// ---- decode attention: one query per row over a long K/V, streamed once --------------------------
// q (B, G, Hk, g, dk) float32: G query groups (1 plain, 2 differential: q1 and q2) whose group i
// attends with keys k[:, i] (B, G, Hk, S, dk); all groups share the values v (B, Hk, S, dv).
// valid (B, S) bool. Returns (B, G, Hk, g, dv) float32 softmax(q.k / sqrt(dk)) @ v per group.
// Each (row, kv head) streams its keys and values exactly once, whatever G and g are.
#if defined(__AVX2__) && defined(__FMA__)
// out[t * stride] = dot(qs[t], key row) * scale for NQ queries: the key row is converted once.
template <typename T, int NQ>
inline void key_dots(const float* qs, int64_t dk, const T* kr, float scale, float* out, int64_t stride) {
  __m256 a[NQ];
  for (int t = 0; t < NQ; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dk; d += 8) {
    const __m256 kv = load8(kr + d);
    for (int t = 0; t < NQ; ++t) a[t] = _mm256_fmadd_ps(_mm256_loadu_ps(qs + t * dk + d), kv, a[t]);
  }
  for (int t = 0; t < NQ; ++t) out[t * stride] = hsum8(a[t]) * scale;
}

// The same for 4 consecutive keys at once (NQ <= 2, dk % 16 == 0), queries qs in split order:
// 8 * NQ independent FMA chains, and one horizontal-add tree giving the 4 scores of a query together.
template <typename T, int NQ>
inline void key_dots4(const float* qs, int64_t dk, const T* kr, int64_t k_ss, float scale, float* out,
                      int64_t stride) {
  __m256 a[NQ][4];
  for (int t = 0; t < NQ; ++t)
    for (int i = 0; i < 4; ++i) a[t][i] = _mm256_setzero_ps();
  for (int64_t d = 0; d < dk; d += 16) {
    __m256 lo[4], hi[4];
    for (int i = 0; i < 4; ++i) load16(kr + i * k_ss + d, lo[i], hi[i]);
    for (int t = 0; t < NQ; ++t) {
      const __m256 ql = _mm256_loadu_ps(qs + t * dk + d), qh = _mm256_loadu_ps(qs + t * dk + d + 8);
      for (int i = 0; i < 4; ++i) a[t][i] = _mm256_fmadd_ps(qh, hi[i], _mm256_fmadd_ps(ql, lo[i], a[t][i]));
    }
  }
  for (int t = 0; t < NQ; ++t) {
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[t][0], a[t][1]), _mm256_hadd_ps(a[t][2], a[t][3]));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out + t * stride, _mm_mul_ps(sums, _mm_set1_ps(scale)));
  }
}

// acc[t][0:16] += sum_j p[t][j] * v[j][0:16] for NQ queries over n value rows, acc in split order
// (two halves of 8 dims: 2 * NQ independent FMA chains).
template <typename T, int NQ>
inline void weigh_values(const float* p, int64_t p_stride, int64_t n, const T* v, int64_t v_ss, float* acc,
                         int64_t acc_stride) {
  __m256 a[NQ][2];
  for (int t = 0; t < NQ; ++t) {
    a[t][0] = _mm256_loadu_ps(acc + t * acc_stride);
    a[t][1] = _mm256_loadu_ps(acc + t * acc_stride + 8);
  }
  for (int64_t j = 0; j < n; ++j) {
    __m256 v0, v1;
    load16(v + j * v_ss, v0, v1);
    for (int t = 0; t < NQ; ++t) {
      const __m256 pj = _mm256_set1_ps(p[t * p_stride + j]);
      a[t][0] = _mm256_fmadd_ps(pj, v0, a[t][0]);
      a[t][1] = _mm256_fmadd_ps(pj, v1, a[t][1]);
    }
  }
  for (int t = 0; t < NQ; ++t) {
    _mm256_storeu_ps(acc + t * acc_stride, a[t][0]);
    _mm256_storeu_ps(acc + t * acc_stride + 8, a[t][1]);
  }
}
#endif

// The largest of row[0:n] (-inf for n = 0).
inline float row_max(const float* row, int64_t n) {
  float mx = -INFINITY;
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 mv = _mm256_set1_ps(-INFINITY);
  for (; j + 8 <= n; j += 8) mv = _mm256_max_ps(mv, _mm256_loadu_ps(row + j));
  mx = hmax8(mv);
#endif
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// row[j] = exp(row[j] - mx) for j < n, in place; returns their sum (softmax weights before the division).
inline float exp_shifted_sum(float* row, int64_t n, float mx) {
  float sum = 0.f;
  int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
  __m256 sv = _mm256_setzero_ps();
  for (; j + 8 <= n; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(row + j, e);
    sv = _mm256_add_ps(sv, e);
  }
  sum = hsum8(sv);
#endif
  for (; j < n; ++j) { row[j] = std::exp(row[j] - mx); sum += row[j]; }
  return sum;
}

template <typename T>
void decode_attention_impl(const float* q, const T* k, const T* v, const bool* valid, float* out,
                           int64_t B, int64_t G, int64_t Hk, int64_t g, int64_t S, int64_t dk,
                           int64_t dv, int64_t k_sb, int64_t k_sg, int64_t k_sh, int64_t k_ss,
                           int64_t v_sb, int64_t v_sh, int64_t v_ss) {
  constexpr int64_t BLK = 64;
  // Software prefetch distance, in keys: each thread streams 2 or 3 rows at a time (keys of each
  // group, values) while computing on them; without it the reads and the arithmetic overlap
  // poorly (measured at 32K keys: 13 -> 16 GB/s on an AVX2 EPYC).
  constexpr int64_t APF = 64;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
#if defined(__AVX2__) && defined(__FMA__)
  const bool split_v = dv % 16 == 0;  // the vector value path keeps acc in split order (load16)
#else
  const bool split_v = false;
#endif
  at::parallel_for(0, B * Hk, 1, [&](int64_t w0, int64_t w1) {
    const int64_t Q = G * g;  // queries sharing this kv head
    std::vector<float> acc(Q * dv), m(Q), l(Q), sc(Q * BLK), kf(dk), vf(dv), qsplit(Q * dk);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hk, h = w % Hk;
      for (int64_t gi = 0; gi < G; ++gi)  // the queries in split order, for key_dots4
        for (int64_t qi = 0; qi < g; ++qi) {
          const float* src = q + (((b * G + gi) * Hk + h) * g + qi) * dk;
          float* dst = &qsplit[(gi * g + qi) * dk];
          for (int64_t d = 0; d + 16 <= dk; d += 16)
            for (int64_t i = 0; i < 16; ++i) dst[d + i] = src[d + split_dim<T>(i)];
        }
      std::fill(acc.begin(), acc.end(), 0.f);
      std::fill(m.begin(), m.end(), -INFINITY);
      std::fill(l.begin(), l.end(), 0.f);
      for (int64_t s0 = 0; s0 < S; s0 += BLK) {
        const int64_t n = std::min(BLK, S - s0);
        // scores for this block
        for (int64_t gi = 0; gi < G; ++gi) {
          const T* kb = k + b * k_sb + gi * k_sg + h * k_sh;
          const float* qg = q + ((b * G + gi) * Hk + h) * g * dk;
          int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
          if (dk % 16 == 0 && g <= 2) {  // 4 keys at a time; masked ones are overwritten below
            const float* qsg = &qsplit[gi * g * dk];
            for (; j + 4 <= n; j += 4) {
              const T* kr = kb + (s0 + j) * k_ss;
              if (s0 + j + 4 + APF <= S) {  // these 4 keys (and values) APF keys ahead
                const char* kp = reinterpret_cast<const char*>(kr + APF * k_ss);
                for (int64_t i = 0; i < 4; ++i)
                  for (int64_t o = 0; o < dk * static_cast<int64_t>(sizeof(T)); o += 64)
                    _mm_prefetch(kp + i * k_ss * sizeof(T) + o, _MM_HINT_T0);
                if (gi == 0) {
                  const char* vp = reinterpret_cast<const char*>(v + b * v_sb + h * v_sh + (s0 + j + APF) * v_ss);
                  for (int64_t i = 0; i < 4; ++i)
                    for (int64_t o = 0; o < dv * static_cast<int64_t>(sizeof(T)); o += 64)
                      _mm_prefetch(vp + i * v_ss * sizeof(T) + o, _MM_HINT_T0);
                }
              }
              float* o = &sc[gi * g * BLK + j];
              if (g == 1) key_dots4<T, 1>(qsg, dk, kr, k_ss, scale, o, BLK);
              else key_dots4<T, 2>(qsg, dk, kr, k_ss, scale, o, BLK);
              for (int64_t i = 0; i < 4; ++i)
                if (!valid[b * S + s0 + j + i])
                  for (int64_t t = 0; t < g; ++t) o[t * BLK + i] = -INFINITY;
            }
          }
#endif
          for (; j < n; ++j) {
            const int64_t s = s0 + j;
            const bool ok = valid[b * S + s];
            const T* kr = kb + s * k_ss;
#if defined(__AVX2__) && defined(__FMA__)
            if (dk % 8 == 0) {  // the key row is converted once, in registers, for up to 4 queries
              for (int64_t q0 = 0; q0 < g; q0 += 4) {
                float* o = &sc[(gi * g + q0) * BLK + j];
                if (!ok) {
                  for (int64_t t = 0; t < std::min<int64_t>(4, g - q0); ++t) o[t * BLK] = -INFINITY;
                  continue;
                }
                const float* qs = qg + q0 * dk;
                switch (std::min<int64_t>(4, g - q0)) {
                  case 1: key_dots<T, 1>(qs, dk, kr, scale, o, BLK); break;
                  case 2: key_dots<T, 2>(qs, dk, kr, scale, o, BLK); break;
                  case 3: key_dots<T, 3>(qs, dk, kr, scale, o, BLK); break;
                  default: key_dots<T, 4>(qs, dk, kr, scale, o, BLK); break;
                }
              }
              continue;
            }
#endif
            for (int64_t d = 0; d < dk; ++d) kf[d] = static_cast<float>(kr[d]);
            for (int64_t qi = 0; qi < g; ++qi) {
              const float* qq = q + (((b * G + gi) * Hk + h) * g + qi) * dk;
              float dot = 0.f;
              for (int64_t d = 0; d < dk; ++d) dot += qq[d] * kf[d];
              sc[(gi * g + qi) * BLK + j] = ok ? dot * scale : -INFINITY;
            }
          }
        }
        // online softmax update per query
        for (int64_t qi = 0; qi < Q; ++qi) {
          float* row = &sc[qi * BLK];
          const float mn = std::max(m[qi], row_max(row, n));
          if (mn == -INFINITY) {  // nothing valid yet: these keys weigh nothing
            std::fill(row, row + n, 0.f);
            continue;
          }
          const float corr = std::exp(m[qi] - mn);
          l[qi] = l[qi] * corr + exp_shifted_sum(row, n, mn);
          m[qi] = mn;
          if (corr != 1.f) {  // the running maximum moved
            float* a = &acc[qi * dv];
            for (int64_t d = 0; d < dv; ++d) a[d] *= corr;
          }
        }
        // values: read each row once, add it to every query's accumulator
        const T* vb = v + b * v_sb + h * v_sh;
#if defined(__AVX2__) && defined(__FMA__)
        if (split_v) {  // 16 value dims at a time, accumulators for up to 4 queries in registers
          for (int64_t d = 0; d < dv; d += 16)
            for (int64_t q0 = 0; q0 < Q; q0 += 4) {
              const float* p = &sc[q0 * BLK];
              float* a = &acc[q0 * dv + d];
              const T* vr = vb + s0 * v_ss + d;
              switch (std::min<int64_t>(4, Q - q0)) {
                case 1: weigh_values<T, 1>(p, BLK, n, vr, v_ss, a, dv); break;
                case 2: weigh_values<T, 2>(p, BLK, n, vr, v_ss, a, dv); break;
                case 3: weigh_values<T, 3>(p, BLK, n, vr, v_ss, a, dv); break;
                default: weigh_values<T, 4>(p, BLK, n, vr, v_ss, a, dv); break;
              }
            }
          continue;
        }
#endif
        for (int64_t j = 0; j < n; ++j) {
          const T* vr = vb + (s0 + j) * v_ss;
          for (int64_t d = 0; d < dv; ++d) vf[d] = static_cast<float>(vr[d]);
          for (int64_t qi = 0; qi < Q; ++qi) {
            const float p = sc[qi * BLK + j];
            if (m[qi] == -INFINITY || p == 0.f) continue;
            float* a = &acc[qi * dv];
            for (int64_t d = 0; d < dv; ++d) a[d] += p * vf[d];
          }
        }
      }
      for (int64_t gi = 0; gi < G; ++gi)
        for (int64_t qi = 0; qi < g; ++qi) {
          const int64_t idx = gi * g + qi;
          float* o = out + (((b * G + gi) * Hk + h) * g + qi) * dv;
          const float inv = l[idx] > 0.f ? 1.f / l[idx] : 0.f;
          const float* a = &acc[idx * dv];
          if (split_v)  // back from split order
            for (int64_t d = 0; d < dv; d += 16)
              for (int64_t i = 0; i < 16; ++i) o[d + split_dim<T>(i)] = a[d + i] * inv;
          else
            for (int64_t d = 0; d < dv; ++d) o[d] = a[d] * inv;
        }
    }
  });
}

torch::Tensor decode_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor valid) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 4 && valid.dim() == 2, "decode_attention: shapes");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && valid.scalar_type() == torch::kBool, "decode_attention: dtypes");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v dtypes differ");
  q = q.contiguous();
  valid = valid.contiguous();
  TORCH_CHECK(k.stride(4) == 1 && v.stride(3) == 1, "decode_attention: rows must be contiguous");
  const int64_t B = q.size(0), G = q.size(1), Hk = q.size(2), g = q.size(3), dk = q.size(4);
  const int64_t S = k.size(3), dv = v.size(3);
  auto out = torch::empty({B, G, Hk, g, dv}, q.options());
  if (k.scalar_type() == torch::kBFloat16)
    decode_attention_impl(q.data_ptr<float>(), k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>(),
                          valid.data_ptr<bool>(), out.data_ptr<float>(), B, G, Hk, g, S, dk, dv,
                          k.stride(0), k.stride(1), k.stride(2), k.stride(3), v.stride(0), v.stride(1),
                          v.stride(2));
  else
    decode_attention_impl(q.data_ptr<float>(), k.data_ptr<float>(), v.data_ptr<float>(),
                          valid.data_ptr<bool>(), out.data_ptr<float>(), B, G, Hk, g, S, dk, dv,
                          k.stride(0), k.stride(1), k.stride(2), k.stride(3), v.stride(0), v.stride(1),
                          v.stride(2));
  return out;
}

// ---- differential decode attention: A1 V - lam A2 V in one pass over V ----------------------------
// q (B, 2, Hk, g, dk), k (B, 2, Hk, S, dk), valid (B, S) as decode_attention takes them, and the values
// in column blocks, v (B, Hk, nb, S, vb) with dv = nb * vb: block i holds dims [i vb, (i + 1) vb) of
// every row (nb = 1 is the plain (B, Hk, S, dv) layout). Returns (B, 1, Hk, g, dv) =
// softmax(q1.k1) V - lam softmax(q2.k2) V, which is what differential attention needs of the two
// groups. Three passes per (row, kv head): every score (the keys streamed once), the softmax
// weights in place, then the values streamed once, each weighed by c = a1 / l1 - lam a2 / l2.
// Knowing l1 and l2 before touching V is what lets one value pass serve both groups: half the
// value arithmetic of decode_attention's online softmax, whose values each carry 2g accumulators
// (paired on an AVX2 EPYC: 1.28x with 2K keys, from cache; 1.20x with 32K, from memory).
#if defined(__AVX2__) && defined(__FMA__)
// acc[t][0:32] += sum_j c[t * c_stride + j] * v[j][0:32] for NQ rows over n value rows (split order).
// pf (or null): prefetch pf_bytes of the row at pf + j * v_ss along with row j, spreading the
// prefetches of later rows over the arithmetic (a burst of them per block measured slower).
template <typename T, int NQ>
inline void weigh_values32(const float* c, int64_t c_stride, int64_t n, const T* v, int64_t v_ss, float* acc,
                           int64_t acc_stride, const T* pf, int64_t pf_bytes) {
  __m256 a[NQ][4];
  for (int t = 0; t < NQ; ++t)
    for (int i = 0; i < 4; ++i) a[t][i] = _mm256_loadu_ps(acc + t * acc_stride + 8 * i);
  for (int64_t j = 0; j < n; ++j) {
    if (pf)
      for (int64_t o = 0; o < pf_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + j * v_ss) + o, _MM_HINT_T0);
    __m256 x[4];
    load16(v + j * v_ss, x[0], x[1]);
    load16(v + j * v_ss + 16, x[2], x[3]);
    for (int t = 0; t < NQ; ++t) {
      const __m256 cj = _mm256_broadcast_ss(c + t * c_stride + j);
      for (int i = 0; i < 4; ++i) a[t][i] = _mm256_fmadd_ps(cj, x[i], a[t][i]);
    }
  }
  for (int t = 0; t < NQ; ++t)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(acc + t * acc_stride + 8 * i, a[t][i]);
}
#endif

template <typename T>
void decode_diff_attention_impl(const float* q, const T* k, const T* v, const bool* valid, float lam, float* out,
                                int64_t B, int64_t Hk, int64_t g, int64_t S, int64_t dk, int64_t dv, int64_t vb,
                                int64_t k_sb, int64_t k_sg, int64_t k_sh, int64_t k_ss, int64_t v_sb, int64_t v_sh,
                                int64_t v_sc, int64_t v_ss) {
  // Value rows per block, weighed 32 dims at a time. In 32-wide column blocks (vb = 32, the decode
  // state's layout) each 32-dim sweep reads one sequential stream: paired at 32K keys and at 2K,
  // 1.16x the whole kernel over rows of 128 dims, whose 4 sweeps read every 4th cache line (there,
  // 16-row blocks measured 1.11x faster than 64 rows: the sweeps over a row stay close in time).
  constexpr int64_t BLK = 16;
  constexpr int64_t APF = 32;  // software prefetch distance in keys (16 and 32 measured alike, 128 slower)
  constexpr int64_t VPF = 16;  // the same for each value stream, in rows (8 to 64 measured alike)
  const float scale = 1.0f / std::sqrt(static_cast<float>(dk));
  const auto vdim = [&](int64_t d) { return d / vb * v_sc + d % vb; };  // offset of dim d in a row
#if defined(__AVX2__) && defined(__FMA__)
  const bool vec = dk % 16 == 0 && vb % 32 == 0;
#else
  const bool vec = false;
#endif
  const auto dim = [&](int64_t d) { return vec ? d - d % 16 + split_dim<T>(d % 16) : d; };  // split order
  std::vector<char> row_ok(B);  // every key of row b valid: pass 2 need not mask (once, not per head)
  for (int64_t b = 0; b < B; ++b) row_ok[b] = std::all_of(valid + b * S, valid + (b + 1) * S, [](bool x) { return x; });
  at::parallel_for(0, B * Hk, 1, [&](int64_t w0, int64_t w1) {
    const int64_t Q = 2 * g;  // rows: group 0's g queries, then group 1's
    std::vector<float> sc(Q * S), l(Q), cb(g * BLK), acc(g * dv), qsplit(Q * dk), kf(dk), vf(dv);
    for (int64_t w = w0; w < w1; ++w) {
      const int64_t b = w / Hk, h = w % Hk;
      const bool* ok = valid + b * S;
      for (int64_t r = 0; r < Q; ++r) {  // queries in split order (load16), as key_dots4 takes them
        const float* src = q + (((b * 2 + r / g) * Hk + h) * g + r % g) * dk;
        for (int64_t d = 0; d < dk; ++d) qsplit[r * dk + d] = src[dim(d)];
      }
      // pass 1: scores, S per row
      for (int64_t gi = 0; gi < 2; ++gi) {
        const T* kb = k + b * k_sb + gi * k_sg + h * k_sh;
        int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
        if (vec)
          for (; j + 4 <= S; j += 4) {
            const T* kr = kb + j * k_ss;
            if (j + 4 + APF <= S) {
              const char* kp = reinterpret_cast<const char*>(kr + APF * k_ss);
              for (int64_t i = 0; i < 4; ++i)
                for (int64_t o = 0; o < dk * static_cast<int64_t>(sizeof(T)); o += 64)
                  _mm_prefetch(kp + i * k_ss * sizeof(T) + o, _MM_HINT_T0);
            }
            for (int64_t q0 = 0; q0 < g; q0 += 2) {
              const float* qs = &qsplit[(gi * g + q0) * dk];
              float* o = &sc[(gi * g + q0) * S + j];
              if (g - q0 >= 2) key_dots4<T, 2>(qs, dk, kr, k_ss, scale, o, S);
              else key_dots4<T, 1>(qs, dk, kr, k_ss, scale, o, S);
            }
          }
#endif
        for (; j < S; ++j) {
          for (int64_t d = 0; d < dk; ++d) kf[d] = static_cast<float>(kb[j * k_ss + dim(d)]);  // as qsplit
          for (int64_t qi = 0; qi < g; ++qi) {
            const float* qq = &qsplit[(gi * g + qi) * dk];
            float dot = 0.f;
            for (int64_t d = 0; d < dk; ++d) dot += qq[d] * kf[d];
            sc[(gi * g + qi) * S + j] = dot * scale;
          }
        }
      }
      // pass 2: softmax weights exp(s - max) in place (0 for masked keys) and their sums
      for (int64_t r = 0; r < Q; ++r) {
        float* row = &sc[r * S];
        if (!row_ok[b])
          for (int64_t j = 0; j < S; ++j)
            if (!ok[j]) row[j] = -INFINITY;
        const float mx = row_max(row, S);
        if (mx == -INFINITY) {  // no valid key: this row weighs nothing
          std::fill(row, row + S, 0.f);
          l[r] = 0.f;
          continue;
        }
        l[r] = exp_shifted_sum(row, S, mx);
      }
      // pass 3: values, row by row of V, each weighed by c = a1 / l1 - lam a2 / l2 per query
      std::fill(acc.begin(), acc.end(), 0.f);
      const T* vh = v + b * v_sb + h * v_sh;
      for (int64_t s0 = 0; s0 < S; s0 += BLK) {
        const int64_t n = std::min(BLK, S - s0);
        for (int64_t qi = 0; qi < g; ++qi) {
          const float f1 = l[qi] > 0.f ? 1.f / l[qi] : 0.f, f2 = l[g + qi] > 0.f ? lam / l[g + qi] : 0.f;
          const float *e1 = &sc[qi * S + s0], *e2 = &sc[(g + qi) * S + s0];
          for (int64_t j = 0; j < n; ++j) cb[qi * BLK + j] = e1[j] * f1 - e2[j] * f2;
        }
#if defined(__AVX2__) && defined(__FMA__)
        if (vec) {
          // each sweep's first query pair prefetches its 32 dims of the rows VPF ahead
          const bool ahead = s0 + BLK + VPF <= S;
          constexpr int64_t pb = 32 * sizeof(T);
          for (int64_t d = 0; d < dv; d += 32)
            for (int64_t q0 = 0; q0 < g; q0 += 2) {
              const T* vr = vh + s0 * v_ss + vdim(d);
              const T* p = ahead && q0 == 0 ? vr + VPF * v_ss : nullptr;
              if (g - q0 >= 2) weigh_values32<T, 2>(&cb[q0 * BLK], BLK, n, vr, v_ss, &acc[q0 * dv + d], dv, p, pb);
              else weigh_values32<T, 1>(&cb[q0 * BLK], BLK, n, vr, v_ss, &acc[q0 * dv + d], dv, p, pb);
            }
          continue;
        }
#endif
        for (int64_t j = 0; j < n; ++j) {
          for (int64_t d = 0; d < dv; ++d) vf[d] = static_cast<float>(vh[(s0 + j) * v_ss + vdim(d)]);
          for (int64_t qi = 0; qi < g; ++qi) {
            const float c = cb[qi * BLK + j];
            for (int64_t d = 0; d < dv; ++d) acc[qi * dv + d] += c * vf[d];
          }
        }
      }
      for (int64_t qi = 0; qi < g; ++qi) {
        float* o = out + (w * g + qi) * dv;
        const float* a = &acc[qi * dv];
        for (int64_t d = 0; d < dv; ++d) o[dim(d)] = a[d];
      }
    }
  });
}

torch::Tensor decode_diff_attention(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor valid,
                                    double lam) {
  if (v.dim() == 4) v = v.unsqueeze(2);  // rows: one column block
  TORCH_CHECK(q.dim() == 5 && q.size(1) == 2 && k.dim() == 5 && k.size(1) == 2 && v.dim() == 5 && valid.dim() == 2,
              "decode_diff_attention: shapes");
  const int64_t B = q.size(0), Hk = q.size(2), g = q.size(3), dk = q.size(4), S = k.size(3);
  const int64_t vb = v.size(4), dv = v.size(2) * vb;
  TORCH_CHECK(k.size(0) == B && k.size(2) == Hk && k.size(4) == dk && v.size(0) == B && v.size(1) == Hk &&
              v.size(3) == S && valid.size(0) == B && valid.size(1) == S, "decode_diff_attention: shapes differ");
  TORCH_CHECK(q.scalar_type() == torch::kFloat32 && valid.scalar_type() == torch::kBool,
              "decode_diff_attention: dtypes");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_diff_attention: k and v dtypes differ");
  TORCH_CHECK(k.stride(4) == 1 && v.stride(4) == 1, "decode_diff_attention: rows must be contiguous");
  q = q.contiguous();
  valid = valid.contiguous();
  auto out = torch::empty({B, 1, Hk, g, dv}, q.options());
  const float l = static_cast<float>(lam);
  const auto run = [&](auto* kp, auto* vp) {
    decode_diff_attention_impl(q.data_ptr<float>(), kp, vp, valid.data_ptr<bool>(), l, out.data_ptr<float>(), B, Hk,
                               g, S, dk, dv, vb, k.stride(0), k.stride(1), k.stride(2), k.stride(3), v.stride(0),
                               v.stride(1), v.stride(2), v.stride(3));
  };
  if (k.scalar_type() == torch::kBFloat16) run(k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>());
  else run(k.data_ptr<float>(), v.data_ptr<float>());
  return out;
}

// ---- Mamba decode step: the selective-SSM state update and readout, one pass over the state --------
// state (B, e, n) float32, updated in place; x, dt (B, e); A (e, n); Bm, Cm (B, n); D (e,) -> y (B, e):
//   s = exp(dt A) * s + (dt x) B;   y = s . C + D x          (ops.selective_state_step's torch form)
torch::Tensor ssm_step(torch::Tensor x, torch::Tensor dt, torch::Tensor A, torch::Tensor Bm,
                       torch::Tensor Cm, torch::Tensor D, torch::Tensor state) {
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous() && state.scalar_type() == torch::kFloat32,
              "ssm_step: state must be a contiguous float32 (B, e, n) tensor");
  const int64_t B = state.size(0), E = state.size(1), N = state.size(2);
  for (const auto& t : {x, dt, A, Bm, Cm, D})
    TORCH_CHECK(t.scalar_type() == torch::kFloat32, "ssm_step: inputs must be float32");
  TORCH_CHECK(x.sizes() == dt.sizes() && x.size(0) == B && x.size(1) == E && A.size(0) == E &&
              A.size(1) == N && Bm.size(1) == N && Cm.size(1) == N && D.numel() == E, "ssm_step: shapes");
  x = x.contiguous(); dt = dt.contiguous(); A = A.contiguous(); Bm = Bm.contiguous();
  Cm = Cm.contiguous(); D = D.contiguous();
  auto y = torch::empty({B, E}, x.options());
  const float *xp = x.data_ptr<float>(), *dp = dt.data_ptr<float>(), *ap = A.data_ptr<float>(),
              *bp = Bm.data_ptr<float>(), *cp = Cm.data_ptr<float>(), *Dp = D.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *yp = y.data_ptr<float>();
  at::parallel_for(0, B * E, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / E, c = i % E;
      const float d = dp[i], dx = d * xp[i];
      const float *a = ap + c * N, *bv = bp + b * N, *cv = cp + b * N;
      float* s = sp + i * N;
      float acc = 0.f;
      int64_t j = 0;
#if defined(__AVX2__) && defined(__FMA__)
      __m256 accv = _mm256_setzero_ps();
      for (; j + 8 <= N; j += 8) {
        const __m256 decay = exp8(_mm256_mul_ps(_mm256_set1_ps(d), _mm256_loadu_ps(a + j)));
        const __m256 sv = _mm256_fmadd_ps(decay, _mm256_loadu_ps(s + j),
                                          _mm256_mul_ps(_mm256_set1_ps(dx), _mm256_loadu_ps(bv + j)));
        _mm256_storeu_ps(s + j, sv);
        accv = _mm256_fmadd_ps(sv, _mm256_loadu_ps(cv + j), accv);
      }
      acc = hsum8(accv);
#endif
      for (; j < N; ++j) {
        s[j] = std::exp(d * a[j]) * s[j] + dx * bv[j];
        acc += s[j] * cv[j];
      }
      yp[i] = acc + Dp[c] * xp[i];
    }
  });
  return y;
}

// Sum of a float32 buffer, read the way the GEMV reads weights: the machine's streaming-read
// bandwidth for the roofline in `sambay bench`.
double stream_read(torch::Tensor buf) {
  TORCH_CHECK(buf.scalar_type() == torch::kFloat32 && buf.is_contiguous(), "stream_read: float32");
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel();
  std::vector<double> part(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, n / 64, 1024, [&](int64_t b0, int64_t b1) {
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = b0; b < b1; ++b) {
      const float* q = p + b * 64;
      a0 = _mm512_add_ps(a0, _mm512_loadu_ps(q));
      a1 = _mm512_add_ps(a1, _mm512_loadu_ps(q + 16));
      a2 = _mm512_add_ps(a2, _mm512_loadu_ps(q + 32));
      a3 = _mm512_add_ps(a3, _mm512_loadu_ps(q + 48));
    }
    float s = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t b = b0; b < b1; ++b) {
      const float* q = p + b * 64;
      a0 = _mm256_add_ps(a0, _mm256_add_ps(_mm256_loadu_ps(q), _mm256_loadu_ps(q + 8)));
      a1 = _mm256_add_ps(a1, _mm256_add_ps(_mm256_loadu_ps(q + 16), _mm256_loadu_ps(q + 24)));
      a2 = _mm256_add_ps(a2, _mm256_add_ps(_mm256_loadu_ps(q + 32), _mm256_loadu_ps(q + 40)));
      a3 = _mm256_add_ps(a3, _mm256_add_ps(_mm256_loadu_ps(q + 48), _mm256_loadu_ps(q + 56)));
    }
    float s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#else
    float s = 0.f;
    for (int64_t i = b0 * 64; i < b1 * 64; ++i) s += p[i];
#endif
    part[at::get_thread_num()] += s;
  });
  double total = 0;
  for (double v : part) total += v;
  return total;
}

// How many threads a parallel_for in these kernels really runs on (1 if built without OpenMP).
int64_t parallel_threads() {
  std::atomic<int64_t> most{1};
  at::parallel_for(0, 1024, 1, [&](int64_t, int64_t) {
    const int64_t mine = at::get_thread_num() + 1;
    int64_t seen = most.load();
    while (mine > seen && !most.compare_exchange_weak(seen, mine)) {}
  });
  return most.load();
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads a parallel_for runs on");
  m.def("stream_read", &stream_read, "sum of a float32 buffer (bandwidth probe)");
  m.def("gemv", &gemv, "y = x @ w.T * scale for small M (memory-bound decoding)");
  m.def("decode_attention", &decode_attention, "one-query attention streaming K/V once");
  m.def("decode_diff_attention", &decode_diff_attention, "differential one-query attention: a1 - lam a2");
  m.def("ssm_step", &ssm_step, "Mamba decode step: state update and readout in one pass");
  m.def("add_layer_norm", &add_layer_norm, "residual add and layer norm in one pass");
  m.def("silu_mul", &silu_mul, "silu(a) * b");
  m.def("conv_step", &conv_step, "Mamba conv window step, then silu");
  m.def("diff_combine", &diff_combine, "differential attention: a1 - lam a2, rms norm, scale");
  m.def("kv_write", &kv_write, "write one position per row into a K/V cache");
  m.def("mlp_step", &mlp_step, "decode block: residual add, norm and SwiGLU MLP");
  m.def("gmu_step", &gmu_step, "decode block: gated memory unit");
  m.def("mamba_step", &mamba_step, "decode block: Mamba mixer for one token per row");
  m.def("attention_step", &attention_step, "decode block: attention for one token per row");
  m.def("decode_layers", &decode_layers, "a decode step's whole layer stack: the blocks in order");
  m.def("fast_paths", []() {
    std::vector<std::string> p;
#ifdef SAMBAY_VNNI
    p.push_back("int8-vnni");
#endif
#ifdef SAMBAY_Q8AVX2
    p.push_back("int8-avx2");
#endif
#ifdef SAMBAY_BF16DOT
    p.push_back("bf16-dot");
#endif
    return p;
  });
}
