#include "pipeline/flux2_klein.hpp"

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/InferenceMode.h>
#include <nlohmann/json.hpp>

#include <stdexcept>

#include "pipeline/models/config_json.hpp"
#include "pipeline/models/flux2_transformer.hpp"
#include "pipeline/models/layer_offload.hpp"
#include "pipeline/models/qwen3.hpp"
#include "pipeline/models/tokenizer.hpp"
#include "pipeline/models/vae_flux2.hpp"
#include "pipeline/weights/diffusers_layout.hpp"

namespace refit::pipeline {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

// Position ids (T, H, W, L): image tokens (0, h, w, 0) row-major, text tokens (0, 0, 0, l).
at::Tensor latent_ids(int64_t h, int64_t w) {
  auto i64 = at::TensorOptions().dtype(at::kLong);
  return at::cartesian_prod({at::zeros({1}, i64), at::arange(h, i64), at::arange(w, i64), at::zeros({1}, i64)});
}

at::Tensor text_ids(int64_t length) {
  auto i64 = at::TensorOptions().dtype(at::kLong);
  return at::cartesian_prod({at::zeros({1}, i64), at::zeros({1}, i64), at::zeros({1}, i64), at::arange(length, i64)});
}

}  // namespace

flux2_klein_pipeline::flux2_klein_pipeline(const fs::path& model_dir, const models::placement& where, const offload_settings& offload)
    : model_dir_(model_dir), where_(where) {
  layout_ = weights::read_model_layout(model_dir);
  const weights::model_layout& layout = layout_;
  model_dir_ = layout.root;
  for (const char* needed : {"scheduler", "text_encoder", "tokenizer", "transformer", "vae"})
    if (!layout.find(needed))
      throw std::runtime_error(model_dir_.string() + ": model_index.json has no '" + needed + "' component (a FLUX.2-klein pipeline needs it)");
  const json index = models::read_config_json(model_dir_ / "model_index.json");
  is_distilled_ = index.value("is_distilled", false);

  scheduler_ = sampling::flow_match_config::from_file(model_dir_ / "scheduler" / "scheduler_config.json");
  tokenizer_ = std::make_unique<models::bpe_tokenizer>(models::bpe_tokenizer::from_file(model_dir_ / "tokenizer" / "tokenizer.json"));
  const auto te_config = models::qwen3_config::from_file(model_dir_ / "text_encoder" / "config.json");
  text_encoder_ = std::make_unique<models::qwen3_text_encoder>(te_config);
  const auto dit_config = models::flux2_config::from_file(model_dir_ / "transformer" / "config.json");
  transformer_ = std::make_unique<models::flux2_transformer>(dit_config);
  vae_ = std::make_unique<models::vae_flux2>(models::vae_flux2_config::from_file(model_dir_ / "vae" / "config.json"));
  const fs::path teacache_json = model_dir_ / "transformer" / "teacache.json";
  teacache_ = std::make_unique<sampling::teacache_config>(fs::exists(teacache_json) ? sampling::teacache_config::from_file(teacache_json)
                                                                                     : sampling::teacache_config{});

  // The DiT consumes n hidden-state taps of the text encoder concatenated per token; Klein takes them
  // evenly spaced (layers 9, 18, 27 of Qwen3-4B's 36), so n and the spacing follow from the configs.
  const int64_t hidden = te_config.hidden_size;
  if (dit_config.joint_attention_dim % hidden != 0)
    throw std::runtime_error(model_dir_.string() + ": transformer joint_attention_dim " + std::to_string(dit_config.joint_attention_dim) +
                             " is not a multiple of the text encoder's hidden_size " + std::to_string(hidden));
  const int64_t n = dit_config.joint_attention_dim / hidden, layers = te_config.num_hidden_layers;
  if (layers % (n + 1) != 0)
    throw std::runtime_error(model_dir_.string() + ": cannot place " + std::to_string(n) + " evenly spaced text-encoder taps in " +
                             std::to_string(layers) + " layers");
  for (int64_t k = 1; k <= n; ++k) taps_.push_back(static_cast<int>(k * layers / (n + 1)));
  if (dit_config.in_channels != 4 * vae_->config().latent_channels)
    throw std::runtime_error(model_dir_.string() + ": transformer in_channels must be 4 x the VAE's latent_channels");
  if (offload.enabled) {
    offload_ = std::make_unique<models::layer_offload>(transformer_->registry(), transformer_->block_prefixes(), where_.device,
                                                       where_.float_dtype, offload.prefetch_size);
    transformer_->set_offload(offload_.get());
  }
}

flux2_klein_pipeline::~flux2_klein_pipeline() = default;

std::vector<std::string> flux2_klein_pipeline::module_names() const { return {"text_encoder", "transformer", "vae"}; }

models::tensor_registry& flux2_klein_pipeline::registry(const std::string& module) {
  if (module == "text_encoder") return text_encoder_->registry();
  if (module == "transformer") return transformer_->registry();
  if (module == "vae") return vae_->registry();
  throw std::invalid_argument("module '" + module + "' not found in pipeline");
}

models::layer_offload* flux2_klein_pipeline::offload(const std::string& module) {
  registry(module);  // an unknown module is an error, not "no offload"
  return module == "transformer" ? offload_.get() : nullptr;
}

void flux2_klein_pipeline::load_weights(const std::optional<fs::path>& from, weights::device_loader* loader) {
  const weights::model_layout layout = from ? weights::read_model_layout(*from) : layout_;
  if (offload_) offload_->quiesce();  // a reload rewrites the host store: no copy may be reading it
  for (const auto& name : module_names()) {
    const weights::component_info* c = layout.find(name);
    if (!c || !c->weight_bearing) throw std::runtime_error(layout.root.string() + ": no weights for module '" + name + "'");
    models::load_into(registry(name), weights::open_module_weights(*c), where_, loader, offload(name));
  }
  if (offload_) offload_->refresh_resident();  // blocks already on the device take the loaded values
}

int64_t flux2_klein_pipeline::vae_scale_factor() const {
  return int64_t{1} << (vae_->config().block_out_channels.size() - 1);
}

int64_t flux2_klein_pipeline::default_size() const { return 128 * vae_scale_factor(); }

at::Tensor flux2_klein_pipeline::encode_prompts(const std::vector<std::string>& prompts) const {
  const auto batch = tokenizer_->encode_klein_prompts(prompts, 512);
  auto i64 = at::TensorOptions().dtype(at::kLong);
  at::Tensor ids = at::tensor(batch.input_ids, i64).reshape({batch.batch, batch.length}).to(where_.device);
  at::Tensor mask = at::tensor(batch.attention_mask, i64).reshape({batch.batch, batch.length}).to(where_.device);
  return text_encoder_->hidden_state_taps(ids, mask, taps_);
}

at::Tensor flux2_klein_pipeline::initial_noise(int64_t batch, int64_t height, int64_t width, uint64_t seed) const {
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(seed);
  return initial_noise(batch, height, width, gen);
}

at::Tensor flux2_klein_pipeline::initial_noise(int64_t batch, int64_t height, int64_t width, at::Generator& gen) const {
  const int64_t step = vae_scale_factor() * 2;
  const int64_t channels = transformer_->config().in_channels;
  return at::randn({batch, channels, height / step, width / step}, gen, at::TensorOptions().dtype(where_.float_dtype));
}

at::Tensor flux2_klein_pipeline::sample(const at::Tensor& noise, const at::Tensor& embeds, const std::optional<at::Tensor>& negative,
                                        int64_t steps, double guidance_scale, const std::atomic<bool>* cancel,
                                        const teacache_settings& teacache, generation_stats* stats,
                                        sampling::flow_rollout* rollout) const {
  const int64_t batch = noise.size(0), channels = noise.size(1), h = noise.size(2), w = noise.size(3);
  at::Tensor latents = noise.to(where_.device).reshape({batch, channels, h * w}).permute({0, 2, 1});  // pack
  const at::Tensor img_ids = latent_ids(h, w).to(where_.device);
  const at::Tensor txt_ids = text_ids(embeds.size(1)).to(where_.device);
  const auto schedule = sampling::klein_schedule(scheduler_, steps, h * w);
  const bool guided = negative.has_value() && guidance_scale > 1.0 && !is_distilled_;
  if (teacache.threshold && *teacache.threshold < 0) throw std::invalid_argument("the TeaCache threshold must be >= 0");
  // One state per branch: the two branches' inputs differ, so neither may reuse the other's residual.
  std::vector<sampling::teacache_state> caches;
  if (teacache.enabled) {
    caches.resize(guided ? 2 : 1);
    for (auto& c : caches) {
      c.config = *teacache_;
      if (teacache.threshold) c.config.threshold = *teacache.threshold;
      c.num_steps = steps;
    }
  }
  auto cache = [&](size_t branch) { return caches.empty() ? nullptr : &caches[branch]; };
  for (int64_t i = 0; i < steps; ++i) {
    if (cancel && cancel->load()) throw generation_cancelled("generation cancelled at step " + std::to_string(i) + " of " + std::to_string(steps));
    // diffusers passes t / 1000 with t = sigma * 1000 in float32, cast to the latents' dtype first.
    at::Tensor t = at::full({batch}, schedule.timesteps[i], at::TensorOptions().dtype(at::kFloat).device(where_.device));
    at::Tensor timestep = t.to(latents.scalar_type()) / 1000;
    at::Tensor velocity = transformer_->forward(latents.to(where_.float_dtype), embeds, timestep, img_ids, txt_ids, std::nullopt, cache(0));
    if (guided) {
      at::Tensor uncond = transformer_->forward(latents.to(where_.float_dtype), *negative, timestep, img_ids, txt_ids, std::nullopt, cache(1));
      velocity = uncond + guidance_scale * (velocity - uncond);
    }
    if (rollout) latents = rollout->step(velocity, latents, i, schedule.timesteps[i]).to(velocity.scalar_type());
    else latents = sampling::euler_step(velocity, latents, schedule.sigmas[i], schedule.sigmas[i + 1]);
  }
  if (rollout) rollout->finish(latents);
  if (stats) {
    stats->dit_calls += steps * (guided ? 2 : 1);
    for (const auto& c : caches) {
      stats->teacache.push_back({c.rel_l1, c.skipped});
      stats->blocks_skipped += c.skipped_steps();
    }
  }
  at::Tensor grid = latents.permute({0, 2, 1}).reshape({batch, channels, h, w});  // unpack (ids are row-major)
  at::Tensor image = vae_->decode_packed(grid);
  return (image / 2 + 0.5).clamp(0, 1);
}

std::vector<rgb_image> flux2_klein_pipeline::generate(const generation_params& p, generation_stats* stats) const {
  if (p.prompts.empty()) throw std::invalid_argument("at least one prompt is required");
  if (p.images_per_prompt < 1) throw std::invalid_argument("images_per_prompt must be at least 1");
  const int64_t width = p.width ? p.width : default_size(), height = p.height ? p.height : default_size();
  const int64_t multiple = vae_scale_factor() * 2;
  if (width <= 0 || height <= 0 || width % multiple || height % multiple)
    throw std::invalid_argument("image size " + std::to_string(width) + "x" + std::to_string(height) +
                                " must be positive multiples of " + std::to_string(multiple));
  const int64_t steps = p.steps ? p.steps : default_steps();
  if (steps < 1 || steps > 1000) throw std::invalid_argument("steps must be between 1 and 1000");
  c10::InferenceMode inference;
  // This thread's current device is the pipeline's: anything that allocates or launches on "the current device"
  // (rather than on its inputs' device) must not land on GPU 0 for a worker on another GPU.
  c10::OptionalDeviceGuard on_device(where_.device.is_cuda() ? c10::optional<c10::Device>(where_.device) : c10::nullopt);

  at::Tensor embeds = encode_prompts(p.prompts);
  if (p.images_per_prompt > 1) embeds = embeds.repeat_interleave(p.images_per_prompt, 0);
  std::optional<at::Tensor> negative;
  if (!is_distilled_ && p.guidance_scale > 1.0)
    negative = encode_prompts(std::vector<std::string>(p.prompts.size(), p.negative_prompt)).repeat_interleave(p.images_per_prompt, 0);
  const int64_t batch = embeds.size(0);
  if (!p.seeds.empty() && static_cast<int64_t>(p.seeds.size()) != batch)
    throw std::invalid_argument("seeds: " + std::to_string(p.seeds.size()) + " given for " + std::to_string(batch) + " images");
  // Each image from its own generator, as SGLang does: image i with seeds[i], or seed + i.
  std::vector<at::Tensor> noises;
  for (int64_t i = 0; i < batch; ++i)
    noises.push_back(initial_noise(1, height, width, p.seeds.empty() ? p.seed + static_cast<uint64_t>(i) : p.seeds[static_cast<size_t>(i)]));
  at::Tensor noise = at::cat(noises, 0);
  return to_rgb_images(sample(noise, embeds, negative, steps, p.guidance_scale, p.cancel, p.teacache, stats));
}

std::vector<rgb_image> to_rgb_images(const at::Tensor& images) {
  // Quantised where the images are (on a GPU: 3 bytes a pixel cross the link instead of the VAE's output, and the
  // rounding runs there); the same float operations, so the same bytes, on either device.
  at::Tensor bytes = images.to(at::kFloat).mul(255).round().to(at::kByte).permute({0, 2, 3, 1}).contiguous().to(at::kCPU);
  std::vector<rgb_image> out;
  for (int64_t b = 0; b < bytes.size(0); ++b) {
    rgb_image img{bytes.size(2), bytes.size(1), {}};
    const auto* p = bytes[b].data_ptr<uint8_t>();
    img.pixels.assign(p, p + bytes[b].numel());
    out.push_back(std::move(img));
  }
  return out;
}

}  // namespace refit::pipeline
