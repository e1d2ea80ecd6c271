#include "pipeline/models/compute_tuning.hpp"

#include <ATen/Context.h>

#include <array>
#include <atomic>
#include <stdexcept>
#include <vector>

namespace refit::models {

namespace {

std::atomic<bool> channels_last{true};

const char* name_of(at::SDPBackend b) {
  switch (b) {
    case at::SDPBackend::cudnn_attention: return "cudnn";
    case at::SDPBackend::flash_attention: return "flash";
    case at::SDPBackend::efficient_attention: return "efficient";
    case at::SDPBackend::math: return "math";
    case at::SDPBackend::overrideable: return "overrideable";
    default: return "other";
  }
}

}  // namespace

void apply_compute_tuning(const compute_tuning& t) {
  // PyTorch's own order is flash, efficient, math, cudnn (then overrideable); the chosen kernel goes first.
  const std::array<std::pair<const char*, at::SDPBackend>, 4> kernels{{{"cudnn", at::SDPBackend::cudnn_attention},
                                                                      {"flash", at::SDPBackend::flash_attention},
                                                                      {"efficient", at::SDPBackend::efficient_attention},
                                                                      {"math", at::SDPBackend::math}}};
  const std::string first = t.attention == "auto" ? "cudnn" : t.attention;
  std::vector<int64_t> order;
  for (const auto& [name, b] : kernels)
    if (first == name) order.push_back(static_cast<int64_t>(b));
  if (order.empty())
    throw std::invalid_argument("attention backend '" + t.attention + "': expected auto, cudnn, flash, efficient or math");
  if (t.vae_layout != "auto" && t.vae_layout != "channels_last" && t.vae_layout != "contiguous")
    throw std::invalid_argument("VAE layout '" + t.vae_layout + "': expected auto, channels_last or contiguous");
  // The rest in PyTorch's default order, whatever was chosen before.
  for (auto b : {at::SDPBackend::flash_attention, at::SDPBackend::efficient_attention, at::SDPBackend::math,
                 at::SDPBackend::cudnn_attention, at::SDPBackend::overrideable})
    if (static_cast<int64_t>(b) != order.front()) order.push_back(static_cast<int64_t>(b));
  at::globalContext().setSDPPriorityOrder(order);
  channels_last = t.vae_layout != "contiguous";
}

bool vae_channels_last() { return channels_last.load(); }

std::string describe_compute_tuning() {
  std::string out = "attention";
  const char* sep = " ";
  for (auto b : at::globalContext().sDPPriorityOrder()) {
    if (b == at::SDPBackend::overrideable) continue;
    out += sep;
    out += name_of(b);
    sep = ", ";
  }
  return out + "; VAE " + (vae_channels_last() ? "channels_last" : "contiguous");
}

}  // namespace refit::models
