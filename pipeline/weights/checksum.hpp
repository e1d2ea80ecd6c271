// The module checksums of DESIGN.md section 4, one implementation for the server, the CLI and the tests.
//   sglang (the default everywhere; SGLang's compute_weights_checksum, so its clients and tests work):
//     SHA-256 over the module's parameters in ascending byte order of name, each contributing its name's
//     UTF-8 bytes and then its raw little-endian bytes (row-major, in the dtype held); buffers are left out
//   refit (self-describing, verifiable per tensor):
//     tensor_digest   = SHA-256(raw little-endian bytes of the whole tensor, row-major, in its dtype)
//     module_checksum = SHA-256 over the tensors in ascending byte order of name, each contributing
//                       name 0x00 dtype-code 0x00 dims-joined-by-"," 0x00 tensor_digest(32 bytes)
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pipeline/weights/diffusers_layout.hpp"
#include "pipeline/weights/dtype.hpp"

namespace refit::weights {

using digest = std::array<uint8_t, 32>;

class sha256 {
 public:
  sha256();
  ~sha256();
  sha256(const sha256&) = delete;
  sha256& operator=(const sha256&) = delete;
  void update(std::span<const std::byte> bytes);
  void update(std::string_view text);
  digest finish();

 private:
  struct impl;
  std::unique_ptr<impl> impl_;
};

std::string to_hex(std::span<const uint8_t> bytes);

struct tensor_digest_record {
  std::string name;
  dtype type;
  std::vector<int64_t> shape;
  digest tensor_digest;
};

// Combines per-tensor digests into the module checksum (hex). Order of `records` does not matter.
std::string combine_module_checksum(std::vector<tensor_digest_record> records);

enum class checksum_format : uint8_t { sglang, refit };
std::string_view checksum_format_name(checksum_format f);  // sglang, refit
std::optional<checksum_format> parse_checksum_format(std::string_view name);

// SGLang's checksum, fed one tensor at a time in ascending byte order of name (checked).
class sglang_checksum {
 public:
  void add(std::string_view name, std::span<const std::byte> bytes);
  // The next tensor's bytes may also come in pieces: begin(name), then update() as often as needed.
  void begin(std::string_view name);
  void update(std::span<const std::byte> bytes) { hash_.update(bytes); }
  std::string finish();  // hex

 private:
  sha256 hash_;
  std::string last_;
  bool any_ = false;
};

struct checksum_options {
  // Floating tensors are hashed as they would be held after conversion to this dtype.
  std::optional<dtype> float_dtype;
  unsigned threads = 0;  // 0: hardware concurrency (the refit format; SGLang's is one stream)
  checksum_format format = checksum_format::refit;
  // Tensors left out: a module's buffers, which SGLang's formula does not cover.
  std::set<std::string> exclude;
};

// Checksum of a module's weights on disk, streamed from the mapped files.
std::string module_checksum(const module_weights& weights, const checksum_options& options = {});

}  // namespace refit::weights
