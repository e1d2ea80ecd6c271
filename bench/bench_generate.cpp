// Generation benchmark: time per image of refit's FLUX.2-klein pipeline, model loaded once.
//   bench_generate MODEL_DIR [--device cuda] [--dtype bf16] [--size 1024] [--steps 4] [--repeat 3] [--seed 0]
//                  [--offload-prefetch N]   (layerwise offload of the DiT blocks, N blocks ahead)
//                  [--attention auto,cudnn,flash,...]  (compute_tuning.hpp: each attention kernel order timed in turn
//                                                       on the same loaded model; default auto)
//                  [--png-prefix P]   (the first timed image of each to P<attention>.png; bench/generate.py compares them)
//                  [--profile]        (one more image each under the Kineto profiler: GPU time per kernel)
//                  [--trace FILE]     (with --profile: the first one's whole trace, CPU and GPU, as Chrome JSON)
// Prints one JSON object: load seconds, per-image seconds of every repetition (after one warm-up),
// best and median, and on CUDA the device memory held after loading and the peak while generating; with several
// choices, each one's.
// Compare with bench/generate.py, which runs Diffusers on the same checkpoint.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <torch/csrc/autograd/profiler_kineto.h>

#include <algorithm>
#include <chrono>
#include <functional>
#include <iostream>
#include <map>
#include <sstream>

#include "pipeline/flux2_klein.hpp"
#include "pipeline/image/png.hpp"
#include "pipeline/models/compute_tuning.hpp"
#include "pipeline/models/layer_offload.hpp"
#include "pipeline/weights/device_loader.hpp"

#ifdef REFIT_TORCH_CUDA
#include <c10/cuda/CUDACachingAllocator.h>
#include <c10/cuda/CUDAFunctions.h>
#endif

namespace {
void sync(const at::Device& d) {
#ifdef REFIT_TORCH_CUDA
  if (d.is_cuda()) c10::cuda::device_synchronize();
#else
  (void)d;
#endif
}
// Bytes the caching allocator has handed out on the device: now and at the peak since the last reset.
std::pair<uint64_t, uint64_t> device_allocated(const at::Device& d) {
#ifdef REFIT_TORCH_CUDA
  if (d.is_cuda()) {
    const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(d.has_index() ? d.index() : 0);
    const auto& a = stats.allocated_bytes[static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE)];
    return {static_cast<uint64_t>(a.current), static_cast<uint64_t>(a.peak)};
  }
#endif
  (void)d;
  return {0, 0};
}
void reset_peak(const at::Device& d) {
#ifdef REFIT_TORCH_CUDA
  if (d.is_cuda()) c10::cuda::CUDACachingAllocator::resetPeakStats(d.has_index() ? d.index() : 0);
#endif
  (void)d;
}
double since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// GPU time per kernel (and copy) while `run` generates one image, largest first, with the wall time around it.
nlohmann::json profile_one(const std::function<void()>& run, const std::string& trace) {
  namespace prof = torch::autograd::profiler;
  using torch::profiler::impl::ActivityType;
  const torch::profiler::impl::ProfilerConfig config(torch::profiler::impl::ProfilerState::KINETO);
  const std::set<ActivityType> activities{ActivityType::CPU, ActivityType::CUDA};
  prof::prepareProfiler(config, activities);
  prof::enableProfiler(config, activities);
  const auto t = std::chrono::steady_clock::now();
  run();
  const double wall = since(t);
  const auto result = prof::disableProfiler();
  if (!trace.empty()) result->save(trace);
  std::map<std::string, std::pair<uint64_t, uint64_t>> by_name;  // count, ns
  uint64_t gpu_ns = 0;
  for (const auto& e : result->events()) {
    if (e.deviceType() != c10::DeviceType::CUDA) continue;
    auto& [n, ns] = by_name[e.name()];
    ++n;
    ns += e.durationNs();
    gpu_ns += e.durationNs();
  }
  std::vector<std::pair<std::string, std::pair<uint64_t, uint64_t>>> sorted(by_name.begin(), by_name.end());
  std::sort(sorted.begin(), sorted.end(), [](const auto& a, const auto& b) { return a.second.second > b.second.second; });
  nlohmann::json kernels = nlohmann::json::array();
  for (const auto& [name, v] : sorted) kernels.push_back({{"name", name.substr(0, 160)}, {"count", v.first}, {"ms", v.second / 1e6}});
  return {{"wall_s", wall}, {"gpu_busy_ms", gpu_ns / 1e6}, {"kernels", kernels}};
}

std::vector<refit::models::compute_tuning> parse_tunings(const std::string& list) {
  std::vector<refit::models::compute_tuning> out;
  std::stringstream ss(list);
  for (std::string item; std::getline(ss, item, ',');) out.push_back({item});
  if (out.empty()) throw std::invalid_argument("--attention: empty");
  return out;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: bench_generate MODEL_DIR [--device D] [--dtype bf16|fp16|fp32] [--size N] [--steps N] [--repeat N] [--seed N]"
                 " [--offload-prefetch N] [--attention K,...] [--png-prefix P] [--profile] [--trace FILE]\n";
    return 2;
  }
  std::string device = "cpu", dtype, tunings = "auto", png_prefix, trace;
  int64_t size = 0, steps = 0, repeat = 3;
  uint64_t seed = 0;
  double offload_prefetch = 0;
  bool profile = false;
  for (int i = 2; i < argc; i += 2) {
    const std::string k = argv[i];
    if (k == "--profile") {
      profile = true;
      --i;
      continue;
    }
    if (i + 1 >= argc) {
      std::cerr << "bench_generate: " << k << " needs a value\n";
      return 2;
    }
    const std::string v = argv[i + 1];
    if (k == "--device") device = v;
    else if (k == "--dtype") dtype = v;
    else if (k == "--size") size = std::stoll(v);
    else if (k == "--steps") steps = std::stoll(v);
    else if (k == "--repeat") repeat = std::stoll(v);
    else if (k == "--seed") seed = std::stoull(v);
    else if (k == "--offload-prefetch") offload_prefetch = std::stod(v);
    else if (k == "--attention") tunings = v;
    else if (k == "--trace") trace = v;
    else if (k == "--png-prefix") png_prefix = v;
    else {
      std::cerr << "bench_generate: unknown option " << k << "\n";
      return 2;
    }
  }
  try {
    const auto tuning_list = parse_tunings(tunings);
    const refit::models::placement where = refit::models::parse_placement(device, dtype);
    refit::models::apply_compute_tuning(tuning_list.front(), where.device.str());  // validates before the load
    auto t0 = std::chrono::steady_clock::now();
    refit::pipeline::flux2_klein_pipeline pipe(argv[1], where, {offload_prefetch > 0, offload_prefetch > 0 ? offload_prefetch : 1});
    std::unique_ptr<refit::weights::device_loader> loader;
    if (where.device.is_cuda()) loader = std::make_unique<refit::weights::device_loader>(where.device.has_index() ? where.device.index() : 0);
    pipe.load_weights(std::nullopt, loader.get());
    loader.reset();  // its pinned ring is not part of what generation needs
    sync(where.device);
    const double load_s = since(t0);
    const uint64_t loaded_bytes = device_allocated(where.device).first;
    reset_peak(where.device);
    refit::pipeline::generation_params p;
    p.prompts = {"a photograph of a red fox in fresh snow, golden hour"};
    p.width = p.height = size;
    p.steps = steps;
    p.seed = seed;
    auto* offload = pipe.transformer_offload();
    nlohmann::json per_tuning = nlohmann::json::object();
    nlohmann::json first_result;
    for (const auto& tuning : tuning_list) {
      refit::models::apply_compute_tuning(tuning, where.device.str());
      const std::string& name = tuning.attention;
      pipe.generate(p);  // warm-up: kernels, allocator, tokenizer caches
      sync(where.device);
      std::vector<double> runs;
      const uint64_t copied_before = offload ? offload->info().prefetched_bytes : 0;
      for (int64_t r = 0; r < repeat; ++r) {
        auto t = std::chrono::steady_clock::now();
        auto images = pipe.generate(p);
        sync(where.device);
        runs.push_back(since(t));
        if (r == 0 && !png_prefix.empty()) {
          const auto& img = images.front();
          refit::image::write_file(png_prefix + tuning.attention + ".png",
                                   refit::image::encode_png_rgb(img.pixels, static_cast<uint32_t>(img.width), static_cast<uint32_t>(img.height)));
        }
      }
      std::vector<double> sorted = runs;
      std::sort(sorted.begin(), sorted.end());
      nlohmann::json result{{"runs_s", runs}, {"best_s", sorted.front()}, {"median_s", sorted[sorted.size() / 2]},
                            {"compute", refit::models::describe_compute_tuning()},
                            {"offload_copied_bytes_per_image",
                             offload ? (offload->info().prefetched_bytes - copied_before) / static_cast<uint64_t>(repeat) : 0}};
      if (profile) {
        try {
          result["profile"] = profile_one(
              [&] {
                pipe.generate(p);
                sync(where.device);
              },
              first_result.is_null() ? trace : std::string());
        } catch (const std::exception& e) {
          result["profile_error"] = e.what();
        }
      }
      if (first_result.is_null()) first_result = result;
      per_tuning[name] = result;
    }
    nlohmann::json out{{"load_s", load_s}, {"size", size ? size : pipe.default_size()},
                       {"steps", steps ? steps : pipe.default_steps()}, {"device", device},
                       {"offload_prefetch", offload_prefetch},
                       {"device_bytes_after_load", loaded_bytes},
                       {"device_bytes_peak_generating", device_allocated(where.device).second},
                       {"attention", per_tuning}};
    // The first choice's numbers at the top level, as before (bench/generate.py, offload_gpu.py read them).
    for (const char* k : {"runs_s", "best_s", "median_s", "offload_copied_bytes_per_image"}) out[k] = first_result[k];
    std::cout << out.dump() << "\n";
  } catch (const std::exception& e) {
    std::cerr << "bench_generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
