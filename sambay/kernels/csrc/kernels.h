// Everything the native extension exports, as bindings.cpp binds it. Each function has a PyTorch
// twin: the GEMV references in sambay/kernels/native.py, the attention, SSM and glue references in
// sambay/ops, and the decode blocks' are the model's own modules (sambay/models).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

// Which low-precision paths this build has, decided once from the compiler's target flags so that
// every file (the GEMV, and fast_paths reporting it) agrees.
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define SAMBAY_VNNI 1  // int8 weights x int8 activations, vpdpbusd (rows)
#elif defined(__AVX2__) && defined(__FMA__)
#define SAMBAY_Q8AVX2 1  // int8 weights x int8 activations, vpmaddubsw (4-row tiles)
#endif
#if defined(__AVX512BF16__)
#define SAMBAY_BF16DOT 1  // bf16 weights x bf16 activations, vdpbf16ps
#endif

// gemv.cpp: the memory-bound matrix products.
at::Tensor gemv(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t exact, at::Tensor bias);

// attention.cpp: one query per row over the K/V cache.
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid);
at::Tensor decode_diff_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid, double lam);

// ssm.cpp: the Mamba state update.
at::Tensor ssm_step(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor Bm, at::Tensor Cm, at::Tensor D,
                    at::Tensor state);

// probe.cpp: what the build and the machine give.
double stream_read(at::Tensor buf);
int64_t parallel_threads();
std::vector<std::string> fast_paths();

// glue.cpp: the element-wise glue of a decode step, fused.
std::vector<at::Tensor> add_layer_norm(at::Tensor h, at::Tensor delta, at::Tensor w, at::Tensor b, double eps);
at::Tensor silu_mul(at::Tensor a, at::Tensor b);
at::Tensor conv_step(at::Tensor x, at::Tensor state, at::Tensor w, at::Tensor b);
at::Tensor diff_combine(at::Tensor o, double lam, at::Tensor w, double eps, double scale);
void kv_write(at::Tensor kv, at::Tensor kc, at::Tensor vc, at::Tensor slot, bool diff);

// glue.cpp: decode blocks, one call per mixer or MLP for one token per row. A linear layer is passed
// as {weight, scale or empty, bias or empty} (a PackedLinear).
using Linear = std::vector<at::Tensor>;
at::Tensor mlp_step(at::Tensor h, at::Tensor delta, at::Tensor ln_w, at::Tensor ln_b, double eps, Linear fc1,
                    Linear fc2);
at::Tensor gmu_step(at::Tensor x, at::Tensor memory, Linear in_proj, Linear out_proj);
std::vector<at::Tensor> mamba_step(at::Tensor x, Linear in_proj, at::Tensor conv_state, at::Tensor conv_w,
                                   at::Tensor conv_b, Linear x_proj, Linear dt_proj, at::Tensor A, at::Tensor D,
                                   at::Tensor ssm_state, Linear out_proj);
at::Tensor attention_step(at::Tensor x, Linear qkv_proj, int64_t H, at::Tensor kc, at::Tensor vc, at::Tensor slot,
                          at::Tensor k, at::Tensor v, at::Tensor valid, double lam, at::Tensor subln_w, double eps,
                          double scale, Linear out_proj);
at::Tensor decode_layers(at::Tensor h, std::vector<int64_t> kinds, std::vector<std::vector<at::Tensor>> tensors,
                         std::vector<std::vector<double>> scalars, std::vector<std::vector<at::Tensor>> keys);
