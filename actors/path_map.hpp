// A joined worker reads checkpoints from its own filesystem: `refit worker --map-path SERVER=LOCAL` rewrites the
// folders an update names on the server (and the roots they must lie beneath) to where this host has them.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace refit::actors {

struct path_map {
  std::vector<std::pair<std::string, std::string>> prefixes;  // server folder -> local folder, first match wins

  // `path` with the first matching prefix replaced (a prefix matches whole path components); else unchanged.
  std::string map(const std::string& path) const {
    for (const auto& [from, to] : prefixes) {
      if (path.compare(0, from.size(), from) != 0) continue;
      if (path.size() == from.size()) return to;
      if (path[from.size()] == '/' || (!from.empty() && from.back() == '/')) return to + path.substr(from.size());
    }
    return path;
  }
};

}  // namespace refit::actors
