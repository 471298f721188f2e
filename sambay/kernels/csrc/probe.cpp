// What this build and this machine give: the streaming-read bandwidth probe of `sambay bench`, the
// threads the kernels' parallel loops really run on, and the low-precision paths compiled in.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <atomic>
#include <string>
#include <vector>

#include "kernels.h"
#include "simd.h"

// Sum of a float32 buffer, read the way the GEMV reads weights: the machine's streaming-read
// bandwidth for the roofline in `sambay bench`. Four accumulators per 64 values keep the adds from
// limiting the loads.
double stream_read(at::Tensor buf) {
  TORCH_CHECK(buf.scalar_type() == at::kFloat && buf.is_contiguous(), "stream_read: float32");
  const float* p = buf.data_ptr<float>();
  const int64_t n = buf.numel();
  std::vector<double> part(at::get_num_threads() + 1, 0.0);
  at::parallel_for(0, n / 64, 1024, [&](int64_t b0, int64_t b1) {
    using V = simd::Native;
    V a[4] = {V::zero(), V::zero(), V::zero(), V::zero()};
    for (int64_t b = b0; b < b1; ++b) {
      const float* q = p + b * 64;
      for (int i = 0; i < 64 / V::size; ++i) a[i % 4] = a[i % 4] + V::load(q + i * V::size);
    }
    part[at::get_thread_num()] += ((a[0] + a[1]) + (a[2] + a[3])).sum();
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

// The low-precision dot-product paths of gemv in this build (kernels.h decides them).
std::vector<std::string> fast_paths() {
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
}
