// Decode attention on CPU: one query per row over a long K/V cache, each streamed once.
//
// The vector paths run at 8 lanes (simd::Vec<8>, AVX2, which AVX-512 CPUs have too): the query and
// value accumulators are kept in the 16-value split order of simd::load_split at that width, and the
// key blocking and prefetch distances were measured with it. The softmax's row maximum and exp sums
// run at the native width.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"
#include "simd.h"

namespace {

#if defined(SAMBAY_AVX2)
using V8 = simd::Vec<8>;
#endif

template <typename T>
inline int64_t split_dim(int64_t i) { return simd::split_dim<T, 8>(i); }

// ---- decode attention: one query per row over a long K/V, streamed once --------------------------
// q (B, G, Hk, g, dk) float32: G query groups (1 plain, 2 differential: q1 and q2) whose group i
// attends with keys k[:, i] (B, G, Hk, S, dk); all groups share the values v (B, Hk, S, dv).
// valid (B, S) bool. Returns (B, G, Hk, g, dv) float32 softmax(q.k / sqrt(dk)) @ v per group.
// Each (row, kv head) streams its keys and values exactly once, whatever G and g are.
#if defined(SAMBAY_AVX2)
// out[t * stride] = dot(qs[t], key row) * scale for NQ queries: the key row is converted once.
template <typename T, int NQ>
inline void key_dots(const float* qs, int64_t dk, const T* kr, float scale, float* out, int64_t stride) {
  V8 a[NQ];
  for (int t = 0; t < NQ; ++t) a[t] = V8::zero();
  for (int64_t d = 0; d < dk; d += 8) {
    const V8 kv = V8::load(kr + d);
    for (int t = 0; t < NQ; ++t) a[t] = fma(V8::load(qs + t * dk + d), kv, a[t]);
  }
  for (int t = 0; t < NQ; ++t) out[t * stride] = a[t].sum() * scale;
}

// The same for 4 consecutive keys at once (NQ <= 2, dk % 16 == 0), queries qs in split order:
// 8 * NQ independent FMA chains, and one horizontal-add tree giving the 4 scores of a query together.
template <typename T, int NQ>
inline void key_dots4(const float* qs, int64_t dk, const T* kr, int64_t k_ss, float scale, float* out,
                      int64_t stride) {
  V8 a[NQ][4];
  for (int t = 0; t < NQ; ++t)
    for (int i = 0; i < 4; ++i) a[t][i] = V8::zero();
  for (int64_t d = 0; d < dk; d += 16) {
    V8 lo[4], hi[4];
    for (int i = 0; i < 4; ++i) simd::load_split(kr + i * k_ss + d, lo[i], hi[i]);
    for (int t = 0; t < NQ; ++t) {
      const V8 ql = V8::load(qs + t * dk + d), qh = V8::load(qs + t * dk + d + 8);
      for (int i = 0; i < 4; ++i) a[t][i] = fma(qh, hi[i], fma(ql, lo[i], a[t][i]));
    }
  }
  for (int t = 0; t < NQ; ++t) {  // the 4 sums at once: a horizontal-add tree of AVX2
    const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a[t][0].v, a[t][1].v), _mm256_hadd_ps(a[t][2].v, a[t][3].v));
    const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out + t * stride, _mm_mul_ps(sums, _mm_set1_ps(scale)));
  }
}

// acc[t][0:16] += sum_j p[t][j] * v[j][0:16] for NQ queries over n value rows, acc in split order
// (two halves of 8 dims: 2 * NQ independent FMA chains).
template <typename T, int NQ>
inline void weigh_values(const float* p, int64_t p_stride, int64_t n, const T* v, int64_t v_ss, float* acc,
                         int64_t acc_stride) {
  V8 a[NQ][2];
  for (int t = 0; t < NQ; ++t) {
    a[t][0] = V8::load(acc + t * acc_stride);
    a[t][1] = V8::load(acc + t * acc_stride + 8);
  }
  for (int64_t j = 0; j < n; ++j) {
    V8 v0, v1;
    simd::load_split(v + j * v_ss, v0, v1);
    for (int t = 0; t < NQ; ++t) {
      const V8 pj = V8::broadcast(p[t * p_stride + j]);
      a[t][0] = fma(pj, v0, a[t][0]);
      a[t][1] = fma(pj, v1, a[t][1]);
    }
  }
  for (int t = 0; t < NQ; ++t) {
    a[t][0].store(acc + t * acc_stride);
    a[t][1].store(acc + t * acc_stride + 8);
  }
}
#endif

// The largest of row[0:n] (-inf for n = 0).
inline float row_max(const float* row, int64_t n) {
  using V = simd::Native;
  float mx = -INFINITY;
  int64_t j = 0;
  if constexpr (V::size > 1) {
    V mv = V::broadcast(-INFINITY);
    for (; j + V::size <= n; j += V::size) mv = max(mv, V::load(row + j));
    mx = mv.max();
  }
  for (; j < n; ++j) mx = std::max(mx, row[j]);
  return mx;
}

// row[j] = exp(row[j] - mx) for j < n, in place; returns their sum (softmax weights before the division).
inline float exp_shifted_sum(float* row, int64_t n, float mx) {
  using V = simd::Native;
  float sum = 0.f;
  int64_t j = 0;
  if constexpr (V::size > 1) {
    V sv = V::zero();
    for (; j + V::size <= n; j += V::size) {
      const V e = simd::exp(V::load(row + j) - V::broadcast(mx));
      e.store(row + j);
      sv = sv + e;
    }
    sum = sv.sum();
  }
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
#if defined(SAMBAY_AVX2)
  const bool split_v = dv % 16 == 0;  // the vector value path keeps acc in split order (simd::load_split)
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
#if defined(SAMBAY_AVX2)
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
#if defined(SAMBAY_AVX2)
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
#if defined(SAMBAY_AVX2)
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

}  // namespace

at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid) {
  TORCH_CHECK(q.dim() == 5 && k.dim() == 5 && v.dim() == 4 && valid.dim() == 2, "decode_attention: shapes");
  TORCH_CHECK(q.scalar_type() == at::kFloat && valid.scalar_type() == at::kBool, "decode_attention: dtypes");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_attention: k and v dtypes differ");
  q = q.contiguous();
  valid = valid.contiguous();
  TORCH_CHECK(k.stride(4) == 1 && v.stride(3) == 1, "decode_attention: rows must be contiguous");
  const int64_t B = q.size(0), G = q.size(1), Hk = q.size(2), g = q.size(3), dk = q.size(4);
  const int64_t S = k.size(3), dv = v.size(3);
  auto out = at::empty({B, G, Hk, g, dv}, q.options());
  if (k.scalar_type() == at::kBFloat16)
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

namespace {

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
#if defined(SAMBAY_AVX2)
// acc[t][0:32] += sum_j c[t * c_stride + j] * v[j][0:32] for NQ rows over n value rows (split order).
// pf (or null): prefetch pf_bytes of the row at pf + j * v_ss along with row j, spreading the
// prefetches of later rows over the arithmetic (a burst of them per block measured slower).
template <typename T, int NQ>
inline void weigh_values32(const float* c, int64_t c_stride, int64_t n, const T* v, int64_t v_ss, float* acc,
                           int64_t acc_stride, const T* pf, int64_t pf_bytes) {
  V8 a[NQ][4];
  for (int t = 0; t < NQ; ++t)
    for (int i = 0; i < 4; ++i) a[t][i] = V8::load(acc + t * acc_stride + 8 * i);
  for (int64_t j = 0; j < n; ++j) {
    if (pf)
      for (int64_t o = 0; o < pf_bytes; o += 64) _mm_prefetch(reinterpret_cast<const char*>(pf + j * v_ss) + o, _MM_HINT_T0);
    V8 x[4];
    simd::load_split(v + j * v_ss, x[0], x[1]);
    simd::load_split(v + j * v_ss + 16, x[2], x[3]);
    for (int t = 0; t < NQ; ++t) {
      const V8 cj = V8::broadcast(c[t * c_stride + j]);
      for (int i = 0; i < 4; ++i) a[t][i] = fma(cj, x[i], a[t][i]);
    }
  }
  for (int t = 0; t < NQ; ++t)
    for (int i = 0; i < 4; ++i) a[t][i].store(acc + t * acc_stride + 8 * i);
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
#if defined(SAMBAY_AVX2)
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
      for (int64_t r = 0; r < Q; ++r) {  // queries in split order (simd::load_split), as key_dots4 takes them
        const float* src = q + (((b * 2 + r / g) * Hk + h) * g + r % g) * dk;
        for (int64_t d = 0; d < dk; ++d) qsplit[r * dk + d] = src[dim(d)];
      }
      // pass 1: scores, S per row
      for (int64_t gi = 0; gi < 2; ++gi) {
        const T* kb = k + b * k_sb + gi * k_sg + h * k_sh;
        int64_t j = 0;
#if defined(SAMBAY_AVX2)
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
#if defined(SAMBAY_AVX2)
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

}  // namespace

at::Tensor decode_diff_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid,
                                    double lam) {
  if (v.dim() == 4) v = v.unsqueeze(2);  // rows: one column block
  TORCH_CHECK(q.dim() == 5 && q.size(1) == 2 && k.dim() == 5 && k.size(1) == 2 && v.dim() == 5 && valid.dim() == 2,
              "decode_diff_attention: shapes");
  const int64_t B = q.size(0), Hk = q.size(2), g = q.size(3), dk = q.size(4), S = k.size(3);
  const int64_t vb = v.size(4), dv = v.size(2) * vb;
  TORCH_CHECK(k.size(0) == B && k.size(2) == Hk && k.size(4) == dk && v.size(0) == B && v.size(1) == Hk &&
              v.size(3) == S && valid.size(0) == B && valid.size(1) == S, "decode_diff_attention: shapes differ");
  TORCH_CHECK(q.scalar_type() == at::kFloat && valid.scalar_type() == at::kBool,
              "decode_diff_attention: dtypes");
  TORCH_CHECK(k.scalar_type() == v.scalar_type(), "decode_diff_attention: k and v dtypes differ");
  TORCH_CHECK(k.stride(4) == 1 && v.stride(4) == 1, "decode_diff_attention: rows must be contiguous");
  q = q.contiguous();
  valid = valid.contiguous();
  auto out = at::empty({B, 1, Hk, g, dv}, q.options());
  const float l = static_cast<float>(lam);
  const auto run = [&](auto* kp, auto* vp) {
    decode_diff_attention_impl(q.data_ptr<float>(), kp, vp, valid.data_ptr<bool>(), l, out.data_ptr<float>(), B, Hk,
                               g, S, dk, dv, vb, k.stride(0), k.stride(1), k.stride(2), k.stride(3), v.stride(0),
                               v.stride(1), v.stride(2), v.stride(3));
  };
  if (k.scalar_type() == at::kBFloat16) run(k.data_ptr<c10::BFloat16>(), v.data_ptr<c10::BFloat16>());
  else run(k.data_ptr<float>(), v.data_ptr<float>());
  return out;
}
