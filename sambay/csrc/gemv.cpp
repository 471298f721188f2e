// Memory-bound matrix-vector products for decoding on CPU: y = x @ W^T (* scale).
//
// Decoding reads every weight once per token, so speed is bytes/second. These kernels stream each
// weight row once for a small batch of activation rows (M <= 16), convert the weights to float32
// in registers and accumulate with FMA. W is float32, bfloat16 or int8 with one float32 scale per
// output row. Python keeps a reference (dequantize, then torch.matmul) and the tests hold them equal.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace {

constexpr int64_t MB = 4;     // activation rows per pass over the weights
constexpr int64_t RT = 8;     // weight rows per tile (one tile = one unit of parallel work)
constexpr int64_t KB = 1024;  // k-block: MB x KB float32 activations stay in L1 while RT rows stream

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

// acc[m] += dot(w[0:len], x[m][0:len]) for M_ activation rows (compile-time, so registers hold them)
template <int M_, typename W>
inline void block_dots(const W* w, const float* x, int64_t ldx, int64_t len, float* acc) {
  __m512 a[M_][2];
  for (int m = 0; m < M_; ++m) a[m][0] = a[m][1] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= len; k += 32) {
    __m512 w0 = load16(w + k), w1 = load16(w + k + 16);
    for (int m = 0; m < M_; ++m) {
      a[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + m * ldx + k), a[m][0]);
      a[m][1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + m * ldx + k + 16), a[m][1]);
    }
  }
  for (int m = 0; m < M_; ++m) {
    float s = _mm512_reduce_add_ps(_mm512_add_ps(a[m][0], a[m][1]));
    for (int64_t kk = k; kk < len; ++kk) s += to_float(w[kk]) * x[m * ldx + kk];
    acc[m] += s;
  }
}
#else
template <int M_, typename W>
inline void block_dots(const W* w, const float* x, int64_t ldx, int64_t len, float* acc) {
  for (int m = 0; m < M_; ++m) {
    float s = 0.f;
    for (int64_t k = 0; k < len; ++k) s += to_float(w[k]) * x[m * ldx + k];
    acc[m] += s;
  }
}
#endif

template <typename W>
inline void dots(int64_t mb, const W* w, const float* x, int64_t ldx, int64_t len, float* acc) {
  switch (mb) {
    case 1: block_dots<1>(w, x, ldx, len, acc); break;
    case 2: block_dots<2>(w, x, ldx, len, acc); break;
    case 3: block_dots<3>(w, x, ldx, len, acc); break;
    default: block_dots<4>(w, x, ldx, len, acc); break;
  }
}

template <typename W>
void gemv_impl(const float* x, const W* w, const float* scale, float* y, int64_t M, int64_t N,
               int64_t K) {
  const int64_t tiles = (N + RT - 1) / RT;
  at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * RT, n1 = std::min(N, n0 + RT);
      for (int64_t m0 = 0; m0 < M; m0 += MB) {
        const int64_t mb = std::min(MB, M - m0);
        float acc[RT][MB] = {};
        for (int64_t k0 = 0; k0 < K; k0 += KB) {
          const int64_t len = std::min(KB, K - k0);
          for (int64_t n = n0; n < n1; ++n)
            dots(mb, w + n * K + k0, x + m0 * K + k0, K, len, acc[n - n0]);
        }
        for (int64_t n = n0; n < n1; ++n) {
          const float s = scale ? scale[n] : 1.f;
          for (int64_t m = 0; m < mb; ++m) y[(m0 + m) * N + n] = acc[n - n0][m] * s;
        }
      }
    }
  });
}

}  // namespace

// x (M, K) float32; w (N, K) float32 / bfloat16 / int8; scale (N,) float32 or empty -> (M, N) float32
torch::Tensor gemv(torch::Tensor x, torch::Tensor w, torch::Tensor scale) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "gemv: shape mismatch");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32, "gemv: x must be float32");
  x = x.contiguous();
  w = w.contiguous();
  const int64_t M = x.size(0), N = w.size(0), K = w.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* sp = scale.numel() ? scale.contiguous().data_ptr<float>() : nullptr;
  switch (w.scalar_type()) {
    case torch::kFloat32:
      gemv_impl(x.data_ptr<float>(), w.data_ptr<float>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    case torch::kBFloat16:
      gemv_impl(x.data_ptr<float>(), w.data_ptr<c10::BFloat16>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    case torch::kInt8:
      TORCH_CHECK(sp, "gemv: int8 weights need a scale");
      gemv_impl(x.data_ptr<float>(), w.data_ptr<int8_t>(), sp, y.data_ptr<float>(), M, N, K);
      break;
    default:
      TORCH_CHECK(false, "gemv: unsupported weight dtype ", w.scalar_type());
  }
  return y;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("gemv", &gemv, "y = x @ w.T * scale for small M (memory-bound decoding)");
}
