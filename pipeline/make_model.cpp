#include "pipeline/make_model.hpp"

#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <atomic>
#include <chrono>
#include <fstream>
#include <map>
#include <mutex>
#include <stdexcept>

#include "pipeline/models/flux2_transformer.hpp"
#include "pipeline/models/model_loader.hpp"
#include "pipeline/models/qwen3.hpp"
#include "pipeline/models/tokenizer.hpp"
#include "pipeline/models/vae_flux2.hpp"
#include "pipeline/weights/host_loader.hpp"
#include "pipeline/weights/parallel.hpp"
#include "pipeline/weights/safetensors.hpp"

namespace refit::pipeline {

namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

struct preset {
  json transformer, vae, text_encoder;
  int64_t vae_sample_size;
};

json klein_scheduler_config() {
  return {{"_class_name", "FlowMatchEulerDiscreteScheduler"}, {"_diffusers_version", "0.42.1"},
          {"num_train_timesteps", 1000}, {"shift", 3.0}, {"use_dynamic_shifting", true}, {"base_shift", 0.5},
          {"max_shift", 1.15}, {"base_image_seq_len", 256}, {"max_image_seq_len", 4096},
          {"time_shift_type", "exponential"}, {"shift_terminal", nullptr}, {"invert_sigmas", false},
          {"stochastic_sampling", false}, {"use_karras_sigmas", false}, {"use_exponential_sigmas", false},
          {"use_beta_sigmas", false}};
}

json transformer_config(int64_t heads, int64_t head_dim, int64_t layers, int64_t single_layers, int64_t in_channels,
                        int64_t joint_dim, std::vector<int64_t> axes) {
  return {{"_class_name", "Flux2Transformer2DModel"}, {"_diffusers_version", "0.42.1"},
          {"attention_head_dim", head_dim}, {"axes_dims_rope", axes}, {"eps", 1e-6}, {"guidance_embeds", false},
          {"in_channels", in_channels}, {"joint_attention_dim", joint_dim}, {"mlp_ratio", 3.0},
          {"num_attention_heads", heads}, {"num_layers", layers}, {"num_single_layers", single_layers},
          {"out_channels", nullptr}, {"patch_size", 1}, {"rope_theta", 2000}, {"timestep_guidance_channels", 256}};
}

json vae_config(std::vector<int64_t> channels, int64_t latent_channels, int64_t layers_per_block, int64_t groups, int64_t sample_size) {
  std::vector<std::string> down(channels.size(), "DownEncoderBlock2D"), up(channels.size(), "UpDecoderBlock2D");
  return {{"_class_name", "AutoencoderKLFlux2"}, {"_diffusers_version", "0.42.1"}, {"act_fn", "silu"},
          {"batch_norm_eps", 0.0001}, {"batch_norm_momentum", 0.1}, {"block_out_channels", channels},
          {"down_block_types", down}, {"force_upcast", true}, {"in_channels", 3}, {"latent_channels", latent_channels},
          {"layers_per_block", layers_per_block}, {"mid_block_add_attention", true}, {"norm_num_groups", groups},
          {"out_channels", 3}, {"patch_size", {2, 2}}, {"sample_size", sample_size}, {"up_block_types", up},
          {"use_post_quant_conv", true}, {"use_quant_conv", true}};
}

json qwen3_config_json(int64_t hidden, int64_t layers, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate) {
  return {{"architectures", {"Qwen3ForCausalLM"}}, {"model_type", "qwen3"}, {"attention_bias", false},
          {"attention_dropout", 0.0}, {"bos_token_id", 151643}, {"eos_token_id", 151645}, {"head_dim", head_dim},
          {"hidden_act", "silu"}, {"hidden_size", hidden}, {"initializer_range", 0.02}, {"intermediate_size", intermediate},
          {"max_position_embeddings", 40960}, {"max_window_layers", layers}, {"num_attention_heads", heads},
          {"num_hidden_layers", layers}, {"num_key_value_heads", kv_heads}, {"rms_norm_eps", 1e-6}, {"rope_scaling", nullptr},
          {"rope_theta", 1000000}, {"sliding_window", nullptr}, {"tie_word_embeddings", true}, {"torch_dtype", "bfloat16"},
          {"use_cache", true}, {"use_sliding_window", false}, {"vocab_size", 151936}};
}

preset find_preset(const std::string& name) {
  if (name == "flux2-klein-tiny")
    // Small enough for CPU tests, with every structural feature of the real model: 3 text taps of a
    // 4-layer Qwen3, double and single blocks, 2 VAE levels with attention and quant convs.
    return {transformer_config(2, 16, 1, 2, 16, 96, {4, 4, 4, 4}), vae_config({16, 32}, 4, 1, 8, 64),
            qwen3_config_json(32, 4, 4, 2, 8, 64), 64};
  if (name == "flux2-klein-4b")
    // The published FLUX.2-klein-4B shapes.
    return {transformer_config(24, 128, 5, 20, 128, 7680, {32, 32, 32, 32}), vae_config({128, 256, 512, 512}, 32, 2, 32, 1024),
            qwen3_config_json(2560, 36, 32, 8, 128, 9728), 1024};
  std::string known;
  for (const auto& p : make_model_presets()) known += (known.empty() ? "" : ", ") + p;
  throw std::invalid_argument("unknown preset '" + name + "' (known: " + known + ")");
}

void write_json(const fs::path& path, const json& j) {
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  if (!out) throw std::runtime_error(path.string() + ": cannot be written");
}

struct writer_job {
  std::string module;
  const models::tensor_slot* slot;
  weights::safetensors_writer* writer;
};

uint64_t numel(const models::tensor_slot& s) {
  uint64_t n = 1;
  for (auto d : s.shape) n *= static_cast<uint64_t>(d);
  return n;
}

// Splits the slots (in name order) into `shards` files of roughly equal bytes.
std::vector<std::vector<const models::tensor_slot*>> split(const models::tensor_registry& r, size_t shards) {
  std::vector<const models::tensor_slot*> slots;
  for (const auto& s : r.slots()) slots.push_back(&s);
  std::sort(slots.begin(), slots.end(), [](auto* a, auto* b) { return a->name < b->name; });
  uint64_t total = 0;
  for (auto* s : slots) total += numel(*s);
  std::vector<std::vector<const models::tensor_slot*>> out(1);
  uint64_t acc = 0;
  for (auto* s : slots) {
    const uint64_t b = numel(*s);
    if (out.size() < shards && acc >= total * out.size() / shards && !out.back().empty()) out.emplace_back();
    out.back().push_back(s);
    acc += b;
  }
  return out;
}

}  // namespace

std::vector<std::string> make_model_presets() { return {"flux2-klein-tiny", "flux2-klein-4b"}; }

make_model_report make_model(const make_model_options& o) {
  const auto start = std::chrono::steady_clock::now();
  const preset p = find_preset(o.preset);
  if (o.out.empty()) throw std::invalid_argument("an output directory is required");
  if (fs::exists(o.out) && (!fs::is_directory(o.out) || !fs::is_empty(o.out)))
    throw std::invalid_argument(o.out.string() + ": already exists and is not an empty directory (refit never overwrites a checkpoint)");
  for (const char* d : {"scheduler", "tokenizer", "text_encoder", "transformer", "vae"}) fs::create_directories(o.out / d);

  write_json(o.out / "model_index.json",
             {{"_class_name", "Flux2KleinPipeline"}, {"_diffusers_version", "0.42.1"}, {"is_distilled", o.distilled},
              {"scheduler", {"diffusers", "FlowMatchEulerDiscreteScheduler"}}, {"text_encoder", {"transformers", "Qwen3ForCausalLM"}},
              {"tokenizer", {"transformers", "Qwen2TokenizerFast"}}, {"transformer", {"diffusers", "Flux2Transformer2DModel"}},
              {"vae", {"diffusers", "AutoencoderKLFlux2"}}});
  write_json(o.out / "scheduler" / "scheduler_config.json", klein_scheduler_config());
  json transformer_config = p.transformer;
  for (auto [value, key] : {std::pair{o.double_blocks, "num_layers"}, std::pair{o.single_blocks, "num_single_layers"}}) {
    if (value < -1 || value > 1000) throw std::invalid_argument(std::string(key) + " must be between 0 and 1000");
    if (value >= 0) transformer_config[key] = value;
  }
  write_json(o.out / "transformer" / "config.json", transformer_config);
  write_json(o.out / "vae" / "config.json", p.vae);
  write_json(o.out / "text_encoder" / "config.json", p.text_encoder);
  models::write_tokenizer_files(o.out / "tokenizer");

  // The real classes, built from the configs just written: their registries name every tensor.
  models::flux2_transformer transformer(models::flux2_config::from_file(o.out / "transformer" / "config.json"));
  models::vae_flux2 vae(models::vae_flux2_config::from_file(o.out / "vae" / "config.json"));
  models::qwen3_text_encoder text_encoder(models::qwen3_config::from_file(o.out / "text_encoder" / "config.json"));

  // Shard like the published checkpoint: the text encoder in two files with an index, the rest in one.
  struct file_plan {
    std::string module;
    fs::path path;
    std::vector<const models::tensor_slot*> slots;
  };
  std::vector<file_plan> files;
  files.push_back({"transformer", o.out / "transformer" / "diffusion_pytorch_model.safetensors", split(transformer.registry(), 1)[0]});
  files.push_back({"vae", o.out / "vae" / "diffusion_pytorch_model.safetensors", split(vae.registry(), 1)[0]});
  auto te_shards = split(text_encoder.registry(), 2);
  json weight_map = json::object();
  for (size_t k = 0; k < te_shards.size(); ++k) {
    const std::string name = "model-0000" + std::to_string(k + 1) + "-of-0000" + std::to_string(te_shards.size()) + ".safetensors";
    files.push_back({"text_encoder", o.out / "text_encoder" / name, te_shards[k]});
    for (auto* s : te_shards[k]) weight_map[s->name] = name;
  }

  std::vector<std::unique_ptr<weights::safetensors_writer>> writers;
  std::vector<writer_job> jobs;
  uint64_t total = 0, te_total = 0;
  for (const auto& f : files) {
    std::vector<weights::tensor_spec> specs;
    for (auto* s : f.slots) {
      const auto type = s->fixed_dtype ? weights::from_scalar_type(*s->fixed_dtype) : weights::dtype::BF16;
      specs.push_back({s->name, type, s->shape});
    }
    writers.push_back(std::make_unique<weights::safetensors_writer>(f.path, specs, std::map<std::string, std::string>{{"format", "pt"}}));
    for (auto* s : f.slots) jobs.push_back({f.module, s, writers.back().get()});
    total += writers.back()->layout().data_size;
    if (f.module == "text_encoder") te_total += writers.back()->layout().data_size;
  }
  // Largest first keeps both threads busy to the end.
  std::sort(jobs.begin(), jobs.end(), [](const writer_job& a, const writer_job& b) {
    return numel(*a.slot) > numel(*b.slot);
  });
  std::atomic<uint64_t> written{0};
  std::mutex progress_mutex;
  weights::parallel_for_each(jobs.size(), o.threads, [&](size_t i) {
    const writer_job& j = jobs[i];
    at::Tensor t = models::random_value(*j.slot, o.seed, at::kBFloat16).contiguous();
    j.writer->write(j.slot->name, {static_cast<const std::byte*>(t.data_ptr()), t.nbytes()});
    const uint64_t done = written += t.nbytes();
    if (o.progress) {
      std::lock_guard lock(progress_mutex);
      o.progress(j.module, j.slot->name, done, total);
    }
  });
  for (auto& w : writers) w->finish();
  write_json(o.out / "text_encoder" / "model.safetensors.index.json", {{"metadata", {{"total_size", te_total}}}, {"weight_map", weight_map}});

  make_model_report r;
  r.tensors = jobs.size();
  r.bytes = total;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  return r;
}

}  // namespace refit::pipeline
