#include "pipeline/weights/staging_geometry.hpp"

#include <algorithm>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <thread>

namespace refit::weights {

namespace {

constexpr uint64_t MiB = 1ull << 20;

// sysfs writes sizes as "32768K" (or "300M").
uint64_t parse_size(const std::string& s) {
  if (s.empty()) return 0;
  size_t used = 0;
  uint64_t v = 0;
  try {
    v = std::stoull(s, &used);
  } catch (const std::exception&) {
    return 0;
  }
  const char unit = used < s.size() ? s[used] : '\0';
  if (unit == 'K') return v << 10;
  if (unit == 'M') return v << 20;
  if (unit == 'G') return v << 30;
  return v;
}

unsigned env_count(const char* name) {
  const char* v = std::getenv(name);
  if (!v) return 0;
  char* end = nullptr;
  const long n = std::strtol(v, &end, 10);
  if (end == v || *end != '\0' || n <= 0 || n > 4096) throw std::invalid_argument(std::string(name) + "='" + v + "' is not a positive number (at most 4096)");
  return static_cast<unsigned>(n);
}

}  // namespace

uint64_t last_level_cache_bytes() {
  namespace fs = std::filesystem;
  std::error_code ec;
  uint64_t best = 0;
  int best_level = 0;
  for (const auto& e : fs::directory_iterator("/sys/devices/system/cpu/cpu0/cache", ec)) {
    if (e.path().filename().string().rfind("index", 0) != 0) continue;
    std::ifstream level_file(e.path() / "level"), size_file(e.path() / "size"), type_file(e.path() / "type");
    int level = 0;
    std::string size, type;
    level_file >> level;
    size_file >> size;
    type_file >> type;
    if (type == "Instruction") continue;
    if (level > best_level || (level == best_level && parse_size(size) > best)) {
      best_level = level;
      best = parse_size(size);
    }
  }
  return best;
}

staging_geometry staging_geometry_for(uint64_t llc_bytes, unsigned hardware_threads) {
  staging_geometry g;
  g.llc_bytes = llc_bytes;
  g.threads = std::clamp(hardware_threads, 1u, 16u);
  g.slots = 2 * g.threads;
  const uint64_t ring = llc_bytes ? llc_bytes / 2 : 128 * MiB;  // unknown: what measured well on an H200 host
  uint64_t slot = 2 * MiB;
  while (slot * 2 <= 32 * MiB && slot * 2 * g.slots <= ring) slot *= 2;
  g.slot_bytes = slot;
  g.source = llc_bytes ? "half the " + std::to_string(llc_bytes / MiB) + " MiB last-level cache" : "last-level cache unknown";
  return g;
}

staging_geometry choose_staging_geometry() {
  staging_geometry g = staging_geometry_for(last_level_cache_bytes(), std::thread::hardware_concurrency());
  const unsigned slot_mb = env_count("REFIT_STAGING_SLOT_MB"), slots = env_count("REFIT_STAGING_SLOTS");
  if (slot_mb) g.slot_bytes = uint64_t{slot_mb} * MiB;
  if (slots) g.slots = slots;
  if (slot_mb || slots) g.source = "REFIT_STAGING_SLOT_MB / REFIT_STAGING_SLOTS";
  if (const unsigned streams = env_count("REFIT_STAGING_STREAMS")) {
    if (streams > 8) throw std::invalid_argument("REFIT_STAGING_STREAMS=" + std::to_string(streams) + ": at most 8 copy streams");
    g.copy_streams = streams;
  }
  return g;
}

}  // namespace refit::weights
