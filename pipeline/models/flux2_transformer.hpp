// Flux2Transformer2DModel (FLUX.2 DiT), mirroring diffusers' transformer_flux2.py: double-stream blocks,
// single-stream (parallel) blocks, shared modulation, SwiGLU, QK RMSNorm, 4-axis RoPE, text-then-image
// joint sequence. Member and parameter names are the checkpoint's.
#pragma once

#include <ATen/core/Tensor.h>

#include <filesystem>
#include <optional>
#include <vector>

#include "pipeline/models/layers.hpp"
#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/sampling/teacache.hpp"

namespace refit::models {

struct flux2_config {
  int64_t patch_size = 1;
  int64_t in_channels = 128;
  int64_t out_channels = 128;
  int64_t num_layers = 8;
  int64_t num_single_layers = 48;
  int64_t attention_head_dim = 128;
  int64_t num_attention_heads = 48;
  int64_t joint_attention_dim = 15360;
  int64_t timestep_guidance_channels = 256;
  double mlp_ratio = 3.0;
  std::vector<int64_t> axes_dims_rope{32, 32, 32, 32};
  double rope_theta = 2000;
  double eps = 1e-6;
  bool guidance_embeds = true;  // the class default; Klein configs say false

  // Reads transformer/config.json; keys it lacks take the class defaults, like diffusers.
  static flux2_config from_file(const std::filesystem::path& config_json);
  int64_t inner_dim() const { return num_attention_heads * attention_head_dim; }
  int64_t mlp_hidden_dim() const { return static_cast<int64_t>(static_cast<double>(inner_dim()) * mlp_ratio); }
};

class layer_offload;

class flux2_transformer {
 public:
  explicit flux2_transformer(const flux2_config& config);
  flux2_transformer(const flux2_transformer&) = delete;
  flux2_transformer& operator=(const flux2_transformer&) = delete;

  const flux2_config& config() const { return config_; }
  tensor_registry& registry() { return registry_; }
  const tensor_registry& registry() const { return registry_; }

  // hidden_states [B, S_img, in_channels], encoder_hidden_states [B, S_txt, joint_attention_dim],
  // timestep [B] = sigma (the pipeline's t/1000), img_ids [S_img, 4], txt_ids [S_txt, 4]
  // -> velocity [B, S_img, patch² · out_channels]. With `cache`, one TeaCache step of that state's
  // branch: the blocks may be skipped; without it the computation is exactly the uncached one.
  at::Tensor forward(const at::Tensor& hidden_states, const at::Tensor& encoder_hidden_states, const at::Tensor& timestep,
                     const at::Tensor& img_ids, const at::Tensor& txt_ids,
                     const std::optional<at::Tensor>& guidance = std::nullopt, sampling::teacache_state* cache = nullptr) const;

  // The blocks in execution order as registry prefixes (double-stream, then single-stream): the
  // units of layerwise offload.
  std::vector<std::string> block_prefixes() const;
  // With an offload, forward() acquires each block from it before running the block and releases it
  // after; the offload must outlive its use here. nullptr: every weight is resident.
  void set_offload(layer_offload* offload) { offload_ = offload; }
  layer_offload* offload() const { return offload_; }

  // Rotary tables (cos, sin), each [S, attention_head_dim], for position ids [S, n_axes].
  std::pair<at::Tensor, at::Tensor> rope(const at::Tensor& ids) const;

 private:
  struct feed_forward {
    linear linear_in, linear_out;
    at::Tensor operator()(const at::Tensor& x) const;
  };
  struct double_block {
    linear to_q, to_k, to_v, to_out_0, add_q_proj, add_k_proj, add_v_proj, to_add_out;
    at::Tensor norm_q, norm_k, norm_added_q, norm_added_k;  // RMSNorm scales [head_dim]
    feed_forward ff, ff_context;
  };
  struct single_block {
    linear to_qkv_mlp_proj, to_out;
    at::Tensor norm_q, norm_k;
  };

  at::Tensor time_embedding(const at::Tensor& t, const linear& l1, const linear& l2) const;
  at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       const at::Tensor& rotary) const;
  void run_double(const double_block& b, at::Tensor& x, at::Tensor& c, const std::vector<at::Tensor>& mod_img,
                  const std::vector<at::Tensor>& mod_txt, const at::Tensor& rotary) const;
  void run_single(const single_block& b, at::Tensor& h, const std::vector<at::Tensor>& mod,
                  const at::Tensor& rotary) const;

  flux2_config config_;
  tensor_registry registry_;
  linear time_linear_1, time_linear_2, guidance_linear_1, guidance_linear_2;
  linear mod_img, mod_txt, mod_single;
  linear x_embedder, context_embedder;
  std::vector<double_block> blocks_;
  std::vector<single_block> single_blocks_;
  linear norm_out_linear, proj_out;
  layer_offload* offload_ = nullptr;
};

}  // namespace refit::models
