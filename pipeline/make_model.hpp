// `refit make-model`: writes a complete Diffusers-layout FLUX.2-klein checkpoint with random weights,
// from the real module classes (their registries give every tensor's name and shape).
#pragma once

#include <cstdint>
#include <filesystem>
#include <functional>
#include <string>
#include <vector>

namespace refit::pipeline {

struct make_model_options {
  std::string preset;          // flux2-klein-tiny, flux2-klein-4b
  uint64_t seed = 0;
  std::filesystem::path out;   // must not exist, or be an empty directory
  unsigned threads = 0;        // 0: all cores
  bool distilled = true;       // false: a "base" checkpoint sampled with classifier-free guidance
  // Called after each tensor is written: (module, tensor, bytes written so far, total bytes).
  std::function<void(const std::string&, const std::string&, uint64_t, uint64_t)> progress;
  // Transformer depth instead of the preset's: double-stream and single-stream blocks (-1: the preset's).
  int64_t double_blocks = -1, single_blocks = -1;
};

std::vector<std::string> make_model_presets();

struct make_model_report {
  uint64_t tensors = 0, bytes = 0;
  double seconds = 0;
};

make_model_report make_model(const make_model_options& options);

}  // namespace refit::pipeline
