// Generation benchmark: time per image of refit's FLUX.2-klein pipeline, model loaded once.
//   bench_generate MODEL_DIR [--device cuda] [--dtype bf16] [--size 1024] [--steps 4] [--repeat 3] [--seed 0]
// Prints one JSON object: load seconds, per-image seconds of every repetition (after one warm-up),
// best and median. Compare with bench/generate.py, which runs Diffusers on the same checkpoint.
#include <ATen/ATen.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <chrono>
#include <iostream>

#include "pipeline/flux2_klein.hpp"

#ifdef REFIT_TORCH_CUDA
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
  for (int i = 2; i + 1 < argc; i += 2) {
    const std::string k = argv[i], v = argv[i + 1];
    if (k == "--device") device = v;
    else if (k == "--dtype") dtype = v;
    else if (k == "--size") size = std::stoll(v);
    else if (k == "--steps") steps = std::stoll(v);
    else if (k == "--repeat") repeat = std::stoll(v);
    else if (k == "--seed") seed = std::stoull(v);
    else {
      std::cerr << "bench_generate: unknown option " << k << "\n";
      return 2;
    }
  }
  try {
    refit::models::placement where;
    where.device = at::Device(device);
    where.float_dtype = dtype == "fp32" ? at::kFloat : dtype == "fp16" ? at::kHalf
                        : (dtype == "bf16" || where.device.is_cuda()) ? at::kBFloat16 : at::kFloat;
    auto t0 = std::chrono::steady_clock::now();
    refit::pipeline::flux2_klein_pipeline pipe(argv[1], where);
    pipe.load_weights();
    sync(where.device);
    const double load_s = since(t0);
    refit::pipeline::generation_params p;
    p.prompts = {"a photograph of a red fox in fresh snow, golden hour"};
    p.width = p.height = size;
    p.steps = steps;
    p.seed = seed;
    pipe.generate(p);  // warm-up: kernels, allocator, tokenizer caches
    sync(where.device);
    std::vector<double> runs;
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
                                {"steps", steps ? steps : pipe.default_steps()}, {"device", device}}
                     .dump()
              << "\n";
  } catch (const std::exception& e) {
    std::cerr << "bench_generate: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
