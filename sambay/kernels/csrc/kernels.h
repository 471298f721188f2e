// Everything the native extension exports (bound in gemv.cpp). Each function has a PyTorch twin:
// the GEMV and attention references in sambay/kernels.py and sambay/ops.py, the glue's in sambay/ops.py,
// and the decode blocks' are the model's own modules (sambay/model.py).
#pragma once

#include <ATen/ATen.h>

#include <vector>

// gemv.cpp: the memory-bound products and sequence kernels.
at::Tensor gemv(at::Tensor x, at::Tensor w, at::Tensor scale, int64_t exact, at::Tensor bias);
at::Tensor decode_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid);
at::Tensor decode_diff_attention(at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor valid, double lam);
at::Tensor ssm_step(at::Tensor x, at::Tensor dt, at::Tensor A, at::Tensor Bm, at::Tensor Cm, at::Tensor D,
                    at::Tensor state);

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
