// What the engine needs from a model family, and nothing else: its weight-bearing modules, each one's
// parameter registry, placement and layerwise offload, loading, and generation. The actors, the HTTP
// API and the apps only ever see this interface; a family is chosen by model_index.json's _class_name
// (open_pipeline). How to add one: docs/architecture.md.
#pragma once

#include <atomic>
#include <cstdint>
#include <filesystem>
#include <memory>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include <ATen/core/Tensor.h>

#include <map>

#include "pipeline/models/placement.hpp"
#include "pipeline/sampling/flow_rollout.hpp"

namespace refit::models {
class layer_offload;
class tensor_registry;
}  // namespace refit::models

namespace refit::weights {
class device_loader;
struct model_layout;
}  // namespace refit::weights

namespace refit::pipeline {

// ---------------------------------------------------------------------------------------------
// Generation

// Layerwise offload of the DiT's blocks (see models::layer_offload).
struct offload_settings {
  bool enabled = false;      // refit serve --dit-layerwise-offload
  double prefetch_size = 1;  // blocks copied ahead (>= 1), or a fraction (0, 1) of the blocks
};

// TeaCache for one request; the state lives with the request, one per CFG branch.
struct teacache_settings {
  bool enabled = false;
  std::optional<double> threshold;  // else the pipeline's configured threshold
};

// What TeaCache did in one CFG branch of a request, step by step.
struct teacache_trace {
  std::vector<double> rel_l1;  // relative L1 change of the first block's modulated input (NaN on step 0)
  std::vector<bool> skipped;   // blocks skipped, residual reused
};

struct generation_stats {
  std::vector<teacache_trace> teacache;  // with TeaCache: conditional branch, then unconditional under CFG
  int64_t dit_calls = 0;                 // DiT calls: one per step and branch
  int64_t blocks_skipped = 0;            // calls that reused a residual instead of running the blocks
};

struct generation_params {
  std::vector<std::string> prompts;
  std::string negative_prompt;       // used when guidance applies (undistilled checkpoints)
  int64_t width = 0, height = 0;     // 0: the model's default size
  int64_t steps = 0;                 // 0: the model's default
  double guidance_scale = 4.0;
  uint64_t seed = 0;              // image i (prompt-major) draws its initial noise with seed + i ...
  std::vector<uint64_t> seeds;    // ... unless this gives one seed per image (prompts x images_per_prompt)
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

// ---------------------------------------------------------------------------------------------
// RL rollouts (POST /rollout/generate): generation that records the sampler's trajectory

struct rollout_params {
  generation_params generation;          // one prompt; images_per_prompt samples, sample i drawn with seed + i
  bool rollout = true;                   // false: a plain generation (ODE steps), returned the same way
  sampling::rollout_config sampler;      // SDE type, noise level, stochastic steps, what to keep
  bool denoising_env = false;            // return the DiT's conditioning inputs
};

// One sample of a rollout. Tensors are on the CPU; absent ones are undefined.
struct rollout_sample {
  at::Tensor image;                      // [3, H, W] decoded pixels in [0, 1], fp32
  at::Tensor log_probs;                  // [T] fp32 (0 on ODE steps)
  std::map<std::string, at::Tensor> debug;  // rollout_variance_noises [T, S, C], rollout_prev_sample_means,
                                            // rollout_noise_std_devs [T, 1], rollout_model_outputs
  // The DiT's conditioning: image_kwargs / pos_cond_kwargs / neg_cond_kwargs -> name -> tensors (a
  // tuple as several), and guidance. Empty maps are absent.
  std::map<std::string, std::map<std::string, std::vector<at::Tensor>>> denoising_env;
  at::Tensor guidance;
  at::Tensor trajectory_latents;         // [K, S, C]: the latents entering each kept step (K = T: the final ones)
  at::Tensor trajectory_timesteps;       // [K]
  at::Tensor sigmas;                     // [T + 1]
};

// ---------------------------------------------------------------------------------------------
// The interface

class diffusion_pipeline {
 public:
  virtual ~diffusion_pipeline() = default;

  // model_index.json's _class_name this family implements (e.g. the Diffusers pipeline class).
  virtual std::string_view class_name() const = 0;
  // Weight-bearing modules by component name, in a stable order.
  virtual std::vector<std::string> module_names() const = 0;
  // The module the sampler runs every step and trainers train (the denoiser, one of module_names()):
  // what an update from a trainer targets when it names no module.
  virtual std::string denoiser() const = 0;
  // A module's parameters and buffers under their checkpoint names; throws std::invalid_argument
  // "module 'X' not found in pipeline" for a name module_names() lacks.
  virtual models::tensor_registry& registry(const std::string& module) = 0;
  // The module's layerwise offload when it is on (its offloaded slots live in a host store), else null.
  virtual models::layer_offload* offload(const std::string& module) = 0;
  virtual const models::placement& placement() const = 0;
  // The checkpoint's components as read at construction (classes, folders, weight files).
  virtual const weights::model_layout& layout() const = 0;

  // Strictly loads every weight-bearing module from the model folder (or the given one); on CUDA,
  // through `loader` when one is given.
  virtual void load_weights(const std::optional<std::filesystem::path>& from = std::nullopt,
                            weights::device_loader* loader = nullptr) = 0;

  virtual int64_t default_steps() const = 0;
  // Images for the request; throws std::invalid_argument for parameters the model cannot take and
  // generation_cancelled when params.cancel is raised.
  virtual std::vector<rgb_image> generate(const generation_params& params, generation_stats* stats = nullptr) const = 0;
  // A rollout: the samples with their per-step log-probabilities and what params asks to keep. Throws
  // std::invalid_argument for parameters the model cannot take.
  virtual std::vector<rollout_sample> rollout(const rollout_params& params) const = 0;
};

// The family of the checkpoint at `model_dir` (model_index.json's _class_name), built and placed but
// without weights (call load_weights). Throws std::runtime_error naming the class and the supported
// ones when no family implements it.
std::unique_ptr<diffusion_pipeline> open_pipeline(const std::filesystem::path& model_dir, const models::placement& where,
                                                  const offload_settings& offload = {});

// The _class_name values open_pipeline accepts.
std::vector<std::string> supported_pipeline_classes();

}  // namespace refit::pipeline
