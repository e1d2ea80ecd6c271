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
#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/sampling/flow_match.hpp"

namespace refit::models {
class flux2_transformer;
class layer_offload;
struct teacache_config;
class qwen3_text_encoder;
class vae_flux2;
class bpe_tokenizer;
}  // namespace refit::models

namespace refit::weights {
class device_loader;
}

namespace refit::pipeline {

// Layerwise offload of the DiT's blocks (see models::layer_offload).
struct offload_settings {
  bool enabled = false;      // refit serve --dit-layerwise-offload
  double prefetch_size = 1;  // blocks copied ahead (>= 1), or a fraction (0, 1) of the blocks
};

// TeaCache for one request; the state lives with the request, one per CFG branch.
struct teacache_settings {
  bool enabled = false;
  std::optional<double> threshold;  // else the pipeline's teacache_config().threshold
};

// What TeaCache did in one CFG branch of a request, step by step.
struct teacache_trace {
  std::vector<double> rel_l1;  // relative L1 change of block 0's modulated input (NaN on step 0)
  std::vector<bool> skipped;   // blocks skipped, residual reused
};

struct generation_stats {
  std::vector<teacache_trace> teacache;  // with TeaCache: conditional branch, then unconditional under CFG
  int64_t transformer_calls = 0;         // one per step and branch
  int64_t blocks_skipped = 0;            // calls that reused a residual instead of running the blocks
};

struct generation_params {
  std::vector<std::string> prompts;
  std::string negative_prompt;       // used when guidance applies (undistilled checkpoints)
  int64_t width = 0, height = 0;     // 0: the model's default size
  int64_t steps = 0;                 // 0: 4 for distilled checkpoints, 50 otherwise
  double guidance_scale = 4.0;
  uint64_t seed = 0;
  int64_t images_per_prompt = 1;
  // Checked between sampling steps: when it reads true, generation stops with generation_cancelled.
  const std::atomic<bool>* cancel = nullptr;
  teacache_settings teacache;
};

struct generation_cancelled : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct rgb_image {
  int64_t width = 0, height = 0;
  std::vector<uint8_t> pixels;  // row-major RGB, 8 bits per channel
};

class flux2_klein_pipeline {
 public:
  // Reads model_index.json and every component's config and builds the modules, without weights.
  // With offload enabled, the transformer's blocks are held in host memory (models::layer_offload).
  flux2_klein_pipeline(const std::filesystem::path& model_dir, const models::placement& where, const offload_settings& offload = {});
  ~flux2_klein_pipeline();

  // Strictly loads every weight-bearing module from the model folder (or the given one); on CUDA,
  // through `loader` when one is given.
  void load_weights(const std::optional<std::filesystem::path>& from = std::nullopt, weights::device_loader* loader = nullptr);

  // Weight-bearing modules by component name: text_encoder, transformer, vae.
  std::vector<std::string> module_names() const;
  models::tensor_registry& registry(const std::string& module);
  const std::filesystem::path& model_dir() const { return model_dir_; }
  // The checkpoint's components as read at construction (classes, folders, weight files).
  const weights::model_layout& layout() const { return layout_; }
  const models::placement& placement() const { return where_; }

  bool is_distilled() const { return is_distilled_; }
  int64_t default_steps() const { return is_distilled_ ? 4 : 50; }
  int64_t vae_scale_factor() const;
  int64_t default_size() const;                   // 128 * vae_scale_factor, like diffusers
  const std::vector<int>& text_taps() const { return taps_; }

  // Prompt embeddings [B, 512, taps * hidden] (chat template, padding to 512, hidden-state taps).
  at::Tensor encode_prompts(const std::vector<std::string>& prompts) const;
  // Initial noise as diffusers draws it, [B, 4 * latent_channels, H/16', W/16'] on the CPU generator.
  at::Tensor initial_noise(int64_t batch, int64_t height, int64_t width, uint64_t seed) const;
  // Runs the sampler from `noise` and returns the decoded images in [0, 1], [B, 3, H, W].
  at::Tensor sample(const at::Tensor& noise, const at::Tensor& prompt_embeds, const std::optional<at::Tensor>& negative_embeds,
                    int64_t steps, double guidance_scale, const std::atomic<bool>* cancel = nullptr,
                    const teacache_settings& teacache = {}, generation_stats* stats = nullptr) const;
  std::vector<rgb_image> generate(const generation_params& params, generation_stats* stats = nullptr) const;

  // TeaCache coefficients and default threshold: transformer/teacache.json when the model has one
  // ({"coefficients": [...], "threshold": x}, fitted to this DiT), else FLUX.1-dev's (see teacache_config).
  const models::teacache_config& teacache_config() const { return *teacache_; }

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
  std::unique_ptr<models::teacache_config> teacache_;
  std::unique_ptr<models::layer_offload> offload_;  // declared after transformer_: it points into it
};

// [B, 3, H, W] in [0, 1] -> 8-bit RGB images, rounded as diffusers' postprocess does.
std::vector<rgb_image> to_rgb_images(const at::Tensor& images);

}  // namespace refit::pipeline
