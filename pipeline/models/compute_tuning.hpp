// How the models compute on a GPU, not what they compute: which fused attention kernel
// scaled_dot_product_attention tries first, and the memory format of the VAE's convolutions. Process-wide,
// set once at startup (serve, worker, generate) before the first generation.
#pragma once

#include <string>

namespace refit::models {

struct compute_tuning {
  // auto | cudnn | flash | efficient | math: the SDPA kernel tried first; one that cannot take a call (head size,
  // mask, device) hands it to the next in PyTorch's order. auto = cudnn on CUDA (see bench/RESULTS.md).
  std::string attention = "auto";
  // auto | channels_last | contiguous: the VAE decoder's activations on a CUDA device. auto = channels_last.
  std::string vae_layout = "auto";
};

// Validates and applies `t` (std::invalid_argument naming the value and the choices). Changes only speed:
// every choice computes the same function within the floating-point tolerance of its dtype.
void apply_compute_tuning(const compute_tuning& t);

// What apply_compute_tuning chose for the VAE (true also before it was called: the default).
bool vae_channels_last();

// "attention cudnn, flash, efficient, math; VAE channels_last" for the startup log.
std::string describe_compute_tuning();

}  // namespace refit::models
