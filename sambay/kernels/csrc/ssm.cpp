// The Mamba decode step on CPU: the selective-SSM state update and its readout in one pass over the
// state, at the native vector width (simd::Native).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "kernels.h"
#include "simd.h"

// state (B, e, n) float32, updated in place; x, dt (B, e); A (e, n); Bm, Cm (B, n); D (e,) -> y (B, e):
//   s = exp(dt A) * s + (dt x) B;   y = s . C + D x          (ops.selective_state_step's torch form)
at::Tensor ssm_step(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor Bm, at::Tensor Cm, at::Tensor D,
                    at::Tensor state) {
  TORCH_CHECK(state.dim() == 3 && state.is_contiguous() && state.scalar_type() == at::kFloat,
              "ssm_step: state must be a contiguous float32 (B, e, n) tensor");
  const int64_t B = state.size(0), E = state.size(1), N = state.size(2);
  for (const auto& t : {x, dt, A, Bm, Cm, D})
    TORCH_CHECK(t.scalar_type() == at::kFloat, "ssm_step: inputs must be float32");
  TORCH_CHECK(x.sizes() == dt.sizes() && x.size(0) == B && x.size(1) == E && A.size(0) == E &&
              A.size(1) == N && Bm.size(1) == N && Cm.size(1) == N && D.numel() == E, "ssm_step: shapes");
  x = x.contiguous(); dt = dt.contiguous(); A = A.contiguous(); Bm = Bm.contiguous();
  Cm = Cm.contiguous(); D = D.contiguous();
  auto y = at::empty({B, E}, x.options());
  const float *xp = x.data_ptr<float>(), *dp = dt.data_ptr<float>(), *ap = A.data_ptr<float>(),
              *bp = Bm.data_ptr<float>(), *cp = Cm.data_ptr<float>(), *Dp = D.data_ptr<float>();
  float *sp = state.data_ptr<float>(), *yp = y.data_ptr<float>();
  using V = simd::Native;
  at::parallel_for(0, B * E, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / E, c = i % E;
      const float d = dp[i], dx = d * xp[i];
      const float *a = ap + c * N, *bv = bp + b * N, *cv = cp + b * N;
      float* s = sp + i * N;
      float acc = 0.f;
      int64_t j = 0;
      if constexpr (V::size > 1) {
        V accv = V::zero();
        for (; j + V::size <= N; j += V::size) {
          const V decay = simd::exp(V::broadcast(d) * V::load(a + j));
          const V sv = fma(decay, V::load(s + j), V::broadcast(dx) * V::load(bv + j));
          sv.store(s + j);
          accv = fma(sv, V::load(cv + j), accv);
        }
        acc = accv.sum();
      }
      for (; j < N; ++j) {
        s[j] = std::exp(d * a[j]) * s[j] + dx * bv[j];
        acc += s[j] * cv[j];
      }
      yp[i] = acc + Dp[c] * xp[i];
    }
  });
  return y;
}
