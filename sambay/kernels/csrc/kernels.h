// Everything the native extension exports, as bindings.cpp binds it. Each function has a PyTorch
// twin: the GEMV references in sambay/kernels/native.py, the attention, SSM and glue references in
// sambay/ops, and the decode blocks' are the model's own modules (sambay/models).
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <variant>
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

// gemv_q4.cpp: 4-bit weights (sambay.quant.int4's layout) x int8 activations; path "" = the fastest.
at::Tensor gemv_q4(at::Tensor x, at::Tensor packed, at::Tensor scales, at::Tensor bias, std::string path);
std::vector<std::string> q4_paths();

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
std::vector<at::Tensor> add_rms_norm(at::Tensor h, at::Tensor delta, at::Tensor w, double eps);
void rope_rows(at::Tensor x, int64_t heads, int64_t head_dim, at::Tensor cos, at::Tensor sin);
at::Tensor silu_mul(at::Tensor a, at::Tensor b);
at::Tensor conv_step(at::Tensor x, at::Tensor state, at::Tensor w, at::Tensor b);
at::Tensor diff_combine(at::Tensor o, double lam, at::Tensor w, double eps, double scale);
void kv_write(at::Tensor kv, at::Tensor kc, at::Tensor vc, at::Tensor slot, bool diff);

// ---- decode.cpp: the decode blocks and a whole step's layer stack, over typed records -------------
// plan.py builds the records once per decode state's rows, by field name; tensors marked "or empty"
// are a 0-element tensor where the layer has none.

struct Linear {  // a PackedLinear: y = x @ weight.T * scale + bias
  at::Tensor weight;  // (N, K) float32 / bfloat16 / int8, or int8 in 4-row tiles (gemv's layouts),
                      // or uint8 4-bit blocks (gemv_q4's layout)
  at::Tensor scale;   // (N,) float32, or empty; float16 group scales for 4-bit weights
  at::Tensor bias;    // (N,) float32, or empty
};

struct Norm {  // a LayerNorm, or (rms) Phi-3's RMSNorm: weight * (x * rsqrt(mean(x^2) + eps))
  at::Tensor weight, bias;  // (d,) float32; bias or empty (always empty for rms)
  double eps = 1e-5;
  bool rms = false;
};

struct MambaLayer {
  Linear in_proj, x_proj, dt_proj, out_proj;
  at::Tensor conv_state;   // (B, K-1, e), updated in place
  at::Tensor conv_weight;  // (e, K) float32
  at::Tensor conv_bias;    // (e,) float32, or empty
  at::Tensor A;            // -exp(A_log) (e, n) float32
  at::Tensor D;            // (e,) float32
  at::Tensor ssm_state;    // (B, e, n) float32, updated in place
  bool memory = false;     // the layer whose SSM output the GMU layers gate with
};

struct GmuLayer {
  Linear in_proj, out_proj;
};

struct AttentionLayer {
  Linear qkv_proj, out_proj;
  int64_t heads = 0;               // query heads
  at::Tensor k_cache, v_cache;     // written at the key set's slot; empty: cross-attention
  at::Tensor keys, values;         // this layer's own key and value views (a ring buffer's); empty: the key set's
  at::Tensor subln_weight;         // differential attention's sub-layer norm (dv,); empty: plain attention
  double lam = 0, subln_eps = 0, scale = 1;  // differential attention's lambda, norm eps, output scale
  int64_t key_set = 0;             // which of the step's key sets the layer reads
  int64_t rotary_dim = 0;          // RoPE on the first rotary_dim dims of q and k (the key set's cos/sin); 0: none
};

struct KeySet {  // what one or more attention layers read this step
  at::Tensor slot;    // (B,) int64: the cache position each row writes
  at::Tensor valid;   // (B, S) bool
  at::Tensor keys;    // (B, G, Hk, S, dk) grouped view, or empty (the layers keep their own)
  at::Tensor values;  // (B, Hk, S, dv) or in column blocks, or empty
  at::Tensor cos, sin;  // (B, rotary_dim) float32: RoPE at each row's position (Phi3), or empty
};

struct LayerRecord {  // a decoder layer: norm, mixer, norm, SwiGLU MLP
  Norm input_norm, post_norm;
  Linear fc1, fc2;
  std::variant<MambaLayer, GmuLayer, AttentionLayer> mixer;
};

// A decode step's layer stack, checked once when built; run(h, key_sets) -> the residual stream
// after the last layer (the final norm is the caller's).
class DecodePlan {
 public:
  explicit DecodePlan(std::vector<LayerRecord> layers);
  at::Tensor run(at::Tensor h, const std::vector<KeySet>& key_sets) const;
  const std::vector<LayerRecord>& layers() const { return layers_; }

 private:
  std::vector<LayerRecord> layers_;
};

std::vector<at::Tensor> norm_step(at::Tensor h, at::Tensor delta, const Norm& norm);
at::Tensor mlp_step(at::Tensor h, at::Tensor delta, const Norm& norm, const Linear& fc1, const Linear& fc2);
at::Tensor gmu_step(at::Tensor x, at::Tensor memory, const GmuLayer& layer);
std::vector<at::Tensor> mamba_step(at::Tensor x, const MambaLayer& layer);
at::Tensor attention_step(at::Tensor x, const AttentionLayer& layer, const KeySet& keys);
at::Tensor decode_layers(const DecodePlan& plan, at::Tensor h, const std::vector<KeySet>& key_sets);
