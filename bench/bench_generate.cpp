// Generation benchmark: time per image of refit's FLUX.2-klein pipeline, model loaded once.
//   bench_generate MODEL_DIR [--device cuda] [--dtype bf16] [--size 1024] [--steps 4] [--repeat 3] [--seed 0]
//                  [--offload-prefetch N]   (layerwise offload of the DiT blocks, N blocks ahead)
// Prints one JSON object: load seconds, per-image seconds of every repetition (after one warm-up),
// best and median, and on CUDA the device memory held after loading and the peak while generating.
// Compare with bench/generate.py, which runs Diffusers on the same checkpoint.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "pipeline/flux2_klein.hpp"
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
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: bench_generate MODEL_DIR [--device D] [--dtype bf16|fp16|fp32] [--size N] [--steps N] [--repeat N] [--seed N]\n";
    return 2;
  }
  std::string device = "cpu", dtype;
  int64_t size = 0, steps = 0, repeat = 3;
  uint64_t seed = 0;
  double offload_prefetch = 0;
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--device") device = v;
    else if (k == "--dtype") dtype = v;
    else if (k == "--size") size = std::stoll(v);
    else if (k == "--steps") steps = std::stoll(v);
    else if (k == "--repeat") repeat = std::stoll(v);
    else if (k == "--seed") seed = std::stoull(v);
    else if (k == "--offload-prefetch") offload_prefetch = std::stod(v);
    else {
      std::cerr << "bench_generate: unknown option " << k << "\n";
      return 2;
    }
  }
  try {
    const refit::models::placement where = refit::models::parse_placement(device, dtype);
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
    pipe.generate(p);  // warm-up: kernels, allocator, tokenizer caches
    sync(where.device);
    std::vector<double> runs;
    auto* offload = pipe.transformer_offload();
    const uint64_t copied_before = offload ? offload->info().prefetched_bytes : 0;
    for (int64_t r = 0; r < repeat; ++r) {
      auto t = std::chrono::steady_clock::now();
      pipe.generate(p);
      sync(where.device);
      runs.push_back(since(t));
    }
    std::vector<double> sorted = runs;
    std::sort(sorted.begin(), sorted.end());
    std::cout << nlohmann::json{{"load_s", load_s}, {"runs_s", runs}, {"best_s", sorted.front()},
                                {"median_s", sorted[sorted.size() / 2]}, {"size", size ? size : pipe.default_size()},
                                {"steps", steps ? steps : pipe.default_steps()}, {"device", device},
                                {"offload_prefetch", offload_prefetch},
                                {"device_bytes_after_load", loaded_bytes},
                                {"device_bytes_peak_generating", device_allocated(where.device).second},
                                {"offload_copied_bytes_per_image",
                                 offload ? (offload->info().prefetched_bytes - copied_before) / static_cast<uint64_t>(repeat) : 0}}
                     .dump()
              << "\n";
  } catch (const std::exception& e) {
    std::cerr << "bench_generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
