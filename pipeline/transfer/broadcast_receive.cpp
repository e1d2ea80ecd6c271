#include "pipeline/transfer/broadcast_receive.hpp"

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <limits>
#include <set>
#include <stdexcept>

#include "pipeline/models/model_loader.hpp"
#include "pipeline/lora/adapter.hpp"
#include "pipeline/models/tensor_registry.hpp"
#include "pipeline/pipeline.hpp"
#include "pipeline/transfer/broadcast_group.hpp"
#include "pipeline/transfer/received_weights.hpp"

namespace refit::transfer {

namespace {

std::string shape_text(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// The received tensors' views into one buffer: per tensor, or slices of a uint8 bucket.
std::vector<at::Tensor> layout(const announcement& a, const at::Tensor& bucket) {
  std::vector<at::Tensor> out;
  int64_t offset = 0;
  for (const auto& t : a.tensors) {
    const auto n = static_cast<int64_t>(announced_bytes(t));
    out.push_back(bucket.narrow(0, offset, n).view(t.dtype).view(t.shape));
    offset += n;
  }
  return out;
}

}  // namespace

uint64_t announced_bytes(const announced_tensor& t) {
  uint64_t n = c10::elementSize(t.dtype);
  for (int64_t d : t.shape) {
    if (d < 0) throw std::invalid_argument("tensor '" + t.wire_name + "': negative dimension in shape " + shape_text(t.shape));
    if (d != 0 && n > static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) / static_cast<uint64_t>(d))
      throw std::invalid_argument("tensor '" + t.wire_name + "': shape " + shape_text(t.shape) + " is too large");
    n *= static_cast<uint64_t>(d);
  }
  return n;
}

uint64_t announcement::bytes() const {
  uint64_t b = 0;
  for (const auto& t : tensors) b += announced_bytes(t);
  return b;
}

namespace {

// A weight of its module, with that shape and a dtype that converts to the held one.
void check_weight(pipeline::diffusion_pipeline& pipe, const announced_tensor& t) {
  const models::tensor_slot* slot = pipe.registry(t.module).find(t.name);
  if (!slot) throw std::invalid_argument("module '" + t.module + "' has no tensor '" + t.name + "'");
  if (t.shape != slot->shape)
    throw std::invalid_argument("tensor '" + t.wire_name + "': shape " + shape_text(t.shape) + " does not match the module's " +
                                shape_text(slot->shape));
  const c10::ScalarType held = models::held_dtype(*slot, pipe.placement());
  if (t.dtype != held && !(c10::isFloatingType(t.dtype) && c10::isFloatingType(held)))
    throw std::invalid_argument("tensor '" + t.wire_name + "': dtype " + std::string(c10::toString(t.dtype)) +
                                " does not convert to the module's " + c10::toString(held));
}

// A floating LoRA A or B weight whose shape fits the 2-D weight it targets.
void check_lora_tensor(pipeline::diffusion_pipeline& pipe, const announced_tensor& t) {
  if (!c10::isFloatingType(t.dtype))
    throw std::invalid_argument("tensor '" + t.wire_name + "': dtype " + std::string(c10::toString(t.dtype)) + " is not floating point");
  lora::check_announced(pipe.registry(t.module), t.module, t.name, t.shape);
}

}  // namespace

void check_announcement(pipeline::diffusion_pipeline& pipe, const announcement& a) {
  std::set<std::pair<std::string, std::string>> seen;
  uint64_t offset = 0;
  for (const auto& t : a.tensors) {
    const uint64_t n = announced_bytes(t);
    if (!seen.insert({t.module, t.name}).second) throw std::invalid_argument("tensor '" + t.wire_name + "' is announced twice");
    if (a.lora)
      check_lora_tensor(pipe, t);
    else
      check_weight(pipe, t);
    if (a.flattened_bucket && offset % c10::elementSize(t.dtype) != 0)
      throw std::invalid_argument("flattened_bucket: tensor '" + t.wire_name + "' starts at byte " + std::to_string(offset) +
                                  ", not a multiple of its element size " + std::to_string(c10::elementSize(t.dtype)));
    offset += n;
  }
}

std::shared_ptr<received_weights> receive_announced(broadcast_group& group, const announcement& a, const std::string& origin) {
  c10::InferenceMode inference;
  const auto on = at::TensorOptions().device(group.device());
  std::vector<at::Tensor> into;
  if (a.flattened_bucket) {
    at::Tensor bucket = at::empty({static_cast<int64_t>(a.bytes())}, on.dtype(at::kByte));
    group.receive({bucket});
    into = layout(a, bucket);
  } else {
    for (const auto& t : a.tensors) into.push_back(at::empty(t.shape, on.dtype(t.dtype)));
    group.receive(into);
  }
  auto set = std::make_shared<received_weights>(origin);
  for (size_t i = 0; i < a.tensors.size(); ++i) set->add(a.tensors[i].module, a.tensors[i].name, into[i]);
  return set;
}

void drain_announced(broadcast_group& group, const announcement& a) {
  c10::InferenceMode inference;
  const auto on = at::TensorOptions().device(group.device()).dtype(at::kByte);
  if (a.flattened_bucket) {
    group.receive({at::empty({static_cast<int64_t>(a.bytes())}, on)});
    return;
  }
  // One scratch buffer, as large as the largest tensor, under every receive (the values are dropped).
  uint64_t largest = 0;
  for (const auto& t : a.tensors) largest = std::max(largest, announced_bytes(t));
  at::Tensor scratch = at::empty({static_cast<int64_t>(largest)}, on);
  std::vector<at::Tensor> into;
  for (const auto& t : a.tensors)
    into.push_back(scratch.narrow(0, 0, static_cast<int64_t>(announced_bytes(t))).view(t.dtype).view(t.shape));
  group.receive(into);
}

}  // namespace refit::transfer
