// The module checksum of DESIGN.md section 4, one definition for the server, the CLI and the tests:
//   tensor_digest   = SHA-256(raw little-endian bytes of the whole tensor, row-major, in its dtype)
//   module_checksum = SHA-256 over the tensors in ascending byte order of name, each contributing
//                     name 0x00 dtype-code 0x00 dims-joined-by-"," 0x00 tensor_digest(32 bytes)
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
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

struct checksum_options {
  // Floating tensors are hashed as they would be held after conversion to this dtype.
  std::optional<dtype> float_dtype;
  unsigned threads = 0;  // 0: hardware concurrency
};

// Checksum of a module's weights on disk: streamed from the mapped files, tensors spread over threads.
std::string module_checksum(const module_weights& weights, const checksum_options& options = {});

}  // namespace refit::weights
