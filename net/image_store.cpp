#include "net/image_store.hpp"

namespace refit::net {

void image_store::evict_locked(std::chrono::steady_clock::time_point now) {
  while (!entries_.empty() && (now - entries_.front().stored > limits_.ttl || (bytes_ > limits_.max_bytes && entries_.size() > 1))) {
    bytes_ -= entries_.front().bytes;
    entries_.pop_front();
  }
}

std::vector<std::string> image_store::put(const std::string& id, std::vector<std::vector<uint8_t>> images, std::string mime) {
  entry e;
  e.id = id;
  e.mime = std::move(mime);
  e.stored = std::chrono::steady_clock::now();
  std::vector<std::string> urls;
  for (size_t i = 0; i < images.size(); ++i) {
    e.bytes += images[i].size();
    e.images.push_back(std::make_shared<const std::vector<uint8_t>>(std::move(images[i])));
    urls.push_back("/v1/images/" + id + "/content" + (images.size() > 1 ? "?variant=" + std::to_string(i) : ""));
  }
  std::lock_guard lock(mu_);
  bytes_ += e.bytes;
  entries_.push_back(std::move(e));
  evict_locked(entries_.back().stored);
  return urls;
}

std::optional<image_store::image> image_store::get(const std::string& id, size_t variant) {
  std::lock_guard lock(mu_);
  evict_locked(std::chrono::steady_clock::now());
  for (const auto& e : entries_)
    if (e.id == id) {
      if (variant >= e.images.size()) return std::nullopt;
      return image{e.images[variant], e.mime};
    }
  return std::nullopt;
}

}  // namespace refit::net
