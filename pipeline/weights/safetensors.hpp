// Strict reader and writer of the safetensors format.
//
// File: u64 little-endian N | N bytes of JSON header | data area. Every header entry is
// {"dtype", "shape", "data_offsets": [begin, end]} relative to the data area; the entries tile the
// data area exactly. refit checks every rule and names the file, the tensor and the rule broken.
#pragma once

#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "pipeline/weights/beneath.hpp"
#include "pipeline/weights/dtype.hpp"
#include "pipeline/weights/weight_error.hpp"

namespace refit::weights {

inline constexpr uint64_t max_header_bytes = 100'000'000;

struct tensor_entry {
  std::string name;
  dtype type = dtype::U8;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // offsets into the data area
  uint64_t end = 0;

  uint64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

struct safetensors_header {
  uint64_t header_len = 0;        // N
  uint64_t data_offset = 0;       // 8 + N: where the data area starts in the file
  uint64_t data_size = 0;
  std::vector<tensor_entry> tensors;  // ascending by name
  std::map<std::string, std::string> metadata;

  const tensor_entry* find(std::string_view name) const;
};

// Parses and validates a header. `prefix` holds the first bytes of the file (at least the 8-byte
// length and the header itself when they fit in the file); `file_size` is the whole file's size.
// `label` names the file in error messages. Throws weight_error.
safetensors_header parse_header(std::string_view label, std::span<const std::byte> prefix, uint64_t file_size);

// A validated safetensors file, mapped read-only.
class safetensors_file {
 public:
  // Opened through `scope` (beneath the allowed model roots when it is restricted).
  static safetensors_file open(const std::filesystem::path& path, const file_scope& scope = {});

  safetensors_file(safetensors_file&&) noexcept;
  safetensors_file& operator=(safetensors_file&&) noexcept;
  ~safetensors_file();

  const std::filesystem::path& path() const { return path_; }
  const safetensors_header& header() const { return header_; }
  uint64_t file_size() const { return file_size_; }
  int fd() const { return fd_; }

  // The tensor's bytes inside the mapping.
  std::span<const std::byte> bytes(const tensor_entry& t) const;
  // Offset of the tensor's first byte in the file (for pread).
  uint64_t file_offset(const tensor_entry& t) const { return header_.data_offset + t.begin; }
  // Share of the file's pages in the page cache (mincore over the mapping): near 0 means a cold read.
  double resident_fraction() const;
  // Throws when the file's size or modification time differs from when it was opened: someone wrote it
  // while it was read (a trainer saving over the checkpoint in place), so what was read may be torn.
  // Reads go through the descriptor opened here, so a file replaced by a rename is never a problem.
  void check_unchanged() const;
  // Whether `fd` refers to this very file (the same inode), e.g. a second descriptor opened by path.
  bool same_file(int fd) const;
  // A second descriptor of this very file with other `flags` (O_DIRECT), opened by path through the same
  // scope; not open when the path no longer names this file or cannot be opened.
  unique_fd reopen(int flags) const;

 private:
  safetensors_file() = default;
  std::filesystem::path path_;
  file_scope scope_;
  safetensors_header header_;
  uint64_t file_size_ = 0;
  int64_t mtime_ns_ = 0;
  uint64_t dev_ = 0, ino_ = 0;
  int fd_ = -1;
  const std::byte* map_ = nullptr;
};

struct tensor_spec {
  std::string name;
  dtype type;
  std::vector<int64_t> shape;
};

// Writes a safetensors file that Python's `safetensors` reads. The layout is fixed up front (tensors
// ordered by element width, widest first, then by name, header padded to 8 bytes with spaces), so
// tensors can be written in any order and from several threads. The file appears under its final
// name only after finish(); a writer destroyed before that removes its temporary file.
class safetensors_writer {
 public:
  safetensors_writer(std::filesystem::path path, std::vector<tensor_spec> tensors,
                     std::map<std::string, std::string> metadata = {});
  ~safetensors_writer();
  safetensors_writer(const safetensors_writer&) = delete;
  safetensors_writer& operator=(const safetensors_writer&) = delete;

  const safetensors_header& layout() const { return layout_; }
  // Thread-safe for distinct tensors. `data` must hold exactly the tensor's byte length.
  void write(std::string_view name, std::span<const std::byte> data);
  void finish();

 private:
  std::filesystem::path path_, tmp_path_;
  safetensors_header layout_;
  std::vector<uint8_t> written_;
  int fd_ = -1;
  bool finished_ = false;
};

// One tensor as a complete safetensors file in memory (header padded to 8 bytes with spaces, no metadata):
// what Python's safetensors.torch.save({name: t}) makes, e.g. for SGLang's rollout responses.
std::vector<uint8_t> encode_safetensors(const tensor_spec& tensor, std::span<const std::byte> data);

}  // namespace refit::weights
