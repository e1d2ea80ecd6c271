#include "net/model_root_policy.hpp"

#include <algorithm>
#include <stdexcept>

namespace refit::net {

namespace fs = std::filesystem;

fs::path model_root_policy::resolve(const fs::path& p) {
  // weakly_canonical resolves symlinks and ".." through the deepest existing prefix and normalises
  // the rest lexically; absolute() first so a relative path cannot stay relative.
  std::error_code ec;
  fs::path r = fs::weakly_canonical(fs::absolute(p, ec), ec);
  if (ec) r = fs::absolute(p, ec).lexically_normal();  // e.g. a parent we may not read: judge the text
  if (!r.has_filename() && r.has_parent_path() && r != r.root_path()) r = r.parent_path();  // drop a trailing '/'
  return r;
}

model_root_policy::model_root_policy(const std::vector<fs::path>& roots) {
  for (const auto& root : roots) {
    std::error_code ec;
    if (!fs::is_directory(root, ec))
      throw std::invalid_argument("--allowed-model-root " + root.string() + " is not an existing directory");
    roots_.push_back(resolve(root));
  }
}

std::optional<fs::path> model_root_policy::admit(const std::string& model_path) const {
  const fs::path resolved = resolve(model_path);
  if (roots_.empty()) return resolved;
  for (const auto& root : roots_) {
    // Component-wise prefix: /data/ckpt does not contain /data/ckpt-evil.
    auto [r, p] = std::mismatch(root.begin(), root.end(), resolved.begin(), resolved.end());
    if (r == root.end()) return resolved;
  }
  return std::nullopt;
}

}  // namespace refit::net
