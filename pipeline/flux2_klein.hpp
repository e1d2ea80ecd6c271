// The FLUX.2-klein pipeline (diffusers' Flux2KleinPipeline): Qwen3 prompt embeddings from hidden-state
// taps, flow-matching Euler sampling of the packed latents with the Flux2 DiT (classifier-free guidance
// for undistilled checkpoints), BatchNorm-denormalised latents decoded by the Flux2 VAE.
#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <stdexcept>
#include <filesystem>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/models/model_loader.hpp"
#include "pipeline/pipeline.hpp"
#include "pipeline/sampling/flow_match.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::models {
class flux2_transformer;
class layer_offload;
class qwen3_text_encoder;
class vae_flux2;
class bpe_tokenizer;
}  // namespace refit::models

namespace refit::sampling {
struct teacache_config;
}

namespace refit::weights {
class device_loader;
}

namespace refit::pipeline {

class flux2_klein_pipeline final : public diffusion_pipeline {
 public:
  static constexpr std::string_view pipeline_class = "Flux2KleinPipeline";

  // Reads model_index.json and every component's config and builds the modules, without weights.
  // With offload enabled, the transformer's blocks are held in host memory (models::layer_offload).
  flux2_klein_pipeline(const std::filesystem::path& model_dir, const models::placement& where, const offload_settings& offload = {});
  ~flux2_klein_pipeline() override;

  // diffusion_pipeline
  std::string_view class_name() const override { return pipeline_class; }
  // text_encoder, transformer, vae.
  std::vector<std::string> module_names() const override;
  std::string denoiser() const override { return "transformer"; }
  models::tensor_registry& registry(const std::string& module) override;
  // The transformer's when --dit-layerwise-offload is on.
  models::layer_offload* offload(const std::string& module) override;
  const models::placement& placement() const override { return where_; }
  const weights::model_layout& layout() const override { return layout_; }
  void load_weights(const std::optional<std::filesystem::path>& from = std::nullopt, weights::device_loader* loader = nullptr) override;
  int64_t default_steps() const override { return is_distilled_ ? 4 : 50; }
  std::vector<rgb_image> generate(const generation_params& params, generation_stats* stats = nullptr) const override;
  std::vector<rollout_sample> rollout(const rollout_params& params) const override;

  const std::filesystem::path& model_dir() const { return model_dir_; }
  bool is_distilled() const { return is_distilled_; }
  int64_t vae_scale_factor() const;
  int64_t default_size() const;                   // 128 * vae_scale_factor, like diffusers
  const std::vector<int>& text_taps() const { return taps_; }

  // Prompt embeddings [B, 512, taps * hidden] (chat template, padding to 512, hidden-state taps).
  at::Tensor encode_prompts(const std::vector<std::string>& prompts) const;
  // Initial noise as diffusers draws it, [B, 4 * latent_channels, H/16', W/16'] on the CPU generator.
  at::Tensor initial_noise(int64_t batch, int64_t height, int64_t width, uint64_t seed) const;
  at::Tensor initial_noise(int64_t batch, int64_t height, int64_t width, at::Generator& generator) const;
  // Runs the sampler from `noise` and returns the decoded images in [0, 1], [B, 3, H, W].
  at::Tensor sample(const at::Tensor& noise, const at::Tensor& prompt_embeds, const std::optional<at::Tensor>& negative_embeds,
                    int64_t steps, double guidance_scale, const std::atomic<bool>* cancel = nullptr,
                    const teacache_settings& teacache = {}, generation_stats* stats = nullptr,
                    sampling::flow_rollout* rollout = nullptr) const;

  // TeaCache coefficients and default threshold: transformer/teacache.json when the model has one
  // ({"coefficients": [...], "threshold": x}, fitted to this DiT), else FLUX.1-dev's (see teacache_config).
  const sampling::teacache_config& teacache_config() const { return *teacache_; }

  models::flux2_transformer& transformer() { return *transformer_; }
  // The transformer's layerwise offload; nullptr when it is off.
  models::layer_offload* transformer_offload() { return offload_.get(); }
  models::vae_flux2& vae() { return *vae_; }
  models::qwen3_text_encoder& text_encoder() { return *text_encoder_; }

 private:
  std::filesystem::path model_dir_;
  weights::model_layout layout_;
  models::placement where_;
  bool is_distilled_ = false;
  std::vector<int> taps_;
  sampling::flow_match_config scheduler_;
  std::unique_ptr<models::bpe_tokenizer> tokenizer_;
  std::unique_ptr<models::qwen3_text_encoder> text_encoder_;
  std::unique_ptr<models::flux2_transformer> transformer_;
  std::unique_ptr<models::vae_flux2> vae_;
  std::unique_ptr<sampling::teacache_config> teacache_;
  std::unique_ptr<models::layer_offload> offload_;  // declared after transformer_: it points into it
};

// [B, 3, H, W] in [0, 1] -> 8-bit RGB images, rounded as diffusers' postprocess does.
std::vector<rgb_image> to_rgb_images(const at::Tensor& images);

}  // namespace refit::pipeline
