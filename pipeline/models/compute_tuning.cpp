#include "pipeline/models/compute_tuning.hpp"

#include <ATen/ATen.h>

#include <algorithm>
#include <array>
#include <mutex>
#include <stdexcept>
#include <utility>
#include <vector>

namespace refit::models {

namespace {

const std::array<std::pair<const char*, at::SDPBackend>, 5> kernels{{{"cudnn", at::SDPBackend::cudnn_attention},
                                                                    {"flash", at::SDPBackend::flash_attention},
                                                                    {"efficient", at::SDPBackend::efficient_attention},
                                                                    {"math", at::SDPBackend::math},
                                                                    {"overrideable", at::SDPBackend::overrideable}}};

const char* name_of(at::SDPBackend b) {
  for (const auto& [name, k] : kernels)
    if (k == b) return name;
  return "other";
}

// PyTorch's own order: its default until an attention call on a GPU settles it, and settled by one such call on
// `device` when that is a GPU (see the header). Read before refit sets any order, or right after PyTorch settled
// its own, so never one refit set.
std::vector<int64_t> pytorch_order(const std::string& device) {
  static std::mutex m;
  static std::vector<int64_t> order;
  static bool settled = false;
  std::lock_guard lock(m);
  if (settled) return order;
  auto current = [] {
    std::vector<int64_t> o;
    for (auto b : at::globalContext().sDPPriorityOrder()) o.push_back(static_cast<int64_t>(b));
    return o;
  };
  if (const at::Device d(device); d.is_cuda()) {
    if (!order.empty()) at::globalContext().setSDPPriorityOrder(order);  // PyTorch's default back, for it to settle
    const at::Tensor q = at::zeros({1, 1, 8, 64}, at::TensorOptions().dtype(at::kHalf).device(d));
    (void)at::scaled_dot_product_attention(q, q, q);
    order = current();
    settled = true;
  } else if (order.empty()) {
    order = current();
  }
  return order;
}

}  // namespace

void apply_compute_tuning(const compute_tuning& t, const std::string& device) {
  // The choosable kernels are the table's first four.
  const auto chosen = std::find_if(kernels.begin(), kernels.end() - 1, [&](const auto& k) { return t.attention == k.first; });
  if (t.attention != "auto" && chosen == kernels.end() - 1)
    throw std::invalid_argument("attention backend '" + t.attention + "': expected auto, cudnn, flash, efficient or math");
  std::vector<int64_t> order = pytorch_order(device);
  if (t.attention != "auto") {  // the chosen kernel moves to the front, the others keep PyTorch's order
    const auto first = std::find(order.begin(), order.end(), static_cast<int64_t>(chosen->second));
    std::rotate(order.begin(), first, first + 1);
  }
  at::globalContext().setSDPPriorityOrder(order);  // a permutation of PyTorch's own: all num_sdp_backends entries
}

std::string describe_compute_tuning() {
  std::string out = "attention";
  const char* sep = " ";
  for (auto b : at::globalContext().sDPPriorityOrder()) {
    if (b == at::SDPBackend::overrideable) continue;
    out += sep;
    out += name_of(b);
    sep = ", ";
  }
  return out;
}

}  // namespace refit::models
