// A decode step's blocks, each one native call for one token per row, and DecodePlan, a whole step's
// layer stack in one call.
//
// The blocks run exactly in the order of the model's modules (which are their reference: the tests
// run a decode step both ways), so that a decode step makes a few native calls per layer, or one,
// instead of dozens of small PyTorch ones. Their arguments are the typed records of kernels.h, which
// sambay/kernels/plan.py builds by field name once per decode state's rows; per step only the key
// sets (slot, mask, the growing cache's view) are new.

#include <ATen/ATen.h>

#include <utility>
#include <variant>

#include "kernels.h"

namespace {

at::Tensor linear(const Linear& l, const at::Tensor& x) {
  if (l.weight.scalar_type() == at::kByte) return gemv_q4(x, l.weight, l.scale, l.bias, "");  // 4-bit
  return gemv(x, l.weight, l.scale, 0, l.bias);
}

}  // namespace

// {h + delta, norm(h + delta)}: a LayerNorm (SambaY) or an RMSNorm (Phi3). delta may be empty.
std::vector<at::Tensor> norm_step(at::Tensor h, at::Tensor delta, const Norm& norm) {
  if (norm.rms) return add_rms_norm(h, delta, norm.weight, norm.eps);
  return add_layer_norm(h, delta, norm.weight, norm.bias, norm.eps);
}

// h + delta -> norm -> fc1 -> silu(gate) * up -> fc2, added to h + delta. h, delta (B, d).
at::Tensor mlp_step(at::Tensor h, at::Tensor delta, const Norm& norm, const Linear& fc1, const Linear& fc2) {
  auto hx = norm_step(h, delta, norm);
  const auto gu = linear(fc1, hx[1]);
  const int64_t n = gu.size(1) / 2;
  const auto y = linear(fc2, silu_mul(gu.narrow(1, 0, n), gu.narrow(1, n, n)));
  const auto hc = hx[0].contiguous();
  auto out = delta.numel() ? hc : at::empty_like(y);  // without delta hx[0] is the caller's h
  const float *hp = hc.data_ptr<float>(), *yp = y.data_ptr<float>();
  float* op = out.data_ptr<float>();
  for (int64_t i = 0; i < y.numel(); ++i) op[i] = hp[i] + yp[i];  // (an ATen add costs ~10x more here)
  return out;
}

// The gated memory unit: out_proj(silu(in_proj(x)) * memory). x (B, d), memory (B, e).
at::Tensor gmu_step(at::Tensor x, at::Tensor memory, const GmuLayer& layer) {
  return linear(layer.out_proj, silu_mul(linear(layer.in_proj, x), memory));
}

// Mamba for one token per row: x (B, d) -> {out (B, d), y (B, e)}, conv and SSM states updated in
// place. dt_proj's rank is its input width.
std::vector<at::Tensor> mamba_step(at::Tensor x, const MambaLayer& m) {
  const auto xz = linear(m.in_proj, x);
  const auto& w = m.dt_proj.weight;
  const int64_t e = xz.size(1) / 2, n = m.A.size(1);
  const int64_t r = w.dim() == 4 ? w.size(1) * w.size(3) : w.size(1);  // int8 tiles: (N/4, K/64, 4, 64)
  const auto xc = conv_step(xz.narrow(1, 0, e), m.conv_state, m.conv_weight, m.conv_bias);
  const auto dbc = linear(m.x_proj, xc);
  const auto dt = at::softplus(linear(m.dt_proj, dbc.narrow(1, 0, r)), 1, 20);
  auto y = ssm_step(xc, dt, m.A, dbc.narrow(1, r, n), dbc.narrow(1, r + n, n), m.D, m.ssm_state);
  return {linear(m.out_proj, silu_mul(xz.narrow(1, e, e), y)), y};
}

// Attention for one token per row: x (B, d) -> out_proj(attention(q, K, V)), (B, d).
// qkv_proj gives the query heads of width hd (then, for self-attention, the new keys and values,
// written into the caches at the key set's slot before attending; cross-attention has no caches).
// The keys (B, G, Hk, S, dk) are the views each query group attends with and the values (B, Hk, S, dv)
// (differential: maybe in column blocks, (B, Hk, nb, S, vb), as decode_diff_attention takes them):
// the layer's own (a ring buffer's view, made once) or else the key set's. Differential attention
// (G = 2, subln_weight given): query head 2i + G' belongs to group G' (as the model's attention splits
// them); decode_diff_attention gives a1 - lam a2, which diff_combine normalizes. Plain (G = 1): the
// heads' outputs side by side. rotary_dim > 0 (Phi3): the query heads and the new keys are rotated
// by the key set's cos/sin (each row's position) before the keys are written.
at::Tensor attention_step(at::Tensor x, const AttentionLayer& a, const KeySet& keys) {
  const bool diff = a.subln_weight.numel() > 0, own = a.keys.numel() > 0, writes = a.k_cache.numel() > 0;
  const auto& k = own ? a.keys : keys.keys;
  const auto& v = own ? a.values : keys.values;
  TORCH_CHECK(k.dim() == 5 && k.size(1) == (diff ? 2 : 1), "attention_step: keys must be (B, G, Hk, S, dk)");
  const int64_t B = x.size(0), G = k.size(1), Hk = k.size(2), dk = k.size(4), H = a.heads;
  TORCH_CHECK(H % (G * Hk) == 0, "attention_step: query heads must divide among the key heads");
  const int64_t g = H / (G * Hk);
  const auto qkv = linear(a.qkv_proj, x);
  if (a.rotary_dim > 0) {
    TORCH_CHECK(!diff && keys.cos.dim() == 2 && keys.cos.size(1) == a.rotary_dim,
                "attention_step: a rotary layer needs its key set's cos/sin (B, rotary_dim)");
    rope_rows(qkv, H + (writes ? Hk : 0), dk, keys.cos, keys.sin);  // q heads, then the new key heads
  }
  if (writes) kv_write(qkv.narrow(1, H * dk, qkv.size(1) - H * dk), a.k_cache, a.v_cache, keys.slot, diff);
  auto q = qkv.narrow(1, 0, H * dk);
  q = diff ? q.view({B, H / 2, 2, dk}).permute({0, 2, 1, 3}).reshape({B, 2, Hk, g, dk})
           : q.view({B, 1, Hk, g, dk});
  if (!diff) return linear(a.out_proj, decode_attention(q, k, v, keys.valid).reshape({B, -1}));  // (B, 1, Hk, g, dv)
  return linear(a.out_proj, diff_combine(decode_diff_attention(q, k, v, keys.valid, a.lam), a.lam, a.subln_weight,
                                         a.subln_eps, a.scale));
}

// ---- a whole decode step's layers in one call -------------------------------------------------------

DecodePlan::DecodePlan(std::vector<LayerRecord> layers) : layers_(std::move(layers)) {
  bool memory = false;
  for (size_t i = 0; i < layers_.size(); ++i) {
    const auto& mixer = layers_[i].mixer;
    if (const auto* m = std::get_if<MambaLayer>(&mixer)) memory = memory || m->memory;
    TORCH_CHECK(!std::holds_alternative<GmuLayer>(mixer) || memory,
                "DecodePlan: GMU layer ", i, " comes before the memory Mamba layer it reads");
    if (const auto* a = std::get_if<AttentionLayer>(&mixer))
      TORCH_CHECK(a->key_set >= 0 && a->heads > 0, "DecodePlan: attention layer ", i, " has no key set or heads");
  }
}

// Per layer, the decoder layer's decode path: norm, mixer block, mlp_step, exactly as the modules call
// them. key_sets: this step's, indexed by AttentionLayer.key_set. Returns the residual stream after the
// last layer (B, d); the final norm is the caller's.
at::Tensor DecodePlan::run(at::Tensor h, const std::vector<KeySet>& key_sets) const {
  at::Tensor memory;
  const auto empty = h.new_empty({0});
  for (const auto& layer : layers_) {
    const auto x = norm_step(h, empty, layer.input_norm)[1];
    at::Tensor mixed;
    if (const auto* m = std::get_if<MambaLayer>(&layer.mixer)) {
      auto r = mamba_step(x, *m);
      mixed = r[0];
      if (m->memory) memory = r[1];
    } else if (const auto* g = std::get_if<GmuLayer>(&layer.mixer)) {
      mixed = gmu_step(x, memory, *g);
    } else {
      const auto& a = std::get<AttentionLayer>(layer.mixer);
      TORCH_CHECK(a.key_set < static_cast<int64_t>(key_sets.size()), "DecodePlan.run: no key set ", a.key_set);
      mixed = attention_step(x, a, key_sets[a.key_set]);
    }
    h = mlp_step(h, mixed, layer.post_norm, layer.fc1, layer.fc2);
  }
  return h;
}

at::Tensor decode_layers(const DecodePlan& plan, at::Tensor h, const std::vector<KeySet>& key_sets) {
  return plan.run(std::move(h), key_sets);
}
