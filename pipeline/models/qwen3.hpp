// Qwen3ForCausalLM as FLUX.2-klein's text encoder, mirroring transformers' modeling_qwen3.py: RMSNorm
// pre-norm decoder layers with QK RMSNorm, GQA, rotate-half RoPE and a SwiGLU MLP. Member and
// parameter names are the checkpoint's; the registry holds every tensor the checkpoint has, even
// the final norm and lm_head that prompt encoding never runs, so loading and checksums stay strict.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <vector>

#include "pipeline/models/layers.hpp"
#include "pipeline/models/tensor_registry.hpp"

namespace refit::models {

// Defaults are transformers' Qwen3Config class defaults (a key config.json lacks takes them, as in
// transformers): notably head_dim 128, not hidden/heads, and untied embeddings.
struct qwen3_config {
  int64_t vocab_size = 151936;
  int64_t hidden_size = 4096;
  int64_t intermediate_size = 22016;
  int64_t num_hidden_layers = 32;
  int64_t num_attention_heads = 32;
  int64_t num_key_value_heads = 32;  // an explicit null means num_attention_heads
  int64_t head_dim = 128;
  int64_t max_position_embeddings = 32768;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  bool tie_word_embeddings = false;
  bool attention_bias = false;

  // Reads text_encoder/config.json. Rejects what this implementation does not compute (another
  // model_type or activation, RoPE scaling, sliding-window layers) with a message naming the file.
  static qwen3_config from_file(const std::filesystem::path& config_json);
};

class qwen3_text_encoder {
 public:
  explicit qwen3_text_encoder(const qwen3_config& config);
  // The registry points into this object's members.
  qwen3_text_encoder(const qwen3_text_encoder&) = delete;
  qwen3_text_encoder& operator=(const qwen3_text_encoder&) = delete;

  const qwen3_config& config() const { return config_; }
  tensor_registry& registry() { return registry_; }
  const tensor_registry& registry() const { return registry_; }

  // FLUX.2-klein prompt embeddings: input_ids, attention_mask [B, L] integer (mask 1 = token, 0 = pad)
  // -> [B, L, taps.size() * hidden_size] = hidden_states[taps[k]] side by side per token, where
  // hidden_states is transformers' output_hidden_states tuple (0 = embeddings, i = after decoder
  // layer i-1, the last one = after the final norm; negative taps index from the end as in Python).
  // Runs only the decoder layers the largest tap needs.
  at::Tensor hidden_state_taps(const at::Tensor& input_ids, const at::Tensor& attention_mask, const std::vector<int>& taps) const;

 private:
  struct self_attention {
    linear q_proj, k_proj, v_proj, o_proj;
    rms_norm q_norm, k_norm;  // over head_dim, per head
  };
  struct swiglu_mlp {
    linear gate_proj, up_proj, down_proj;
  };
  struct decoder_layer {
    self_attention self_attn;
    swiglu_mlp mlp;
    rms_norm input_layernorm, post_attention_layernorm;
  };

  at::Tensor run_layer(const decoder_layer& layer, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                       const at::Tensor& mask) const;

  qwen3_config config_;
  tensor_registry registry_;
  at::Tensor embed_tokens;  // model.embed_tokens.weight [vocab, hidden]
  std::vector<decoder_layer> layers_;
  rms_norm norm;
  linear lm_head;  // bound only when the embeddings are untied
};

}  // namespace refit::models
