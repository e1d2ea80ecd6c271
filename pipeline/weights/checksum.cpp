#include "pipeline/weights/checksum.hpp"

#include <openssl/evp.h>

#include <algorithm>
#include <stdexcept>

#include "pipeline/weights/convert.hpp"
#include "pipeline/weights/parallel.hpp"

namespace refit::weights {

struct sha256::impl {
  EVP_MD_CTX* ctx = nullptr;
};

sha256::sha256() : impl_(std::make_unique<impl>()) {
  impl_->ctx = EVP_MD_CTX_new();
  if (!impl_->ctx || EVP_DigestInit_ex(impl_->ctx, EVP_sha256(), nullptr) != 1)
    throw std::runtime_error("OpenSSL: cannot initialise SHA-256");
}

sha256::~sha256() { EVP_MD_CTX_free(impl_->ctx); }

void sha256::update(std::span<const std::byte> bytes) {
  if (!bytes.empty()) EVP_DigestUpdate(impl_->ctx, bytes.data(), bytes.size());
}

void sha256::update(std::string_view text) {
  if (!text.empty()) EVP_DigestUpdate(impl_->ctx, text.data(), text.size());
}

digest sha256::finish() {
  digest d{};
  unsigned len = 0;
  EVP_DigestFinal_ex(impl_->ctx, d.data(), &len);
  return d;
}

std::string to_hex(std::span<const uint8_t> bytes) {
  static constexpr char hex[] = "0123456789abcdef";
  std::string s;
  s.reserve(bytes.size() * 2);
  for (uint8_t b : bytes) {
    s.push_back(hex[b >> 4]);
    s.push_back(hex[b & 0xF]);
  }
  return s;
}

std::string combine_module_checksum(std::vector<tensor_digest_record> records) {
  std::sort(records.begin(), records.end(), [](const auto& a, const auto& b) { return a.name < b.name; });
  sha256 h;
  const std::string_view nul("\0", 1);
  for (const auto& r : records) {
    h.update(r.name);
    h.update(nul);
    h.update(dtype_name(r.type));
    h.update(nul);
    std::string dims;
    for (size_t i = 0; i < r.shape.size(); ++i) {
      if (i) dims += ',';
      dims += std::to_string(r.shape[i]);
    }
    h.update(dims);
    h.update(nul);
    h.update(std::as_bytes(std::span(r.tensor_digest)));
  }
  auto d = h.finish();
  return to_hex(d);
}

std::string_view checksum_format_name(checksum_format f) { return f == checksum_format::sglang ? "sglang" : "refit"; }

std::optional<checksum_format> parse_checksum_format(std::string_view name) {
  if (name == "sglang") return checksum_format::sglang;
  if (name == "refit") return checksum_format::refit;
  return std::nullopt;
}

void sglang_checksum::begin(std::string_view name) {
  if (any_ && !(last_ < name)) throw std::logic_error("sglang_checksum: tensor '" + std::string(name) + "' out of name order");
  last_ = name;
  any_ = true;
  hash_.update(name);
}

void sglang_checksum::add(std::string_view name, std::span<const std::byte> bytes) {
  begin(name);
  hash_.update(bytes);
}

std::string sglang_checksum::finish() {
  const digest d = hash_.finish();
  return to_hex(d);
}

namespace {

// Feeds a stored tensor's bytes to `h`, as they are held after conversion from `stored` to `held`.
template <class Hash>
void hash_bytes(Hash& h, std::span<const std::byte> src, dtype stored, dtype held) {
  if (stored == held) {
    constexpr size_t chunk = 8u << 20;
    for (size_t off = 0; off < src.size(); off += chunk) h.update(src.subspan(off, std::min(chunk, src.size() - off)));
    return;
  }
  const size_t in_size = dtype_bits(stored) / 8, out_size = dtype_bits(held) / 8;
  const uint64_t count = src.size() / in_size;
  constexpr uint64_t chunk_elems = 1u << 20;
  std::vector<std::byte> buf(std::min<uint64_t>(count, chunk_elems) * out_size);
  for (uint64_t i = 0; i < count; i += chunk_elems) {
    uint64_t n = std::min(chunk_elems, count - i);
    convert_elements(stored, src.data() + i * in_size, held, buf.data(), n);
    h.update(std::span(buf.data(), n * out_size));
  }
}

digest hash_tensor(std::span<const std::byte> src, dtype stored, dtype held) {
  sha256 h;
  hash_bytes(h, src, stored, held);
  return h.finish();
}

// SGLang's formula is one stream over the tensors in name order (weights.tensors is ordered by name).
std::string sglang_module_checksum(const module_weights& weights, const checksum_options& options) {
  sglang_checksum h;
  for (const auto& [name, loc] : weights.tensors) {
    if (options.exclude.count(name)) continue;
    const tensor_entry& t = *loc.entry;
    h.begin(name);
    hash_bytes(h, weights.shards[loc.shard].bytes(t), t.type, held_dtype(t.type, options.float_dtype));
  }
  for (const auto& shard : weights.shards) shard.check_unchanged();
  return h.finish();
}

}  // namespace

std::string module_checksum(const module_weights& weights, const checksum_options& options) {
  if (options.format == checksum_format::sglang) return sglang_module_checksum(weights, options);
  std::vector<const std::pair<const std::string, tensor_location>*> order;
  for (const auto& kv : weights.tensors)
    if (!options.exclude.count(kv.first)) order.push_back(&kv);
  // Largest first, so one big tensor does not start last and leave the other threads idle.
  std::stable_sort(order.begin(), order.end(), [](auto* a, auto* b) { return a->second.entry->nbytes() > b->second.entry->nbytes(); });
  std::vector<tensor_digest_record> records(order.size());
  parallel_for_each(order.size(), options.threads, [&](size_t i) {
    const auto& [name, loc] = *order[i];
    const tensor_entry& t = *loc.entry;
    const dtype held = held_dtype(t.type, options.float_dtype);
    records[i] = {name, held, t.shape, hash_tensor(weights.shards[loc.shard].bytes(t), t.type, held)};
  });
  for (const auto& shard : weights.shards) shard.check_unchanged();
  return combine_module_checksum(std::move(records));
}

}  // namespace refit::weights
