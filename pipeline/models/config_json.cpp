#include "pipeline/models/config_json.hpp"

#include <fstream>
#include <stdexcept>

namespace refit::models {

nlohmann::json read_config_json(const std::filesystem::path& path) {
  std::ifstream in(path);
  if (!in) throw std::runtime_error(path.string() + ": cannot be read");
  nlohmann::json j = nlohmann::json::parse(in, nullptr, /*allow_exceptions=*/false);
  if (!j.is_object()) throw std::runtime_error(path.string() + ": not a JSON object");
  return j;
}

}  // namespace refit::models
