// The Python module: every function of kernels.h, bound by name. The only file that includes
// torch/extension.h (pybind11 and its type casters), which is slow to compile.

#include <torch/extension.h>

#include "kernels.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads a parallel_for runs on");
  m.def("stream_read", &stream_read, "sum of a float32 buffer (bandwidth probe)");
  m.def("fast_paths", &fast_paths, "the low-precision paths of gemv in this build");
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
}
