// Generated images kept for response_format "url" (SGLang's default): each response's images stay
// fetchable at /v1/images/<id>/content[?variant=i] for a bounded time and within a bounded amount of
// memory (oldest evicted first; one response larger than the bound is still kept until the next).
#pragma once

#include <chrono>
#include <cstdint>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

namespace refit::net {

class image_store {
 public:
  struct limits {
    std::chrono::seconds ttl{600};
    uint64_t max_bytes = 256ull << 20;
  };
  explicit image_store(limits l) : limits_(l) {}

  // Keeps one response's images under `id`; returns their URLs, relative to the server as SGLang's are:
  // /v1/images/<id>/content for one image, ...?variant=<i> (from 0) for several.
  std::vector<std::string> put(const std::string& id, std::vector<std::vector<uint8_t>> images, std::string mime);

  struct image {
    std::shared_ptr<const std::vector<uint8_t>> bytes;
    std::string mime;
  };
  // nullopt: unknown id or variant, expired, or evicted.
  std::optional<image> get(const std::string& id, size_t variant);

  const limits& bounds() const { return limits_; }

 private:
  struct entry {
    std::string id, mime;
    std::chrono::steady_clock::time_point stored;
    std::vector<std::shared_ptr<const std::vector<uint8_t>>> images;
    uint64_t bytes = 0;
  };
  void evict_locked(std::chrono::steady_clock::time_point now);

  limits limits_;
  std::mutex mu_;
  std::deque<entry> entries_;  // oldest first
  uint64_t bytes_ = 0;
};

}  // namespace refit::net
