// How the models compute on a GPU, not what they compute: which fused attention kernel
// scaled_dot_product_attention tries first. Process-wide, set once at startup (serve, worker, generate) before the
// first generation.
#pragma once

#include <string>

namespace refit::models {

struct compute_tuning {
  // auto | cudnn | flash | efficient | math: the SDPA kernel tried first; one that cannot take a call (head size,
  // mask, device) hands it to the next. auto = PyTorch's own order: cuDNN first on Hopper and Blackwell with a
  // recent cuDNN (the H200: 2x faster than flash for the DiT's attention, bench/RESULTS.md), flash first elsewhere.
  std::string attention = "auto";
};

// Validates and applies `t` (std::invalid_argument naming the value and the choices). Changes only speed: every
// kernel computes the same attention within the floating-point tolerance of its dtype. PyTorch settles its own
// order at the first attention call on a GPU, overwriting any order set before; with `device` a CUDA device (the
// first one the models run on: "cuda", "cuda:1") this makes that first call there (a tiny one), so that an explicit
// choice holds and the log tells the order in use. "cpu" makes none.
void apply_compute_tuning(const compute_tuning& t, const std::string& device = "cpu");

// "attention cudnn, flash, efficient, math" for the startup log.
std::string describe_compute_tuning();

}  // namespace refit::models
