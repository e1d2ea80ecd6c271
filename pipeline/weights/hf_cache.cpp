#include "pipeline/weights/hf_cache.hpp"

#include <cstdlib>
#include <fstream>
#include <stdexcept>

namespace refit::weights {

namespace fs = std::filesystem;

fs::path hf_hub_cache() {
  if (const char* c = std::getenv("HF_HUB_CACHE"); c && *c) return c;
  if (const char* h = std::getenv("HF_HOME"); h && *h) return fs::path(h) / "hub";
  const char* home = std::getenv("HOME");
  return fs::path(home && *home ? home : "/") / ".cache" / "huggingface" / "hub";
}

bool looks_like_repo_id(std::string_view text) {
  auto part_ok = [](std::string_view p) {
    if (p.empty() || p.size() > 96 || p == "." || p == ".." || p.front() == '.' || p.front() == '-') return false;
    for (char c : p)
      if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' || c == '_' || c == '-')) return false;
    return p.find("..") == std::string_view::npos;
  };
  const auto slash = text.find('/');
  if (slash == std::string_view::npos) return part_ok(text);
  return part_ok(text.substr(0, slash)) && part_ok(text.substr(slash + 1));
}

std::optional<fs::path> find_cached_repo(std::string_view repo_id) {
  if (!looks_like_repo_id(repo_id)) return std::nullopt;
  std::string folder = "models--";
  for (char c : repo_id) folder += c == '/' ? std::string("--") : std::string(1, c);
  const fs::path repo = hf_hub_cache() / folder;
  std::ifstream ref(repo / "refs" / "main");
  std::string commit;
  if (!ref || !std::getline(ref, commit)) return std::nullopt;
  while (!commit.empty() && (commit.back() == '\r' || commit.back() == ' ')) commit.pop_back();
  if (commit.size() != 40 || commit.find_first_not_of("0123456789abcdef") != std::string::npos) return std::nullopt;
  const fs::path snapshot = repo / "snapshots" / commit;
  std::error_code ec;
  if (!fs::is_directory(snapshot, ec)) return std::nullopt;
  return snapshot;
}

std::string resolve_model_path(const std::string& path) {
  std::error_code ec;
  if (path.empty() || fs::exists(path, ec) || !looks_like_repo_id(path) || path.find('/') == std::string::npos) return path;
  if (auto snapshot = find_cached_repo(path)) return snapshot->string();
  throw std::runtime_error("Failed to download model: '" + path + "' is no folder here, and no model of that Hugging Face id is in the local "
                           "hub cache (" + hf_hub_cache().string() + "); refit does not download: fetch it first (huggingface-cli download " +
                           path + ")");
}

}  // namespace refit::weights
