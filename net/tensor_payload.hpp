// SGLang's update_weights_from_tensor payload: a base64 string of a pickle made with torch's multiprocessing
// reductions (ForkingPickler), decoded with the restricted reader (pickle_reader.hpp) into descriptors of
// shared storages and tensor views (msg::shared_payload). Nothing is opened here: the worker that owns the
// GPU (or the shared memory) opens the storages, after checking every view against them.
//
// Accepted objects (SGLang's MG/runtime/post_training/weights_updater.py): a list of (name, tensor) pairs
// for the single target module; a dict {module: payload}; with load_format "flattened_bucket" each payload
// is {"flattened_tensor": uint8 tensor, "metadata": [FlattenedTensorMetadata | SimpleNamespace]}.
// Tensors: torch.multiprocessing.reductions.rebuild_tensor over a storage shared by file name (torch's
// "file_system" strategy, CPU) or rebuild_cuda_tensor (CUDA IPC; SGLang's _rebuild_cuda_tensor_modified
// carries the GPU's UUID instead of its ordinal).
#pragma once

#include <string_view>

#include "messages/types.hpp"

namespace refit::net {

// Throws bad_request: "Failed to deserialize serialized_named_tensors: <why>" for anything it cannot read.
msg::shared_payload decode_tensor_payload(std::string_view base64, bool flattened_bucket);

}  // namespace refit::net
