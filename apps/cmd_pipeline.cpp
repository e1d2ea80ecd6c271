// `refit make-model` and `refit generate`: checkpoints with random weights, and one-shot images with any
// pipeline family refit serves (pipeline/pipeline.hpp).
#include <ATen/ATen.h>
#include <spdlog/spdlog.h>

#include <chrono>
#include <cstdio>
#include <thread>

#include "apps/commands.hpp"
#include "pipeline/image/png.hpp"
#include "pipeline/make_model.hpp"
#include "pipeline/pipeline.hpp"
#include "pipeline/weights/hf_cache.hpp"

namespace refit::apps {

namespace fs = std::filesystem;

namespace {

std::pair<int64_t, int64_t> parse_size(const std::string& s) {
  const auto x = s.find('x');
  try {
    if (x != std::string::npos) {
      size_t used_w = 0, used_h = 0;
      const int64_t w = std::stoll(s.substr(0, x), &used_w), h = std::stoll(s.substr(x + 1), &used_h);
      if (used_w == x && used_h == s.size() - x - 1 && w > 0 && h > 0) return {w, h};
    }
  } catch (const std::exception&) {
  }
  throw std::invalid_argument("--size must be WIDTHxHEIGHT with positive integers, got '" + s + "'");
}

models::placement parse_flags(const std::string& device, const std::string& dtype) {
  try {
    return models::parse_placement(device, dtype);
  } catch (const std::invalid_argument& e) {
    throw std::invalid_argument(std::string("--") + e.what());
  }
}

std::string joined(const std::vector<std::string>& v, const char* sep) {
  std::string out;
  for (const auto& s : v) out += (out.empty() ? "" : sep) + s;
  return out;
}

}  // namespace

void add_pipeline_commands(CLI::App& app, command_registry& commands) {
  struct make_args {
    std::string preset, out;
    uint64_t seed = 0;
    unsigned threads = 0;
    bool base = false;
    int64_t double_blocks = -1, single_blocks = -1;
  };
  auto ma = std::make_shared<make_args>();
  auto* make = app.add_subcommand("make-model", "Write a checkpoint with random weights in the real Diffusers layout");
  make->add_option("--preset", ma->preset,
                   "One of: " + joined(pipeline::make_model_presets(), ", ") + " (*-tiny: seconds on CPU, for tests; others: the real shapes)")
      ->required();
  make->add_option("--seed", ma->seed, "Seed of the random weights (same seed, same bytes)")->capture_default_str();
  make->add_option("--out", ma->out, "Output directory; must not exist or be empty")->required();
  make->add_option("--threads", ma->threads, "Generator threads (default: all cores)");
  make->add_flag("--base", ma->base, "Write an undistilled (base) checkpoint, sampled with classifier-free guidance");
  make->add_option("--double-blocks", ma->double_blocks, "Double-stream DiT blocks (default: the preset's)")
      ->check(CLI::Range(0, 1000));
  make->add_option("--single-blocks", ma->single_blocks, "Single-stream DiT blocks (default: the preset's)")
      ->check(CLI::Range(0, 1000));
  commands.emplace_back(make, [ma] {
    pipeline::make_model_options o{ma->preset, ma->seed, ma->out, ma->threads, !ma->base, {}, ma->double_blocks, ma->single_blocks};
    auto last = std::chrono::steady_clock::now();
    o.progress = [&last](const std::string& module, const std::string&, uint64_t done, uint64_t total) {
      auto now = std::chrono::steady_clock::now();
      if (now - last > std::chrono::seconds(2) || done == total) {
        spdlog::info("make-model: {} ... {:.2f} / {:.2f} GB", module, done / 1e9, total / 1e9);
        last = now;
      }
    };
    auto r = pipeline::make_model(o);
    spdlog::info("make-model: wrote {} ({} tensors, {:.3f} GB) in {:.1f} s ({:.2f} GB/s)", ma->out, r.tensors, r.bytes / 1e9,
                 r.seconds, r.bytes / 1e9 / r.seconds);
    return 0;
  });

  struct gen_args {
    std::string model, prompt, negative, size, device = "cpu", dtype, out;
    uint64_t seed = 0;
    int64_t steps = 0;
    double guidance = 4.0;
    bool teacache = false;
    double teacache_threshold = -1;
    bool offload = false;
    double prefetch = 1;
    models::compute_tuning tuning;
  };
  auto ga = std::make_shared<gen_args>();
  auto* gen = app.add_subcommand("generate", "Generate one image with a checkpoint and write it as PNG");
  gen->add_option("--model-path", ga->model, "Diffusers-layout checkpoint (model_index.json _class_name: " +
                                                 joined(pipeline::supported_pipeline_classes(), ", ") + ")")
      ->required();
  gen->add_option("--prompt", ga->prompt, "Text prompt")->required();
  gen->add_option("--negative-prompt", ga->negative, "Negative prompt (undistilled checkpoints, with guidance)");
  gen->add_option("--seed", ga->seed, "Seed of the initial noise (same seed and weights: identical PNG bytes)")->capture_default_str();
  gen->add_option("--steps", ga->steps, "Sampling steps (default: 4 distilled, 50 base)");
  gen->add_option("--guidance-scale", ga->guidance, "Classifier-free guidance scale (base checkpoints only)")->capture_default_str();
  gen->add_option("--size", ga->size, "WIDTHxHEIGHT (default: the model's, e.g. 1024x1024)");
  gen->add_option("--device", ga->device, "cpu, cuda or cuda:N")->capture_default_str();
  gen->add_option("--dtype", ga->dtype, "bf16, fp16 or fp32 (default: bf16 on CUDA, fp32 on CPU)");
  gen->add_flag("--teacache", ga->teacache, "Skip DiT blocks on steps whose input barely changed (TeaCache)");
  gen->add_option("--teacache-threshold", ga->teacache_threshold,
                  "TeaCache threshold (default: the DiT folder's teacache.json, else 0.25); implies --teacache")
      ->check(CLI::Range(0.0, 1e6));
  add_offload_options(*gen, ga->offload, ga->prefetch);
  add_compute_tuning_options(*gen, ga->tuning);
  gen->add_option("-o,--output", ga->out, "PNG file to write")->required();
  commands.emplace_back(gen, [ga] {
    const auto where = parse_flags(ga->device, ga->dtype);
    models::apply_compute_tuning(ga->tuning, where.device.str());
    if (where.device.is_cuda()) spdlog::info("generate: {}", models::describe_compute_tuning());
    auto t0 = std::chrono::steady_clock::now();
    const auto pipe_ptr = pipeline::open_pipeline(weights::resolve_model_path(ga->model), where, {ga->offload, ga->prefetch});
    pipeline::diffusion_pipeline& pipe = *pipe_ptr;
    pipe.load_weights();
    auto t1 = std::chrono::steady_clock::now();
    pipeline::generation_params p;
    p.prompts = {ga->prompt};
    p.negative_prompt = ga->negative;
    p.seed = ga->seed;
    p.steps = ga->steps;
    p.guidance_scale = ga->guidance;
    if (!ga->size.empty()) std::tie(p.width, p.height) = parse_size(ga->size);
    p.teacache.enabled = ga->teacache || ga->teacache_threshold >= 0;
    if (ga->teacache_threshold >= 0) p.teacache.threshold = ga->teacache_threshold;
    pipeline::generation_stats stats;
    auto images = pipe.generate(p, &stats);
    auto t2 = std::chrono::steady_clock::now();
    const auto& img = images.front();
    image::write_file(ga->out, image::encode_png_rgb(img.pixels, static_cast<uint32_t>(img.width), static_cast<uint32_t>(img.height)));
    spdlog::info("generate: {}x{} image, {} steps, seed {} -> {} (load {:.2f} s, generate {:.2f} s)", img.width, img.height,
                 p.steps ? p.steps : pipe.default_steps(), p.seed, ga->out,
                 std::chrono::duration<double>(t1 - t0).count(), std::chrono::duration<double>(t2 - t1).count());
    if (p.teacache.enabled)
      spdlog::info("generate: TeaCache skipped the DiT blocks in {} of {} DiT calls", stats.blocks_skipped, stats.dit_calls);
    return 0;
  });
}

}  // namespace refit::apps
