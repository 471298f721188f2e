// The Python module: every function of kernels.h, bound by name. The only file that includes
// torch/extension.h (pybind11 and its type casters), which is slow to compile.

#include <torch/extension.h>

#include <optional>
#include <utility>
#include <variant>

#include "kernels.h"

namespace py = pybind11;

namespace {

at::Tensor or_empty(const std::optional<at::Tensor>& t) { return t ? *t : at::empty({0}); }

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("parallel_threads", &parallel_threads, "threads a parallel_for runs on");
  m.def("stream_read", &stream_read, "sum of a float32 buffer (bandwidth probe)");
  m.def("fast_paths", &fast_paths, "the low-precision paths of gemv in this build");
  m.def("gemv", &gemv, "y = x @ w.T * scale for small M (memory-bound decoding)");
  m.def("gemv_q4", &gemv_q4, "y = x @ W.T + bias, W 4-bit in blocks of 4 rows (sambay.quant.int4)", py::arg("x"),
        py::arg("packed"), py::arg("scales"), py::arg("bias"), py::arg("path") = "");
  m.def("q4_paths", &q4_paths, "the 4-bit GEMV paths of this build, fastest first");
  m.def("decode_attention", &decode_attention, "one-query attention streaming K/V once");
  m.def("decode_diff_attention", &decode_diff_attention, "differential one-query attention: a1 - lam a2");
  m.def("ssm_step", &ssm_step, "Mamba decode step: state update and readout in one pass");
  m.def("add_layer_norm", &add_layer_norm, "residual add and layer norm in one pass");
  m.def("add_rms_norm", &add_rms_norm, "residual add and RMSNorm (normalize, then scale) in one pass");
  m.def("rope_rows", &rope_rows, "RoPE in place on the first heads of each row (half-split layout)");
  m.def("silu_mul", &silu_mul, "silu(a) * b");
  m.def("conv_step", &conv_step, "Mamba conv window step, then silu");
  m.def("diff_combine", &diff_combine, "differential attention: a1 - lam a2, rms norm, scale");
  m.def("kv_write", &kv_write, "write one position per row into a K/V cache");
  // The decode step's records (kernels.h), built by keyword; None stands for an empty tensor.
  using Opt = std::optional<at::Tensor>;
  py::class_<Linear>(m, "Linear", "a packed linear layer: x @ weight.T * scale + bias")
      .def(py::init([](at::Tensor weight, Opt scale, Opt bias) { return Linear{weight, or_empty(scale), or_empty(bias)}; }),
           py::arg("weight"), py::arg("scale") = py::none(), py::arg("bias") = py::none())
      .def_readonly("weight", &Linear::weight)
      .def_readonly("scale", &Linear::scale)
      .def_readonly("bias", &Linear::bias);
  py::class_<Norm>(m, "Norm", "a layer norm, or (rms) an RMSNorm")
      .def(py::init([](at::Tensor weight, Opt bias, double eps, bool rms) {
             return Norm{weight, or_empty(bias), eps, rms};
           }),
           py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms") = false)
      .def_readonly("weight", &Norm::weight)
      .def_readonly("bias", &Norm::bias)
      .def_readonly("eps", &Norm::eps)
      .def_readonly("rms", &Norm::rms);
  py::class_<MambaLayer>(m, "MambaLayer", "a Mamba mixer and its decode states")
      .def(py::init([](Linear in_proj, at::Tensor conv_state, at::Tensor conv_weight, Opt conv_bias, Linear x_proj,
                       Linear dt_proj, at::Tensor A, at::Tensor D, at::Tensor ssm_state, Linear out_proj, bool memory) {
             return MambaLayer{in_proj, x_proj, dt_proj, out_proj, conv_state, conv_weight, or_empty(conv_bias),
                               A, D, ssm_state, memory};
           }),
           py::arg("in_proj"), py::arg("conv_state"), py::arg("conv_weight"), py::arg("conv_bias") = py::none(),
           py::arg("x_proj"), py::arg("dt_proj"), py::arg("A"), py::arg("D"), py::arg("ssm_state"),
           py::arg("out_proj"), py::arg("memory") = false)
      .def_readonly("memory", &MambaLayer::memory);
  py::class_<GmuLayer>(m, "GmuLayer", "a gated memory unit")
      .def(py::init([](Linear in_proj, Linear out_proj) { return GmuLayer{in_proj, out_proj}; }),
           py::arg("in_proj"), py::arg("out_proj"));
  py::class_<AttentionLayer>(m, "AttentionLayer", "an attention mixer: its projections, caches and constants")
      .def(py::init([](Linear qkv_proj, Linear out_proj, int64_t heads, int64_t key_set, Opt k_cache, Opt v_cache,
                       Opt keys, Opt values, Opt subln_weight, double lam, double subln_eps, double scale,
                       int64_t rotary_dim) {
             return AttentionLayer{qkv_proj, out_proj, heads, or_empty(k_cache), or_empty(v_cache), or_empty(keys),
                                   or_empty(values), or_empty(subln_weight), lam, subln_eps, scale, key_set,
                                   rotary_dim};
           }),
           py::arg("qkv_proj"), py::arg("out_proj"), py::arg("heads"), py::arg("key_set"),
           py::arg("k_cache") = py::none(), py::arg("v_cache") = py::none(), py::arg("keys") = py::none(),
           py::arg("values") = py::none(), py::arg("subln_weight") = py::none(), py::arg("lam") = 0.0,
           py::arg("subln_eps") = 0.0, py::arg("scale") = 1.0, py::arg("rotary_dim") = 0)
      .def_readonly("heads", &AttentionLayer::heads)
      .def_readonly("rotary_dim", &AttentionLayer::rotary_dim)
      .def_readonly("key_set", &AttentionLayer::key_set);
  py::class_<KeySet>(m, "KeySet", "what attention layers read this step: slot, mask, key and value views")
      .def(py::init([](at::Tensor slot, at::Tensor valid, Opt keys, Opt values, Opt cos, Opt sin) {
             return KeySet{slot, valid, or_empty(keys), or_empty(values), or_empty(cos), or_empty(sin)};
           }),
           py::arg("slot"), py::arg("valid"), py::arg("keys") = py::none(), py::arg("values") = py::none(),
           py::arg("cos") = py::none(), py::arg("sin") = py::none());
  py::class_<LayerRecord>(m, "LayerRecord", "a decoder layer: norms, the SwiGLU MLP and the mixer")
      .def(py::init([](Norm input_norm, Norm post_norm, Linear fc1, Linear fc2,
                       std::variant<MambaLayer, GmuLayer, AttentionLayer> mixer) {
             return LayerRecord{input_norm, post_norm, fc1, fc2, std::move(mixer)};
           }),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("fc1"), py::arg("fc2"), py::arg("mixer"))
      .def_readonly("input_norm", &LayerRecord::input_norm)
      .def_readonly("post_norm", &LayerRecord::post_norm)
      .def_readonly("fc1", &LayerRecord::fc1)
      .def_readonly("fc2", &LayerRecord::fc2)
      .def_property_readonly("mixer", [](const LayerRecord& r) { return r.mixer; });
  py::class_<DecodePlan>(m, "DecodePlan", "a decode step's layer stack, checked once")
      .def(py::init<std::vector<LayerRecord>>(), py::arg("layers"))
      .def("run", &DecodePlan::run, py::arg("h"), py::arg("key_sets"))
      .def("__len__", [](const DecodePlan& p) { return p.layers().size(); });

  m.def("norm_step", &norm_step, "decode block: residual add and the record's norm (layer or RMS)",
        py::arg("h"), py::arg("delta"), py::arg("norm"));
  m.def("mlp_step", &mlp_step, "decode block: residual add, norm and SwiGLU MLP", py::arg("h"), py::arg("delta"),
        py::arg("norm"), py::arg("fc1"), py::arg("fc2"));
  m.def("gmu_step", &gmu_step, "decode block: gated memory unit", py::arg("x"), py::arg("memory"), py::arg("layer"));
  m.def("mamba_step", &mamba_step, "decode block: Mamba mixer for one token per row", py::arg("x"),
        py::arg("layer"));
  m.def("attention_step", &attention_step, "decode block: attention for one token per row", py::arg("x"),
        py::arg("layer"), py::arg("keys"));
  m.def("decode_layers", &decode_layers, "a decode step's whole layer stack: plan.run(h, key_sets)",
        py::arg("plan"), py::arg("h"), py::arg("key_sets"));
}
