// Reading the JSON configs of a checkpoint (config.json, scheduler_config.json, model_index.json, ...).
#pragma once

#include <nlohmann/json.hpp>

#include <filesystem>

namespace refit::models {

// The file's JSON object; throws std::runtime_error naming the file when it cannot be read or is not one.
nlohmann::json read_config_json(const std::filesystem::path& path);

}  // namespace refit::models
