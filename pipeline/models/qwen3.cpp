#include "pipeline/models/qwen3.hpp"

#include "pipeline/models/config_json.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <stdexcept>
#include <type_traits>

namespace refit::models {

using json = nlohmann::json;

qwen3_config qwen3_config::from_file(const std::filesystem::path& path) {
  auto fail = [&path](const std::string& what) { throw std::runtime_error(path.string() + ": " + what); };
  const json j = read_config_json(path);

  // A present, non-null key overrides the default; a value of the wrong type names the key.
  auto get_from = [&fail](const json& obj, const std::string& key, auto& field) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) return false;
    using T = std::decay_t<decltype(field)>;
    const bool ok = std::is_same_v<T, bool> ? it->is_boolean() : std::is_same_v<T, std::string> ? it->is_string() : it->is_number();
    if (!ok) fail("'" + key + "' has the wrong type (" + it->dump() + ")");
    field = it->get<T>();
    return true;
  };
  auto get = [&](const std::string& key, auto& field) { return get_from(j, key, field); };

  std::string model_type = "qwen3", hidden_act = "silu";
  get("model_type", model_type);
  if (model_type != "qwen3") fail("model_type '" + model_type + "' is not a Qwen3 text encoder (expected 'qwen3')");
  get("hidden_act", hidden_act);
  if (hidden_act != "silu") fail("hidden_act '" + hidden_act + "' is not supported (Qwen3's MLP is SwiGLU with 'silu')");

  qwen3_config c;
  get("vocab_size", c.vocab_size);
  get("hidden_size", c.hidden_size);
  get("intermediate_size", c.intermediate_size);
  get("num_hidden_layers", c.num_hidden_layers);
  get("num_attention_heads", c.num_attention_heads);
  // As Qwen3Config: an absent key keeps the class default (32), an explicit null means one KV head per query head.
  if (auto it = j.find("num_key_value_heads"); it != j.end() && it->is_null()) c.num_key_value_heads = c.num_attention_heads;
  get("num_key_value_heads", c.num_key_value_heads);
  get("head_dim", c.head_dim);
  get("max_position_embeddings", c.max_position_embeddings);
  get("rms_norm_eps", c.rms_norm_eps);
  get("tie_word_embeddings", c.tie_word_embeddings);
  get("attention_bias", c.attention_bias);

  // transformers 5 writes {"rope_parameters": {"rope_type", "rope_theta"}}; older configs carry a
  // top-level rope_theta and an optional rope_scaling ({"type"|"rope_type", "factor", ...}).
  get("rope_theta", c.rope_theta);
  for (const char* key : {"rope_scaling", "rope_parameters"}) {
    auto it = j.find(key);
    if (it == j.end() || it->is_null()) continue;
    if (!it->is_object()) fail(std::string("'") + key + "' must be an object or null");
    std::string type = "default";
    get_from(*it, "type", type);
    get_from(*it, "rope_type", type);
    if (type != "default")
      fail(std::string(key) + " requests RoPE type '" + type + "'; only the default (unscaled) RoPE is supported");
    get_from(*it, "rope_theta", c.rope_theta);
  }

  // Sliding-window layers would need a banded mask; Qwen3 text encoders ship without them.
  bool use_sliding_window = false;
  int64_t max_window_layers = 28;
  get("use_sliding_window", use_sliding_window);
  get("max_window_layers", max_window_layers);
  if (auto it = j.find("layer_types"); it != j.end() && !it->is_null()) {
    if (!it->is_array() || static_cast<int64_t>(it->size()) != c.num_hidden_layers)
      fail("'layer_types' must list one type per layer (" + std::to_string(c.num_hidden_layers) + ")");
    for (const auto& t : *it)
      if (t != "full_attention") fail("layer type " + t.dump() + " is not supported (only full_attention)");
  } else if (use_sliding_window && j.value("sliding_window", json(4096)).is_number() && max_window_layers < c.num_hidden_layers) {
    fail("use_sliding_window makes layers " + std::to_string(max_window_layers) + ".." + std::to_string(c.num_hidden_layers - 1) +
         " sliding-window attention, which is not supported");
  }

  const std::pair<const char*, int64_t> sizes[] = {{"vocab_size", c.vocab_size}, {"hidden_size", c.hidden_size},
                                                    {"intermediate_size", c.intermediate_size}, {"num_hidden_layers", c.num_hidden_layers},
                                                    {"num_attention_heads", c.num_attention_heads},
                                                    {"num_key_value_heads", c.num_key_value_heads}, {"head_dim", c.head_dim}};
  for (const auto& [name, v] : sizes)
    if (v <= 0) fail(std::string("'") + name + "' must be positive, got " + std::to_string(v));
  if (c.num_attention_heads % c.num_key_value_heads != 0)
    fail("num_attention_heads " + std::to_string(c.num_attention_heads) + " is not a multiple of num_key_value_heads " +
         std::to_string(c.num_key_value_heads));
  if (c.head_dim % 2 != 0) fail("head_dim must be even for rotary embeddings, got " + std::to_string(c.head_dim));
  return c;
}

qwen3_text_encoder::qwen3_text_encoder(const qwen3_config& c)
    : config_(c), norm(c.hidden_size, c.rms_norm_eps), lm_head(c.hidden_size, c.vocab_size, false) {
  const int64_t H = c.hidden_size, q_dim = c.num_attention_heads * c.head_dim, kv_dim = c.num_key_value_heads * c.head_dim;
  const bool b = c.attention_bias;
  layers_.reserve(static_cast<size_t>(c.num_hidden_layers));
  for (int64_t i = 0; i < c.num_hidden_layers; ++i)
    layers_.push_back({{linear(H, q_dim, b), linear(H, kv_dim, b), linear(H, kv_dim, b), linear(q_dim, H, b),
                        rms_norm(c.head_dim, c.rms_norm_eps), rms_norm(c.head_dim, c.rms_norm_eps)},
                       {linear(H, c.intermediate_size, false), linear(H, c.intermediate_size, false), linear(c.intermediate_size, H, false)},
                       rms_norm(H, c.rms_norm_eps),
                       rms_norm(H, c.rms_norm_eps)});

  // Binding after the vector is complete: the registry keeps pointers to these members.
  const registry_scope model = registry_scope(registry_).sub("model");
  model.sub("embed_tokens").param("weight", embed_tokens, {c.vocab_size, H});
  for (size_t i = 0; i < layers_.size(); ++i) {
    auto& l = layers_[i];
    const registry_scope s = model.sub("layers").sub(i), attn = s.sub("self_attn"), mlp = s.sub("mlp");
    l.self_attn.q_proj.bind(attn.sub("q_proj"));
    l.self_attn.k_proj.bind(attn.sub("k_proj"));
    l.self_attn.v_proj.bind(attn.sub("v_proj"));
    l.self_attn.o_proj.bind(attn.sub("o_proj"));
    l.self_attn.q_norm.bind(attn.sub("q_norm"));
    l.self_attn.k_norm.bind(attn.sub("k_norm"));
    l.mlp.gate_proj.bind(mlp.sub("gate_proj"));
    l.mlp.up_proj.bind(mlp.sub("up_proj"));
    l.mlp.down_proj.bind(mlp.sub("down_proj"));
    l.input_layernorm.bind(s.sub("input_layernorm"));
    l.post_attention_layernorm.bind(s.sub("post_attention_layernorm"));
  }
  norm.bind(model.sub("norm"));
  // Tied checkpoints store no lm_head.weight (transformers drops the tied alias when saving).
  if (!c.tie_word_embeddings) lm_head.bind(registry_scope(registry_).sub("lm_head"));
}

namespace {

at::Tensor rotate_half(const at::Tensor& x) {
  const int64_t half = x.size(-1) / 2;
  return at::cat({-x.slice(-1, half), x.slice(-1, 0, half)}, -1);
}

// transformers' repeat_kv: [B, kv, L, D] -> [B, kv * n_rep, L, D], each KV head repeated n_rep times in place.
at::Tensor repeat_kv(const at::Tensor& x, int64_t n_rep) {
  if (n_rep == 1) return x;
  const auto s = x.sizes();
  return x.unsqueeze(2).expand({s[0], s[1], n_rep, s[2], s[3]}).reshape({s[0], s[1] * n_rep, s[2], s[3]});
}

}  // namespace

at::Tensor qwen3_text_encoder::run_layer(const decoder_layer& layer, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                         const at::Tensor& mask) const {
  const int64_t B = x.size(0), L = x.size(1), hd = config_.head_dim;
  const int64_t n_rep = config_.num_attention_heads / config_.num_key_value_heads;
  const auto& a = layer.self_attn;

  at::Tensor h = layer.input_layernorm(x);
  at::Tensor q = a.q_norm(a.q_proj(h).view({B, L, -1, hd})).transpose(1, 2);  // [B, heads, L, hd]
  at::Tensor k = a.k_norm(a.k_proj(h).view({B, L, -1, hd})).transpose(1, 2);  // [B, kv_heads, L, hd]
  at::Tensor v = a.v_proj(h).view({B, L, -1, hd}).transpose(1, 2);
  q = q * cos + rotate_half(q) * sin;
  k = k * cos + rotate_half(k) * sin;

  // transformers' sdpa_attention_forward: without a mask, SDPA's own causal mask and native GQA
  // (head_dim <= 256); with padding, the explicit boolean mask and repeated KV heads.
  const double scale = std::pow(static_cast<double>(hd), -0.5);
  at::Tensor o;
  if (!mask.defined()) {
    const bool native_gqa = n_rep > 1 && hd <= 256;
    if (!native_gqa) k = repeat_kv(k, n_rep), v = repeat_kv(v, n_rep);
    o = at::scaled_dot_product_attention(q, k, v, std::nullopt, 0.0, /*is_causal=*/true, scale, native_gqa);
  } else {
    o = at::scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask, 0.0, false, scale);
  }
  at::Tensor y = x + a.o_proj(o.transpose(1, 2).reshape({B, L, -1}));

  h = layer.post_attention_layernorm(y);
  return y + layer.mlp.down_proj(at::silu(layer.mlp.gate_proj(h)) * layer.mlp.up_proj(h));
}

// Mirrors diffusers' Flux2KleinPipeline._get_qwen3_prompt_embeds (diffusers 0.42): the encoder runs with
// the tokenizer's attention mask and output_hidden_states=True, use_cache=False; the selected hidden
// states are stacked on dim 1, cast to the encoder's dtype, permuted to [B, L, n, H] and flattened.
at::Tensor qwen3_text_encoder::hidden_state_taps(const at::Tensor& input_ids, const at::Tensor& attention_mask,
                                                 const std::vector<int>& taps) const {
  const auto& c = config_;
  const int64_t n_states = c.num_hidden_layers + 1;  // embeddings + one per layer (the last after the norm)
  if (taps.empty()) throw std::invalid_argument("qwen3 text encoder: no hidden-state taps requested");
  std::vector<int64_t> resolved;
  for (int t : taps) {
    if (t < -n_states || t >= n_states)
      throw std::invalid_argument("qwen3 text encoder: hidden-state tap " + std::to_string(t) + " is outside hidden_states[0.." +
                                  std::to_string(n_states - 1) + "] of a " + std::to_string(c.num_hidden_layers) + "-layer model");
    resolved.push_back(t < 0 ? t + n_states : t);
  }
  const int64_t deepest = *std::max_element(resolved.begin(), resolved.end());

  if (input_ids.dim() != 2 || attention_mask.sizes() != input_ids.sizes())
    throw std::invalid_argument("qwen3 text encoder: input_ids " + c10::str(input_ids.sizes()) + " and attention_mask " +
                                c10::str(attention_mask.sizes()) + " must both be [batch, length]");
  if (at::isFloatingType(input_ids.scalar_type()) || at::isFloatingType(attention_mask.scalar_type()))
    throw std::invalid_argument("qwen3 text encoder: input_ids and attention_mask must be integer tensors");
  const int64_t B = input_ids.size(0), L = input_ids.size(1);
  if (B == 0 || L == 0) throw std::invalid_argument("qwen3 text encoder: empty batch or sequence");
  const auto [lo, hi] = at::aminmax(input_ids);
  if (lo.item<int64_t>() < 0 || hi.item<int64_t>() >= c.vocab_size)
    throw std::invalid_argument("qwen3 text encoder: input_ids hold token ids in [" + std::to_string(lo.item<int64_t>()) + ", " +
                                std::to_string(hi.item<int64_t>()) + "], outside the vocabulary [0, " + std::to_string(c.vocab_size) + ")");

  const at::Device device = embed_tokens.device();
  const auto dtype = embed_tokens.scalar_type();
  at::Tensor h = at::embedding(embed_tokens, input_ids.to(device, at::kLong));  // [B, L, H]

  // Rotary tables as Qwen3RotaryEmbedding: inv_freq in fp32 on the host, positions 0..L-1 for every row
  // (transformers does not shift positions for padding), cos/sin in fp32, then cast to the model dtype.
  const auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor inv_freq = at::pow(c.rope_theta, at::arange(0, c.head_dim, 2, f32) / c.head_dim).reciprocal().to(device);
  at::Tensor freqs = at::arange(L, at::TensorOptions().dtype(at::kLong).device(device)).to(at::kFloat).unsqueeze(-1) * inv_freq;
  at::Tensor emb = at::cat({freqs, freqs}, -1).view({1, 1, L, c.head_dim});
  const at::Tensor cos = emb.cos().to(dtype), sin = emb.sin().to(dtype);

  // create_causal_mask for sdpa: no mask when nothing is padded (SDPA's is_causal), else a boolean
  // [B, 1, L, L] = causal AND key-is-a-token.
  at::Tensor mask;
  const at::Tensor is_token = attention_mask.to(device).to(at::kBool);
  if (!is_token.all().item<bool>()) {
    at::Tensor causal = at::ones({L, L}, at::TensorOptions().dtype(at::kBool).device(device)).tril();
    mask = causal.view({1, 1, L, L}).logical_and(is_token.view({B, 1, 1, L}));
  }

  std::vector<at::Tensor> states(static_cast<size_t>(n_states));
  auto keep = [&](int64_t index, const at::Tensor& t) {
    if (std::find(resolved.begin(), resolved.end(), index) != resolved.end()) states[static_cast<size_t>(index)] = t;
  };
  keep(0, h);
  for (int64_t i = 0; i < std::min(deepest, c.num_hidden_layers); ++i) {
    h = run_layer(layers_[static_cast<size_t>(i)], h, cos, sin, mask);
    // transformers replaces the last layer's output in hidden_states with last_hidden_state (after the norm).
    keep(i + 1, i + 1 == c.num_hidden_layers ? norm(h) : h);
  }

  std::vector<at::Tensor> picked;
  for (int64_t t : resolved) picked.push_back(states[static_cast<size_t>(t)]);
  at::Tensor out = at::stack(picked, 1).to(dtype);  // [B, n, L, H]
  return out.permute({0, 2, 1, 3}).reshape({B, L, static_cast<int64_t>(picked.size()) * c.hidden_size});
}

}  // namespace refit::models
