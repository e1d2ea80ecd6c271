// --allowed-model-root: the folders update checkpoints may be read from.
#pragma once

#include <filesystem>
#include <optional>
#include <string>
#include <vector>

namespace refit::net {

// Where update checkpoints may be read from (--allowed-model-root). Paths are compared after
// resolving symlinks and "..": a path that does not exist yet resolves through its deepest
// existing parent and is then checked lexically.
class model_root_policy {
 public:
  model_root_policy() = default;
  // Each root must be an existing directory (a typo should stop the server, not lock it open or shut).
  explicit model_root_policy(const std::vector<std::filesystem::path>& roots);

  bool restricted() const { return !roots_.empty(); }
  const std::vector<std::filesystem::path>& roots() const { return roots_; }
  // The resolved path, which lies inside a root, or nullopt (every path is admitted when unrestricted).
  std::optional<std::filesystem::path> admit(const std::string& model_path) const;

  static std::filesystem::path resolve(const std::filesystem::path& p);

 private:
  std::vector<std::filesystem::path> roots_;  // resolved
};

}  // namespace refit::net
