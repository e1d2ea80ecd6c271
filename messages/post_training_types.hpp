// The message structs of SGLang's post-training API beyond checkpoints and broadcasts: LoRA adapters and their
// operations, tensors a colocated trainer shares, and release/resume of device memory. Part of the protocol
// (types.hpp includes it); registered in msg::add_types like the rest.
#pragma once

#include <caf/meta/load_callback.hpp>
#include <caf/meta/type_name.hpp>

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "messages/load_enum.hpp"

namespace refit::msg {

// One LoRA adapter of a merge: under which nickname, read from where, at which strength.
struct lora_entry {
  std::string nickname;
  std::string path;       // a folder or .safetensors file; empty: the adapter kept under the nickname
  double strength = 1;
  int32_t alpha = 0;      // the training alpha when the files do not give it (SGLang's lora_alpha); 0: none
  bool received = false;  // the adapter is the tensors the worker received for this update (lora_merge)
  int32_t rank = 0;       // the rank every layer must have (SGLang's lora_rank); 0: any
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, lora_entry& x) {
  return f(caf::meta::type_name("lora_entry"), x.nickname, x.path, x.strength, x.alpha, x.received, x.rank);
}

// Tensors a colocated trainer shares (SGLang's update_weights_from_tensor), as the HTTP layer decoded them
// from the trainer's pickle: where each storage lives and how each tensor views it. Nothing is opened yet.
enum class storage_kind : uint8_t { shared_memory, cuda_ipc };

struct shared_storage {
  storage_kind kind = storage_kind::shared_memory;
  std::string handle;      // shared_memory: torch's segment name ("/torch_<pid>_<n>_<n>"); cuda_ipc: the 64-byte handle
  uint64_t size_bytes = 0; // the storage's size
  uint64_t offset_bytes = 0;  // cuda_ipc: where the storage starts in the IPC allocation
  std::string device;      // cuda_ipc: the producer's GPU (its UUID "GPU-..." or an ordinal)
  std::string event_handle;   // cuda_ipc: the producer's event to wait for (64 bytes), or empty
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, shared_storage& x) {
  auto kind = static_cast<uint8_t>(x.kind);
  return f(caf::meta::type_name("shared_storage"), kind, x.handle, x.size_bytes, x.offset_bytes, x.device, x.event_handle,
           caf::meta::load_callback([&] { return load_enum(x.kind, kind, storage_kind::cuda_ipc, "storage kind"); }));
}

struct shared_tensor {
  std::string module;  // empty: the request's single target module
  std::string name;
  std::string dtype;   // torch's name: "bfloat16", ...
  std::vector<int64_t> shape, stride;  // stride in elements
  uint64_t offset_bytes = 0;           // of the first element in its storage
  uint32_t storage = 0;                // index into the payload's storages
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, shared_tensor& x) {
  return f(caf::meta::type_name("shared_tensor"), x.module, x.name, x.dtype, x.shape, x.stride, x.offset_bytes, x.storage);
}

struct shared_payload {
  std::vector<shared_storage> storages;
  std::vector<shared_tensor> tensors;
  std::string gpu_uuid;  // payload_gpu_uuids: the GPU it was exported from ("" when not given)
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, shared_payload& x) {
  return f(caf::meta::type_name("shared_payload"), x.storages, x.tensors, x.gpu_uuid);
}

// SGLang's LoRA operations (/v1/set_lora, merge_lora_weights, unmerge_lora_weights) on one target.
enum class lora_op : uint8_t { set, merge, unmerge };

struct lora_request {
  lora_op op = lora_op::set;
  std::vector<lora_entry> adapters;  // set: what to merge, in order (path empty: an adapter loaded before)
  std::string target = "all";        // "all" or a module name
  double strength = 1;               // merge: the strength every adapter set on the target is merged at
  std::string weight_version;        // empty: derived from the base's version and the adapters
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, lora_request& x) {
  auto op = static_cast<uint8_t>(x.op);
  return f(caf::meta::type_name("lora_request"), op, x.adapters, x.target, x.strength, x.weight_version,
           caf::meta::load_callback([&] { return load_enum(x.op, op, lora_op::unmerge, "LoRA operation"); }));
}

// SGLang's /v1/list_loras: the adapters loaded (nickname, path), and per module those merged now.
struct lora_status {
  std::vector<lora_entry> loaded;
  std::map<std::string, std::vector<lora_entry>> active;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, lora_status& x) {
  return f(caf::meta::type_name("lora_status"), x.loaded, x.active);
}

// SGLang's release_memory_occupation / resume_memory_occupation: {success, sleeping, message}, plus what
// moved and what the devices hold before and after (bytes in use as the driver reports it, summed over GPUs).
struct memory_result {
  bool success = false;
  bool sleeping = false;
  std::string message;
  uint64_t moved_bytes = 0;
  uint64_t device_used_before = 0;
  uint64_t device_used_after = 0;
  double seconds = 0;
};

template <class Inspector>
typename Inspector::result_type inspect(Inspector& f, memory_result& x) {
  return f(caf::meta::type_name("memory_result"), x.success, x.sleeping, x.message, x.moved_bytes, x.device_used_before,
           x.device_used_after, x.seconds);
}

}  // namespace refit::msg
