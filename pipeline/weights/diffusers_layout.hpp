// The Diffusers checkpoint layout: model_index.json at the root, one folder per component, each with
// config.json and either one NAME.safetensors or shards listed in NAME.safetensors.index.json.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "pipeline/weights/safetensors.hpp"

namespace refit::weights {

struct component_info {
  std::string name;        // "transformer", "vae", ...
  std::string library;     // "diffusers", "transformers"
  std::string class_name;  // "Flux2Transformer2DModel", ...
  std::filesystem::path dir;
  bool weight_bearing = false;
  std::optional<std::filesystem::path> index_file;   // sharded checkpoints
  std::vector<std::filesystem::path> weight_files;   // the shards, or the single file
};

struct model_layout {
  std::filesystem::path root;
  std::string pipeline_class;
  std::vector<component_info> components;  // in name order

  const component_info* find(std::string_view name) const;
  std::vector<std::string> weight_bearing_names() const;
};

// Reads model_index.json and locates each component's weights. Checks that every listed component
// has its folder, and that a weight folder is unambiguous. Does not open the safetensors files. Every
// folder and file is opened through `scope` (beneath the allowed model roots when restricted).
model_layout read_model_layout(const std::filesystem::path& root, const file_scope& scope = {});

// Where one tensor of a module lives.
struct tensor_location {
  size_t shard;               // index into module_weights::shards
  const tensor_entry* entry;  // inside that shard's header
};

// The validated weights of one component: all shards opened, the index consistent with them.
struct module_weights {
  std::string module;
  std::filesystem::path dir;
  std::vector<safetensors_file> shards;
  std::map<std::string, tensor_location> tensors;  // ascending by name (byte order)
  uint64_t total_bytes = 0;
};

module_weights open_module_weights(const component_info& component, const file_scope& scope = {});

// Opens a single component folder (config.json + weights) that is not part of a pipeline.
module_weights open_module_dir(const std::string& module, const std::filesystem::path& dir, const file_scope& scope = {});

}  // namespace refit::weights
